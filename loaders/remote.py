"""Shard roots in an object store (``data.shards: s3://bucket/prefix``), as the loaders read them.

Owns how a shard root that is not a local folder is read, through flora/store.py's client (endpoint,
credentials and region from the standard AWS environment and config files; throttling such as
``503 SlowDown`` and dropped connections retried there, never fatal on their own):

* **The metadata mirror**: ``manifest.json`` and the class mappings are fetched each time an index
  is built (small files), a shard's ``.idx`` only when the shard is scanned, into
  ``store_meta/<store>/`` under the cache root (never into the store, which may be read-only), so the
  shard format's own readers (sharding/format/schema.py) parse them. Tars are never copied to disk.
* **Sample tables** (``fetch_table``): the publisher's table of a tar's samples, used instead of a
  scan when it names the tar's current ETag and the manifest's sha256 (the store vouches for the
  bytes: an ETag is the store's checksum of the object it holds), so a first epoch reads each jpg
  once and the tars nowhere else. A store without tables (a local build copied with ``aws s3 sync``)
  or with a tar replaced since is scanned as below.
* **Stamps**: a tar's size and ETag (one HEAD) stand in for a local file's size and mtime as the
  scan cache's key (``tar_stamp``).
* **Reading tars**: ``open_shard`` gives a tar as a file for ``seek`` + ``read``: a local file, or a
  ``RangeReader`` (one ranged GET per read: a loader reads each sample's jpg once, and nothing else
  of the tar). A scan reads a whole tar front to back in one GET (``TarStream``), hashing every byte
  on the way, so checking the manifest's sha256 costs no second read.
* **Worker processes**: the AWS settings of this process (``aws_env``), which a worker started from a
  fork server (whose environment is that of an earlier moment) applies before it reads.
* **DALI's S3 client** (``dali_s3_check``): it reads ``AWS_ENDPOINT_URL`` only (not the
  ``AWS_ENDPOINT_URL_S3`` that boto3 prefers) and, for an endpoint named by a host name, addresses
  buckets virtual-host style (``http://bucket.host/key``); with an IP address it uses path style.

Leaves out: which samples are read (index.py), verification rules (index.py, recheck.py), and
writing to the store (the sharder's publish step).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from flora import store
from flora.sharding.cache.derived import derived_dir
from flora.sharding.format.schema import (
    MANIFEST,
    ShardFormatError,
    class_mapping_name,
    read_table,
    table_name,
)
from flora.store import S3Url, StoreError, is_remote

__all__ = [
    "RangeReader",
    "TarStream",
    "aws_env",
    "dali_s3_check",
    "fetch_index",
    "fetch_metadata",
    "fetch_table",
    "is_remote",
    "open_shard",
    "tar_stamp",
]

#: Bytes read per call from a tar's stream during a scan (large enough that per-call overhead vanishes).
STREAM_CHUNK = 1 << 20
#: Manifest keys that every Flora shard entry carries (a manifest.json of another tool lacks them).
ENTRY_KEYS = ("path", "split", "region")


class RemoteShardError(store.StoreError):
    """A shard root in the store is not one the loaders can read (no manifest, a foreign manifest,
    a listed tar or index missing); the message names the location."""


def mirror_dir(url: str, cache_root: str | None) -> Path:
    """The local folder holding a store's mirrored metadata (manifest, class mappings, .idx files)."""
    return derived_dir("store_meta", url, cache_root)


def _put(path: Path, data: bytes) -> None:
    """Writes ``data`` atomically (ranks of one node may mirror the same store at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fetch_metadata(url: str, cache_root: str | None, region: str | None = None) -> Path:
    """Mirrors ``manifest.json`` and the class mapping(s) of the shard root ``url``; returns the mirror.

    A missing manifest or one that is not a Flora shard manifest is a ``RemoteShardError``; a missing
    bucket, refused credentials or an unreachable endpoint a ``StoreError`` (one line each).
    """
    root = S3Url.parse(url)
    mirror = mirror_dir(root.url, cache_root)
    try:
        mirror.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache root: a private folder for this process
        mirror = Path(tempfile.mkdtemp(prefix="flora-store-meta-"))
    mirror = mirror.resolve()
    data = store.read_bytes(root.join(MANIFEST))
    if data is None:
        raise RemoteShardError(
            f"no {MANIFEST} at {root.url}: not a shard root (build shards there first: "
            f"flora build --out {root.url}; or check the prefix)"
        )
    _check_manifest(data, root)
    _put(mirror / MANIFEST, data)
    for name in {class_mapping_name(None), class_mapping_name(region)}:
        found = store.read_bytes(root.join(name))
        if found is None:
            (mirror / name).unlink(missing_ok=True)  # the format's reader then names it missing
        else:
            _put(mirror / name, found)
    return mirror


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


def translate(message: str, mirror: Path, url: str) -> str:
    """A format reader's message about the mirror, told about the store location instead."""
    return message.replace(str(mirror), url.rstrip("/"))


