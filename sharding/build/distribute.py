"""Where shard jobs run: local worker processes (default) or Ray tasks on an existing cluster.

Owns ``run_jobs(fn, jobs, ...)``: it calls the picklable top-level function ``fn(job)`` for every
job and yields ``(job, result)`` as jobs complete, in completion order. Distributors register by
name (``DISTRIBUTORS``), as img2dataset's ``multiprocessing``/``pyspark``/``ray`` ones do.

* ``local``: a ``ProcessPoolExecutor`` with the ``spawn`` start method (no LMDB environment, HTTP
  pool or thread is ever inherited across ``fork``); ``processes=1`` runs inline, in this process.
* ``ray``: ``ray.init(address=...)`` (``None`` starts a local instance), one task per job, spread over
  the cluster's nodes (``SPREAD``); jobs share nothing but the output location and each node's own
  cache directory (``$FLORA_IMAGE_CACHE_DIR`` in that node's environment, cache_config.py). A task
  whose worker or node dies is re-run elsewhere by Ray (``RAY_TASK_RETRIES``; a job redoes its chunk
  from scratch); when Ray gives up, the build stops with one ``DistributeError`` line and a re-run
  resumes. A cluster with token authentication (``RAY_AUTH_MODE=token``) needs ``RAY_AUTH_TOKEN`` in
  the driver's environment, as every Ray client does. A local instance (no
  ``ray_address``, no ``RAY_ADDRESS`` in the environment) binds every component (GCS, raylet, workers,
  agents) to 127.0.0.1 only (``ray_loopback``, default on): left alone, Ray listens on the machine's
  interface address, reachable from the network, though nobody asked for a cluster.
  ``ray_loopback=false`` restores Ray's default. A ``ray_address`` on 127.0.0.1 (a cluster on this
  machine's loopback, as the tests start one) is connected to as given: Ray would swap it for the
  interface address (``_ray_address_as_given``), where such a cluster does not listen. A local
  instance reports no usage statistics to Ray's servers (``RAY_USAGE_STATS_ENABLED=0`` unless the
  environment says otherwise).

Leaves out: what a job does (build.py), retries of crashed jobs beyond Ray's own (a re-run resumes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from flora.errors import FloraError, one_line

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


#: Where a local Ray instance listens when ``ray_loopback`` is on.
LOOPBACK = "127.0.0.1"
#: Re-runs of a task whose worker process or node died (Ray's own default, stated): jobs are idempotent.
RAY_TASK_RETRIES = 3
#: How much of Ray's (long, multi-line) description of a lost task goes into the one-line error.
RAY_ERROR_CHARS = 300


class DistributeError(FloraError, RuntimeError):
    """A job could not be run to the end by the distributor (Ray lost its worker or node for good)."""


@contextlib.contextmanager
def _ray_loopback_only() -> Iterator[None]:
    """While a local Ray instance starts, Ray's own single-machine mode: ``ray.init`` otherwise turns
    127.0.0.1 into the interface address (``services.resolve_ip_for_localhost``). The mode is Ray's
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when Ray is imported, so it is set both in the
    environment (for the processes Ray starts) and in Ray's already-loaded constant; both are restored.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _ray_address_as_given(address: str | None) -> Iterator[None]:
    """While connecting to ``address`` on a loopback host: Ray's ``resolve_ip_for_localhost`` left out,
    so the driver dials 127.0.0.1, not the interface address Ray would put in its place."""
    from ray._private import services

    host = (address or "").rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        yield
        return
    saved = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = saved


#: Ray's switch for reporting usage statistics to its servers.
USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``name=value`` in the environment while Ray starts its processes, unless already set."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _ray(
    fn: Callable[[Job], Result],
    jobs: Sequence[Job],
    processes: int,
    ray_address: str | None = None,
    ray_loopback: bool = True,
    **_: Any,
) -> Iterator[tuple[Job, Result]]:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a declared dependency
        raise RuntimeError("--distributor ray needs Ray: pip install 'flora[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"address": ray_address} if ray_address else {"num_cpus": max(processes, 1)}
        local = not (ray_address or os.environ.get("RAY_ADDRESS"))  # Ray's own variable
        if local and ray_loopback:
            kwargs["_node_ip_address"] = LOOPBACK
        with (
            _ray_loopback_only() if local and ray_loopback else contextlib.nullcontext(),
            _env_default(USAGE_STATS_ENV, "0") if local else contextlib.nullcontext(),
            _ray_address_as_given(ray_address),
        ):
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **kwargs)
    try:
        remote = ray.remote(scheduling_strategy="SPREAD", max_retries=RAY_TASK_RETRIES)(fn)
        refs = {remote.remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError:
                    raise  # the job's own exception, raised again here as its own type
                except ray.exceptions.RayError as exc:  # its worker or node died, and retries ran out
                    what = getattr(job, "chunk_id", None) or "a job"
                    why = one_line(f"{type(exc).__name__}: {exc}")[:RAY_ERROR_CHARS]
                    raise DistributeError(
                        f"Ray could not finish {what} ({why}); run the build again to resume"
                    ) from exc
                yield job, result
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
