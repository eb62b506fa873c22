"""The shard format's reader: a published shard set, in a local folder or at ``s3://bucket/prefix``.

Owns every read of what the sharder publishes (the loaders, incremental builds and export read shards
only through it):

* **Opening a shard root** (``ShardReader``): a folder, or a prefix in an object store read through
  flora/store.py's client (endpoint, credentials and region from the standard AWS environment and
  config files; throttling such as ``503 SlowDown`` and dropped connections retried there). Of a store,
  ``manifest.json`` is fetched when the root is opened, a class mapping when it is asked for and a
  shard's ``.idx`` when its samples are read, into ``store_meta/<store>/`` under the cache root (never
  into the store, which may be read-only), so that schema.py's parsers read them; their errors name
  the store location, not the mirror. A store prefix without a manifest, or with another tool's, is a
  ``RemoteShardError`` (one line). Tars are never copied to disk.
* **Its shards** (``shards``): the manifest's tars of one split (and regions), each a ``Shard``: its
  location, its size and sha256 as listed, and its tombstones (keys of samples an incremental build
  removed), which ``samples`` never yields.
* **A tar's samples**: ``samples`` (``tar_samples`` for one local tar, e.g. a build's own) yields a
  ``TarSample`` (key, label from ``cls``, jpg bytes, ``SampleMeta``) per sample in index order,
  reading only the members asked for, by the ``.idx`` offsets. ``scan`` gives a checker that must see
  damaged samples too (the loaders' scan) each sample's index entry and its members' bytes, reading a
  tar in the store front to back in one GET (``TarStream``) that hashes it on the way, so checking the
  manifest's sha256 costs no second read.
* **Sample tables** (``table``): the publisher's table of a tar's samples, used instead of a scan when
  it names the tar's current ETag and the manifest's sha256 (the store vouches for the bytes: an ETag
  is the store's checksum of the object it holds). A store without tables (a local build copied with
  ``aws s3 sync``) or with a tar replaced since is scanned.
* **Stamps** (``tar_stamp``): a tar's size and ETag (one HEAD), or a local tar's size and mtime.
* **Byte access** (``open_tar``): a tar as a file for ``seek`` + ``read``: the local file, or a
  ``RangeReader`` (one ranged GET per read: a loader reads each sample's jpg once, nothing else).

Leaves out: the format itself (schema.py: layout, keys, the manifest, index files, sample tables),
writing (writer.py; the sharder's publish step, sharding/build/remote.py), and what readers do with
the samples: selection and verification (loaders/), keeping or tombstoning them (incremental.py).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from flora import store
from flora.io import atomic_write_bytes, sha256_file
from flora.sharding.cache.derived import derived_dir
from flora.sharding.format.schema import (
    MANIFEST,
    MEMBERS,
    IndexEntry,
    SampleMeta,
    ShardFormatError,
    class_mapping_name,
    read_class_mapping,
    read_index,
    read_manifest,
    read_table,
    table_name,
)
from flora.store import S3Url, is_remote

#: Bytes read per call from a tar's stream during a scan (large enough that per-call overhead vanishes).
STREAM_CHUNK = 1 << 20
#: Manifest keys that every Flora shard entry carries (a manifest.json of another tool lacks them).
ENTRY_KEYS = ("path", "split", "region")

#: A member's ``(data offset, size, member name)`` -> its bytes.
MemberGetter = Callable[[tuple[int, int, str]], bytes]


class RemoteShardError(store.StoreError):
    """A shard root in the store is not one Flora can read (no manifest, a foreign manifest, a listed
    tar's index missing); the message names the location."""


@dataclass(frozen=True)
class Shard:
    """One tar of a shard set, as the manifest lists it."""

    path: Path | str  # absolute tar path, or its s3:// URL
    rel: str  # as in the manifest
    split: str
    region: str
    bytes: int = 0  # the manifest's size of the tar (0: not recorded)
    sha256: str = ""  # the manifest's sha256 of the tar ("": not recorded)
    tombstones: frozenset[str] = frozenset()  # keys the manifest says are removed (incremental builds)


class TarSample(NamedTuple):
    """One sample of a tar; a member not asked for, or absent, is None."""

    key: str
    label: int | None  # the ``cls`` member's
    jpg: bytes | None
    meta: SampleMeta | None  # the ``json`` member


# ------------------------------------------------------------------------------------------ a shard root
class ShardReader:
    """A shard root (a folder or an ``s3://`` prefix) opened for reading: its manifest, shards, class
    mappings and samples. Raises ``ShardFormatError`` or ``StoreError`` (one line each)."""

    def __init__(self, root: str | Path, cache_root: str | None = None):
        self.remote = is_remote(root)
        self.root: Path | str = S3Url.parse(str(root)).url if self.remote else Path(root).resolve()
        #: Where manifest.json, class mappings and .idx files are read: the folder, or the store's mirror.
        self.meta = _mirror(self.root, cache_root) if self.remote else self.root
        if self.remote:
            self._fetch_manifest()
        with self._store_names():
            self.manifest = read_manifest(self.meta)

    def shards(self, split: str, regions: list[str] | None = None) -> list[Shard]:
        """The tars of ``split`` (of ``regions`` when given), by path; errors name what exists."""
        with self._store_names():
            entries = self.manifest.select(split, regions)
            return [
                Shard(
                    path=S3Url.parse(self.root).join(e.path).url if self.remote else self.manifest.path(e),
                    rel=e.path,
                    split=e.split,
                    region=e.region,
                    bytes=e.bytes,
                    sha256=e.sha256,
                    tombstones=frozenset(e.tombstones),
                )
                for e in entries
            ]

    def class_mapping(self, region: str | None = None) -> dict[str, int]:
        """``class_mapping.json`` (or a region's own): species -> 0..K-1."""
        if self.remote:
            self._fetch(class_mapping_name(region))
        with self._store_names():
            return read_class_mapping(self.meta, region)

    def index(self, shard: Shard) -> list[IndexEntry]:
        """The samples of a tar, ``ext -> (offset, size, member)`` each (schema.read_index)."""
        with self._store_names():
            return read_index(self._fetch_index(shard) if self.remote else Path(shard.path))

    def samples(self, shard: Shard, members: Iterable[str] = MEMBERS) -> Iterator[TarSample]:
        """Each sample of a tar that the manifest does not tombstone, in index order, with the
        ``members`` asked for read by offset (in the store: one ranged GET per member)."""
        entries = self.index(shard)
        with open_tar(shard.path) as f:
            yield from _samples(shard.path, f, entries, members, lambda key: key not in shard.tombstones)

    def scan(self, shard: Shard, size: int) -> TarScan:
        """Every sample of a tar, damaged ones included, for a checker (``TarScan``); ``size`` is the
        tar's (``tar_stamp``)."""
        return TarScan(shard, self.index(shard), size)

    def table(self, shard: Shard, size: int, etag: str) -> list[list] | None:
        """The rows of the sample table beside a tar in the store if it describes the object there now
        (the manifest's sha256; the object's size and ETag, which the store computes from the bytes it
        holds); None otherwise, and for a local tar: then the tar is scanned."""
        tar_url = str(shard.path)
        if not self.remote or not shard.sha256 or not tar_url.endswith(".tar"):
            return None
        data = store.read_bytes(S3Url.parse(table_name(tar_url)))
        if data is None:
            return None
        try:
            table = read_table(data)
        except ShardFormatError:
            return None
        found = (table.get("tar_sha256"), table.get("tar_bytes"), table.get("tar_etag"))
        return table["rows"] if found == (shard.sha256, size, str(etag).strip('"')) else None

    # ------------------------------------------------------------------------- the store's mirror
    @contextmanager
    def _store_names(self) -> Iterator[None]:
        """A format error about the mirror, told about the store location instead."""
        try:
            yield
        except ShardFormatError as exc:
            if not self.remote:
                raise
            raise ShardFormatError(str(exc).replace(str(self.meta), self.root.rstrip("/"))) from None

    def _fetch_manifest(self) -> None:
        """Mirrors the store's manifest: a missing one, or another tool's, is a ``RemoteShardError``."""
        root = S3Url.parse(self.root)
        data = store.read_bytes(root.join(MANIFEST))
        if data is None:
            raise RemoteShardError(
                f"no {MANIFEST} at {root.url}: not a shard root (build shards there first: "
                f"flora build --out {root.url}; or check the prefix)"
            )
        _check_manifest(data, root)
        _put(self.meta / MANIFEST, data)

    def _fetch(self, name: str) -> None:
        """Mirrors the root's file ``name``; an absent one leaves the mirror (the format's reader then
        names it missing)."""
        data = store.read_bytes(S3Url.parse(self.root).join(name))
        if data is None:
            (self.meta / name).unlink(missing_ok=True)
        else:
            _put(self.meta / name, data)

    def _fetch_index(self, shard: Shard) -> Path:
        """Mirrors the ``.idx`` beside a tar in the store; returns the mirror's *tar* path (absent:
        schema.read_index reads the ``.idx`` beside it)."""
        rel, tar_url = shard.rel, str(shard.path)
        stem = rel[: -len(".tar")] if rel.endswith(".tar") else rel
        idx = S3Url.parse(tar_url[: -len(".tar")] + ".idx" if tar_url.endswith(".tar") else tar_url + ".idx")
        data = store.read_bytes(idx)
        if data is None:
            raise RemoteShardError(
                f"no index {idx.url} beside its tar: the store needs the .idx files the sharder writes "
                "(publish the whole shard folder)"
            )
        _put(self.meta / f"{stem}.idx", data)
        return self.meta / f"{stem}.tar"


def _mirror(url: str, cache_root: str | None) -> Path:
    """The local folder holding a store's mirrored metadata (manifest, class mappings, .idx files)."""
    mirror = derived_dir("store_meta", url, cache_root)
    try:
        mirror.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache root: a private folder for this process
        mirror = Path(tempfile.mkdtemp(prefix="flora-store-meta-"))
    return mirror.resolve()


def _put(path: Path, data: bytes) -> None:
    """Writes ``data`` atomically (ranks of one node may mirror the same store at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _check_manifest(data: bytes, root: S3Url) -> None:
    where = root.join(MANIFEST).url
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise RemoteShardError(f"{where}: not JSON ({exc}); expected a Flora shard manifest") from None
    shards = raw.get("shards") if isinstance(raw, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and all(k in s for k in ENTRY_KEYS) for s in shards
    ):
        keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise RemoteShardError(
            f"{where} is not a Flora shard manifest (expected a 'shards' list of entries with "
            f"{', '.join(ENTRY_KEYS)}; found {keys}): another data set's manifest?"
        )


# --------------------------------------------------------------------------------------------- one tar
def tar_samples(
    tar: Path, members: Iterable[str] = MEMBERS, keys: Collection[str] | None = None
) -> Iterator[TarSample]:
    """Each sample of one local tar (of ``keys`` only, when given) in index order, with the ``members``
    asked for read by the ``.idx`` offsets (by its headers without one); no manifest is consulted."""
    entries = read_index(tar)
    with open(tar, "rb") as f:
        yield from _samples(tar, f, entries, members, (lambda key: key in keys) if keys is not None else None)


def _samples(
    where: Path | str,
    f: BinaryIO,
    entries: list[IndexEntry],
    members: Iterable[str],
    keep: Callable[[str], bool] | None,
) -> Iterator[TarSample]:
    members = tuple(members)
    for comps in entries:
        key = _key(comps)
        if keep is not None and not keep(key):
            continue
        got = {}
        for ext in members:
            if ext in comps:
                offset, size, _name = comps[ext]
                f.seek(offset)
                got[ext] = f.read(size)
        meta = SampleMeta.from_json(got["json"]) if "json" in got else None
        yield TarSample(key, _label(got["cls"], where, key) if "cls" in got else None, got.get("jpg"), meta)


def _key(comps: IndexEntry) -> str:
    """A sample's key: the stem of its members' names."""
    return next(iter(comps.values()))[2].split(".", 1)[0]


def _label(data: bytes, where: Path | str, key: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except ValueError:
        raise ShardFormatError(f"{where}: sample {key}: cls member {data[:20]!r} is not a label") from None


def tar_stamp(path: str | Path) -> tuple[int | None, str | int | None]:
    """(size, ETag) of a tar in the store, (size, mtime in ns) of a local one; (None, None) if absent."""
    if is_remote(path):
        found = store.head(S3Url.parse(str(path)))
        return (found["size"], found["etag"]) if found else (None, None)
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None, None
    return st.st_size, st.st_mtime_ns


def open_tar(path: str | Path):
    """A tar for byte-offset reads: the local file, or a ``RangeReader`` on the store."""
    return RangeReader(str(path)) if is_remote(path) else open(path, "rb")  # noqa: SIM115 - the caller closes


class RangeReader:
    """A tar in the store as a read-only file: ``seek`` then ``read(n)``, each read one ranged GET."""

    def __init__(self, url: str):
        self.url = S3Url.parse(url)
        self.pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("RangeReader seeks to absolute offsets only")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int) -> bytes:
        data = store.read_range(self.url, self.pos, size)
        self.pos += len(data)
        return data

    def close(self) -> None:
        """Nothing is held between reads (the process's client keeps its connection pool)."""

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TarScan:
    """One pass over every sample of a tar: iterating gives each sample's index entry and a getter of
    its members' bytes, in index order; ``sha256()`` then gives the whole tar's. A tar in the store is
    read front to back in one GET (each sample's members as one span), hashed on the way."""

    def __init__(self, shard: Shard, entries: list[IndexEntry], size: int):
        self.shard, self.entries, self.size = shard, entries, size
        self._stream = TarStream(str(shard.path)) if is_remote(shard.path) else None
        self._file = open(shard.path, "rb") if self._stream is None else None  # noqa: SIM115 - close()

    def __iter__(self) -> Iterator[tuple[IndexEntry, MemberGetter]]:
        for comps in self.entries:
            yield comps, (self._read_file if self._file is not None else self._span(comps))

    def _read_file(self, comp: tuple[int, int, str]) -> bytes:
        self._file.seek(comp[0])
        return self._file.read(comp[1])

    def _span(self, comps: IndexEntry) -> MemberGetter:
        start = min(c[0] for c in comps.values())
        end = min(max(c[0] + c[1] for c in comps.values()), self.size)
        if start >= self._stream.pos:
            span = self._stream.read_at(start, max(0, end - start))
        else:  # members listed out of tar order: this sample by byte range
            span = store.read_range(S3Url.parse(str(self.shard.path)), start, max(0, end - start))
        return lambda c: span[c[0] - start : c[0] - start + c[1]]

    def sha256(self) -> str:
        """The whole tar's sha256 (in the store: the rest of the same GET)."""
        return self._stream.finish()[0] if self._stream is not None else sha256_file(self.shard.path)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> TarScan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stream_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (BotoCoreError, HTTPError, OSError)


class TarStream:
    """A whole tar read front to back in one GET (resumed from where it broke off, if it does),
    every byte hashed: ``read_at(offset, size)`` moves forward only; ``finish()`` reads the rest and
    returns the tar's sha256 and size."""

    def __init__(self, url: str):
        self.url = S3Url.parse(url)
        self.pos = 0
        self.hash = hashlib.sha256()
        self._body = None

    def _read(self, size: int) -> bytes:
        out = bytearray()
        failures = 0
        while len(out) < size:
            if self._body is None:
                self._body = store.open_stream_at(self.url, self.pos)
            try:
                chunk = self._body.read(min(size - len(out), STREAM_CHUNK))
            except _stream_errors() as exc:  # a dropped stream: open it again at self.pos
                self._body = None
                failures += 1
                if failures >= store.MAX_ATTEMPTS:
                    raise store.store_error(exc, f"reading {self.url}") from None
                continue
            if not chunk:
                break
            out += chunk
            self.pos += len(chunk)
            self.hash.update(chunk)
        return bytes(out)

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < self.pos:
            raise ValueError(f"TarStream reads forward only: offset {offset} is behind {self.pos}")
        while self.pos < offset:  # skip (and hash) what lies between
            if not self._read(min(offset - self.pos, STREAM_CHUNK)):
                return b""
        return self._read(size)

    def finish(self) -> tuple[str, int]:
        while self._read(STREAM_CHUNK):
            pass
        self.close()
        return self.hash.hexdigest(), self.pos

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
