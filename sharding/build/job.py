"""One chunk job of the sharder: its records -> cached or downloaded images -> work tar parts + a marker.

Owns ``run_chunk`` (runs in worker processes or Ray tasks): it reads its records, gets each image
from the LMDB cache or downloads, validates and converts it (``obtain``: cache.py, download.py,
images.py) on a thread pool with a bounded look-ahead window (``in_order``), writes the successes in
plan order into work parts under ``SHARDS/_work/`` (writer.py), and last writes ``chunk.json``
(parts, keys, sha256s and perceptual hashes, failures): a chunk without it is redone from scratch,
so a SIGKILL at any moment loses only unfinished chunks. Also: ``Outcome`` (what one record came
to), ``WorkerState`` (the per-process downloader, cache and pool), the cache write buffer, memory
probes.

Leaves out: planning (plan.py), assembling the shards (finalize.py).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from flora.errors import storage_error
from flora.sharding.build.plan import MARKER, ChunkJob, failure_policy, image_fingerprint
from flora.sharding.build.remote import localize, ship_chunk
from flora.sharding.cache.config import node_cache_dir
from flora.sharding.cache.image_cache import ImageCache
from flora.sharding.catalog.records import url_key
from flora.sharding.config import BuildConfig
from flora.sharding.download.fetch import Downloader
from flora.sharding.download.optout import HEADER, agent_token, opted_out
from flora.sharding.format.schema import SampleMeta, safe_key
from flora.sharding.format.writer import RollingTarWriter, Sample
from flora.sharding.images.budget import DecodeBudget, budget_bytes
from flora.sharding.images.convert import ImageError, process_image
from flora.sharding.images.neardup import perceptual_hashes
from flora.sharding.outputs import dumps

#: Cache writes per commit (see PutBuffer): 32 images of ~50 KB, a few MB per transaction.
PUT_BATCH = 32
#: Downloads kept in flight per worker thread: enough to hide latency, bounded memory.
WINDOW_PER_THREAD = 2
#: Finished downloads that may wait behind a slow one at the head, per window: 8 windows of 16 images
#: of ~100 KB (threads 8) is ~13 MB a process.
HOLD_PER_WINDOW = 8
#: ``next``'s default at the end of the items.
_END = object()


@dataclass
class WorkerState:
    """Per-process downloader, cache and thread pool, reused across the chunks a process runs (a
    worker process runs many chunks; a forked child builds its own)."""

    key: str
    pid: int
    downloader: Downloader
    cache: ImageCache | None
    pool: ThreadPoolExecutor
    policy: str  # failure_policy of the download settings
    budget: DecodeBudget  # the decoding memory this process's threads may have in flight
    present: set = field(default_factory=set)  # cache keys of the current chunk that are cached
    puts: PutBuffer | None = None  # the current chunk's cache writes

    _current: ClassVar[WorkerState | None] = None
    _atexit: ClassVar[bool] = False

    @classmethod
    def for_config(cls, cfg: BuildConfig) -> WorkerState:
        key = dumps(asdict(cfg), sort_keys=True)
        current = cls._current
        if current is None or current.key != key or current.pid != os.getpid():
            cls.close_current()
            if not cls._atexit:
                atexit.register(cls.close_current)  # flushes the cache's batched recency updates
                cls._atexit = True
            cls._current = cls(
                key=key,
                pid=os.getpid(),
                downloader=Downloader(cfg.download),
                cache=ImageCache.from_config(replace(cfg.cache, path=node_cache_dir(cfg.cache))),  # per node
                pool=ThreadPoolExecutor(cfg.download.threads, thread_name_prefix="fetch"),
                policy=failure_policy(cfg.download),
                budget=DecodeBudget(
                    budget_bytes(cfg.decode_budget_mib, cfg.processes or os.cpu_count() or 1)
                ),
            )
        return cls._current

    @classmethod
    def close_current(cls) -> None:
        current, cls._current = cls._current, None
        if current is not None and current.pid == os.getpid():  # a fork's inherited state is left alone
            if current.cache is not None:
                current.cache.close()
            current.downloader.close()
            current.pool.shutdown(wait=False)


class PutBuffer:
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


def read_records(job: ChunkJob) -> Iterator[dict]:
    with open(job.splits_path, "rb") as fh:
        for offset in map(int, job.offsets):
            fh.seek(offset)
            record = json.loads(fh.readline())
            record["_offset"] = offset
            yield record


@dataclass
class Outcome:
    """What getting one record's image came to: the stored JPEG and its facts, or a failure."""

    ok: bool
    source: str  # "cache" or "network"
    jpg: bytes = b""
    meta: dict = field(default_factory=dict)  # the stored image's facts (sharding.format.SampleMeta)
    reason: str = ""  # a failure's reason (download.py, images.py)
    message: str = ""
    attempts: int = 0
    status: int | None = None  # the last HTTP status, if any
    robots: tuple[str, ...] = ()  # the response's X-Robots-Tag values (download/optout.py)

    def cache_entry(self, policy: str) -> tuple[bytes, dict]:
        """(data, meta) to cache: the JPEG, or a negative entry valid under this download policy."""
        if self.ok:
            return self.jpg, self.meta
        meta = {"failed": self.reason, "message": self.message[:300], "status": self.status,
                "attempts": self.attempts, "policy": policy, "robots": list(self.robots)}  # fmt: skip
        return b"", meta


