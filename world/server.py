"""Loopback HTTP image server for the sample world, with fault injection.

Owns: ``ImageServer`` (a threaded ``http.server`` on 127.0.0.1 serving files under a root by URL
path, GET and HEAD, keep-alive, Content-Type from the real image format), the fault kinds a
downloader must survive (status codes with ``Retry-After``, flaky paths that recover, slow, truncated
and huge bodies, HTML instead of an image, redirects and redirect loops, decompression bombs, tiny and
corrupt images; and, only when set by hand, a trickle: a byte per interval), extra response headers
for chosen paths or whole folders (``set_headers``: e.g. ``X-Robots-Tag: noai``, so that a test opts
images out with this real server), thread-safe per-path request counters, and loading ``faults.json``.

Leaves out: choosing which paths fault (``generate.assign_faults``) and rendering the images
(``images.py``). Not a production server: no TLS, no ranges, no caching headers.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image

from world.images import render_image

LOOPBACK = "127.0.0.1"
REQUEST_QUEUE_SIZE = 1024  # listen backlog; the default of 5 drops connections under load
STREAM_CHUNK = 64 * 1024
POLL_INTERVAL_S = 0.02  # how often serve_forever checks for shutdown (the default 0.5 s slows tests)
BOMB_SIDE = 20_000  # 400 megapixels: far above PIL's MAX_IMAGE_PIXELS (about 89 M)
_BOMB_ROWS_PER_BLOCK = 100  # BOMB_SIDE must be a multiple
TINY_SIDE = 8
FAULT_KINDS: tuple[str, ...] = (
    "status",
    "flaky",
    "slow",
    "truncated",
    "html",
    "redirect",
    "redirect_loop",
    "huge",
    "bomb",
    "tiny",
    "corrupt",
)
#: Served when set by hand (``set_fault``, faults.json) but never assigned by ``generate.assign_faults``:
#: a trickling path costs every build that meets it its whole download deadline per attempt.
#: ``{"kind": "trickle", "interval_s": 1.0, "bytes": N, "headers": false}``: the first N body bytes
#: (default: all), and with ``headers`` the status line and headers before them, one per ``interval_s``;
#: the rest at once.
HAND_SET_FAULT_KINDS: tuple[str, ...] = ("trickle",)
TRICKLE_INTERVAL_S = 1.0  # the one-byte-a-second host of issue 16
HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Photo not available</title></head>"
    b"<body><h1>This photo is no longer available</h1><p>Please log in to view it.</p></body></html>\n"
)
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"WEBP", 8, "image/webp"),
    (b"GIF8", 0, "image/gif"),
)


def sniff_content_type(data: bytes) -> str:
    """Return the MIME type of an image from its first bytes (``application/octet-stream`` if unknown)."""
    for magic, offset, mime in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return mime
    return "application/octet-stream"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A valid 8-bit grayscale PNG of ``BOMB_SIDE``² black pixels, about 400 KB on the wire.

    Built without materialising the pixels: after a full flush, deflating the same block of zero rows
    yields the same bytes, so one compressed block is repeated; the zlib checksum of all-zero data is
    computed in closed form.
    """
    block = b"\x00" * ((BOMB_SIDE + 1) * _BOMB_ROWS_PER_BLOCK)  # filter byte 0 + row, per row
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed_block = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    raw = compressed_block * (BOMB_SIDE // _BOMB_ROWS_PER_BLOCK) + deflate.flush(zlib.Z_FINISH)
    adler = ((len(block) * (BOMB_SIDE // _BOMB_ROWS_PER_BLOCK)) % 65521) << 16 | 1  # adler32 of zeros
    stream = b"\x78\xda" + raw + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@lru_cache(maxsize=1)
def tiny_jpeg() -> bytes:
    """A valid ``TINY_SIDE`` x ``TINY_SIDE`` JPEG."""
    out = io.BytesIO()
    Image.new("RGB", (TINY_SIDE, TINY_SIDE), (90, 140, 60)).save(out, "JPEG", quality=90)
    return out.getvalue()


@lru_cache(maxsize=1)
def corrupt_jpeg() -> bytes:
    """A JPEG header (SOI + JFIF APP0) followed by garbage that no decoder accepts."""
    header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    garbage = bytes((i * 151 + 7) % 251 for i in range(4096)).replace(b"\xff", b"\x00")
    return header + garbage


@lru_cache(maxsize=1)
def _fallback_image() -> bytes:
    """Body for faults that need an image when the faulted path has no file on disk."""
    return render_image("Fallback imago", 0, 0, size=(320, 240))


def load_faults(path: str | Path) -> dict[str, dict]:
    """Read a ``faults.json`` (``{url path: fault spec}``) and check every spec has a known kind."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of url path -> fault, got {type(data).__name__}")
    return {_normalise(p): _check_fault(spec) for p, spec in data.items()}


def _check_fault(spec: Mapping) -> dict:
    kinds = FAULT_KINDS + HAND_SET_FAULT_KINDS
    if not isinstance(spec, Mapping) or spec.get("kind") not in kinds:
        raise ValueError(f"fault must be a mapping with 'kind' in {sorted(kinds)}, got {spec!r}")
    if spec["kind"] == "redirect" and not spec.get("location"):
        raise ValueError(f"a redirect fault needs a 'location', got {spec!r}")
    if spec["kind"] == "huge" and int(spec.get("bytes", 0)) <= 0:
        raise ValueError(f"a huge fault needs 'bytes' > 0, got {spec!r}")
    if spec["kind"] == "trickle" and not (
        float(spec.get("interval_s", TRICKLE_INTERVAL_S)) > 0 and int(spec.get("bytes", 1)) > 0
    ):
        raise ValueError(f"a trickle fault needs 'interval_s' > 0 and 'bytes' > 0 if given, got {spec!r}")
    return dict(spec)


def jpeg_variant(data: bytes, tag: str) -> bytes:
    """The same JPEG with a comment segment naming ``tag``: other bytes, same pixels. Scale
    benchmarks serve ``?variant=N`` of a few files as many distinct images this way."""
    comment = f"variant {tag}".encode()[:1000]
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def _normalise(path: str) -> str:
    """URL path without query or fragment, percent-decoded, with one leading slash."""
    return "/" + unquote(urlsplit(path).path).lstrip("/")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for pooled clients; every reply sets Content-Length
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        """Silence the per-request log line."""

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._respond(head=True)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        head: bool,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _respond(self, head: bool) -> None:
        owner = self.server.owner
        path = _normalise(self.path)
        fault = owner._hit(path)
        try:
            if fault is None or not self._fault(fault, path, head):
                self._serve_file(path, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (size cap, timeout): not an error

    def _serve_file(self, path: str, head: bool) -> None:
        data = self.server.owner._read(path)
        if data is None:
            self._send(404, b"not found\n", "text/plain", head)
            return
        variant = parse_qs(urlsplit(self.path).query).get("variant")
        if variant and data[:2] == b"\xff\xd8":
            data = jpeg_variant(data, variant[0])
        self._send(200, data, sniff_content_type(data), head, self.server.owner._headers_for(path))

    def _fault(self, fault: Mapping, path: str, head: bool) -> bool:
        """Apply ``fault``; return False when the request should be served normally after all."""
        kind = fault["kind"]
        if kind == "status" or (kind == "flaky" and fault["_failing"]):
            extra = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else None
            status = int(fault.get("status", 503))
            self._send(status, f"error {status}\n".encode(), "text/plain", head, extra)
        elif kind == "flaky":
            return False
        elif kind == "slow":
            time.sleep(float(fault.get("delay_s", 2.0)))
            return False
        elif kind == "truncated":
            body = self.server.owner._read(path) or _fallback_image()
            self.send_response(200)
            self.send_header("Content-Type", sniff_content_type(body))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif kind == "html":
            self._send(200, HTML_PAGE, "text/html; charset=utf-8", head)
        elif kind in ("redirect", "redirect_loop"):
            location = self.path if kind == "redirect_loop" else str(fault["location"])
            self._send(302, b"", "text/plain", head, {"Location": location})
        elif kind == "huge":
            self._stream_huge(int(fault["bytes"]), head)
        elif kind == "trickle":
            self._trickle(self.server.owner._read(path) or _fallback_image(), fault, head)
        else:
            body = {"bomb": bomb_png, "tiny": tiny_jpeg, "corrupt": corrupt_jpeg}[kind]()
            self._send(200, body, "image/png" if kind == "bomb" else "image/jpeg", head)
        return True

    def _trickle(self, body: bytes, fault: Mapping, head: bool) -> None:
        """Headers (trickled too with ``headers``), then the first ``bytes`` of ``body`` one per interval."""
        interval = float(fault.get("interval_s", TRICKLE_INTERVAL_S))
        header = (
            f"{self.protocol_version} 200 OK\r\nContent-Type: {sniff_content_type(body)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        body = b"" if head else body
        slow = min(int(fault.get("bytes", len(body))), len(body))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each byte its own segment
        if fault.get("headers"):
            data, slow = header + body, len(header) + slow
        else:
            self.wfile.write(header)
            data = body
        for i in range(slow):
            time.sleep(interval)  # the fault itself: a host that sends a byte per interval
            self.wfile.write(data[i : i + 1])
        self.wfile.write(data[slow:])

    def _stream_huge(self, size: int, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if head:
            return
        zeros = bytes(STREAM_CHUNK)
        first = (b"\xff\xd8\xff\xe0" + zeros)[: min(STREAM_CHUNK, size)]  # looks like a JPEG at first
        self.wfile.write(first)
        sent = len(first)
        while sent < size:
            piece = zeros if size - sent >= STREAM_CHUNK else zeros[: size - sent]
            self.wfile.write(piece)
            sent += len(piece)


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = REQUEST_QUEUE_SIZE
    daemon_threads = True
    allow_reuse_address = True
    owner: ImageServer

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet about clients that hang up; report anything else as usual."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ImageServer:
    """Serve the files under ``root`` on loopback, answering faulted paths with their fault.

    Use as a context manager: ``with ImageServer(world.image_dir, world.faults) as srv: srv.url(...)``.
    The socket is bound on construction, so ``base_url`` is known before the server starts.

    Args:
        root: Folder whose files are served by URL path (``/img/x/1.jpg`` -> ``root/img/x/1.jpg``).
        faults: ``{url path: fault spec}``, a path to a ``faults.json``, or ``None`` for no faults.
        host: Address to bind; loopback unless you really mean otherwise.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(
        self,
        root: str | Path,
        faults: Mapping[str, Mapping] | str | Path | None = None,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image server root must be a folder, got {root}")
        self._lock = threading.Lock()
        self._faults: dict[str, dict] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._failures: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        loaded = load_faults(faults) if isinstance(faults, str | Path) else (faults or {})
        for path, spec in loaded.items():
            self.set_fault(path, spec)
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (``img/a/1.jpg`` or ``/img/a/1.jpg``) on this server."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def start(self) -> ImageServer:
        """Serve in a background daemon thread; return self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(POLL_INTERVAL_S,), name="images", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``close`` is called from another thread."""
        self._httpd.serve_forever(POLL_INTERVAL_S)

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_fault(self, path: str, spec: Mapping) -> None:
        """Answer ``path`` with the fault ``spec`` from now on (resets a flaky path's failure count)."""
        checked = _check_fault(spec)
        with self._lock:
            key = _normalise(path)
            self._faults[key] = checked
            self._failures.pop(key, None)

    def clear_faults(self) -> None:
        """Serve every path normally from now on."""
        with self._lock:
            self._faults.clear()
            self._failures.clear()

    def set_headers(self, path: str, headers: Mapping[str, str]) -> None:
        """Send ``headers`` with every file served at ``path`` from now on; a ``path`` ending in ``/``
        covers every path under it (``/`` the whole host). An empty mapping removes the entry."""
        key = _normalise(path)
        checked = {str(k): str(v) for k, v in headers.items()}
        if any("\r" in x or "\n" in x for pair in checked.items() for x in pair):
            raise ValueError(f"a header name or value must be one line, got {headers!r}")
        with self._lock:
            if checked:
                self._headers[key] = checked
            else:
                self._headers.pop(key, None)

    def _headers_for(self, path: str) -> dict[str, str]:
        """The extra headers of ``path``: its folders' (outermost first), then its own."""
        with self._lock:
            found = {}
            for key in sorted(self._headers, key=len):
                if key == path or (key.endswith("/") and path.startswith(key)):
                    found.update(self._headers[key])
            return found

    @property
    def faults(self) -> dict[str, dict]:
        """A copy of the current faults."""
        with self._lock:
            return {path: dict(spec) for path, spec in self._faults.items()}

    def request_count(self, path: str | None = None) -> int:
        """Requests received so far for ``path``, or in total when ``path`` is None."""
        with self._lock:
            return sum(self._counts.values()) if path is None else self._counts[_normalise(path)]

    def _hit(self, path: str) -> dict | None:
        """Count a request for ``path``; return its fault (flaky: with ``_failing`` for this request)."""
        with self._lock:
            self._counts[path] += 1
            fault = self._faults.get(path)
            if fault is None:
                return None
            fault = dict(fault)
            if fault["kind"] == "flaky":
                self._failures[path] += 1
                fault["_failing"] = self._failures[path] <= int(fault.get("times", 1))
            return fault

    def _read(self, path: str) -> bytes | None:
        """Bytes of the file at URL ``path`` under root, or None if missing or outside root."""
        try:
            target = (self.root / path.lstrip("/")).resolve()
            if not target.is_relative_to(self.root) or not target.is_file():
                return None
            return target.read_bytes()
        except (OSError, ValueError):  # unreadable, or a NUL byte in the path
            return None
