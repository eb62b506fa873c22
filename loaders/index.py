"""The sample index: which samples of which shards a loader reads, in which order, on which rank.

Owns, for both loaders (so that they agree sample for sample):

* **Selection**: shards of one split from ``manifest.json``, narrowed by region; then samples: the
  manifest's tombstones (samples an incremental build removed) are never yielded and are counted
  apart from skips (``tombstoned``); then by ``production_only`` (each sample's ``license_class``)
  and, for ``label_space: region``, by the region's class mapping. Labels come from here (the
  ``.cls`` member, or remapped by species name).
* **Where the shards are**: a local folder or an object-store prefix (``s3://bucket/prefix``), read
  through the shard format's reader (sharding/format/reader.py: the manifest and class mappings; the
  publisher's sample table of a tar in a store, else a scan of the tar, in one GET there; then each
  planned sample's jpg by byte range).
* **Verification**: every sample's JPEG is checked once (jpeg.py); a corrupt one is skipped and
  counted with a reason (jpeg.py's ``SKIP_REASONS``), never fatal, never silent. Scan results are
  cached per shard under the cache root, keyed by the tar's and index's size and mtime (in the store:
  size and ETag), which bit rot keeps: recheck.py re-checks later, with the sha256 the scan keeps per
  sample.
* **The manifest's word on each tar**: a tar whose size differs from the manifest's is refused
  (always, one ``stat``); under ``verify: full`` a fresh scan also hashes the whole tar and refuses
  a sha256 mismatch that no damaged sample explains (torn or tampered store, not bit rot).
* **The epoch plan**: shard order shuffled per epoch by ``(seed, epoch)``; the concatenated samples
  cut into ``world_size`` contiguous ranges exactly as DALI's reader cuts ``num_shards``
  (``[n * r // w, n * (r + 1) // w)``), so every sample is on exactly one rank each epoch.
* **Filtered index files** for DALI (wds2idx v1.2 lines with only the given samples' ``jpg``, in
  order: base.py's plan of one epoch on one rank).

Leaves out: reading the shard format (sharding/format/reader.py), decoding and augmentation (dali.py,
reference.py), batching policy and runtime skips (the loaders, base.py) and re-checks after the scan
(recheck.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flora.errors import FloraError
from flora.io import atomic_write_text
from flora.loaders.config import DataConfig
from flora.loaders.jpeg import (  # jpeg_size: part of this module's interface
    BAD_JSON,
    BAD_LABEL,
    LABEL_OUT_OF_RANGE,
    LICENSE_FILTERED,
    MISSING_JPG,
    NO_JPEG_FRAME,
    NOT_A_JPEG,
    NOT_IN_LABEL_SPACE,
    SHA256_MISMATCH,
    SIZE_MISMATCH,
    TRUNCATED_SHARD,
    check_jpeg,
    jpeg_size,  # noqa: F401
)
from flora.sharding.cache.derived import derived_dir
from flora.sharding.format.reader import Shard, ShardReader, tar_stamp
from flora.sharding.format.schema import PERMISSIVE, SampleMeta, ShardFormatError, index_line, index_text
from flora.store import StoreError

CACHE_FORMAT = 2  # 2: rows carry each sample's sha256
SHA256_BYTES = 32


class LoaderError(FloraError, ValueError):
    """The shards cannot be loaded as configured; the message says what was found and expected."""


@dataclass
class SampleIndex:
    """The selected samples of one split, grouped by shard (shard ``i`` owns ``bounds[i]:bounds[i+1]``)."""

    root: Path | str  # the shard folder, or an s3:// prefix
    split: str
    shards: list[Shard]
    bounds: np.ndarray  # int64, len(shards) + 1
    keys: list[str]
    labels: np.ndarray  # int64, in the configured label space
    jpg_offset: np.ndarray  # int64 byte offset of each sample's jpg in its tar
    jpg_size: np.ndarray  # int64
    class_mapping: dict[str, int]
    skipped: Counter = field(default_factory=Counter)  # reason -> samples left out
    skipped_samples: list[dict] = field(default_factory=list)  # {shard, key, reason} of bad samples
    #: (n, 32) uint8: each jpg's sha256 as its json records it; all zeros where none is recorded.
    sha256: np.ndarray = field(default_factory=lambda: np.zeros((0, SHA256_BYTES), dtype=np.uint8))
    #: Shards scanned now at the ``verify`` level (not served by the scan cache): checked moments ago.
    fresh: frozenset[int] = frozenset()
    #: Samples left out because the manifest tombstones them (removed records): not skips, not damage.
    tombstoned: int = 0
    #: Each sample's licence class (the json's ``license_class``; "" where it records none): streams.
    license_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U1"))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_mapping)

    def shard_of(self, sample: int) -> int:
        return int(np.searchsorted(self.bounds, sample, side="right") - 1)

    def shards_of(self, samples: np.ndarray) -> np.ndarray:
        """``shard_of`` for many sample ids at once."""
        return np.searchsorted(self.bounds, samples, side="right") - 1

    def subset(self, shard_ids: list[int]) -> SampleIndex:
        """The samples of some of the shards only, in the given order (e.g. the shards whose derived
        rows, such as cached soft labels, are missing); scan facts (skips, fresh) are not carried."""
        runs = [np.arange(self.bounds[i], self.bounds[i + 1], dtype=np.int64) for i in shard_ids]
        chosen = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
        sizes = [len(r) for r in runs]
        return SampleIndex(
            root=self.root,
            split=self.split,
            shards=[self.shards[i] for i in shard_ids],
            bounds=np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64),
            keys=[self.keys[s] for s in chosen.tolist()],
            labels=self.labels[chosen],
            jpg_offset=self.jpg_offset[chosen],
            jpg_size=self.jpg_size[chosen],
            class_mapping=self.class_mapping,
            sha256=self.sha256[chosen] if len(self.sha256) else self.sha256,
            license_class=self.license_class[chosen] if len(self.license_class) else self.license_class,
        )

    def digest(self, sample: int) -> bytes | None:
        """The sha256 the sample's json records for its jpg, or None."""
        d = self.sha256[sample].tobytes() if len(self.sha256) else b""
        return d if d.strip(b"\0") else None

    def lookup(self) -> dict[tuple[bytes, int], int]:
        """``(tar path bytes, jpg offset) -> sample id``: how DALI's ``source_info`` is mapped back."""
        out = {}
        for i, shard in enumerate(self.shards):
            p = str(shard.path).encode()
            for s in range(self.bounds[i], self.bounds[i + 1]):
                out[(p, int(self.jpg_offset[s]))] = s
        return out

    # --------------------------------------------------------------------------------- epoch plan
    def shard_order(self, epoch: int, seed: int, shuffle: bool) -> list[int]:
        """Shard indices in this epoch's order: a permutation drawn from ``(seed, epoch)``, or as listed."""
        n = len(self.shards)
        if not shuffle:
            return list(range(n))
        return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]

    def epoch_samples(self, order: list[int]) -> np.ndarray:
        """All sample ids in the order the shards are read."""
        parts = [np.arange(self.bounds[i], self.bounds[i + 1], dtype=np.int64) for i in order]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def rank_samples(self, order: list[int], rank: int, world_size: int) -> np.ndarray:
        """This rank's contiguous slice of the epoch, cut as DALI's reader cuts ``num_shards``."""
        samples = self.epoch_samples(order)
        start, end = rank_bounds(len(samples), rank, world_size)
        return samples[start:end]

    # ----------------------------------------------------------------------- DALI's index files
    def write_dali_files(self, samples: np.ndarray, directory: Path) -> tuple[list[str], list[str]]:
        """(tar paths, index paths) for DALI's reader to read exactly ``samples``, in this order.

        One filtered wds2idx file (only the samples' ``jpg``) per run of consecutive samples of one
        shard; an epoch plan reads each shard as one run, so that is one file per shard read.
        """
        directory.mkdir(parents=True, exist_ok=True)
        if not len(samples):
            return [], []
        shard_ids = self.shards_of(samples)
        starts = np.flatnonzero(np.diff(shard_ids, prepend=-1))  # where each run of one shard begins
        paths, idx = [], []
        for n, (start, run) in enumerate(zip(starts.tolist(), np.split(samples, starts[1:]), strict=True)):
            lines = [
                index_line([(f"{self.keys[s]}.jpg", int(self.jpg_offset[s]), int(self.jpg_size[s]))])
                for s in run.tolist()
            ]
            path = directory / f"{n:06d}.idx"
            path.write_text(index_text(lines), encoding="ascii")
            paths.append(str(self.shards[int(shard_ids[start])].path))
            idx.append(str(path))
        return paths, idx


