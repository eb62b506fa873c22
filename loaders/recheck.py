"""Checks after the scan: some samples' JPEGs read again and checked again (bit rot).

The scan (index.py) checks every sample once and caches its verdict per shard, keyed by the tar's
size and mtime; bytes that flip later keep both, so the cache cannot see them. Owns ``recheck``,
which re-reads given samples by byte offset and returns the ones that fail, with a reason:

* ``full``: the jpg's sha256 against the one its json records (kept by the scan in
  ``SampleIndex.sha256``) -> ``sha256_mismatch``; the header check where none is recorded.
* ``header``: JPEG markers and a frame header (``not_a_jpeg``, ``no_jpeg_frame``).
* ``decode`` (after a decoder failed, when the culprit is unknown): ``full``, then a full PIL decode
  of every sample without a recorded sha256 (``decode_error``). A sample whose bytes match the
  sha256 recorded when it was written is not suspected.

A sample whose bytes are no longer there at all (the tar shrank) is ``truncated_shard``. Shards are
checked in parallel (``threads``; hashing and decoding release the GIL), each read in offset order
through the shard format's reader (``open_tar``: a local file, or ranged GETs in a store). The
reasons are jpeg.py's ``SKIP_REASONS``.

Leaves out: the first scan and its cache (index.py) and what a loader does with the verdicts
(base.py leaves the samples out of later epochs and counts them; dali.py rebuilds a failed epoch).
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from flora.loaders.index import SampleIndex
from flora.loaders.jpeg import DECODE_ERROR, SHA256_MISMATCH, TRUNCATED_SHARD, check_jpeg
from flora.sharding.format.reader import open_tar
from flora.sharding.format.schema import SampleMeta

__all__ = ["DECODE_ERROR", "LEVELS", "recheck", "verdict"]  # DECODE_ERROR: the reference loader's too

LEVELS = ("full", "header", "decode")


def recheck(index: SampleIndex, samples: np.ndarray, level: str, threads: int = 1) -> dict[int, str]:
    """``{sample id: reason}`` for each of ``samples`` whose jpg fails the ``level`` check (see above)."""
    if level not in LEVELS:
        raise ValueError(f"recheck level must be one of {LEVELS}, got {level!r}")
    samples = np.unique(np.asarray(samples, dtype=np.int64))
    if not len(samples):
        return {}
    shard_ids = index.shards_of(samples)
    groups = [samples[shard_ids == s] for s in np.unique(shard_ids).tolist()]
    bad: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups)))) as pool:
        for found in pool.map(lambda group: _recheck_shard(index, group, level), groups):
            bad.update(found)
    return bad


def _recheck_shard(index: SampleIndex, samples: np.ndarray, level: str) -> dict[int, str]:
    out: dict[int, str] = {}
    order = samples[np.argsort(index.jpg_offset[samples], kind="stable")]
    with open_tar(index.shards[index.shard_of(int(order[0]))].path) as f:
        for sid in order.tolist():
            size = int(index.jpg_size[sid])
            f.seek(int(index.jpg_offset[sid]))
            data = f.read(size)
            problem = TRUNCATED_SHARD if len(data) < size else verdict(data, index.digest(sid), level)
            if problem is not None:
                out[sid] = problem
    return out


def verdict(data: bytes, digest: bytes | None, level: str) -> str | None:
    """None when ``data`` passes the ``level`` check, else the reason it fails."""
    if level != "header" and digest is not None:
        return None if hashlib.sha256(data).digest() == digest else SHA256_MISMATCH
    problem = check_jpeg(data, SampleMeta(), "header")
    if problem is None and level == "decode":
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception:  # noqa: BLE001 - whatever stops the decode is the verdict
            return DECODE_ERROR
    return problem
