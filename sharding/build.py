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

The same splits, config and seed give the same shard bytes whether the run was interrupted or
not and whatever order downloads finished in, since every shard's content is a function of its
chunk's records and their outcomes. Every failure is cached as a negative entry (valid only under
the same download policy: allow-list, byte cap, redirect cap), so a rebuild from a warm cache makes
no request at all and reproduces the same failures; ``--retry-failed`` bypasses them and
re-attempts exactly the records in ``failures.jsonl``, adding the successes as new shards (round
``retryNN`` chunks) of the right split and region.

Accounting: records in = sharded + failed + content duplicates, checked and written to the manifest.

Leaves out: HTTP (download.py), image rules (images.py), the cache (cache.py), tar bytes
(writer.py), where jobs run (distribute.py).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from flora.config import ConfigError
from flora.io import read_jsonl, sha256_file

from .cache import CacheConfig, ImageCache
from .config import SPLIT_NAMES
from .download import DownloadConfig, Downloader
from .format import MANIFEST, SampleMeta, safe_key, shard_name, write_index
from .images import ImageConfig, ImageError, process_image
from .outputs import OutputSet, dumps
from .records import url_key
from .split import seeded_rank
from .writer import RollingTarWriter, Sample, drop_samples

WORK_DIR = "_work"
MARKER = "chunk.json"
PLAN_FILE = "plan.json"
#: Download settings that decide whether a URL fails (a negative cache entry is only valid for
#: the same ones: a URL refused under one allow-list is retried under another).
FAILURE_POLICY_KEYS = ("allow_networks", "max_bytes", "max_redirects")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
#: Cache writes per commit (see _PutBuffer): 32 images of ~50 KB, a few MB per transaction.
PUT_BATCH = 32
#: Downloads kept in flight per worker thread: enough to hide latency, bounded memory.
WINDOW_PER_THREAD = 2


@dataclass
class ShardConfig:
    max_samples: int = 1000
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ConfigError(f"shards.max_samples must be >= 1, got {self.max_samples}")
        if self.max_bytes < 1:
            raise ConfigError(f"shards.max_bytes must be >= 1, got {self.max_bytes}")


@dataclass
class BuildConfig:
    """The sharder's config (config/sharding.yaml)."""

    seed: int = 0
    shards: ShardConfig = field(default_factory=ShardConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    #: Worker processes for the local distributor (0: one per CPU).
    processes: int = 0
    distributor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.processes < 0:
            raise ConfigError(f"processes must be >= 0, got {self.processes}")


@dataclass
class ChunkJob:
    """One planned shard: records of one stream, by byte offset into the splits file."""

    chunk_id: str
    split: str
    region: str
    splits_path: str
    out_dir: str
    offsets: Sequence[int]  # a numpy int64 array when planned, a list when loaded from a retry round
    use_negative_cache: bool = True
    cfg: BuildConfig | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.out_dir) / WORK_DIR / self.split / self.region / self.chunk_id

    @property
    def size(self) -> int:
        return len(self.offsets)


