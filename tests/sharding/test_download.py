"""Tests of sharding/download/fetch.py against real HTTP servers on loopback (the world's ImageServer and a
small scripted one for what ImageServer cannot do: bodies without Content-Length, a concurrency gauge,
a connection count)."""

from __future__ import annotations

import email.utils
import ipaddress
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flora.config import ConfigError
from flora.sharding.download.fetch import REASONS, DownloadConfig, Downloader, refusal, retry_after_seconds
from world import ImageServer, render_image

LOOPBACK = ["127.0.0.1/32"]
GOOD = "img/a/000001.jpg"
OTHER = "img/a/000002.jpg"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "img" / "a").mkdir(parents=True)
    (root / GOOD).write_bytes(render_image("Quercus ilex", 1, 0, size=(640, 480)))  # ~60 KB
    (root / OTHER).write_bytes(render_image("Pinus pinea", 2, 0, size=(320, 240)))
    for i in range(3, 67):
        (root / f"img/a/{i:06d}.jpg").write_bytes(render_image("Abies alba", i, 0, size=(120, 90)))
    return root


@pytest.fixture
def srv(root):
    with ImageServer(root) as server:
        yield server


class Recorder:
    """Stands in for ``time.sleep``: records the delays, sleeps not at all."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Ceiling(random.Random):
    """Jitter that always draws the top of the range, so backoff delays are exact."""

    def random(self) -> float:
        return 1.0


def downloader(sleep: Recorder | None = None, **overrides) -> Downloader:
    settings = {
        "allow_networks": LOOPBACK,
        "retries": 2,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
        **overrides,
    }
    return Downloader(DownloadConfig(**settings), sleep=sleep or Recorder())


# ------------------------------------------------------------------------------------------ basics


def test_ok_fetch_returns_the_file(srv, root):
    with downloader() as dl:
        result = dl.fetch(srv.url(GOOD))
    assert result.ok and result.reason is None and result.status == 200
    assert result.data == (root / GOOD).read_bytes()
    assert (result.attempts, result.final_url, result.url) == (1, srv.url(GOOD), srv.url(GOOD))
    assert srv.request_count(GOOD) == 1


@pytest.mark.parametrize(
    ("status", "reason"), [(404, "http_404"), (403, "http_403"), (410, "http_410"), (418, "http_4xx")]
)
def test_client_errors_are_not_retried(srv, status, reason):
    srv.set_fault(GOOD, {"kind": "status", "status": status})
    sleep = Recorder()
    with downloader(sleep) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.ok, result.reason, result.status, result.attempts) == (False, reason, status, 1)
    assert srv.request_count(GOOD) == 1 and sleep.delays == []


def test_missing_file_is_http_404_with_one_request(srv):
    with downloader() as dl:
        result = dl.fetch(srv.url("img/a/999999.jpg"))
    assert result.reason == "http_404" and srv.request_count("img/a/999999.jpg") == 1


def test_server_error_is_retried_then_http_5xx(srv):
    srv.set_fault(GOOD, {"kind": "status", "status": 500})
    sleep = Recorder()
    with downloader(sleep, retries=3) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.status, result.attempts) == ("http_5xx", 500, 4)
    assert srv.request_count(GOOD) == 4 and len(sleep.delays) == 3


def test_flaky_recovers_on_the_third_attempt(srv, root):
    srv.set_fault(GOOD, {"kind": "flaky", "status": 503, "times": 2})
    with downloader(retries=3) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert result.ok and result.attempts == 3 and result.data == (root / GOOD).read_bytes()
    assert srv.request_count(GOOD) == 3


# ------------------------------------------------------------------------------------ retry timing


def test_retry_after_seconds_is_honoured(srv):
    srv.set_fault(GOOD, {"kind": "flaky", "status": 429, "times": 1, "retry_after": 1})
    sleep = Recorder()
    with downloader(sleep) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert result.ok and result.attempts == 2 and sleep.delays == [1.0]


def test_retry_after_date_is_honoured_and_429_reported_after_retries(srv):
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    srv.set_fault(GOOD, {"kind": "status", "status": 429, "retry_after": when})
    sleep = Recorder()
    with downloader(sleep, retries=1) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.attempts) == ("http_429", 2)
    assert len(sleep.delays) == 1 and 1.0 < sleep.delays[0] <= 3.0


def test_retry_after_is_capped(srv):
    srv.set_fault(GOOD, {"kind": "status", "status": 503, "retry_after": 3600})
    sleep = Recorder()
    with downloader(sleep, retries=2, retry_after_max_s=5.0) as dl:
        assert dl.fetch(srv.url(GOOD)).reason == "http_5xx"
    assert sleep.delays == [5.0, 5.0]


def test_backoff_grows_exponentially_and_is_capped(srv):
    srv.set_fault(GOOD, {"kind": "status", "status": 502})
    sleep = Recorder()
    cfg = DownloadConfig(allow_networks=LOOPBACK, retries=6, backoff_base_s=0.5, backoff_max_s=6.0)
    with Downloader(cfg, sleep=sleep, rng=Ceiling()) as dl:
        assert dl.fetch(srv.url(GOOD)).attempts == 7
    assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]


def test_backoff_jitter_stays_under_the_ceiling():
    dl = Downloader(DownloadConfig(backoff_base_s=0.5, backoff_max_s=6.0), rng=random.Random(7))
    delays = [dl.backoff(n) for n in range(8) for _ in range(50)]
    ceilings = [min(6.0, 0.5 * 2**n) for n in range(8) for _ in range(50)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) > 300  # jittered, not constant


def test_retry_after_parsing():
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Mon, 01 Jan 2024 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Mon, 01 Jan 2024 11:00:00 GMT", now) == 0.0  # in the past
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# ------------------------------------------------------------------------------ broken transfers


def test_slow_response_times_out(srv):
    srv.set_fault(GOOD, {"kind": "slow", "delay_s": 1.5})
    start = time.perf_counter()
    with downloader(retries=1, read_timeout_s=0.2) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.attempts) == ("timeout", 2)
    assert time.perf_counter() - start < 1.2 and srv.request_count(GOOD) == 2


def test_truncated_body_is_retried_then_truncated(srv):
    srv.set_fault(GOOD, {"kind": "truncated"})
    with downloader(retries=2) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.status, result.attempts) == ("truncated", 200, 3)
    assert srv.request_count(GOOD) == 3 and result.data is None


def test_content_length_over_the_cap_is_too_large_without_reading(srv):
    srv.set_fault(GOOD, {"kind": "huge", "bytes": 8 * 2**20})
    with downloader(max_bytes=2**20) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.attempts) == ("too_large", 1) and "Content-Length" in result.message
    assert srv.request_count(GOOD) == 1


def test_refused_connection_is_retried_then_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with downloader(retries=2) as dl:
        result = dl.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert (result.reason, result.attempts, result.status) == ("connection_error", 3, None)


# -------------------------------------------------------------------------------------- redirects


def test_redirect_is_followed(srv, root):
    srv.set_fault(GOOD, {"kind": "redirect", "location": "/" + OTHER})
    with downloader() as dl:
        result = dl.fetch(srv.url(GOOD))
    assert result.ok and result.final_url == srv.url(OTHER) and result.url == srv.url(GOOD)
    assert result.data == (root / OTHER).read_bytes() and result.attempts == 1


def test_redirect_to_another_scheme_is_bad_scheme(srv):
    srv.set_fault(GOOD, {"kind": "redirect", "location": "ftp://files.example/x.jpg"})
    with downloader() as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.attempts, result.final_url) == (
        "bad_scheme",
        1,
        "ftp://files.example/x.jpg",
    )


def test_redirect_to_metadata_address_is_blocked(srv):
    srv.set_fault(GOOD, {"kind": "redirect", "location": "http://169.254.169.254/latest/meta-data/"})
    start = time.perf_counter()
    with downloader(connect_timeout_s=3.0) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.attempts) == ("blocked_address", 1) and "link-local" in result.message
    assert time.perf_counter() - start < 1.0  # refused, not a connect attempt running into its timeout


def test_redirect_to_a_private_server_never_reaches_it(srv, root):
    try:
        inner = ImageServer(root, host="127.0.0.2").start()
    except OSError:
        pytest.skip("cannot bind 127.0.0.2 on this machine")
    try:
        srv.set_fault(GOOD, {"kind": "redirect", "location": inner.url(OTHER)})
        with downloader() as dl:  # 127.0.0.1/32 allowed, 127.0.0.2 not
            result = dl.fetch(srv.url(GOOD))
        assert result.reason == "blocked_address" and result.final_url == inner.url(OTHER)
        assert inner.request_count() == 0
    finally:
        inner.close()


def test_redirect_loop_is_too_many_redirects(srv):
    srv.set_fault(GOOD, {"kind": "redirect_loop"})
    with downloader(max_redirects=3) as dl:
        result = dl.fetch(srv.url(GOOD))
    assert (result.reason, result.status, result.attempts) == ("too_many_redirects", 302, 1)
    assert srv.request_count(GOOD) == 4  # the first request and 3 redirects


# ------------------------------------------------------------------------------------ SSRF guard


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_loopback_is_blocked_without_allow_networks(srv, host):
    dl = Downloader(DownloadConfig(retries=2), sleep=Recorder())
    result = dl.fetch(f"http://{host}:{srv.port}/{GOOD}")
    assert (result.reason, result.attempts, result.status) == ("blocked_address", 1, None)
    assert "loopback" in result.message
    assert srv.request_count() == 0


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("93.184.215.14", None),
        ("2606:4700::1111", None),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "non-global"),  # carrier-grade NAT: neither private nor global
        ("240.0.0.1", "refused"),  # reserved (Python files it under private too)
        ("127.0.0.53", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
    ],
)
def test_refusal_classifies_addresses(address, why):
    found = refusal(ipaddress.ip_address(address))
    assert found == why or (why == "refused" and found is not None)
    allowed = (ipaddress.ip_network(address),)
    assert refusal(ipaddress.ip_address(address), allowed) is None


def test_allow_networks_lets_loopback_through(srv):
    dl = Downloader(DownloadConfig(allow_networks=["127.0.0.0/8"]))
    assert dl.fetch(srv.url(GOOD)).ok


def test_unresolvable_host_is_dns_error():
    with downloader() as dl:
        result = dl.fetch("http://nonexistent.invalid/x.jpg")
    assert (result.reason, result.attempts) == ("dns_error", 1)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.org/x.jpg", "bad_scheme"),
        ("file:///etc/passwd", "bad_scheme"),
        ("http:///x.jpg", "invalid_url"),
        ("http://127.0.0.1:99999/x.jpg", "invalid_url"),
        ("http://exa mple.org/x.jpg", "invalid_url"),
    ],
)
def test_unusable_urls(url, reason):
    with downloader() as dl:
        assert dl.fetch(url).reason == reason


# ---------------------------------------------------------------- scripted server: what ImageServer lacks


class _Scripted(BaseHTTPRequestHandler):
    """``/stream/N``: N bytes without Content-Length; ``/slow``: 0.2 s, with a concurrency gauge;
    ``/missing``: a small 404; anything else: a small 200. Every request's client port is recorded."""

    protocol_version = "HTTP/1.1"
    server: _ScriptedServer

    def log_message(self, format, *args):  # noqa: A002 - base class signature
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        srv = self.server
        with srv.lock:
            srv.ports.append(self.client_address[1])
            srv.paths.append(self.path)
        if self.path == "/reset":  # hang up without a response
            self.close_connection = True
            return
        if self.path.startswith("/stream/"):
            self._stream(int(self.path.rsplit("/", 1)[1]))
        elif self.path == "/slow":
            with srv.lock:
                srv.active += 1
                srv.peak = max(srv.peak, srv.active)
            time.sleep(0.2)
            with srv.lock:
                srv.active -= 1
            self._reply(200, b"\xff\xd8\xff slow")
        else:
            self._reply(404 if self.path == "/missing" else 200, b"x" * 100)

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        block = b"\x00" * 2**16
        try:
            while self.server.sent < size:
                self.wfile.write(block[: size - self.server.sent])
                self.server.sent += min(len(block), size - self.server.sent)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up = True


