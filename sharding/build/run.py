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
4. **The dataset card** (card.py): ``dataset_card.md``/``.json`` and plots beside the manifest, from
   the published set and the catalog's reports, on every build and ``--compact``.

**The output folder** is checked before anything is written in it, under its lock: it must not be, hold
or lie inside what the build reads (the splits, the cache: ``refuse_overlap``); a ``manifest.json``
there must be a readable manifest (``check_published``: else one line with the way out, ``--fresh``,
which sets the file aside and builds afresh); and no symbolic link may stand where the build writes
(``refuse_links``: work area, split folders, logs, class mappings, manifest), so nothing is ever
written outside ``--out``.

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
(lock.py: a second build on the same output refuses or waits). What sets an ``s3://`` output apart
(a prefix check, chunks shipped between nodes, publication) is the output object's (``Remote``,
remote.py; ``LocalOutput`` here, where those steps do nothing), chosen once by ``open_output``.
Leaves out: HTTP (download.py), image rules (images.py), the cache (cache.py), tar bytes (writer.py),
where jobs run (distribute.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from flora.errors import FloraError
from flora.io import refuse_overlap
from flora.sharding.build.card import write_card
from flora.sharding.build.finalize import finalize
from flora.sharding.build.incremental import COMPACT_FILE, Increment, build_settings, compact, plan_increment
from flora.sharding.build.job import run_chunk
from flora.sharding.build.lock import output_lock
from flora.sharding.build.plan import (
    MARKER,
    PLAN_FILE,
    WORK_DIR,
    ChunkJob,
    JobSettings,
    load_marker,
    new_retry_round,
    plan_fingerprint,
    plan_jobs,
    retry_rounds,
)
from flora.sharding.build.remote import Remote, prepare
from flora.sharding.cache.config import cap_warning
from flora.sharding.config import SPLIT_NAMES, BuildConfig, ShardConfig
from flora.sharding.format.schema import ATTRIBUTION, DUPLICATES, FAILURES, MANIFEST
from flora.store import is_remote

__all__ = ["BuildConfig", "ShardConfig", "build", "compact_shards"]

log = logging.getLogger(__name__)

SPLITS_FILE = "dataset_splits.jsonl"


@dataclass
class LocalOutput:
    """A folder output: the build runs in it. The steps an ``s3://`` output adds (``Remote``, remote.py)
    do nothing here: no prefix to check, no chunk shipped between nodes, nothing to publish."""

    folder: Path

    def check(self, splits_dir: Path | None, version: str | None) -> None:
        return None

    def job_settings(self, cfg: BuildConfig, splits_sha256: str) -> JobSettings:
        return JobSettings(cfg, splits_sha256)

    def share_splits(self, splits_path: Path, sha256: str) -> None:
        return None

    def fetch_chunk(self, job: ChunkJob) -> bool:
        return False

    def collect(self, job: ChunkJob) -> None:
        return None

    def publish(self, manifest: dict) -> dict:
        return manifest


Output = LocalOutput | Remote


def open_output(out_dir: str | Path) -> Output:
    """``out_dir`` as an output: a folder, or ``s3://bucket/prefix`` (remote.py: the bucket checked, the
    build staged in a local folder, then published). A path that exists but is not a folder (a file) is
    refused (``BuildError``, one line)."""
    if is_remote(out_dir):
        return prepare(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        kind = "a regular file" if os.path.isfile(out_dir) else "not a folder"
        raise BuildError(
            f"build: --out {out_dir} is {kind}; expected a folder (created if missing) or an "
            f"s3://bucket/prefix: name another path"
        )
    return LocalOutput(Path(out_dir))


def build(
    splits_dir: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig,
    retry_failed: bool = False,
    fresh: bool = False,
    keep_tombstones: bool = False,
) -> dict:
    """Builds (or resumes, or retries the failures of) the shards of a catalog's splits.

    ``out_dir`` is a folder or ``s3://bucket/prefix`` (remote.py: built in a local staging folder,
    then published, the manifest last). ``fresh`` (``--fresh``): the folder's ``manifest.json``, damaged
    or not, is set aside (renamed ``manifest.json.set-aside-<UTC time>``) and the build runs as over a
    folder that publishes nothing (no incremental build; shards come again from the cache).
    ``keep_tombstones`` (``--keep-tombstones``): an incremental build leaves the samples it tombstones in
    the kept tars (listed as tombstones; Flora's loaders skip them, other WebDataset readers do not)
    instead of rewriting those shards without them (incremental.py's ``drop_tombstones``).

    Holds the output folder's build lock throughout (lock.py): while another build holds it, this one
    refuses at once or, with ``cfg.wait_lock_s``, waits that long for it.
    """
    splits_dir = Path(splits_dir)
    if not (splits_dir / SPLITS_FILE).is_file():
        raise FileNotFoundError(f"no {SPLITS_FILE} in {splits_dir} (run `flora catalog` first)")
    if not (splits_dir / "class_mapping.json").is_file():
        raise FileNotFoundError(f"no class_mapping.json in {splits_dir}")
    # the output's files are replaced and removed: it must not be, hold or lie in what the build reads
    refuse_overlap(
        "build", out_dir, {"--splits": splits_dir, "the cache (--cache, cache.path)": cfg.cache.path}
    )
    warning = cap_warning(cfg.cache)
    if warning:
        log.warning(warning)
    output = open_output(out_dir)
    # one build per output folder, held until the manifest is written
    with output_lock(output.folder, cfg.wait_lock_s):
        check_published(output.folder, fresh)
        refuse_links(output.folder)
        if (output.folder / WORK_DIR / COMPACT_FILE).is_file():  # a --compact swap a crash interrupted
            compact(output.folder)  # finished first: its staged copies are in the work area
        return _build_locked(splits_dir, output, cfg, retry_failed, keep_tombstones)


def check_published(out: Path, fresh: bool = False) -> None:
    """A ``manifest.json`` in ``out`` must be one (a regular file, UTF-8 JSON, a mapping with a list of
    shards): anything else is a ``BuildError`` naming what is wrong and the way out, ``--fresh``, which
    sets the file aside (renamed, never deleted) and builds the folder as a fresh build."""
    path = out / MANIFEST
    if not os.path.lexists(path):
        return
    if fresh:
        aside = path.with_name(f"{MANIFEST}.set-aside-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(path, aside)  # a link or a folder moves as it is: nothing behind it is touched
        log.warning("build --fresh: %s set aside as %s; building %s as a fresh build", path, aside.name, out)
        return
    why = _damage(path)
    if why:
        raise BuildError(
            f"build: {path} is damaged ({why}), so the build cannot tell what is published there: run again "
            f"with --fresh to set it aside (kept, renamed {MANIFEST}.set-aside-<time>) and build {out} afresh"
        )


def _damage(path: Path) -> str | None:
    """What is wrong with a manifest file, or None."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if not path.is_file():
        return "not a regular file"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        return f"JSON, but not a shard manifest (a {type(raw).__name__} without a list of shards)"
    return None


def refuse_links(out: Path) -> None:
    """Refuses (``BuildError``) a symbolic link where a build writes in ``out`` (``out`` itself may be one):
    its work area, the split folders and everything under them, the manifest, the logs and the class
    mappings. A build writes work files, tars, index files, logs and manifests only inside its output
    folder, never through a link to somewhere else. Other entries (a set-aside manifest, a user's
    notes) are not the build's and are left alone."""
    if not out.is_dir():
        return
    for entry in os.scandir(out):
        name = entry.name
        if name in (WORK_DIR, MANIFEST, FAILURES, DUPLICATES, ATTRIBUTION, *SPLIT_NAMES) or name.startswith(
            ("class_mapping", "dataset_card")
        ):
            _refuse_link(out, Path(entry.path))
            if name in (WORK_DIR, *SPLIT_NAMES) and entry.is_dir(follow_symlinks=False):
                for folder, dirs, files in os.walk(entry.path):
                    for inner in (*dirs, *files):
                        _refuse_link(out, Path(folder) / inner)


def _refuse_link(out: Path, path: Path) -> None:
    if path.is_symlink():
        raise BuildError(
            f"build: {path} is a symbolic link (to {os.readlink(path)}); a build writes only inside its "
            f"output folder {out}: remove the link, or put what it points to in its place"
        )


class BuildError(FloraError, ValueError):
    """The output folder is not one a build can safely write: says what is wrong and the way out."""


def _build_locked(
    splits_dir: Path, output: Output, cfg: BuildConfig, retry_failed: bool, keep_tombstones: bool
) -> dict:
    """Plans, runs the chunks still to do, finalizes and publishes (see the module docstring)."""
    out, splits_path = output.folder, splits_dir / SPLITS_FILE
    fingerprint = _open_work_area(out, splits_path, cfg)
    version = fingerprint["splits_sha256"]
    # s3: a prefix with another data set's manifest is refused; a published set staging lacks comes down
    output.check(splits_dir, version)
    planning = time.perf_counter()
    plan = _plan(splits_dir, output, cfg, fingerprint, retry_failed)
    if cfg.distributor != "local":  # a job on another node reads its records from the store
        output.share_splits(splits_path, version)
    todo = [job for job in plan.jobs if load_marker(job) is None and not output.fetch_chunk(job)]
    plan_seconds = time.perf_counter() - planning  # with an incremental build's shard comparison
    ran = _run(todo, output, cfg)
    missing = [job.chunk_id for job in plan.jobs if not (job.work_dir / MARKER).is_file()]
    if missing:
        raise RuntimeError(f"chunks {missing[:5]} did not complete; run again to resume")
    run_stats = _run_stats(out, version, plan, plan_seconds, ran, cfg, retry_failed)
    manifest = finalize(
        out, plan.jobs, plan.n_records, plan.unreadable, splits_dir, run_stats, plan.release, plan.increment,
        keep_tombstones,
    )  # fmt: skip
    card = write_card(out, splits_dir)  # card.py: beside the manifest, published with the logs
    return {**output.publish(manifest), "card": card}


def _open_work_area(out: Path, splits_path: Path, cfg: BuildConfig) -> dict:
    """The plan's fingerprint, saved in the work area; a work area of another catalog or config is
    emptied first (nothing in it can be reused)."""
    work = out / WORK_DIR
    fingerprint = plan_fingerprint(splits_path, cfg)
    plan_file = work / PLAN_FILE
    if plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != fingerprint:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(fingerprint, sort_keys=True), encoding="utf-8")
    return fingerprint


@dataclass
class _Plan:
    """Every job of this build (new, reused and retry rounds alike), the records in, the splits
    file's unreadable lines, an incremental build's kept shards (None for a full build) and the
    manifest's release fields (``version``, ``parent``, ``build_settings``)."""

    jobs: list[ChunkJob]
    n_records: int
    unreadable: list[dict]
    increment: Increment | None
    release: dict


def _plan(splits_dir: Path, output: Output, cfg: BuildConfig, fingerprint: dict, retry_failed: bool) -> _Plan:
    """Plans the build's jobs (plan.py) over kept shards if any (incremental.py), then its retry rounds:
    ``--retry-failed`` saves a new one, and earlier or unfinished ones are loaded."""
    out, splits_path = output.folder, splits_dir / SPLITS_FILE
    settings = output.job_settings(cfg, fingerprint["splits_sha256"])
    increment = plan_increment(out, splits_dir, fingerprint)  # kept shards, or None
    if increment is None:
        jobs, n_records, unreadable = plan_jobs(splits_path, out, settings)
    else:  # only records not live in a kept shard are planned, after the old shard indices
        jobs, n_records, unreadable = plan_jobs(
            splits_path, out, settings, increment.live_keys(), increment.prefix
        )
    if retry_failed:
        if not (out / MANIFEST).is_file():
            raise FileNotFoundError(f"--retry-failed: no manifest.json in {out} (build first)")
        new_retry_round(out, splits_path, settings)  # saved; loaded just below
    jobs += retry_rounds(out, settings)  # earlier rounds, and one that a crash left unfinished
    release = {
        "version": fingerprint["splits_sha256"],
        "parent": increment.parent if increment else None,
        "build_settings": build_settings(fingerprint),
    }
    return _Plan(jobs, n_records, unreadable, increment, release)


@dataclass
class _Ran:
    """What the jobs run now reported: outcome and cache counts, the workers' peak memory, the time."""

    chunks: int
    images: int
    processes: int
    counts: Counter = field(default_factory=Counter)
    cache: Counter = field(default_factory=Counter)
    worker_peak: float = 0.0
    worker_anon: float = 0.0
    worker_file: float = 0.0
    seconds: float = 0.0

    def add(self, marker: dict) -> None:
        self.counts.update(marker["counts"])
        self.worker_peak = max(self.worker_peak, marker["peak_rss_mib"])
        self.worker_anon = max(self.worker_anon, marker["anon_rss_mib"])
        self.worker_file = max(self.worker_file, marker["file_rss_mib"])
        self.cache.update(marker["cache"])


def _run(todo: list[ChunkJob], output: Output, cfg: BuildConfig) -> _Ran:
    """Runs the jobs where ``cfg.distributor`` says (distribute.py), with a progress bar."""
    from tqdm import tqdm

    from flora.sharding.build.distribute import run_jobs

    ran = _Ran(len(todo), sum(j.size for j in todo), cfg.processes or os.cpu_count() or 1)
    started = time.perf_counter()
    hide = not os.isatty(2) if cfg.progress is None else not cfg.progress
    with tqdm(total=ran.images, unit=" img", desc="shards", disable=hide) as bar:
        ray_options = {"ray_address": cfg.ray_address, "ray_loopback": cfg.ray_loopback}
        for job, marker in run_jobs(run_chunk, todo, cfg.distributor, ran.processes, **ray_options):
            output.collect(job)  # s3: a chunk that ran on another node comes down
            ran.add(marker)
            bar.update(job.size)
            served = ran.counts["from_cache"] + ran.counts["from_network"]
            bar.set_postfix(
                hit=f"{ran.counts['from_cache'] / max(served, 1):.0%}", failed=ran.counts["failed"]
            )
    ran.seconds = time.perf_counter() - started
    return ran


def _run_stats(
    out: Path, version: str, plan: _Plan, plan_seconds: float, ran: _Ran, cfg: BuildConfig, retry_failed: bool
) -> dict:
    """The manifest's ``last_run``: this run's facts (finalize adds its own)."""
    return {
        "splits_sha256": version,
        "retry_rounds": len(list((out / WORK_DIR).glob("retry-round-*.json"))),
        "plan_seconds": round(plan_seconds, 3),
        "chunks_run": ran.chunks,
        "chunks_reused": len(plan.jobs) - ran.chunks,
        "seconds": round(ran.seconds, 3),
        "images_per_s": round(ran.images / ran.seconds, 1) if ran.chunks and ran.seconds > 0 else None,
        "from_cache": ran.counts["from_cache"],
        "from_network": ran.counts["from_network"],
        "failed": ran.counts["failed"],
        "cache": dict(sorted(ran.cache.items())),
        "distributor": cfg.distributor,
        "processes": ran.processes,
        "retry_failed": retry_failed,
        "worker_peak_rss_mib": ran.worker_peak,
        "worker_anon_rss_mib": ran.worker_anon,
        "worker_file_rss_mib": ran.worker_file,
    }


def compact_shards(out_dir: str | Path, wait_lock_s: float = 0.0) -> dict:
    """``--compact``: rewrites shards with tombstones without them (incremental.py), under the lock."""
    output = open_output(out_dir)
    with output_lock(output.folder, wait_lock_s):
        check_published(output.folder)
        refuse_links(output.folder)
        output.check(None, None)  # s3: no data-set check, only the sync
        manifest = compact(output.folder)
        card = write_card(output.folder, None)  # the catalog's facts from the card already there
        return {**output.publish(manifest), "card": card}
