"""A real two-node Ray cluster on one machine, every component on 127.0.0.1: a head and a second node
started as separate processes with ``ray start`` (their own temp folders, raylets, custom resources
and image caches), the sharder's ``--distributor ray --ray-address`` building the sample world's
shards over both (equal, sample for sample, to a local build), and a node killed mid-build (the build
finishes on the node left or stops with one line; a re-run completes without duplicates).

How the cluster stays on loopback: ``ray start --node-ip-address=127.0.0.1`` would swap 127.0.0.1 for
the machine's interface address (``services.resolve_ip_for_localhost``) unless Ray runs in its
single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which refuses to add a second node. The
nodes are started through ``ray start``'s own entry point with that one swap turned off
(``_LAUNCHER``); given 127.0.0.1, the GCS, the raylets, the agents, the client server and every worker
bind 127.0.0.1 only, which the first test checks in /proc. Every port Ray would otherwise pick from a
fixed default (GCS 6379, client server 10001, dashboard agent 52365) is a free one; the dashboard is
off; token authentication (``RAY_AUTH_MODE=token``) with a fresh token per cluster keeps other local
users' drivers out; no usage statistics are sent. Nodes are stopped by signalling their own process
ids (``ray stop`` would stop every Ray process on the machine, other users' too).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from flora.sharding.cache.config import NODE_CACHE_ENV

from .build_settings import cli, shard_bytes
from .listening import descendants, listening

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
# `ray start` returns once its node is up: 10-20 s each on the project's 2-core machines.
NODE_START_TIMEOUT_S = 120
NODE_STOP_TIMEOUT_S = 2  # then SIGKILL: some agents ignore SIGTERM for long (a test cluster keeps nothing)
BUILD_TIMEOUT_S = 300
# The GCS marks a node dead after this many failed health checks this far apart (Ray's defaults,
# 3 s and 5, take 15 s or more): 1 s x 3 lets the killed node's tasks move on within seconds.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

# `ray start`, keeping --node-ip-address=127.0.0.1 as given (see the module docstring).
_LAUNCHER = """\
import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _session(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class RayNode:
    """One node started with ``ray start`` in a session of its own: every process it starts (GCS,
    raylet, agents, workers; Ray daemonises them) stays in that session, which is how they are found."""

    name: str
    temp_dir: Path
    cache_dir: Path
    env: dict[str, str]
    launcher_pid: int
    log: str

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], cache_dir: Path) -> RayNode:
        # Short: Ray's unix socket paths under it must stay below 108 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))
        node_env = {**env, NODE_CACHE_ENV: str(cache_dir)}
        argv = [sys.executable, "-c", _LAUNCHER, "start", f"--temp-dir={temp_dir}", *args]
        proc = subprocess.run(
            argv,
            env=node_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=NODE_START_TIMEOUT_S,
            start_new_session=True,  # its session id is the launcher's pid
            check=False,
        )
        node = cls(name, temp_dir, cache_dir, node_env, _launcher_pid_of(temp_dir), proc.stdout + proc.stderr)
        if proc.returncode != 0:
            node.kill()
            raise RuntimeError(f"ray start ({name}) failed with {proc.returncode}:\n{node.log[-4000:]}")
        return node

    def pids(self) -> set[int]:
        """This node's live processes (its session's)."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _session(int(entry.name)) == self.launcher_pid:
                found.add(int(entry.name))
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        stop_nodes([self])


def stop_nodes(nodes: list[RayNode]) -> None:
    """SIGTERM to every process of ``nodes`` at once, ``NODE_STOP_TIMEOUT_S`` for all of them to end,
    then SIGKILL to what is left; their temp folders go."""
    for node in nodes:
        node.kill(signal.SIGTERM)
    deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
    while any(node.pids() for node in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    for node in nodes:
        node.kill(signal.SIGKILL)
        shutil.rmtree(node.temp_dir, ignore_errors=True)


def _launcher_pid_of(temp_dir: Path) -> int:
    """The session id of the node's processes: the pid of the ``ray start`` that made them, found as
    the session of the process whose command line names ``temp_dir`` (the raylet does)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(temp_dir).encode() in cmdline:
            session = _session(int(entry.name))
            if session is not None:
                return session
    return -1


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs: the auth token, no usage stats
    head: RayNode
    worker: RayNode
    extra: list[RayNode] = field(default_factory=list)

    def nodes(self) -> list[RayNode]:
        return [self.head, self.worker, *self.extra]

    def add_node(self, name: str, cache_dir: Path, resources: dict[str, int]) -> RayNode:
        node = RayNode.start(name, _worker_args(self.address, resources), self.env, cache_dir)
        self.extra.append(node)
        return node