class _ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Scripted)
        self.lock = threading.Lock()
        self.ports: list[int] = []
        self.paths: list[str] = []
        self.active = self.peak = self.sent = 0
        self.hung_up = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def scripted():
    server = _ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_body_without_length_under_the_cap_is_read(scripted):
    with downloader() as dl:
        result = dl.fetch(scripted.url(f"/stream/{700_000}"))
    assert result.ok and result.data == b"\x00" * 700_000


def test_body_without_length_stops_at_the_cap(scripted):
    total = 256 * 2**20
    with downloader(max_bytes=2**20) as dl:
        result = dl.fetch(scripted.url(f"/stream/{total}"))
        assert (result.reason, result.attempts) == ("too_large", 1) and "max_bytes" in result.message
        deadline = time.monotonic() + 5
        while not scripted.hung_up and time.monotonic() < deadline:
            time.sleep(0.01)
    assert scripted.hung_up and scripted.sent < total / 4  # the client hung up long before the end


def test_per_host_cap_bounds_concurrent_requests(scripted):
    with downloader(per_host_connections=2) as dl, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(dl.fetch, [scripted.url("/slow")] * 6))
    assert all(r.ok for r in results)
    assert scripted.peak == 2  # reached, never exceeded


def test_keep_alive_survives_error_pages(scripted):
    with downloader() as dl:
        for path in ["/missing", "/ok"] * 5:
            dl.fetch(scripted.url(path))
    assert len(scripted.ports) == 10 and len(set(scripted.ports)) == 1  # one connection for all