def rank_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's shard cut: rank ``r`` of ``w`` reads ``[n * r // w, n * (r + 1) // w)``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return n * rank // world_size, n * (rank + 1) // world_size


def buffer_shuffle(samples: np.ndarray, buffer: int, seed: int) -> np.ndarray:
    """A shuffle buffer, as DALI's ``initial_fill`` and webdataset's ``shuffle``: fill ``buffer``
    samples, then emit a random one and put the next sample in its place; drain randomly at the end."""
    rng = random.Random(seed)
    out, buf = [], []
    for s in samples.tolist():
        if len(buf) < buffer:
            buf.append(s)
            continue
        j = rng.randrange(len(buf))
        out.append(buf[j])
        buf[j] = s
    rng.shuffle(buf)
    out.extend(buf)
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------------------ building
def build_index(cfg: DataConfig, split: str) -> SampleIndex:
    """Selects, scans (or reads the scan cache) and filters the samples of ``split``."""
    regions = cfg.regions
    try:
        region = regions[0] if cfg.label_space == "region" else None
        reader = ShardReader(cfg.shards, cfg.cache_root)
        root = reader.root
        shards = reader.shards(split, regions)
        region_map = reader.class_mapping(region) if region is not None else None
        global_map = reader.class_mapping()
        cache_dir = _cache_dir(root, cfg.index_cache, cfg.cache_root)
        with ThreadPoolExecutor(max_workers=max(1, cfg.threads)) as pool:
            scans = list(pool.map(lambda s: scan_shard(s, cfg.verify, cache_dir, reader), shards))
    except (ShardFormatError, StoreError) as exc:  # StoreError: a missing bucket, refused credentials...
        raise LoaderError(str(exc)) from None
    keys, labels, offsets, sizes, digests, licences, bounds = [], [], [], [], [], [], [0]
    skipped: Counter = Counter()
    bad: list[dict] = []
    tombstoned = 0
    for shard, (rows, _fresh) in zip(shards, scans, strict=True):
        for key, label, off, size, license_class, latin, problem, sha in rows:
            if key in shard.tombstones:
                tombstoned += 1
                continue
            reason = problem
            if reason is None and cfg.production_only and license_class != PERMISSIVE:
                reason = LICENSE_FILTERED
            if reason is None and region_map is not None:
                if latin not in region_map:
                    reason = NOT_IN_LABEL_SPACE
                else:
                    label = region_map[latin]
            if reason is None and not 0 <= label < len(global_map if region_map is None else region_map):
                reason = LABEL_OUT_OF_RANGE
            if reason is not None:
                skipped[reason] += 1
                if reason != LICENSE_FILTERED:
                    bad.append({"shard": shard.rel, "key": key, "reason": reason})
                continue
            keys.append(key)
            labels.append(label)
            offsets.append(off)
            sizes.append(size)
            digests.append(_digest_bytes(sha))
            licences.append(license_class)
        bounds.append(len(keys))
    if not keys:
        raise LoaderError(
            f"no samples left in split {split!r} of {root} after filters (skipped: {dict(skipped)})"
        )
    return SampleIndex(
        root=root,
        split=split,
        shards=shards,
        bounds=np.asarray(bounds, dtype=np.int64),
        keys=keys,
        labels=np.asarray(labels, dtype=np.int64),
        jpg_offset=np.asarray(offsets, dtype=np.int64),
        jpg_size=np.asarray(sizes, dtype=np.int64),
        class_mapping=region_map if region_map is not None else global_map,
        skipped=skipped,
        skipped_samples=bad,
        sha256=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, SHA256_BYTES),
        fresh=frozenset(i for i, (_rows, fresh) in enumerate(scans) if fresh),
        tombstoned=tombstoned,
        license_class=np.asarray(licences, dtype=str),
    )


