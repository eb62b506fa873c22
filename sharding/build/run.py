"""The sharder: catalog splits -> cached, validated downloads -> WebDataset shards per split and region.

Owns the plan, the shard jobs, and the final assembly of ``SHARDS/``:

1. **Plan** (deterministic). Each record of ``dataset_splits.jsonl`` belongs to the stream
   ``(split, region)``. Within a stream records are ordered by ``sha256(seed, url key)`` (the
   seeded shuffle) and cut into chunks of ``shards.max_samples`` records: a chunk is one job. Only
   byte offsets into the file are held, so the planner's memory is ~16 bytes a record.
2. **Jobs** (``run_chunk``, in worker processes or Ray tasks). A job reads its records, gets each
   image from the LMDB cache or downloads, validates and converts it (cache.py, download.py,
   images.py; a thread pool with a bounded look-ahead window), and writes the successes in plan
   order into work parts under ``SHARDS/_work/`` (writer.py), rolling at ``shards.max_bytes``.
   Its last act is to write ``chunk.json`` (parts, keys, sha256s, failures); a chunk without it is
   redone from scratch on the next run, so a SIGKILL at any moment loses only unfinished chunks.
3. **Finalize** (idempotent). Content-hash dedup in global plan order (train, then val, then
   test: a copy in train is kept, so identical bytes under two URLs never leak into evaluation);
   parts are renamed to ``{split}/{region}/{split}-{region}-{index:06d}.tar`` with a DALI ``.idx``
   beside each, then ``failures.jsonl``, ``duplicates.jsonl`` and ``manifest.json`` (written last:
   a shard listed there is complete). Shards of an earlier, different plan are removed.

**Incremental builds** (incremental.py): over a published build of an earlier version of the same
catalog (its lineage) with the same settings, published shards are kept byte for byte, only records
not live in them are planned (new chunks, new shard indices), removed or relabelled samples become
tombstones in the manifest (``version``, ``parent``, per shard ``version`` and ``tombstones``), and
``compact_shards`` (``--compact``) rewrites the shards that have tombstones.

The same splits, config and seed give the same shard bytes whether the run was interrupted or
not and whatever order downloads finished in, since every shard's content is a function of its
chunk's records and their outcomes. Every failure is cached as a negative entry (valid only under
the same download policy: allow-list, byte cap, redirect cap), so a rebuild from a warm cache makes
no request at all and reproduces the same failures; ``--retry-failed`` bypasses them and
re-attempts exactly the records in ``failures.jsonl``, adding the successes as new shards (round
``retryNN`` chunks) of the right split and region.

Accounting: records in = sharded + failed + content duplicates, checked and written to the manifest.

Where each step lives: planning and retry rounds (plan.py), a chunk job (job.py), finalize
(finalize.py); this module runs them in order (``build``), holding the output folder's lock
(lock.py: a second build on the same output refuses or waits). Leaves out: HTTP (download.py), image
rules (images.py), the cache (cache.py), tar bytes (writer.py), where jobs run (distribute.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from flora.sharding.build.finalize import finalize
from flora.sharding.build.incremental import build_settings, compact, plan_increment
from flora.sharding.build.job import load_marker, run_chunk
from flora.sharding.build.lock import output_lock
from flora.sharding.build.plan import (
    MARKER,
    PLAN_FILE,
    WORK_DIR,
    new_retry_round,
    plan_fingerprint,
    plan_jobs,
    retry_rounds,
)
from flora.sharding.build.remote import Remote, check_prefix, fetch_chunk, prepare, publish, share_splits
from flora.sharding.cache.config import cap_warning
from flora.sharding.config import BuildConfig, ShardConfig
from flora.sharding.format.schema import MANIFEST
from flora.store import is_remote

__all__ = ["BuildConfig", "ShardConfig", "build", "compact_shards"]

log = logging.getLogger(__name__)


def build(splits_dir: str | Path, out_dir: str | Path, cfg: BuildConfig, retry_failed: bool = False) -> dict:
    """Builds (or resumes, or retries the failures of) the shards of a catalog's splits.

    ``out_dir`` is a folder or ``s3://bucket/prefix`` (remote.py: built in a local staging folder,
    then published, the manifest last).

    Holds the output folder's build lock throughout (lock.py): while another build holds it, this one
    refuses at once or, with ``cfg.wait_lock_s``, waits that long for it.
    """
    splits_dir = Path(splits_dir)
    splits_path = splits_dir / "dataset_splits.jsonl"
    if not splits_path.is_file():
        raise FileNotFoundError(f"no dataset_splits.jsonl in {splits_dir} (run `flora catalog` first)")
    if not (splits_dir / "class_mapping.json").is_file():
        raise FileNotFoundError(f"no class_mapping.json in {splits_dir}")
    warning = cap_warning(cfg.cache)
    if warning:
        log.warning(warning)
    remote = prepare(out_dir) if is_remote(out_dir) else None  # remote.py: s3://
    out = remote.staging if remote else Path(out_dir)
    with output_lock(out, cfg.wait_lock_s):  # one build per output folder, held until the manifest is written
        return _build_locked(splits_dir, out, cfg, retry_failed, remote)


def _build_locked(
    splits_dir: Path, out: Path, cfg: BuildConfig, retry_failed: bool, remote: Remote | None = None
) -> dict:
    from tqdm import tqdm

    from flora.sharding.build.distribute import run_jobs

    splits_path = splits_dir / "dataset_splits.jsonl"
    work = out / WORK_DIR
    fingerprint = plan_fingerprint(splits_path, cfg)
    plan_file = work / PLAN_FILE
    if plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != fingerprint:
        shutil.rmtree(work)  # another catalog or config: nothing in the work area can be reused
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(fingerprint, sort_keys=True), encoding="utf-8")
    if remote:  # another data set's manifest there is refused; a published set staging lacks comes down
        check_prefix(remote, splits_dir, fingerprint["splits_sha256"])

    planning = time.perf_counter()
    increment = plan_increment(out, splits_dir, fingerprint)  # incremental.py: kept shards, or None
    if increment is None:
        jobs, n_records, unreadable = plan_jobs(splits_path, out, cfg)
    else:  # only records not live in a kept shard are planned, after the old shard indices
        kept = increment.live_keys()
        jobs, n_records, unreadable = plan_jobs(splits_path, out, cfg, kept, increment.prefix)
    if retry_failed:
        if not (out / MANIFEST).is_file():
            raise FileNotFoundError(f"--retry-failed: no manifest.json in {out} (build first)")
        new_retry_round(out, splits_path, cfg, fingerprint["splits_sha256"])  # saved; loaded just below
    jobs += retry_rounds(out)  # earlier rounds, and one that a crash left unfinished
    for job in jobs:
        job.cfg = cfg
        if remote:  # a job on another node ships its chunk through the store (remote.py)
            job.remote, job.driver_token = remote.url.url, remote.token
            job.splits_sha256 = fingerprint["splits_sha256"]
    if remote and cfg.distributor != "local":
        share_splits(remote, splits_path, fingerprint["splits_sha256"])
    todo = [job for job in jobs if load_marker(job) is None and not (remote and fetch_chunk(remote, job))]

    processes = cfg.processes or os.cpu_count() or 1
    counts, cache = Counter(), Counter()
    worker_peak = worker_anon = worker_file = 0.0
    started = time.perf_counter()
    hide = not os.isatty(2) if cfg.progress is None else not cfg.progress
    with tqdm(total=sum(j.size for j in todo), unit=" img", desc="shards", disable=hide) as bar:
        ray_options = {"ray_address": cfg.ray_address, "ray_loopback": cfg.ray_loopback}
        for job, marker in run_jobs(run_chunk, todo, cfg.distributor, processes, **ray_options):
            if remote and load_marker(job) is None:
                fetch_chunk(remote, job)  # it ran on another node
            counts.update(marker["counts"])
            worker_peak = max(worker_peak, marker["peak_rss_mib"])
            worker_anon = max(worker_anon, marker["anon_rss_mib"])
            worker_file = max(worker_file, marker["file_rss_mib"])
            cache.update(marker["cache"])
            bar.update(job.size)
            served = counts["from_cache"] + counts["from_network"]
            bar.set_postfix(hit=f"{counts['from_cache'] / max(served, 1):.0%}", failed=counts["failed"])
    seconds = time.perf_counter() - started
    missing = [job.chunk_id for job in jobs if not (job.work_dir / MARKER).is_file()]
    if missing:
        raise RuntimeError(f"chunks {missing[:5]} did not complete; run again to resume")
    run_stats = {
        "splits_sha256": fingerprint["splits_sha256"],
        "retry_rounds": len(list(work.glob("retry-round-*.json"))),
        "plan_seconds": round(started - planning, 3),  # with an incremental build's shard comparison
        "chunks_run": len(todo),
        "chunks_reused": len(jobs) - len(todo),
        "seconds": round(seconds, 3),
        "images_per_s": round(sum(j.size for j in todo) / seconds, 1) if todo and seconds > 0 else None,
        "from_cache": counts["from_cache"],
        "from_network": counts["from_network"],
        "failed": counts["failed"],
        "cache": dict(sorted(cache.items())),
        "distributor": cfg.distributor,
        "processes": processes,
        "retry_failed": retry_failed,
        "worker_peak_rss_mib": worker_peak,
        "worker_anon_rss_mib": worker_anon,
        "worker_file_rss_mib": worker_file,
    }
    release = {
        "version": fingerprint["splits_sha256"],
        "parent": increment.parent if increment else None,
        "build_settings": build_settings(fingerprint),
    }
    manifest = finalize(out, jobs, n_records, unreadable, splits_dir, run_stats, release, increment)
    if remote:
        manifest = {**manifest, "published": {"url": remote.url.url, **publish(remote, manifest)}}
    return manifest


def compact_shards(out_dir: str | Path, wait_lock_s: float = 0.0) -> dict:
    """``--compact``: rewrites shards with tombstones without them (incremental.py), under the lock."""
    remote = prepare(out_dir) if is_remote(out_dir) else None
    out = remote.staging if remote else Path(out_dir)
    with output_lock(out, wait_lock_s):
        if remote:
            check_prefix(remote, None, None)
        manifest = compact(out)
        if remote:
            manifest = {**manifest, "published": {"url": remote.url.url, **publish(remote, manifest)}}
        return manifest