def obtain(record: dict, state: WorkerState, cfg: BuildConfig, prefix: str, use_negative: bool) -> Outcome:
    """Cache, else download + validate + cache (a failure is cached as a negative entry).

    A cached response whose ``X-Robots-Tag`` values (kept with every entry) opt out under this build's
    ``download.opt_out_directives`` fails as ``opted_out``, image or not; an entry that opted out under
    other directives is fetched again (a retry round re-asks the host either way), and so is one cached
    before the header's values were kept, unless the directives are off."""
    url = record["image_url"]
    key = f"{prefix}|{url}"
    if state.cache is not None and key in state.present:
        entry = state.cache.get(key)
        why = _opts_out(entry.meta, cfg) if entry is not None else []
        if why and use_negative:
            text = f"{HEADER} {'; '.join(entry.meta['robots'])!r} opts out ({', '.join(why)}) (cached)"
            return Outcome(False, "cache", reason="opted_out", message=text, status=entry.meta.get("status"),
                           robots=tuple(entry.meta["robots"]))  # fmt: skip
        # an image cached before responses' headers were kept cannot be judged: fetched again
        unjudged = entry is not None and "robots" not in entry.meta and bool(cfg.download.opt_out_directives)
        if entry is not None and not why and not unjudged:
            if not entry.meta.get("failed"):
                meta = entry.meta
                if "phash_crops" not in meta:  # cached before the hashes existed: a function of the bytes
                    phash, crops = perceptual_hashes(entry.data)
                    meta = {**meta, "phash": phash, "phash_crops": crops}
                return Outcome(True, "cache", entry.data, meta)
            if (
                use_negative
                and entry.meta.get("policy") == state.policy
                and entry.meta["failed"] != "opted_out"
            ):
                meta = entry.meta
                return Outcome(False, "cache", reason=meta["failed"], message=meta.get("message", ""),
                               attempts=meta.get("attempts", 0), status=meta.get("status"))  # fmt: skip
    fetched = state.downloader.fetch(url)
    if not fetched.ok:
        got = Outcome(False, "network", reason=fetched.reason, message=fetched.message,
                      attempts=fetched.attempts, status=fetched.status, robots=fetched.robots)  # fmt: skip
    else:
        try:
            image = process_image(fetched.data, cfg.images, budget=state.budget)
        except ImageError as exc:
            got = Outcome(False, "network", reason=exc.reason, message=str(exc),
                          attempts=fetched.attempts, status=fetched.status)  # fmt: skip
        else:
            meta = {
                "sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "original_width": image.original_width,
                "original_height": image.original_height,
                "original_format": image.original_format,
                "phash": image.phash,
                "phash_crops": image.phash_crops,
                "robots": list(fetched.robots),  # judged again by each build that finds it cached
            }
            got = Outcome(True, "network", image.jpeg, meta)
    state.puts.add(key, *got.cache_entry(state.policy))
    return got


def _opts_out(meta: dict, cfg: BuildConfig) -> list[str]:
    """The configured directives that a cached response's X-Robots-Tag values address to us."""
    return opted_out(
        meta.get("robots"), cfg.download.opt_out_directives, agent_token(cfg.download.user_agent)
    )


