"""Distributors: a local Ray instance listens on loopback only (every process it starts), and the
procfs reader the check relies on finds and classifies sockets correctly."""

import ipaddress
import os
import socket

import pytest

from flora.errors import one_line
from sharding.distribute import run_jobs

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
    mode_before = ray_constants.ENABLE_RAY_CLUSTER
    results, seen = {}, []
    jobs = ["a\nb", "c", "d\n\ne", " f "]  # one_line: a plain top-level function the workers can import
    for job, result in run_jobs(one_line, jobs, "ray", processes=2):
        results[job] = result
        if not seen:  # Ray is up while the jobs' results are yielded
            assert ray.is_initialized()
            seen = listening(descendants(os.getpid()))
    assert results == {job: one_line(job) for job in jobs}
    assert not ray.is_initialized(), "the distributor stops the instance it started"
    names = " ".join(s.name for s in seen)
    assert "gcs_server" in names and "raylet" in names, f"Ray's servers were not found: {seen}"
    exposed = [s for s in seen if not s.loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) == env_before  # restored
    assert mode_before == ray_constants.ENABLE_RAY_CLUSTER