def _common_args(resources: dict[str, int]) -> list[str]:
    return [
        f"--node-ip-address={LOOPBACK}",
        "--num-cpus=1",
        f"--resources={json.dumps(resources)}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--include-log-monitor=false",
        "--disable-usage-stats",
    ]


def _worker_args(address: str, resources: dict[str, int]) -> list[str]:
    return [f"--address={address}", *_common_args(resources)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server) -> Iterator[Cluster]:
    """Two nodes; the worker node has a cache root of its own (``FLORA_CACHE_DIR``), as another machine
    would, and every node has the S3 server's environment (jobs there ship chunks through the store)."""
    root = tmp_path_factory.mktemp("ray-cluster")
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        **s3_server.env(),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port = _free_port()
    head_args = [
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
        f"--system-config={json.dumps(SYSTEM_CONFIG)}",
        *_common_args({"flora_head": 1}),
    ]
    head = RayNode.start("head", head_args, env, root / "head-cache")
    address = f"{LOOPBACK}:{gcs_port}"
    try:
        worker_env = {**env, "FLORA_CACHE_DIR": str(root / "worker-root")}  # not the driver's staging
        worker = RayNode.start(
            "worker", _worker_args(address, {"flora_worker": 1}), worker_env, root / "worker-cache"
        )
    except BaseException:
        head.stop()
        raise
    cluster = Cluster(address, env, head, worker)
    try:
        yield cluster
    finally:
        stop_nodes(cluster.nodes())


# A driver in a process of its own: Ray reads RAY_AUTH_MODE once per process, and this one may have
# met Ray before (another test's local instance). It pauses, connected, after the first result.
_DRIVER = """\
import json, os, sys, time
from flora.sharding.build.distribute import run_jobs

def where(name):  # holds its node's one CPU a moment, so that the next task goes to the other node
    time.sleep(0.5)
    return os.environ.get(name)

results = run_jobs(where, [sys.argv[2]] * int(sys.argv[3]), "ray", ray_address=sys.argv[1])
first = [next(results)[1]]
print("connected", flush=True)
sys.stdin.readline()
print(json.dumps(first + [result for _, result in results]), flush=True)
"""