def in_order(
    pool: ThreadPoolExecutor, fn, items: Iterator[dict], window: int, hold: int | None = None
) -> Iterator[tuple[dict, Any]]:
    """Like ``pool.map`` (results in input order) with at most ``window`` items running and at most
    ``hold`` (default ``window * HOLD_PER_WINDOW``) finished or running ones kept (bounded memory).

    A slow item at the head does not stop the others: while it runs, new items start as running ones
    finish, up to ``hold``; so several trickling hosts in one chunk cost about one deadline, not one
    each, one after another. Finishing items are counted by a done-callback (no rescan of the running
    set per result: at 32 threads that was 64 locked ``done()`` calls per image)."""
    hold = max(window, hold if hold is not None else window * HOLD_PER_WINDOW)
    pending: deque[tuple[dict, Future]] = deque()
    finished = threading.Condition()
    counts = [0, 0]  # submitted, finished

    def on_done(_: Future) -> None:
        with finished:
            counts[1] += 1
            finished.notify()

    items = iter(items)
    exhausted = False
    while True:
        while not exhausted and counts[0] - counts[1] < window and len(pending) < hold:
            item = next(items, _END)
            if item is _END:
                exhausted = True
                break
            future = pool.submit(fn, item)
            counts[0] += 1
            pending.append((item, future))
            future.add_done_callback(on_done)
        if not pending:
            return
        head, future = pending[0]
        if future.done() or exhausted or len(pending) >= hold or counts[0] - counts[1] <= 1:
            pending.popleft()
            yield head, future.result()
        else:  # the head and others are still running: wait for any item to finish, then start more
            with finished:
                seen = counts[1]
                finished.wait_for(lambda seen=seen: counts[1] != seen)


#: What to do after a disk error: the chunks finished so far are kept and reused.
RESUME = "run the build again (finished chunks are kept and reused)"


def run_chunk(job: ChunkJob) -> dict:
    """Runs one chunk job (see module docstring), writes its marker, returns the marker's summary
    (counts, cache counters, memory) to the driver: the rest stays on disk until finalize."""
    cfg = job.settings.cfg
    started = time.perf_counter()
    ship = localize(job)  # remote.py: on another node than the driver, work here, then ship via the store
    shutil.rmtree(job.work_dir, ignore_errors=True)  # a chunk without a marker is redone from scratch
    job.work_dir.mkdir(parents=True)
    state = WorkerState.for_config(cfg)
    state.puts = puts = PutBuffer(state.cache)
    cache_before = state.cache.stats() if state.cache is not None else {}
    prefix = image_fingerprint(cfg.images)
    writer = RollingTarWriter(job.work_dir, "part", cfg.shards.max_samples, cfg.shards.max_bytes)
    failures, samples = [], []
    counts = Counter()
    window = max(1, cfg.download.threads * WINDOW_PER_THREAD)
    fetch = lambda r: obtain(r, state, cfg, prefix, job.use_negative_cache)  # noqa: E731
    records = list(read_records(job))  # one chunk: at most shards.max_samples small dicts
    keys = [f"{prefix}|{r['image_url']}" for r in records]
    state.present = state.cache.contains_many(keys) if state.cache is not None else set()
    try:
        if len(state.present) == len(records):  # all cached (a rebuild): threads would only add overhead
            outcomes = ((r, fetch(r)) for r in records)
        else:
            outcomes = in_order(state.pool, fetch, iter(records), window)
        for record, got in outcomes:
            counts[f"from_{got.source}"] += 1
            ident = {
                k: record.get(k) for k in ("plant_id", "latin_name", "image_url", "split", "region", "label")
            }
            ident["offset"] = record["_offset"]
            if not got.ok:
                counts["failed"] += 1
                failures.append(
                    {
                        **ident,
                        "reason": got.reason,
                        "message": got.message,
                        "attempts": got.attempts,
                        "http_status": got.status,
                        "chunk": job.chunk_id,
                    }
                )
                continue
            key = safe_key(url_key(record["image_url"]))
            meta = SampleMeta.from_record(record, record["label"], got.meta).as_json()
            writer.write(Sample(key=key, jpg=got.jpg, label=int(record["label"]), meta=meta))
            facts = {k: got.meta[k] for k in ("sha256", "phash", "phash_crops")}
            samples.append({"key": key, **facts, "image_url": record["image_url"]})
        parts = writer.close()
        puts.flush()
    except OSError as exc:  # a full or failing disk under the work area: one line naming the file
        writing = writer.current or job.work_dir
        writer.abort()
        raise storage_error("build: writing shard parts", writing, exc, RESUME) from exc
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
        "cache": _delta(cache_before, state.cache.stats() if state.cache is not None else {}),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mib": round(memory_mib("VmHWM"), 1),
        "anon_rss_mib": round(memory_mib("RssAnon"), 1),
        "file_rss_mib": round(memory_mib("RssFile"), 1),
    }
    tmp = job.work_dir / (MARKER + ".tmp")
    try:
        tmp.write_text(dumps(marker), encoding="utf-8")
        os.replace(tmp, job.work_dir / MARKER)  # the chunk is complete only now
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error("build: writing a chunk marker", tmp, exc, RESUME) from exc
    if ship:
        ship_chunk(job)
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
    counters += ("write_failures", "read_failures")
    return {k: after[k] - before.get(k, 0) for k in counters if k in after}