def fetch_index(tar_url: str, rel: str, mirror: Path) -> Path:
    """Mirrors the ``.idx`` beside the tar ``tar_url`` (``rel`` in its shard root); returns the
    mirror's *tar* path (absent: sharding.format.read_index reads the ``.idx`` beside it)."""
    stem = rel[: -len(".tar")] if rel.endswith(".tar") else rel
    idx = S3Url.parse(tar_url[: -len(".tar")] + ".idx" if tar_url.endswith(".tar") else tar_url + ".idx")
    data = store.read_bytes(idx)
    if data is None:
        raise RemoteShardError(
            f"no index {idx.url} beside its tar: the store needs the .idx files the sharder writes "
            "(publish the whole shard folder)"
        )
    _put(mirror / f"{stem}.idx", data)
    return mirror / f"{stem}.tar"


def fetch_table(tar_url: str, sha256: str | None, size: int, etag: str) -> list[list] | None:
    """The sample table (sharding/format/schema.py) beside a tar in the store if it describes the object
    there now (the manifest's sha256; the object's size and ETag, which the store computes from the
    bytes it holds); None otherwise, and the tar is scanned."""
    if not sha256 or not tar_url.endswith(".tar"):
        return None
    data = store.read_bytes(S3Url.parse(table_name(tar_url)))
    if data is None:
        return None
    try:
        table = read_table(data)
    except ShardFormatError:
        return None
    found = (table.get("tar_sha256"), table.get("tar_bytes"), table.get("tar_etag"))
    return table["rows"] if found == (sha256, size, str(etag).strip('"')) else None


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


def open_shard(path: str | Path):
    """A tar for byte-offset reads: the local file, or a ``RangeReader`` on the store."""
    return RangeReader(str(path)) if is_remote(path) else open(path, "rb")  # noqa: SIM115 - the caller closes


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


def aws_env() -> dict[str, str]:
    """The ``AWS_*`` settings of this process (to apply in a worker process; never printed)."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def dali_s3_check(url: str) -> None:
    """Prepares DALI's S3 client for the shard root ``url``, or refuses one it cannot address.

    DALI reads ``AWS_ENDPOINT_URL`` alone, so an ``AWS_ENDPOINT_URL_S3`` (boto3's first choice) is
    copied there; its SDK's retries are set to flora/store.py's unless the environment sets them.
    For an endpoint named by a host name DALI asks for ``bucket.host``: unless that resolves (a store
    with virtual-host buckets), the endpoint must be given by IP address.
    """
    s3_only = os.environ.get("AWS_ENDPOINT_URL_S3")
    if s3_only:
        os.environ["AWS_ENDPOINT_URL"] = s3_only
    # The AWS SDK under DALI retries throttling and 5xx answers as botocore does here (standard mode),
    # as often as flora/store.py does, unless the environment says otherwise (boto3 ignores these:
    # store.client() passes its own retry settings).
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(store.MAX_ATTEMPTS))
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return  # AWS itself: virtual-host buckets resolve
    host = urlsplit(endpoint).hostname or ""
    try:
        ipaddress.ip_address(host)
        return  # path style
    except ValueError:
        pass
    bucket = S3Url.parse(url).bucket
    try:
        socket.getaddrinfo(f"{bucket}.{host}", None)
    except OSError:
        raise StoreError(
            f"backend dali: DALI's S3 client addresses bucket {bucket!r} as {bucket}.{host}, which does "
            f"not resolve; give AWS_ENDPOINT_URL with the store's IP address (e.g. http://"
            f"{_first_address(host)}:{urlsplit(endpoint).port or 80}) or use backend: torch"
        ) from None


def _first_address(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return "<ip>"