def test_url_is_percent_encoded_on_the_wire(scripted):
    with downloader() as dl:
        result = dl.fetch(scripted.url("/a b/é.jpg?q=x y#frag"))
    assert result.ok
    assert scripted.paths == ["/a%20b/%C3%A9.jpg?q=x%20y"]  # as requests sent it; no fragment


def test_connection_dropped_before_the_response_is_retried(scripted):
    with downloader() as dl:
        result = dl.fetch(scripted.url("/reset"))
    assert (result.reason, result.attempts, result.status) == ("connection_error", 3, None)


def test_refused_connection_is_connection_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with downloader(retries=0) as dl:
        result = dl.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert (result.reason, result.attempts) == ("connection_error", 1)


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on loopback with a self-signed certificate (not in certifi's bundle)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = _ScriptedServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/ok"
    server.shutdown()
    server.server_close()


def test_untrusted_certificate_is_tls_error_and_not_retried(tls_server):
    with downloader() as dl:
        result = dl.fetch(tls_server)
    assert (result.reason, result.attempts) == ("tls_error", 1)
    assert "certificate" in result.message.lower()


# ------------------------------------------------------------------------------------- concurrency


def test_64_fetches_from_32_threads(srv, root):
    paths = [f"img/a/{i:06d}.jpg" for i in range(3, 67)]
    with downloader() as dl, ThreadPoolExecutor(32) as pool:
        results = list(pool.map(dl.fetch, [srv.url(p) for p in paths]))
    assert all(r.ok for r in results)
    assert all(r.data == (root / p).read_bytes() for r, p in zip(results, paths, strict=True))
    assert srv.request_count() == 64


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "download.threads must be >= 1, got 0"),
        ({"per_host_connections": 0}, "download.per_host_connections must be >= 1, got 0"),
        ({"read_timeout_s": 0}, "download.read_timeout_s must be > 0, got 0"),
        ({"max_bytes": -1}, "download.max_bytes must be > 0, got -1"),
        ({"retries": -1}, "download.retries must be >= 0, got -1"),
        ({"allow_networks": ["10.0.0.0/33"]}, "download.allow_networks"),
        ({"user_agent": " "}, "download.user_agent"),
    ],
)
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ConfigError) as info:
        DownloadConfig(**kwargs)
    assert message in str(info.value)


def test_reason_codes_are_the_documented_ones():
    assert set(REASONS) >= {
        "http_404", "http_403", "http_410", "http_4xx", "http_429", "http_5xx", "timeout",
        "connection_error", "too_large", "too_many_redirects", "bad_scheme", "blocked_address",
        "dns_error", "truncated",
    }  # fmt: skip
