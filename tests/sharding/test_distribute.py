"""Distributors: a local Ray instance listens on loopback only (every process it starts) and reports
no usage statistics, a cluster address on loopback is dialled as given, each node's image cache is
its own, and the procfs reader the checks rely on finds and classifies sockets correctly. (A real
two-node cluster: test_ray_cluster.py.)"""

import ipaddress
import os
import socket
from pathlib import Path

import pytest

from flora.errors import one_line
from flora.sharding.build.distribute import USAGE_STATS_ENV, run_jobs
from flora.sharding.cache.config import NODE_CACHE_ENV, CacheConfig, node_cache_dir

from .listening import descendants, is_loopback, listening, parse_address


def test_proc_addresses_are_parsed_and_classified():
    assert parse_address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert parse_address("020200C0") == ipaddress.ip_address("192.0.2.2")  # an interface address
    mapped = parse_address("0000000000000000FFFF00000100007F")
    assert mapped == ipaddress.ip_address("::ffff:127.0.0.1") and is_loopback(mapped)
    assert is_loopback(parse_address("00000000000000000000000001000000"))  # ::1
    assert not is_loopback(parse_address("00000000000000000000000000000000"))  # :: (every interface)
    assert not is_loopback(parse_address("00000000"))  # 0.0.0.0
    assert not is_loopback(ipaddress.ip_address("192.0.2.2"))


def test_a_listening_loopback_socket_of_this_process_is_found():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        mine = [s for s in listening({os.getpid()}) if s.port == port]
    assert len(mine) == 1 and mine[0].loopback and mine[0].pid == os.getpid()
    assert os.getpid() in descendants(os.getpid())
    assert not [s for s in listening({os.getpid()}) if s.port == port]  # closed: gone


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_loopback_only():
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    env_before = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    usage_before = os.environ.get(USAGE_STATS_ENV)
    mode_before = ray_constants.ENABLE_RAY_CLUSTER
    results, seen = {}, []
    jobs = ["a\nb", "c", "d\n\ne", " f "]  # one_line: a plain top-level function the workers can import
    for job, result in run_jobs(one_line, jobs, "ray", processes=2):
        results[job] = result
        if not seen:  # Ray is up while the jobs' results are yielded
            assert ray.is_initialized()
            seen = listening(descendants(os.getpid()))
            gcs_env = [_environ(s.pid) for s in seen if "gcs_server" in s.name]
    assert results == {job: one_line(job) for job in jobs}
    assert not ray.is_initialized(), "the distributor stops the instance it started"
    names = " ".join(s.name for s in seen)
    assert "gcs_server" in names and "raylet" in names, f"Ray's servers were not found: {seen}"
    if usage_before is None:  # the processes Ray started were told not to report usage
        assert gcs_env and all(f"{USAGE_STATS_ENV}=0" in env for env in gcs_env)
    exposed = [s for s in seen if not s.loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) == env_before  # restored
    assert mode_before == ray_constants.ENABLE_RAY_CLUSTER
    assert os.environ.get(USAGE_STATS_ENV) == usage_before


def _environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


def test_a_node_cache_dir_comes_from_the_node_environment(tmp_path, monkeypatch):
    configured = CacheConfig(path=str(tmp_path / "configured"))
    monkeypatch.delenv(NODE_CACHE_ENV, raising=False)
    assert node_cache_dir(configured) == str(tmp_path / "configured")
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node"))
    assert node_cache_dir(configured) == str(tmp_path / "node")
    assert node_cache_dir(CacheConfig(path=None)) is None, "the variable moves a cache, never turns one on"


def test_a_cluster_address_on_loopback_is_dialled_as_given():
    pytest.importorskip("ray")
    from ray._private import services

    from flora.sharding.build.distribute import _ray_address_as_given

    original = services.resolve_ip_for_localhost
    with _ray_address_as_given("127.0.0.1:6379"):
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    assert services.resolve_ip_for_localhost is original
    with _ray_address_as_given("10.1.2.3:6379"):
        assert services.resolve_ip_for_localhost is original  # a real cluster: Ray's rules
    with _ray_address_as_given(None):
        assert services.resolve_ip_for_localhost is original


@pytest.mark.slow
def test_a_job_whose_worker_keeps_dying_is_one_distribute_error():
    pytest.importorskip("ray")
    from flora.sharding.build.distribute import RAY_TASK_RETRIES, DistributeError

    def die(code: int) -> None:  # local: pickled by value, so the workers need not import this module
        os._exit(code)  # kills the Ray worker running it; Ray re-runs it RAY_TASK_RETRIES times

    with pytest.raises(DistributeError) as exc:
        list(run_jobs(die, [1], "ray", processes=1))
    message = str(exc.value)
    assert "\n" not in message and message.endswith("run the build again to resume"), message
    assert "WorkerCrashedError" in message and RAY_TASK_RETRIES == 3