def _digest_bytes(sha: str) -> bytes:
    """A json's hex sha256 as 32 bytes; zeros when absent or malformed (nothing to compare with)."""
    try:
        raw = bytes.fromhex(sha) if isinstance(sha, str) else b""
    except ValueError:
        raw = b""
    return raw if len(raw) == SHA256_BYTES else bytes(SHA256_BYTES)


def _cache_dir(root: Path | str, setting: bool | str | None, cache_root: str | None) -> Path | None:
    if setting in (None, False, "off"):
        return None
    path = derived_dir("loader_index", root, cache_root) if setting in (True, "auto") else Path(setting)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError:
        return None  # an unwritable cache: scan every time, which is correct, only slower
    return path


# ----------------------------------------------------------------------------------------- scanning
class Row(NamedTuple):
    """One sample as a scan found it (cached per shard as a JSON list in this field order)."""

    key: str
    label: int
    jpg_offset: int
    jpg_size: int
    license_class: str
    latin_name: str
    problem: str | None  # why it is skipped, or None
    sha256: str  # the jpg's sha256 as the json records it ("" when it records none)


def scan_shard(
    shard: Shard, verify: str, cache_dir: Path | None, reader: ShardReader
) -> tuple[list[Row], bool]:
    """Every sample of one tar with its label, jpg location and verification verdict (cached), and
    whether it was scanned now (False: read from the cache). A tar that disagrees with the manifest
    is refused (``check_manifest_size``, ``check_manifest_sha256``)."""
    if reader.remote:
        size, etag = tar_stamp(shard.path)
        if size is None:
            raise LoaderError(f"shard listed in the manifest is missing from the store: {shard.path}")
        stamp = [[shard.rel.rsplit("/", 1)[-1], size, etag]]
    else:
        stamp = _stamp(shard.path, shard.path.with_suffix(".idx"))
    check_manifest_size(shard, stamp[0][1])
    cache = (
        cache_dir / (hashlib.sha1(str(shard.path).encode()).hexdigest()[:20] + ".json") if cache_dir else None
    )
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if (
                data.get("format") == CACHE_FORMAT
                and data.get("stamp") == stamp
                and (data.get("verify") == verify or data.get("verify") == "full")
            ):
                return [Row(*r) for r in data["rows"]], False
        except (OSError, ValueError, TypeError):
            pass  # a damaged cache entry is rebuilt
    if (table := reader.table(shard, *stamp[0][1:])) is not None:
        rows, found = [Row(*r[:6], None, r[6]) for r in table], shard.sha256  # the publisher's scan
    else:
        with reader.scan(shard, stamp[0][1]) as tar:
            rows = [_row(comps, get, tar.size, verify) for comps, get in tar]
            whole = verify == "full" and shard.sha256 and not _damaged(rows)
            found = tar.sha256() if whole else None
    if verify == "full":
        check_manifest_sha256(shard, rows, found)
    if cache is not None:
        entry = {"format": CACHE_FORMAT, "stamp": stamp, "verify": verify, "rows": rows}
        atomic_write_text(cache, json.dumps(entry))
    return rows, True