def test_tasks_run_on_both_nodes_and_every_listener_is_on_loopback(cluster):
    argv = [sys.executable, "-c", _DRIVER, cluster.address, NODE_CACHE_ENV, "8"]
    pipe = subprocess.PIPE
    driver = subprocess.Popen(argv, cwd=REPO, env=cluster.env, stdin=pipe, stdout=pipe, text=True)
    try:
        assert driver.stdout.readline().strip() == "connected"
        driver_pids = descendants(driver.pid)
        seen = listening(set().union(*(node.pids() for node in cluster.nodes())) | driver_pids)
        results = json.loads(driver.communicate("go\n", timeout=BUILD_TIMEOUT_S)[0])
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0
    # Each node's workers inherit its raylet's environment: the value says which node ran the task.
    assert set(results) == {str(cluster.head.cache_dir), str(cluster.worker.cache_dir)}, results
    names = [s.name for s in seen]
    assert sum("raylet" in n for n in names) >= 2 and any("gcs_server" in n for n in names), seen
    assert any(s.pid in driver_pids for s in seen), f"the driver's own server was not found: {seen}"
    exposed = [s for s in seen if not s.loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"


# -- builds ------------------------------------------------------------------------------------------


def _build(world, out, *extra: str, env: dict[str, str] | None = None, wait: bool = True):
    argv = cli(world.splits, out, "shards.max_samples=20", "download.threads=2", *extra)
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=BUILD_TIMEOUT_S)
    return SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def local_build(clean_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-build") / "shards"
    done = _build(clean_world, out, "processes=1", "--distributor", "local")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def output_location(tmp_path) -> Path:
    """Where the cluster's build writes (a local folder for now; the object store later)."""
    return tmp_path / "ray-shards"


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard: key -> {member extension: bytes}."""
    import tarfile

    found: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*/*/*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                assert (key not in found) or (ext not in found[key]), f"duplicate sample {member.name}"
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def test_a_build_over_both_nodes_equals_a_local_build(
    cluster, clean_world, local_build, output_location, tmp_path
):
    driver_cache = tmp_path / "driver-cache"
    env = {k: v for k, v in cluster.env.items() if k != NODE_CACHE_ENV}
    done = _build(
        clean_world,
        output_location,
        f"cache.path={driver_cache}",  # config overrides first, then flags
        "--distributor",
        "ray",
        "--ray-address",
        cluster.address,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((output_location / "manifest.json").read_text())
    assert manifest["last_run"]["distributor"] == "ray"
    assert manifest["accounting"]["ok"]
    ours, theirs = _samples(output_location), _samples(local_build)
    assert ours.keys() == theirs.keys() and ours == theirs, "sample for sample"
    assert shard_bytes(output_location) == shard_bytes(local_build), "byte for byte"
    # Each node filled its own cache; the driver's configured one was never opened by a job.
    assert (cluster.head.cache_dir / "data.mdb").is_file(), "no job ran on the head node"
    assert (cluster.worker.cache_dir / "data.mdb").is_file(), "no job ran on the worker node"
    assert not driver_cache.exists()


@pytest.mark.s3
def test_a_build_over_both_nodes_into_s3_equals_a_local_build(
    cluster, clean_world, local_build, s3_bucket, tmp_path
):
    """``--out s3://...`` over the cluster: the worker node (another cache root, so not the driver's
    staging folder) ships its chunks through the store; the published set equals the local build."""
    from flora import store
    from flora.store import S3Url

    url = f"s3://{s3_bucket}/cluster"
    env = {k: v for k, v in cluster.env.items() if k != NODE_CACHE_ENV}
    done = _build(clean_world, url, f"cache.path={tmp_path / 'c'}", "--distributor", "ray", "--ray-address",
                  cluster.address, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published to" in done.stdout
    worker_root = cluster.worker.env["FLORA_CACHE_DIR"]
    shipped = list(Path(worker_root).glob("staging/*/_work/*/*/*/chunk.json"))
    assert shipped, "no chunk ran on the worker node"
    base = S3Url.parse(url)
    keys = {k for k, _ in store.list_objects(base)}
    assert not [k for k in keys if k.startswith("_work/")], "the store's work area goes once published"
    tars = {p.relative_to(local_build).as_posix(): p.read_bytes() for p in local_build.glob("*/*/*.tar")}
    assert {k for k in keys if k.endswith(".tar")} == set(tars)
    assert all(store.read_bytes(base.join(k)) == data for k, data in tars.items()), "byte for byte"


def test_a_node_killed_mid_build_then_a_rerun_completes_without_duplicates(
    cluster, clean_world, local_build, output_location, tmp_path
):
    doomed = cluster.add_node("doomed", tmp_path / "doomed-cache", {"flora_doomed": 1})
    env = {k: v for k, v in cluster.env.items() if k != NODE_CACHE_ENV}
    argv_extra = [f"cache.path={tmp_path / 'c'}", "--distributor", "ray", "--ray-address", cluster.address]
    proc = _build(clean_world, output_location, *argv_extra, env=env, wait=False)
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        # Killed once some chunk has finished (the build is under way) and the doomed node holds work.
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the build ended before the node could be killed:\n{proc.stderr.read()[-3000:]}")
            started = (doomed.cache_dir / "data.mdb").is_file()
            if started and list(output_location.glob("_work/*/*/*/chunk.json")):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the doomed node never got a job")
        doomed.kill()  # SIGKILL: raylet, agents, workers
        stdout, stderr = proc.communicate(timeout=BUILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        errors = [line for line in stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("flora build: error:"), stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    rerun = _build(clean_world, output_location, *argv_extra, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((output_location / "manifest.json").read_text())
    assert manifest["accounting"]["ok"]
    assert _samples(output_location) == _samples(local_build)  # _samples refuses duplicates
    assert shard_bytes(output_location) == shard_bytes(local_build)
    print(f"first run exit {proc.returncode}; stderr tail: {stderr[-500:]!r}")
