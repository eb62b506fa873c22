"""Where shard jobs run: local worker processes (default) or Ray tasks on an existing cluster.

Owns ``run_jobs(fn, jobs, ...)``: it calls the picklable top-level function ``fn(job)`` for every
job and yields ``(job, result)`` as jobs complete, in completion order. Distributors register by
name (``DISTRIBUTORS``), as img2dataset's ``multiprocessing``/``pyspark``/``ray`` ones do.

* ``local``: a ``ProcessPoolExecutor`` with the ``spawn`` start method (no LMDB environment, HTTP
  pool or thread is ever inherited across ``fork``); ``processes=1`` runs inline, in this process.
* ``ray``: ``ray.init(address=...)`` (``None`` starts a local instance), one task per job; jobs
  share nothing but the output location and each node's own cache directory.

Leaves out: what a job does (build.py), retries of crashed jobs (a re-run resumes instead).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

Job = Any
Result = Any


def _local(
    fn: Callable[[Job], Result], jobs: Sequence[Job], processes: int, **_: Any
) -> Iterator[tuple[Job, Result]]:
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, fn(job)
        return
    ctx = multiprocessing.get_context("spawn")
    # Workers run dozens of threads; glibc's default of 8 malloc arenas per core lets freed image
    # buffers pile up per thread. Two arenas keep a long-running worker's memory flat.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    with ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(fn, job): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield futures.pop(future), future.result()  # dropped once yielded: flat memory


def _ray(
    fn: Callable[[Job], Result], jobs: Sequence[Job], processes: int, ray_address: str | None = None, **_: Any
) -> Iterator[tuple[Job, Result]]:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a declared dependency
        raise RuntimeError("--distributor ray needs Ray: pip install 'flora[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": ray_address} if ray_address else {"num_cpus": max(processes, 1)}
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **kwargs)
    try:
        remote = ray.remote(fn)
        refs = {remote.remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs.pop(ref), ray.get(ref)
    finally:
        if started_here:
            ray.shutdown()


DISTRIBUTORS: dict[str, Callable[..., Iterator[tuple[Job, Result]]]] = {"local": _local, "ray": _ray}


def run_jobs(
    fn: Callable[[Job], Result],
    jobs: Sequence[Job],
    distributor: str = "local",
    processes: int = 1,
    **options: Any,
) -> Iterator[tuple[Job, Result]]:
    """Runs ``fn`` on every job with the named distributor; yields ``(job, result)`` as they finish."""
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"unknown distributor {distributor!r}; known: {', '.join(DISTRIBUTORS)}")
    return DISTRIBUTORS[distributor](fn, jobs, processes, **options)