def check_manifest_size(shard: Shard, size: int | None) -> None:
    """Refuses a tar whose size on disk is not the manifest's (torn, truncated or appended to)."""
    if shard.bytes and size != shard.bytes:
        sha = shard.sha256 or "not recorded"
        raise LoaderError(
            f"shard {shard.rel}: the manifest lists {shard.bytes} bytes (sha256 {sha}), found {size} bytes "
            f"at {shard.path}: a torn or tampered shard store; publish the shards again"
        )


#: Sample problems that account for a tar's changed bytes (its sha256 then differs from the manifest's).
_DAMAGE = frozenset({SHA256_MISMATCH, NOT_A_JPEG, NO_JPEG_FRAME, SIZE_MISMATCH, BAD_JSON, BAD_LABEL})


def _damaged(rows: list[Row]) -> bool:
    return any(r.problem in _DAMAGE for r in rows)


def check_manifest_sha256(shard: Shard, rows: list[Row], found: str | None) -> None:
    """Refuses a tar whose sha256 (``found``: the scan's) is not the manifest's unless damaged samples
    explain it (bit rot in a sample is skipped and counted; changed bytes that no sample check sees are
    not bit rot we can skip around)."""
    if not shard.sha256 or _damaged(rows):
        return  # nothing to compare with, or damaged samples (skipped, counted) account for a mismatch
    if found != shard.sha256:
        raise LoaderError(
            f"shard {shard.rel}: the manifest lists sha256 {shard.sha256} ({shard.bytes} bytes), found "
            f"{found} at {shard.path}, with every sample intact: a tampered shard store (tar headers or "
            "members outside the samples changed); publish the shards again"
        )


def _stamp(*paths: Path) -> list:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            out.append([p.name, None, None])
    return out


def _row(comps: dict, get, size_on_disk: int, verify: str) -> Row:
    """One sample's Row from its index entry; ``get(member)`` returns a member's bytes."""
    name = next(iter(comps.values()))[2]
    key = name.split(".", 1)[0]
    if "jpg" not in comps:
        return Row(key, -1, 0, 0, "", "", MISSING_JPG, "")
    off, size, _ = comps["jpg"]
    if off + size > size_on_disk:
        return Row(key, -1, off, size, "", "", TRUNCATED_SHARD, "")
    meta, problem = SampleMeta(), None
    if "json" in comps:
        try:
            meta = SampleMeta.from_json(get(comps["json"]))
        except (ValueError, TypeError):
            problem = BAD_JSON
    label = -1
    try:
        label = int(get(comps["cls"]).decode("ascii").strip()) if "cls" in comps else int(meta.label)
    except (ValueError, TypeError):
        problem = problem or BAD_LABEL
    if problem is None:
        problem = check_jpeg(get(comps["jpg"]), meta, verify)
    licence, latin = meta.license_class or "", meta.latin_name or ""
    return Row(key, label, off, size, licence, latin, problem, meta.sha256 or "")