def image_fingerprint(cfg: ImageConfig) -> str:
    """Cache keys include the image settings: a resize change must not reuse old bytes."""
    import hashlib

    return hashlib.sha256(dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- planning


def plan_jobs(splits_path: Path, out_dir: Path, cfg: BuildConfig) -> tuple[list[ChunkJob], int, list[dict]]:
    """Chunks every stream of the splits file; returns (jobs in global order, records, unreadable rows)."""
    import numpy as np

    # 8 bytes a record for the rank and 8 for the offset: the plan's memory stays flat
    ranks: dict[tuple[str, str], array] = defaultdict(lambda: array("Q"))
    offsets: dict[tuple[str, str], array] = defaultdict(lambda: array("q"))
    unreadable: list[dict] = []
    n = 0
    with open(splits_path, "rb") as fh:
        offset = 0
        for line in fh:
            here, offset = offset, offset + len(line)
            if not line.strip():
                continue
            n += 1
            row = None
            try:
                row = json.loads(line)
                split, region, url = row["split"], row["region"], row["image_url"]
                if split not in SPLIT_NAMES or not _SAFE_NAME.fullmatch(str(region)):
                    raise ValueError(f"split {split!r} / region {region!r} is not a valid stream")
            except (ValueError, KeyError, TypeError) as exc:
                known = row if isinstance(row, dict) else {}
                unreadable.append(
                    {"offset": here, "image_url": known.get("image_url"), "split": known.get("split"),
                     "region": known.get("region"), "reason": "bad_record", "message": str(exc)[:300]}
                )  # fmt: skip
                continue
            stream = (split, region)
            ranks[stream].append(int.from_bytes(seeded_rank(cfg.seed, url_key(url))[:8], "big"))
            offsets[stream].append(here)
    jobs = []
    per = cfg.shards.max_samples
    for split, region in sorted(ranks, key=lambda s: (SPLIT_NAMES.index(s[0]), s[1])):
        order = np.argsort(np.frombuffer(ranks[(split, region)], dtype=np.uint64), kind="stable")
        offs = np.frombuffer(offsets[(split, region)], dtype=np.int64)[order]
        for c, start in enumerate(range(0, len(offs), per)):
            jobs.append(
                ChunkJob(
                    f"{c:06d}",
                    split,
                    region,
                    str(splits_path),
                    str(out_dir),
                    offs[start : start + per].copy(),
                )
            )
        del ranks[(split, region)], offsets[(split, region)]
    return jobs, n, unreadable


# --------------------------------------------------------------------------------------------- a job

_WORKER: dict[str, Any] = {}


def _worker_state(cfg: BuildConfig) -> dict[str, Any]:
    """Per-process downloader, cache and thread pool, reused across the chunks this process runs."""
    key = dumps(asdict(cfg), sort_keys=True)
    if _WORKER.get("key") != key or _WORKER.get("pid") != os.getpid():
        _close_worker_state()
        if not _WORKER.get("atexit"):
            atexit.register(_close_worker_state)  # flushes the cache's batched recency updates
        _WORKER.update(
            key=key,
            pid=os.getpid(),
            downloader=Downloader(cfg.download),
            cache=ImageCache.from_config(cfg.cache),
            pool=ThreadPoolExecutor(cfg.download.threads, thread_name_prefix="fetch"),
            policy=failure_policy(cfg.download),
        )
    return _WORKER


def _close_worker_state() -> None:
    if _WORKER.get("pid") == os.getpid():
        if _WORKER.get("cache") is not None:
            _WORKER["cache"].close()
        _WORKER["downloader"].close()
        _WORKER["pool"].shutdown(wait=False)
    registered = _WORKER.get("atexit")
    _WORKER.clear()
    _WORKER["atexit"] = registered or True


def _read_records(job: ChunkJob) -> Iterator[dict]:
    with open(job.splits_path, "rb") as fh:
        for offset in map(int, job.offsets):
            fh.seek(offset)
            record = json.loads(fh.readline())
            record["_offset"] = offset
            yield record


def failure_policy(cfg: DownloadConfig) -> str:
    """The settings a cached failure depends on, as a short fingerprint."""
    import hashlib

    policy = {k: getattr(cfg, k) for k in FAILURE_POLICY_KEYS}
    return hashlib.sha256(dumps(policy, sort_keys=True).encode()).hexdigest()[:12]


class _PutBuffer:
    """Cache writes of one chunk, committed ``PUT_BATCH`` at a time (one fsync per batch, not per
    image: per-image commits serialised the worker threads behind the disk) and all at chunk end."""

    def __init__(self, cache: ImageCache | None):
        self.cache, self.items, self.lock = cache, [], threading.Lock()

    def add(self, key: str, data: bytes, meta: dict) -> None:
        if self.cache is None:
            return
        with self.lock:
            self.items.append((key, data, meta))
            if len(self.items) < PUT_BATCH:
                return
            batch, self.items = self.items, []
        self.cache.put_many(batch)

    def flush(self) -> None:
        if self.cache is None:
            return
        with self.lock:
            batch, self.items = self.items, []
        if batch:
            self.cache.put_many(batch)
        self.cache.flush()


def _obtain(record: dict, state: dict, cfg: BuildConfig, prefix: str, use_negative: bool) -> dict:
    """Cache, else download + validate + cache. Returns {"ok", "jpg", "meta", "source"} or a failure."""
    url = record["image_url"]
    cache: ImageCache | None = state["cache"]
    key = f"{prefix}|{url}"
    if cache is not None and key in state["present"]:
        entry = cache.get(key)
        if entry is not None:
            if entry.meta.get("failed"):
                if use_negative and entry.meta.get("policy") == state["policy"]:
                    return {
                        "ok": False,
                        "reason": entry.meta["failed"],
                        "message": entry.meta.get("message", ""),
                        "attempts": entry.meta.get("attempts", 0),
                        "status": entry.meta.get("status"),
                        "from": "cache",
                    }
            else:
                return {"ok": True, "jpg": entry.data, "meta": entry.meta, "from": "cache"}
    fetched = state["downloader"].fetch(url)
    if not fetched.ok:
        failure = {
            "ok": False,
            "reason": fetched.reason,
            "message": fetched.message,
            "attempts": fetched.attempts,
            "status": fetched.status,
            "from": "network",
        }
    else:
        try:
            image = process_image(fetched.data, cfg.images)
        except ImageError as exc:
            failure = {
                "ok": False,
                "reason": exc.reason,
                "message": str(exc),
                "attempts": fetched.attempts,
                "status": fetched.status,
                "from": "network",
            }
        else:
            meta = {
                "sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "original_width": image.original_width,
                "original_height": image.original_height,
                "original_format": image.original_format,
            }
            state["puts"].add(key, image.jpeg, meta)
            return {"ok": True, "jpg": image.jpeg, "meta": meta, "from": "network"}
    state["puts"].add(
        key,
        b"",
        {
            "failed": failure["reason"],
            "message": failure["message"][:300],
            "status": failure["status"],
            "attempts": failure["attempts"],
            "policy": state["policy"],
        },
    )
    return failure


def _in_order(pool: ThreadPoolExecutor, fn, items: Iterator[dict], window: int) -> Iterator[tuple[dict, Any]]:
    """Like ``pool.map`` but with at most ``window`` items in flight (bounded memory)."""
    pending: list[tuple[dict, Future]] = []
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            first, future = pending.pop(0)
            yield first, future.result()
    for item, future in pending:
        yield item, future.result()


def run_chunk(job: ChunkJob) -> dict:
    """Runs one chunk job (see module docstring), writes its marker, returns the marker's summary
    (counts, cache counters, memory) to the driver: the rest stays on disk until finalize."""
    cfg = job.cfg
    started = time.perf_counter()
    shutil.rmtree(job.work_dir, ignore_errors=True)  # a chunk without a marker is redone from scratch
    job.work_dir.mkdir(parents=True)
    state = _worker_state(cfg)
    state["puts"] = puts = _PutBuffer(state["cache"])
    cache_before = state["cache"].stats() if state["cache"] is not None else {}
    prefix = image_fingerprint(cfg.images)
    writer = RollingTarWriter(job.work_dir, "part", cfg.shards.max_samples, cfg.shards.max_bytes)
    failures, samples = [], []
    counts = Counter()
    window = max(1, cfg.download.threads * WINDOW_PER_THREAD)
    fetch = lambda r: _obtain(r, state, cfg, prefix, job.use_negative_cache)  # noqa: E731
    records = list(_read_records(job))  # one chunk: at most shards.max_samples small dicts
    keys = [f"{prefix}|{r['image_url']}" for r in records]
    state["present"] = state["cache"].contains_many(keys) if state["cache"] is not None else set()
    try:
        if len(state["present"]) == len(records):  # all cached (a rebuild): threads would only add overhead
            outcomes = ((r, fetch(r)) for r in records)
        else:
            outcomes = _in_order(state["pool"], fetch, iter(records), window)
        for record, got in outcomes:
            counts[f"from_{got['from']}"] += 1
            ident = {
                k: record.get(k) for k in ("plant_id", "latin_name", "image_url", "split", "region", "label")
            }
            ident["offset"] = record["_offset"]
            if not got["ok"]:
                counts["failed"] += 1
                failures.append(
                    {
                        **ident,
                        "reason": got["reason"],
                        "message": got["message"],
                        "attempts": got["attempts"],
                        "http_status": got["status"],
                        "chunk": job.chunk_id,
                    }
                )
                continue
            key = safe_key(url_key(record["image_url"]))
            meta = SampleMeta.from_record(record, record["label"], got["meta"]).as_json()
            writer.write(Sample(key=key, jpg=got["jpg"], label=int(record["label"]), meta=meta))
            samples.append({"key": key, "sha256": got["meta"]["sha256"], "image_url": record["image_url"]})
        parts = writer.close()
        puts.flush()
    except BaseException:
        writer.abort()
        raise
    marker = {
        "chunk_id": job.chunk_id,
        "split": job.split,
        "region": job.region,
        "records": job.size,
        "parts": [
            {
                "name": p.path.name,
                "samples": p.samples,
                "bytes": p.bytes,
                "keys": p.keys,
                "index": p.index,
                "sha256": p.sha256,
                "labels": p.labels,
                "license_classes": p.license_classes,
            }
            for p in parts
        ],
        "samples": samples,
        "failures": failures,
        "counts": dict(counts),
        "cache": _delta(cache_before, state["cache"].stats() if state["cache"] is not None else {}),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mib": round(memory_mib("VmHWM"), 1),
        "anon_rss_mib": round(memory_mib("RssAnon"), 1),
        "file_rss_mib": round(memory_mib("RssFile"), 1),
    }
    tmp = job.work_dir / (MARKER + ".tmp")
    tmp.write_text(dumps(marker), encoding="utf-8")
    os.replace(tmp, job.work_dir / MARKER)  # the chunk is complete only now
    return {
        k: marker[k] for k in ("counts", "cache", "peak_rss_mib", "anon_rss_mib", "file_rss_mib", "seconds")
    }


def memory_mib(field: str = "VmHWM") -> float:
    """A memory figure of this process from /proc/self/status: ``VmHWM`` (peak resident, its own
    address space, not a forked parent's) or ``RssAnon`` (resident now, without file-backed pages
    such as the LMDB cache's memory map, which the kernel can drop at any time). 0 off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    counters = ("hits", "misses", "puts", "evictions", "corrupt", "too_large_for_cache")
    return {k: after[k] - before.get(k, 0) for k in counters if k in after}


def load_marker(job: ChunkJob) -> dict | None:
    path = job.work_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged marker: redo the chunk


# ------------------------------------------------------------------------------------------- finalize


def finalize(
    out: Path, jobs: list[ChunkJob], n_records: int, unreadable: list[dict], splits_dir: Path, run_stats: dict
) -> dict:
    """Dedups by content, moves parts to their final names, writes indexes, logs and the manifest.

    Markers are read one at a time and the content index lives in SQLite beside the work area, so
    finalizing 10^6 records needs no more memory than 10^4.
    """
    failures: dict[str, dict] = {}  # by URL: a later round's outcome replaces an earlier failure
    duplicates, shards = [], []
    repeats = 0
    next_index: Counter = Counter()
    index_path = out / WORK_DIR / "content.sqlite"
    index_path.unlink(missing_ok=True)
    db = sqlite3.connect(index_path)
    db.execute("CREATE TABLE seen (sha BLOB PRIMARY KEY, url TEXT, split TEXT, region TEXT, chunk TEXT)")
    try:
        for job in jobs:
            marker = load_marker(job)
            by_key = {s["key"]: s for s in marker["samples"]}
            for failure in marker["failures"]:
                failures.pop(failure["image_url"], None)
                failures[failure["image_url"]] = failure
            for part in marker["parts"]:
                dropped = set()
                for key, label in zip(part["keys"], part["labels"], strict=True):
                    sample = by_key[key]
                    failures.pop(sample["image_url"], None)
                    row = (
                        bytes.fromhex(sample["sha256"]),
                        sample["image_url"],
                        job.split,
                        job.region,
                        job.chunk_id,
                    )
                    if db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, ?)", row).rowcount:
                        continue
                    url, split, region, chunk = db.execute(
                        "SELECT url, split, region, chunk FROM seen WHERE sha = ?", row[:1]
                    ).fetchone()
                    if url == sample["image_url"]:  # the same record twice (never expected): shard it once
                        dropped.add(key)
                        repeats += 1
                    else:
                        dropped.add(key)
                        first = {"image_url": url, "split": split, "region": region, "chunk": chunk}
                        duplicates.append(
                            {"reason": "same_content", "image_url": sample["image_url"], "split": job.split,
                             "region": job.region, "label": label, "sha256": sample["sha256"],
                             "duplicate_of": first}
                        )  # fmt: skip
                shard = _place_part(out, job, part, dropped, next_index)
                if shard is not None:
                    shards.append(shard)
    finally:
        db.close()
        index_path.unlink(missing_ok=True)
    for row in unreadable:
        failures[f"offset:{row['offset']}"] = row
    run_stats["repeated_records_dropped"] = repeats
    return _write_reports(out, shards, list(failures.values()), duplicates, n_records, splits_dir, run_stats)


def _place_part(out: Path, job: ChunkJob, part: dict, dropped: set[str], next_index: Counter) -> dict | None:
    work = job.work_dir / part["name"]
    remaining = part["samples"] - len(dropped)
    if remaining == 0:
        work.unlink(missing_ok=True)
        return None
    stream = (job.split, job.region)
    index = next_index[stream]
    next_index[stream] += 1
    final = out / shard_name(job.split, job.region, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    if work.exists():
        if dropped:
            drop_samples(work, dropped)
        os.replace(work, final)
    elif not final.exists():
        raise RuntimeError(f"{work} and {final} are both missing; remove {out / WORK_DIR} and run again")
    write_index(final, None if dropped else part["index"])
    keep = [i for i, k in enumerate(part["keys"]) if k not in dropped]
    labels = [part["labels"][i] for i in keep]
    return {
        "path": str(final.relative_to(out)),
        "split": job.split,
        "region": job.region,
        "samples": remaining,
        "bytes": final.stat().st_size,
        "sha256": part["sha256"] if not dropped else sha256_file(final),
        "classes": sorted(set(labels)),
        "licenses": dict(sorted(Counter(part["license_classes"][i] for i in keep).items())),
        "chunk": job.chunk_id,
    }


def _write_reports(
    out: Path,
    shards: list[dict],
    failures: list[dict],
    duplicates: list[dict],
    n_records: int,
    splits_dir: Path,
    run_stats: dict,
) -> dict:
    listed = {out / s["path"] for s in shards}
    for split in SPLIT_NAMES:  # shards of an earlier, different plan
        for stale in sorted((out / split).glob("*/*.tar")) if (out / split).is_dir() else []:
            if stale not in listed:
                stale.unlink()
                stale.with_suffix(".idx").unlink(missing_ok=True)
    totals: dict = defaultdict(lambda: defaultdict(lambda: {"shards": 0, "samples": 0, "bytes": 0}))
    for s in shards:
        t = totals[s["split"]][s["region"]]
        t["shards"] += 1
        t["samples"] += s["samples"]
        t["bytes"] += s["bytes"]
    sharded = sum(s["samples"] for s in shards)
    accounting = {
        "records_in": n_records,
        "sharded": sharded,
        "failed": len(failures),
        "content_duplicates": len(duplicates),
        "ok": n_records == sharded + len(failures) + len(duplicates),
    }
    manifest = {
        "shards": shards,
        "totals": {split: dict(sorted(regions.items())) for split, regions in totals.items()},
        "accounting": accounting,
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "class_mapping": "class_mapping.json",
        "splits_sha256": run_stats["splits_sha256"],  # --retry-failed checks it against the catalog
        "retry_rounds": run_stats["retry_rounds"],  # rounds finalized; a later one is unfinished
        "last_run": run_stats,
    }
    with OutputSet(out) as outputs:
        for mapping in sorted(splits_dir.glob("class_mapping*.json")):
            outputs.json(mapping.name, json.loads(mapping.read_text(encoding="utf-8")))
        outputs.jsonl("failures.jsonl", failures)
        outputs.jsonl("duplicates.jsonl", duplicates)
        if not accounting["ok"]:  # a bug, not bad input: raise before anything is committed
            raise AssertionError(f"sharder accounting broken: {accounting}")
        outputs.json(MANIFEST, manifest)
    if not accounting["ok"]:
        raise AssertionError(f"sharder accounting broken: {accounting}")
    return manifest


# ---------------------------------------------------------------------------------------------- build


def _plan_fingerprint(splits_path: Path, cfg: BuildConfig) -> dict:
    return {
        "splits_sha256": sha256_file(splits_path),
        "seed": cfg.seed,
        "shards": asdict(cfg.shards),
        "images": image_fingerprint(cfg.images),
        "download_policy": failure_policy(cfg.download),  # a new allow-list re-attempts everything
    }


def _retry_rounds(out: Path) -> list[ChunkJob]:
    """Chunk jobs of earlier ``--retry-failed`` rounds, from their saved job files, in round order."""
    jobs = []
    for path in sorted((out / WORK_DIR).glob("retry-round-*.json")):
        jobs.extend(ChunkJob(**row) for row in json.loads(path.read_text(encoding="utf-8")))
    return jobs


def _new_retry_round(out: Path, splits_path: Path, cfg: BuildConfig, splits_sha256: str) -> list[ChunkJob]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("splits_sha256") != splits_sha256:
        raise ConfigError(
            f"--retry-failed: {out}/failures.jsonl belongs to another catalog than {splits_path}; "
            "run a full build first"
        )
    rounds = sorted((out / WORK_DIR).glob("retry-round-*.json"))
    if len(rounds) > manifest.get("retry_rounds", 0):
        return []  # the last round never finished: it is resumed (see _retry_rounds), not planned again
    failures = [
        f for f in read_jsonl(out / "failures.jsonl") if "split" in f and f.get("reason") != "bad_record"
    ]
    round_no = len(rounds) + 1
    by_stream: dict[tuple[str, str], list[int]] = defaultdict(list)
    for f in failures:
        by_stream[(f["split"], f["region"])].append(f["offset"])
    jobs = []
    per = cfg.shards.max_samples
    for (split, region), offs in sorted(
        by_stream.items(), key=lambda s: (SPLIT_NAMES.index(s[0][0]), s[0][1])
    ):
        for c, start in enumerate(range(0, len(offs), per)):
            jobs.append(
                ChunkJob(
                    f"retry{round_no:02d}-{c:06d}",
                    split,
                    region,
                    str(splits_path),
                    str(out),
                    offs[start : start + per],
                    use_negative_cache=False,
                )
            )
    saved = [
        {**{k: v for k, v in asdict(j).items() if k != "cfg"}, "offsets": list(map(int, j.offsets))}
        for j in jobs
    ]
    (out / WORK_DIR / f"retry-round-{round_no:03d}.json").write_text(json.dumps(saved), encoding="utf-8")
    return jobs


def build(splits_dir: str | Path, out_dir: str | Path, cfg: BuildConfig, retry_failed: bool = False) -> dict:
    """Builds (or resumes, or retries the failures of) the shards of a catalog's splits."""
    from tqdm import tqdm

    from .distribute import run_jobs

    splits_dir, out = Path(splits_dir), Path(out_dir)
    splits_path = splits_dir / "dataset_splits.jsonl"
    if not splits_path.is_file():
        raise FileNotFoundError(
            f"no dataset_splits.jsonl in {splits_dir} (run `python -m sharding catalog` first)"
        )
    if not (splits_dir / "class_mapping.json").is_file():
        raise FileNotFoundError(f"no class_mapping.json in {splits_dir}")
    work = out / WORK_DIR
    fingerprint = _plan_fingerprint(splits_path, cfg)
    plan_file = work / PLAN_FILE
    if plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != fingerprint:
        shutil.rmtree(work)  # another catalog or config: nothing in the work area can be reused
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(fingerprint, sort_keys=True), encoding="utf-8")

    jobs, n_records, unreadable = plan_jobs(splits_path, out, cfg)
    if retry_failed:
        if not (out / "manifest.json").is_file():
            raise FileNotFoundError(f"--retry-failed: no manifest.json in {out} (build first)")
        _new_retry_round(out, splits_path, cfg, fingerprint["splits_sha256"])  # saved; loaded just below
    jobs += _retry_rounds(out)  # earlier rounds, and one that a crash left unfinished
    for job in jobs:
        job.cfg = cfg
    todo = [job for job in jobs if load_marker(job) is None]

    processes = cfg.processes or os.cpu_count() or 1
    counts, cache = Counter(), Counter()
    worker_peak = worker_anon = worker_file = 0.0
    started = time.perf_counter()
    hide = not os.isatty(2) if cfg.progress is None else not cfg.progress
    with tqdm(total=sum(j.size for j in todo), unit=" img", desc="shards", disable=hide) as bar:
        for job, marker in run_jobs(run_chunk, todo, cfg.distributor, processes, ray_address=cfg.ray_address):
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
    return finalize(out, jobs, n_records, unreadable, splits_dir, run_stats)
