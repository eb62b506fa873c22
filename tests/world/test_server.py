"""Tests of the loopback image server and its faults (world/server.py), over real HTTP."""

from __future__ import annotations

import http.client
import io
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from world import ImageServer, WorldSpec, build_world, load_faults, render_image
from world.server import BOMB_SIDE, FAULT_KINDS, HAND_SET_FAULT_KINDS, TINY_SIDE, sniff_content_type

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return build_world(root, WorldSpec(n_species=5, n_records=60, seed=1))


@pytest.fixture
def srv(world):
    with ImageServer(world.image_dir) as server:
        yield server


@pytest.fixture
def path(world) -> str:
    """URL path of a healthy JPEG of the world."""
    return "/" + next(rel for rel, e in world.images.items() if e["format"] == "JPEG")


def _raw_get(srv: ImageServer, raw_path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request(method, raw_path)  # http.client sends the path as is: no dot-segment removal
    return conn.getresponse()


def test_serves_files_with_bytes_and_real_content_type(srv, world):
    for rel, entry in list(world.images.items())[:12]:
        resp = requests.get(srv.url(rel), timeout=10)
        assert resp.status_code == 200
        assert resp.content == (world.image_dir / rel).read_bytes()
        assert resp.headers["Content-Type"] == MIME[entry["format"]]
        assert int(resp.headers["Content-Length"]) == len(resp.content)


def test_content_type_follows_the_bytes_not_the_extension(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "liar.jpg").write_bytes(render_image("Pinus pinea", 1, 0, fmt="PNG", size=(40, 30)))
    with ImageServer(tmp_path) as srv:
        assert requests.get(srv.url("img/liar.jpg"), timeout=10).headers["Content-Type"] == "image/png"
    assert sniff_content_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_content_type(b"<html>") == "application/octet-stream"


def test_head_sends_headers_only(srv, world, path):
    resp = _raw_get(srv, path, "HEAD")
    assert resp.status == 200
    assert int(resp.getheader("Content-Length")) == (world.image_dir / path.lstrip("/")).stat().st_size
    assert resp.read() == b""


def test_missing_file_is_404(srv):
    assert requests.get(srv.url("img/iNaturalist/999999.jpg"), timeout=10).status_code == 404


@pytest.mark.parametrize(
    "raw_path",
    [
        "/../catalog.jsonl",
        "/img/../../catalog.jsonl",
        "/%2e%2e/catalog.jsonl",
        "/..%2fcatalog.jsonl",
        "/img/%2e%2e/%2e%2e/faults.json",
        "/%00",
    ],
)
def test_path_traversal_is_404(srv, world, raw_path):
    assert (world.image_dir.parent / "catalog.jsonl").is_file()  # the target exists, one level up
    assert _raw_get(srv, raw_path).status == 404


@pytest.mark.parametrize("status", [404, 500, 503])
def test_status_fault(srv, path, status):
    srv.set_fault(path, {"kind": "status", "status": status})
    assert requests.get(srv.url(path), timeout=10).status_code == status


def test_status_fault_with_retry_after(srv, path):
    srv.set_fault(path, {"kind": "status", "status": 429, "retry_after": 3})
    resp = requests.get(srv.url(path), timeout=10)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"


def test_flaky_fails_n_times_then_recovers(srv, world, path):
    srv.set_fault(path, {"kind": "flaky", "status": 503, "times": 2})
    codes = [requests.get(srv.url(path), timeout=10).status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    assert srv.request_count(path) == 4
    srv.set_fault(path, {"kind": "flaky", "status": 500, "times": 1})  # setting it again re-arms it
    assert requests.get(srv.url(path), timeout=10).status_code == 500


def test_slow_fault_delays_then_serves(srv, world, path):
    srv.set_fault(path, {"kind": "slow", "delay_s": 0.4})
    start = time.perf_counter()
    resp = requests.get(srv.url(path), timeout=10)
    assert time.perf_counter() - start >= 0.4
    assert resp.content == (world.image_dir / path.lstrip("/")).read_bytes()
    with pytest.raises(requests.exceptions.Timeout):
        requests.get(srv.url(path), timeout=0.1)


def test_trickle_fault_sends_bytes_one_per_interval(srv, world, path):
    full = (world.image_dir / path.lstrip("/")).read_bytes()
    srv.set_fault(path, {"kind": "trickle", "interval_s": 0.02, "bytes": 10})
    start = time.perf_counter()
    resp = _raw_get(srv, path)
    head_s = time.perf_counter() - start
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(full)
    assert resp.read(10) == full[:10] and time.perf_counter() - start >= 10 * 0.02  # then the rest at once
    assert resp.read() == full[10:] and head_s < 10 * 0.02  # the headers came first, at once
    srv.set_fault(path, {"kind": "trickle", "interval_s": 0.002, "bytes": 1, "headers": True})
    start = time.perf_counter()
    resp = _raw_get(srv, path)
    assert time.perf_counter() - start >= 0.002 * len("HTTP/1.1 200 OK\r\n")  # the status line trickled
    assert resp.read() == full


def test_trickle_is_never_assigned_by_the_world(world):
    assert "trickle" not in FAULT_KINDS and "trickle" in HAND_SET_FAULT_KINDS
    assert all(spec["kind"] != "trickle" for spec in world.faults.values())


def test_truncated_fault_declares_full_length_sends_half(srv, world, path):
    full = (world.image_dir / path.lstrip("/")).read_bytes()
    srv.set_fault(path, {"kind": "truncated"})
    resp = _raw_get(srv, path)
    assert int(resp.getheader("Content-Length")) == len(full)
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == full[: len(full) // 2]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(srv.url(path), timeout=10)


def test_html_fault(srv, path):
    srv.set_fault(path, {"kind": "html"})
    resp = requests.get(srv.url(path), timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html") and b"<html>" in resp.content


def test_redirect_fault(srv, world, path):
    other = "/" + next(rel for rel in world.images if "/" + rel != path)
    srv.set_fault(path, {"kind": "redirect", "location": other})
    resp = requests.get(srv.url(path), timeout=10)
    assert resp.status_code == 200 and resp.content == (world.image_dir / other.lstrip("/")).read_bytes()
    assert resp.history[0].status_code == 302
    srv.set_fault(path, {"kind": "redirect", "location": "ftp://127.0.0.1/secret.jpg"})
    raw = requests.get(srv.url(path), timeout=10, allow_redirects=False)
    assert raw.status_code == 302 and raw.headers["Location"] == "ftp://127.0.0.1/secret.jpg"


def test_redirect_loop_fault(srv, path):
    srv.set_fault(path, {"kind": "redirect_loop"})
    raw = requests.get(srv.url(path) + "?a=1", timeout=10, allow_redirects=False)
    assert raw.status_code == 302 and raw.headers["Location"] == path + "?a=1"
    with pytest.raises(requests.exceptions.TooManyRedirects):
        requests.get(srv.url(path), timeout=10)


def test_huge_fault_streams_the_declared_size(srv, path):
    size = 5 * 1024 * 1024 + 123
    srv.set_fault(path, {"kind": "huge", "bytes": size})
    with requests.get(srv.url(path), timeout=10, stream=True) as resp:
        assert int(resp.headers["Content-Length"]) == size
        assert sum(len(chunk) for chunk in resp.iter_content(1 << 16)) == size
    with requests.get(srv.url(path), timeout=10, stream=True) as resp:  # a client that gives up early
        next(resp.iter_content(1 << 16))
    srv.clear_faults()
    assert requests.get(srv.url(path), timeout=10).status_code == 200  # the server is still fine


def test_bomb_fault_is_a_tiny_png_declaring_a_huge_image(srv, path):
    srv.set_fault(path, {"kind": "bomb"})
    body = requests.get(srv.url(path), timeout=30).content
    assert len(body) < 1_000_000 and body.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", body[16:24])
    assert width == height == BOMB_SIDE
    idat = body.index(b"IDAT") + 4
    pixels = zlib.decompressobj().decompress(body[idat:], 1 << 20)
    assert len(pixels) == 1 << 20 and not pixels.strip(b"\x00")  # real, all-zero scanlines
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))


def test_tiny_fault(srv, path):
    srv.set_fault(path, {"kind": "tiny"})
    with Image.open(io.BytesIO(requests.get(srv.url(path), timeout=10).content)) as img:
        assert (img.format, img.size) == ("JPEG", (TINY_SIDE, TINY_SIDE))


def test_corrupt_fault(srv, path):
    srv.set_fault(path, {"kind": "corrupt"})
    body = requests.get(srv.url(path), timeout=10).content
    assert body.startswith(b"\xff\xd8\xff")
    with pytest.raises((OSError, SyntaxError)), Image.open(io.BytesIO(body)) as img:
        img.load()


def test_faults_from_faults_json(world):
    faults = load_faults(world.faults_path)
    status_path, spec = next((p, s) for p, s in faults.items() if s["kind"] == "status")
    tiny_path = next(p for p, s in faults.items() if s["kind"] == "tiny")
    with ImageServer(world.image_dir, world.faults_path) as srv:
        assert srv.faults == faults
        assert requests.get(srv.url(status_path), timeout=10).status_code == spec["status"]
        assert len(requests.get(srv.url(tiny_path), timeout=10).content) < 1000
        srv.clear_faults()
        assert (
            requests.get(srv.url(tiny_path), timeout=10).content
            == (world.image_dir / tiny_path.lstrip("/")).read_bytes()
        )


def test_bad_fault_specs_are_rejected(srv, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        srv.set_fault("/x.jpg", {"kind": "explode"})
    with pytest.raises(ValueError, match="location"):
        srv.set_fault("/x.jpg", {"kind": "redirect"})
    with pytest.raises(ValueError, match="interval_s"):
        srv.set_fault("/x.jpg", {"kind": "trickle", "interval_s": 0})
    bad = tmp_path / "faults.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_faults(bad)
    with pytest.raises(FileNotFoundError):
        ImageServer(tmp_path / "missing")


def test_counters_per_path_and_total(srv, path):
    assert srv.request_count() == 0
    requests.get(srv.url(path) + "?v=1", timeout=10)
    requests.head(srv.url(path), timeout=10)
    requests.get(srv.url("img/none.jpg"), timeout=10)
    assert srv.request_count(path) == 2
    assert srv.request_count(path.lstrip("/")) == 2
    assert srv.request_count("/img/none.jpg") == 1
    assert srv.request_count() == 3


def test_keep_alive_reuses_the_connection(srv, path):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", path)
    first = conn.getresponse()
    first.read()
    sock = conn.sock
    conn.request("GET", path)
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_200_requests_from_32_threads(srv, world):
    paths = list(world.images)
    expected = {rel: (world.image_dir / rel).read_bytes() for rel in paths}
    local = threading.local()

    def fetch(i: int) -> bool:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        rel = paths[i % len(paths)]
        resp = session.get(srv.url(rel), timeout=30)
        return resp.status_code == 200 and resp.content == expected[rel]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(fetch, range(200)))
    assert all(results)
    assert srv.request_count() == 200


def test_exit_closes_the_socket(world):
    with ImageServer(world.image_dir) as srv:
        port = srv.port
        assert srv.base_url == f"http://127.0.0.1:{port}"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_only_loopback_by_default(srv):
    assert srv.base_url.startswith("http://127.0.0.1:")
    assert isinstance(srv.root, Path)


def test_variant_query_serves_distinct_bytes_with_the_same_pixels(tmp_path):
    import hashlib
    import io

    import requests
    from PIL import Image

    from world import render_image

    (tmp_path / "a.jpg").write_bytes(render_image("Olea europaea", 0, seed=0))
    with ImageServer(tmp_path) as srv:
        plain = requests.get(srv.url("a.jpg"), timeout=5).content
        one = requests.get(srv.url("a.jpg") + "?variant=1", timeout=5).content
        two = requests.get(srv.url("a.jpg") + "?variant=2", timeout=5).content
    assert len({hashlib.sha256(b).hexdigest() for b in (plain, one, two)}) == 3
    pixels = [Image.open(io.BytesIO(b)).convert("RGB").tobytes() for b in (plain, one, two)]
    assert pixels[0] == pixels[1] == pixels[2]
