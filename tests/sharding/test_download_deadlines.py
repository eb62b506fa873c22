"""Time limits of sharding/download/fetch.py (pace.py, ssrf.py): the attempt deadline, the minimum rate after
a grace period and the DNS deadline, against the world's ImageServer trickling bytes on loopback; and a
real build with trickling hosts, timed (issue 16: a trickle must not hold a build for minutes)."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from flora.config import ConfigError, load_config
from flora.io import read_jsonl
from flora.sharding.__main__ import main
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.download.fetch import REASONS, RETRYABLE, DownloadConfig, Downloader
from world import ImageServer, render_image

from .test_download import Recorder

LOOPBACK = ["127.0.0.1/32"]
GOOD = "img/a/000001.jpg"
#: Scheduling slack for wall-clock bounds on a shared 2-core machine.
SLACK_S = 0.6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "img" / "a").mkdir(parents=True)
    (root / GOOD).write_bytes(render_image("Quercus ilex", 1, 0, size=(320, 240)))
    return root


@pytest.fixture
def srv(root):
    with ImageServer(root) as server:
        yield server


def downloader(sleep: Recorder | None = None, **overrides) -> Downloader:
    settings = {"allow_networks": LOOPBACK, "retries": 0, "read_timeout_s": 2.0, **overrides}
    return Downloader(DownloadConfig(**settings), sleep=sleep or Recorder())


def timed_fetch(dl: Downloader, url: str):
    start = time.perf_counter()
    result = dl.fetch(url)
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------------- the deadline


def test_trickled_body_fails_as_timeout_at_the_deadline_of_each_attempt(srv):
    # 20 bytes/s: each byte arrives long before the 2 s read timeout, which therefore never trips;
    # the whole ~10 KB body would take over 8 minutes.
    srv.set_fault(GOOD, {"kind": "trickle", "interval_s": 0.05})
    sleep = Recorder()
    with downloader(sleep, retries=2, deadline_s=0.5, min_bytes_per_s=0) as dl:
        result, elapsed = timed_fetch(dl, srv.url(GOOD))
    assert (result.ok, result.reason, result.status, result.attempts) == (False, "timeout", 200, 3)
    assert "deadline_s (0.5 s) passed" in result.message and "read timed out" not in result.message
    assert srv.request_count(GOOD) == 3 and len(sleep.delays) == 2  # retried as configured
    assert 3 * 0.5 <= elapsed < 3 * 0.5 + SLACK_S


def test_trickled_headers_fail_at_the_deadline(srv):
    srv.set_fault(GOOD, {"kind": "trickle", "interval_s": 0.05, "headers": True})
    with downloader(deadline_s=0.4, min_bytes_per_s=0) as dl:
        result, elapsed = timed_fetch(dl, srv.url(GOOD))
    assert (result.reason, result.attempts, result.status) == ("timeout", 1, None)  # no status line yet
    assert "deadline_s" in result.message
    assert 0.4 <= elapsed < 0.4 + SLACK_S


def test_the_read_timeout_still_bounds_a_single_read(srv):
    srv.set_fault(GOOD, {"kind": "trickle", "interval_s": 1.0})  # a byte a second: each read waits 1 s
    with downloader(deadline_s=10.0, read_timeout_s=0.3, min_bytes_per_s=0) as dl:
        result, elapsed = timed_fetch(dl, srv.url(GOOD))
    assert result.reason == "timeout" and "read timed out" in result.message
    assert elapsed < 0.3 + SLACK_S


def test_a_fast_download_is_untouched_by_the_limits(srv, root):
    with downloader(deadline_s=5.0, min_bytes_per_s=100_000, rate_grace_s=0.0) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert result.ok and result.data == (root / GOOD).read_bytes() and result.attempts == 1


# ------------------------------------------------------------------------------ the minimum rate


def test_trickle_below_the_minimum_rate_fails_as_too_slow_after_the_grace(srv):
    srv.set_fault(GOOD, {"kind": "trickle", "interval_s": 0.02})  # 50 B/s
    sleep = Recorder()
    with downloader(sleep, retries=1, deadline_s=30.0, min_bytes_per_s=1000, rate_grace_s=0.3) as dl:
        result, elapsed = timed_fetch(dl, srv.url(GOOD))
    assert (result.reason, result.attempts, result.status) == ("too_slow", 2, 200)
    assert "below download.min_bytes_per_s 1000" in result.message
    assert srv.request_count(GOOD) == 2 and len(sleep.delays) == 1
    assert 2 * 0.3 <= elapsed < 2 * 0.3 + SLACK_S  # the grace, not the 30 s deadline, decided


def test_slow_start_within_the_grace_then_fast_succeeds(srv, root):
    # The first 10 bytes take 0.3 s (33 B/s), then the rest comes at once.
    srv.set_fault(GOOD, {"kind": "trickle", "interval_s": 0.03, "bytes": 10})
    with downloader(deadline_s=5.0, min_bytes_per_s=5000, rate_grace_s=1.0) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert result.ok and result.data == (root / GOOD).read_bytes() and result.attempts == 1
    with downloader(
        deadline_s=5.0, min_bytes_per_s=5000, rate_grace_s=0.1
    ) as dl:  # the same start, less grace
        assert dl.fetch(srv.url(GOOD)).reason == "too_slow"


# -------------------------------------------------------------------------------------------- DNS


@pytest.fixture
def hanging_resolver(monkeypatch):
    """``socket.getaddrinfo`` that never answers for ``*.hang.test`` (until teardown) and answers
    ``images.test`` with loopback; every other name goes to the real resolver."""
    real, release = socket.getaddrinfo, threading.Event()
    calls: list[str] = []

    def fake(host, port, *args, **kwargs):
        calls.append(host)
        if str(host).endswith(".hang.test"):
            release.wait()  # a resolver that is stuck until the test is over
            raise socket.gaierror(socket.EAI_AGAIN, "released")
        if host == "images.test":
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield calls
    release.set()  # lets the abandoned lookup threads finish


def test_hanging_dns_fails_as_dns_timeout_and_is_retried(hanging_resolver):
    sleep = Recorder()
    with downloader(sleep, retries=1, dns_timeout_s=0.3, deadline_s=10.0) as dl:
        result, elapsed = timed_fetch(dl, "http://cdn.hang.test/x.jpg")
    assert (result.reason, result.attempts, result.status) == ("dns_timeout", 2, None)
    assert "no DNS answer for 'cdn.hang.test' within 0.3 s" in result.message
    assert hanging_resolver == ["cdn.hang.test"] * 2 and len(sleep.delays) == 1
    assert 2 * 0.3 <= elapsed < 2 * 0.3 + SLACK_S


def test_dns_wait_is_cut_to_the_attempt_deadline(hanging_resolver):
    with downloader(dns_timeout_s=30.0, deadline_s=0.3) as dl:
        result, elapsed = timed_fetch(dl, "http://cdn.hang.test/x.jpg")
    assert result.reason == "dns_timeout" and 0.3 <= elapsed < 0.3 + SLACK_S


def test_names_still_resolve_through_the_timed_lookup(hanging_resolver, srv, root):
    with downloader(dns_timeout_s=0.5) as dl:
        result = dl.fetch(f"http://images.test:{srv.port}/{GOOD}")
    assert result.ok and result.data == (root / GOOD).read_bytes()
    assert [h for h in hanging_resolver if not h[0].isdigit()] == ["images.test"]  # (connect looks up the IP)
    with downloader(dns_timeout_s=0.5) as dl:
        assert dl.fetch("http://nonexistent.invalid/x.jpg").reason == "dns_error"  # an answer: not retried


def test_infinite_deadline_and_dns_timeout_turn_the_limits_off(hanging_resolver, srv, root):
    with downloader(deadline_s=math.inf, dns_timeout_s=math.inf) as dl:
        result = dl.fetch(f"http://images.test:{srv.port}/{GOOD}")
    assert result.ok and result.data == (root / GOOD).read_bytes()


def test_new_reasons_are_declared_and_retryable():
    assert {"too_slow", "dns_timeout", "timeout"} <= set(REASONS)
    assert {"too_slow", "dns_timeout", "timeout"} <= RETRYABLE and "dns_error" not in RETRYABLE


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("deadline_s", 0, "download.deadline_s must be > 0, got 0"),
        ("deadline_s", -5.0, "download.deadline_s must be > 0, got -5.0"),
        ("deadline_s", math.nan, "download.deadline_s must be > 0, got nan"),
        ("dns_timeout_s", 0.0, "download.dns_timeout_s must be > 0, got 0.0"),
        ("min_bytes_per_s", -1, "download.min_bytes_per_s must be a finite number >= 0, got -1"),
        ("min_bytes_per_s", math.inf, "download.min_bytes_per_s must be a finite number >= 0, got inf"),
        ("rate_grace_s", -0.5, "download.rate_grace_s must be a finite number >= 0, got -0.5"),
    ],
)
def test_config_errors_name_the_key_and_value(key, value, message):
    with pytest.raises(ConfigError) as info:
        DownloadConfig(**{key: value})
    assert message in str(info.value)


def test_defaults_and_yaml_overrides():
    cfg = DownloadConfig()
    assert (cfg.deadline_s, cfg.dns_timeout_s, cfg.min_bytes_per_s, cfg.rate_grace_s) == (
        30.0,
        5.0,
        1024.0,
        5.0,
    )
    repo_cfg = load_config(BuildConfig, Path(__file__).parents[2] / "config" / "sharding.yaml", [])
    assert repo_cfg.download.deadline_s == 30.0 and repo_cfg.download.min_bytes_per_s == 1024
    over = load_config(BuildConfig, None, ["download.deadline_s=12.5", "download.min_bytes_per_s=0"])
    assert (over.download.deadline_s, over.download.min_bytes_per_s) == (12.5, 0)


def test_cli_override_is_validated_as_the_config_key(tmp_path, capsys):
    (tmp_path / "splits").mkdir()
    code = main(["build", "--splits", str(tmp_path / "splits"), "--out", str(tmp_path / "o"),
                 "download.deadline_s=-1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "download.deadline_s must be > 0, got -1" in err


# ---------------------------------------------------------------------------- a build, timed


BUILD_OVERRIDES = [
    "progress=false",
    "processes=1",
    # Few threads: the 50-odd records of the largest stream are far more than one look-ahead window
    # (threads x 2); job.in_order keeps the rest moving while a trickle sits at the head.
    "download.threads=4",
    "download.retries=2",
    "download.backoff_base_s=0.01",
    "download.backoff_max_s=0.05",
    "download.read_timeout_s=2.0",
    "download.deadline_s=0.5",  # a trickle costs 3 attempts x 0.5 s; a loopback image takes milliseconds
    "download.min_bytes_per_s=0",  # the deadline alone, as the bound to measure
    "images.resize_shorter_side=64",
    f"download.allow_networks=[{LOOPBACK[0]}]",
]


def test_a_build_with_trickling_hosts_ends_within_the_deadlines(small_world, tmp_path):
    cfg = load_config(BuildConfig, None, BUILD_OVERRIDES)
    start = time.perf_counter()
    clean = build(small_world.splits, tmp_path / "clean", cfg)
    good_s = time.perf_counter() - start
    records = read_jsonl(small_world.splits / "dataset_splits.jsonl")
    streams = Counter((r["split"], r["region"]) for r in records)
    stream = streams.most_common(1)[0][0]  # one chunk (max_samples 1000), the trickles spread over it
    in_stream = [r for r in records if (r["split"], r["region"]) == stream]
    assert len(in_stream) > 4 * 2 * cfg.download.threads  # several look-ahead windows (see BUILD_OVERRIDES)
    paths = sorted({"/" + r["image_url"].split("/", 3)[3].split("?")[0] for r in in_stream})
    trickled = [paths[0], paths[len(paths) // 2], paths[-1]]
    before = {path: small_world.server.request_count(path) for path in trickled}
    for path in trickled:  # one byte every 50 ms: ~a quarter of an hour per image without a deadline
        small_world.server.set_fault(path, {"kind": "trickle", "interval_s": 0.05})
    try:
        start = time.perf_counter()
        manifest = build(small_world.splits, tmp_path / "trickle", cfg)
        trickle_s = time.perf_counter() - start
    finally:
        small_world.server.clear_faults()
    d, n = cfg.download.deadline_s, cfg.download.retries + 1
    print(f"\nbuild of {len(records)} records: clean {good_s:.2f} s; with 3 trickling URLs {trickle_s:.2f} s "
          f"(deadline_s {d:g} x {n} attempts = {d * n:g} s)")  # fmt: skip
    failures = read_jsonl(tmp_path / "trickle" / "failures.jsonl")
    assert sorted((f["reason"], f["attempts"]) for f in failures) == [("timeout", n)] * 3
    assert manifest["accounting"]["sharded"] == clean["accounting"]["sharded"] - 3
    assert all(small_world.server.request_count(p) - before[p] == n for p in trickled)  # retried, no more
    assert d * n <= trickle_s < good_s + d * n + (n - 1) * cfg.download.backoff_max_s + 2.0
