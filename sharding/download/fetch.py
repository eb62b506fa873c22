"""The sharder's HTTP fetcher: one URL in, its bytes or a failure reason out.

Owns ``DownloadConfig`` and ``Downloader.fetch``: a pooled ``urllib3`` pool manager (used directly: the
``requests`` layer above it cost ~0.2 ms of CPU per image, a quarter of the fetch), redirects followed by
hand (scheme and address re-checked at every hop), retries with exponential backoff and full jitter
(``Retry-After`` honoured), a byte cap per image, a connection cap per host, and the SSRF guard.
``fetch`` never raises for network or HTTP problems: every outcome is a ``FetchResult`` whose
``reason`` is one of ``REASONS``, a stable code that the sharder writes to ``failures.jsonl``.
A response whose ``X-Robots-Tag`` opts out of AI use (``download.opt_out_directives``, optout.py)
fails as ``opted_out``, its body unread; every result carries the header's values (``robots``).

SSRF guard (ssrf.py): every connection resolves its host once, refuses non-public addresses not in
``allow_networks`` and connects to exactly the addresses it checked. Proxies from the environment
are ignored (no proxy is ever configured on the pool manager): through a proxy, the check would test
the proxy's address instead of the target's. HTTPS verifies certificates against certifi's bundle (as
``requests`` does).

Retries: timeouts, slow transfers, DNS timeouts, connection errors, truncated bodies, 5xx and 429 are
retried (``retries`` extra attempts, each restarting the redirect chain); other 4xx, ``too_large``,
redirect, scheme, URL, TLS, DNS and guard failures are answers and are not.

Time limits (pace.py, ssrf.py): one attempt (every hop of its redirect chain: DNS, connect, headers,
body) gets ``deadline_s`` of wall clock while it holds a host's connection slot, then fails as
``timeout``; ``read_timeout_s`` bounds each single read within it, ``dns_timeout_s`` each lookup
(``dns_timeout``), and after ``rate_grace_s`` from a response's first byte its average rate must
stay above ``min_bytes_per_s`` (``too_slow``). A server that trickles a byte a second therefore
costs at most ``deadline_s`` per attempt: a fetch ends within about (retries + 1) x deadline_s plus
the backoff sleeps, plus any wait for a connection slot of its host.

Cost per request is kept small: no environment or cookie handling per request, ``Accept-Encoding:
identity`` (images are compressed already), and TCP_QUICKACK before each response on Linux (servers
that write headers and body separately without TCP_NODELAY, such as ``http.server``, otherwise stall
every response on the client's delayed ACK: 28 ms -> 0.6 ms per fetch against the world's server).

Threading: one ``Downloader`` serves many threads (the caller's pool, ``DownloadConfig.threads`` of
them); ``fetch`` is thread-safe. Retries and backoff sleeps happen in the calling thread.

Leaves out: the thread pool itself, caching (cache.py), image validation (images.py), and robots.txt
or per-host rate limits beyond the connection cap.
"""

from __future__ import annotations

import email.utils
import ipaddress
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import certifi
from urllib3 import BaseHTTPResponse
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util import Timeout, parse_url

from flora.config import ConfigError
from flora.sharding.download import optout
from flora.sharding.download.pace import DeadlineExceeded, Pace, PaceError, TooSlow
from flora.sharding.download.ssrf import (
    AddressGuard,
    BlockedAddressError,
    DnsError,
    DnsTimeoutError,
    GuardedAdapter,
    refusal,
)

__all__ = ["REASONS", "DownloadConfig", "Downloader", "FetchResult", "refusal", "retry_after_seconds"]

#: Every ``FetchResult.reason``; stable strings (they land in failures.jsonl). Besides the HTTP codes:
#: ``truncated`` (body shorter than Content-Length, connection dropped mid-body), ``bad_redirect`` (a
#: 3xx without a usable Location), ``invalid_url`` (no host, bad port), ``tls_error`` (certificate or
#: handshake failure: retrying does not help), ``timeout`` (a read or connect timeout, or the attempt's
#: deadline), ``too_slow`` (below ``min_bytes_per_s`` after the grace), ``dns_timeout`` (no DNS answer
#: within ``dns_timeout_s``).
REASONS: tuple[str, ...] = (
    "http_404", "http_403", "http_410", "http_4xx", "http_429", "http_5xx", "timeout", "connection_error",
    "truncated", "too_large", "too_many_redirects", "bad_redirect", "bad_scheme", "invalid_url",
    "blocked_address", "dns_error", "tls_error", "too_slow", "dns_timeout", "opted_out",
)  # fmt: skip
#: Failures worth another attempt (the rest are answers, not accidents).
RETRYABLE: frozenset[str] = frozenset(
    {"timeout", "too_slow", "dns_timeout", "connection_error", "truncated", "http_5xx", "http_429"}
)
ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # RFC 9110 section 15.4
_STATUS_REASONS = {403: "http_403", 404: "http_404", 410: "http_410", 429: "http_429"}
#: Read size when the length is unknown: big enough that a typical photo is one or two reads.
STREAM_CHUNK = 256 * 2**10
#: Error pages up to this size are read to the end so the keep-alive connection can be reused;
#: anything bigger (or of unknown length) closes the connection instead.
DRAIN_LIMIT = 64 * 2**10
#: Host pools kept open: max(this, threads), least recently used dropped first (urllib3 ``num_pools``).
#: Photo catalogues draw from a few CDN hosts, so this is rarely reached.
MIN_HOST_POOLS = 16
DEFAULT_USER_AGENT = "flora-sharder/0.1 (+https://example.invalid/flora)"


@dataclass
class DownloadConfig:
    """How images are fetched; see the module docstring for the policies."""

    #: Concurrent downloads per worker process (the caller's thread pool; also sizes the host pools).
    threads: int = 32
    #: Cap on simultaneous connections to one host (a semaphore per host and the pool size per host).
    per_host_connections: int = 16
    connect_timeout_s: float = 5.0
    #: Longest wait for any single read from the socket (not a total budget for the body).
    read_timeout_s: float = 15.0
    #: Wall-clock budget of one attempt: DNS, connect, headers and body of every redirect hop (time spent
    #: waiting for the host's connection slot excluded). A 20 MiB image needs ~700 KB/s to fit in 30 s.
    deadline_s: float = 30.0
    #: Longest wait for the resolver per lookup (getaddrinfo has no timeout of its own).
    dns_timeout_s: float = 5.0
    #: Slowest acceptable average rate of a response, in bytes/s since its first byte; 0 turns it off.
    #: 1 KiB/s: far below any working image host, far above a trickle.
    min_bytes_per_s: float = 1024.0
    #: Seconds after a response's first byte before ``min_bytes_per_s`` is checked (TCP slow start, a
    #: stalled first segment).
    rate_grace_s: float = 5.0
    #: Byte cap per image: Content-Length is checked before reading, the count while streaming.
    max_bytes: int = 20 * 2**20
    max_redirects: int = 5
    #: Extra attempts after timeouts, connection errors, truncated bodies, 5xx and 429 (never other 4xx).
    retries: int = 3
    #: Backoff before retry ``n`` (0-based) is uniform in [0, min(max, base * 2**n)] ("full jitter").
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    #: A server's Retry-After (seconds or HTTP-date) replaces the backoff, capped at this.
    retry_after_max_s: float = 60.0
    #: CIDRs exempt from the private-address refusal, e.g. ``["127.0.0.1/32"]`` for a loopback server.
    allow_networks: list[str] = field(default_factory=list)
    user_agent: str = DEFAULT_USER_AGENT
    #: ``X-Robots-Tag`` directives that opt an image out (optout.py); [] ignores the header.
    opt_out_directives: list[str] = field(default_factory=lambda: list(optout.DEFAULT_DIRECTIVES))

    def __post_init__(self) -> None:
        for key in ("threads", "per_host_connections"):
            if getattr(self, key) < 1:
                raise ConfigError(f"download.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("connect_timeout_s", "read_timeout_s", "max_bytes", "deadline_s", "dns_timeout_s"):
            if not getattr(self, key) > 0:  # `not >` also refuses NaN
                raise ConfigError(f"download.{key} must be > 0, got {getattr(self, key)}")
        for key in ("max_redirects", "retries", "backoff_base_s", "backoff_max_s", "retry_after_max_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"download.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("min_bytes_per_s", "rate_grace_s"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ConfigError(f"download.{key} must be a finite number >= 0, got {getattr(self, key)}")
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"download.allow_networks: not a CIDR network: {cidr!r} ({exc})") from exc
        if not self.user_agent.strip():
            raise ConfigError(f"download.user_agent must not be empty, got {self.user_agent!r}")
        self.opt_out_directives = optout.check_directives(self.opt_out_directives)


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one ``fetch``: the bytes, or why there are none."""

    url: str
    ok: bool
    data: bytes | None
    #: Failure reason code (one of ``REASONS``), None when ok.
    reason: str | None
    #: Human-readable detail.
    message: str
    #: Last HTTP status seen (None when no response arrived).
    status: int | None
    #: HTTP attempts made (1 + retries used); a redirect chain counts as one attempt.
    attempts: int
    #: The URL the bytes came from, after redirects (the last URL tried on failure).
    final_url: str
    #: The final response's ``X-Robots-Tag`` values (optout.py), whether or not they opted out.
    robots: tuple[str, ...] = ()


class _AttemptFailed(Exception):
    """One attempt ended without bytes; carries what ``FetchResult`` needs."""

    def __init__(
        self, reason: str, message: str, status: int | None = None, retry_after: float | None = None,
        robots: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status
        self.retry_after, self.robots = retry_after, robots
        self.url = ""  # the URL of the hop that failed, filled in by ``Downloader._attempt``


# ----------------------------------------------------------------------------------------- helpers


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or HTTP-date), None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _content_length(headers: Any) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _status_reason(status: int) -> str:
    if status >= 500:
        return "http_5xx"
    return _STATUS_REASONS.get(status, "http_4xx")


def _release(resp: BaseHTTPResponse) -> None:
    """Return the connection to the pool after reading a small body, or close it."""
    length = _content_length(resp.headers)
    if length is not None and length <= DRAIN_LIMIT:
        try:
            resp.read(length + 1, decode_content=False)
            resp.release_conn()
            return
        except (ProtocolError, ReadTimeoutError, Urllib3SSLError, OSError, PaceError):
            pass
    _discard(resp)


def _discard(resp: BaseHTTPResponse) -> None:
    """Close the response's connection and hand the closed connection back to its pool (which reopens
    it on next use), as ``requests``' ``Response.close`` does."""
    resp.close()
    resp.release_conn()


# -------------------------------------------------------------------------------------------- fetcher


class Downloader:
    """Fetches URLs with the policies of a ``DownloadConfig``; share one instance between threads.

    Args:
        cfg: The download policies.
        sleep: Called with the backoff delay in seconds before each retry (inject to test backoff).
        rng: Source of the backoff jitter (``random()`` in [0, 1)); inject to make delays predictable.
    """

    def __init__(
        self,
        cfg: DownloadConfig,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self._sleep = sleep
        self._agent = optout.agent_token(cfg.user_agent)  # whom an X-Robots-Tag's token must name
        self._rng = rng or random.Random()
        self._timeout = Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s)
        #: Pool settings of https hosts: certificates verified against certifi's bundle, as requests does.
        self._tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": certifi.where()}
        self._headers = {
            "User-Agent": cfg.user_agent,
            "Accept": "image/*,*/*;q=0.8",
            "Accept-Encoding": "identity",
        }
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._adapter = GuardedAdapter(
            AddressGuard(
                tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cfg.allow_networks),
                cfg.dns_timeout_s,
            ),
            pool_connections=max(MIN_HOST_POOLS, cfg.threads),
            pool_maxsize=cfg.per_host_connections,
            max_retries=0,  # retries are ours, with backoff and Retry-After
            pool_block=False,  # the per-host semaphore already bounds the connections
        )
        # The adapter's guarded urllib3 pool manager, used directly (no requests session: no per-request
        # environment, cookie or proxy handling; a proxy would defeat the guard).
        self._pools = self._adapter.poolmanager

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self._pools.clear()

    def fetch(self, url: str) -> FetchResult:
        """Download ``url`` with retries; never raises for network or HTTP problems.

        Args:
            url: An http(s) URL.

        Returns:
            ``ok`` with the body, or a failure with one of ``REASONS``.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                data, status, final_url, robots = self._attempt(url)
            except _AttemptFailed as f:
                if f.reason not in RETRYABLE or attempt > self.cfg.retries:
                    return FetchResult(url, False, None, f.reason, f.message, f.status, attempt, f.url,
                                       f.robots)  # fmt: skip
                self._sleep(self.backoff(attempt - 1, f.retry_after))
                continue
            return FetchResult(url, True, data, None, "ok", status, attempt, final_url, robots)

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Delay before retry ``retry`` (0-based): the server's Retry-After (capped) or jittered backoff."""
        if retry_after is not None:
            return min(retry_after, self.cfg.retry_after_max_s)
        ceiling = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2.0 ** min(retry, 64))
        return self._rng.random() * ceiling

    # ---------------------------------------------------------------------------------------- internals

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        slot = self._slots.get(host)
        if slot is None:
            with self._slots_lock:
                slot = self._slots.setdefault(host, threading.BoundedSemaphore(self.cfg.per_host_connections))
        return slot

    def _attempt(self, url: str) -> tuple[bytes, int, str, tuple[str, ...]]:
        """One attempt: the redirect chain from ``url`` to a body, or ``_AttemptFailed``."""
        current, status = url, None
        budget = [self.cfg.deadline_s]  # seconds left of this attempt, spent by each hop
        for _hop in range(self.cfg.max_redirects + 1):
            try:
                status, data, location, robots = self._hop(current, budget)
            except _AttemptFailed as failed:
                failed.url = current
                failed.status = failed.status or status  # e.g. the 302 before a blocked hop
                raise
            if location is None:
                return data, status, current, robots
            current = location
        failed = _AttemptFailed(
            "too_many_redirects", f"more than {self.cfg.max_redirects} redirects from {url}", status
        )
        failed.url = current
        raise failed

    def _hop(self, url: str, budget: list[float]) -> tuple[int, bytes, str | None, tuple[str, ...]]:
        """One request: ``(status, body, None, X-Robots-Tag values)``, or ``(status, b"", next URL, ())``.

        ``budget[0]``: seconds left of the attempt's deadline; the time this hop holds its slot is taken off.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise _AttemptFailed("invalid_url", f"cannot parse URL {url[:80]!r}: {exc}") from exc
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            raise _AttemptFailed("bad_scheme", f"scheme must be http or https, got {url[:80]!r}")
        host = (parts.hostname or "").lower()
        if not host:
            raise _AttemptFailed("invalid_url", f"URL has no host: {url[:80]!r}")
        with self._slot(host):
            start = time.monotonic()
            if budget[0] <= 0:
                raise _AttemptFailed("timeout", f"download.deadline_s ({self.cfg.deadline_s:g} s) passed")
            cfg = self.cfg
            pace = Pace(
                start + budget[0], cfg.deadline_s, cfg.read_timeout_s, cfg.min_bytes_per_s, cfg.rate_grace_s
            )
            try:
                with pace.applied():
                    return self._exchange(url)
            finally:
                budget[0] -= time.monotonic() - start

    def _exchange(self, url: str) -> tuple[int, bytes, str | None, tuple[str, ...]]:
        """``_hop``'s request and response, within the thread's pace and the host's slot."""
        resp = self._send(url)
        status = resp.status
        if status in REDIRECT_STATUSES:
            location = resp.headers.get("Location", "").strip()
            _release(resp)
            if not location:
                raise _AttemptFailed("bad_redirect", f"HTTP {status} without Location from {url}", status)
            return status, b"", urljoin(url, location), ()
        if not 200 <= status < 300:
            retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
            _release(resp)
            reason = "bad_redirect" if 300 <= status < 400 else _status_reason(status)
            raise _AttemptFailed(reason, f"HTTP {status} from {url}", status, retry_after)
        robots = tuple(resp.headers.getlist(optout.HEADER))
        if why := optout.opted_out(robots, self.cfg.opt_out_directives, self._agent):
            _release(resp)  # the body is never read into the result
            text = f"{optout.HEADER} {'; '.join(robots)!r} opts out ({', '.join(why)}) at {url}"
            raise _AttemptFailed("opted_out", text, status, robots=robots)
        return status, self._read_body(resp, status), None, robots

    def _send(self, url: str) -> BaseHTTPResponse:
        """One GET without redirects, body not read yet (the response holds its pooled connection)."""
        try:
            parts = parse_url(url)  # percent-encodes what must be, IDNA-encodes the host
            tls = self._tls if parts.scheme == "https" else None
            pool = self._pools.connection_from_host(parts.host, parts.port, parts.scheme, pool_kwargs=tls)
        except (LocationValueError, ValueError) as exc:  # LocationParseError included
            raise _AttemptFailed("invalid_url", f"invalid URL {url[:80]!r}: {exc}") from exc
        try:
            return pool.urlopen(
                "GET",
                parts.request_uri,
                headers=self._headers,
                redirect=False,
                retries=False,  # ours, with backoff and Retry-After; errors come through unwrapped
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                release_conn=False,
                timeout=self._timeout,
            )
        except BlockedAddressError as exc:
            raise _AttemptFailed("blocked_address", str(exc)) from exc
        except DnsError as exc:
            raise _AttemptFailed("dns_error", str(exc)) from exc
        except DnsTimeoutError as exc:
            raise _AttemptFailed("dns_timeout", str(exc)) from exc
        except DeadlineExceeded as exc:
            raise _AttemptFailed("timeout", str(exc)) from exc
        except TooSlow as exc:
            raise _AttemptFailed("too_slow", f"too slow: {exc}") from exc
        except NewConnectionError as exc:  # a subclass of ConnectTimeoutError in urllib3 2: first
            raise _AttemptFailed("connection_error", f"connection failed: {exc}") from exc
        except (ConnectTimeoutError, ReadTimeoutError, TimeoutError) as exc:
            raise _AttemptFailed("timeout", f"timed out: {exc}") from exc
        except Urllib3SSLError as exc:
            raise _AttemptFailed("tls_error", f"TLS failure: {exc}") from exc
        except LocationValueError as exc:
            raise _AttemptFailed("invalid_url", f"invalid URL {url[:80]!r}: {exc}") from exc
        except (HTTPError, OSError) as exc:  # ProtocolError (reset, aborted), a closed pool, socket errors
            raise _AttemptFailed("connection_error", f"connection failed: {exc}") from exc

    def _read_body(self, resp: BaseHTTPResponse, status: int) -> bytes:
        """The body, within ``max_bytes``; closes the connection on any failure."""
        limit = self.cfg.max_bytes
        length = _content_length(resp.headers)
        if length is not None and length > limit:
            _discard(resp)
            raise _AttemptFailed("too_large", f"Content-Length {length} exceeds max_bytes {limit}", status)
        encoded = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        chunks: list[bytes] = []
        total = 0
        want = length if length and not encoded else STREAM_CHUNK
        try:
            while True:
                piece = resp.read(want, decode_content=encoded)
                if not piece:
                    break
                chunks.append(piece)
                total += len(piece)
                if total > limit:
                    _discard(resp)
                    raise _AttemptFailed("too_large", f"body exceeds max_bytes {limit}", status)
                want = STREAM_CHUNK
        except ReadTimeoutError as exc:
            _discard(resp)
            raise _AttemptFailed("timeout", f"read timed out after {total} bytes", status) from exc
        except DeadlineExceeded as exc:
            _discard(resp)
            raise _AttemptFailed("timeout", str(exc), status) from exc
        except TooSlow as exc:
            _discard(resp)
            raise _AttemptFailed("too_slow", f"too slow: {exc}", status) from exc
        except (ProtocolError, DecodeError, Urllib3SSLError, OSError) as exc:
            _discard(resp)
            raise _AttemptFailed("truncated", f"body broken after {total} bytes: {exc}", status) from exc
        return b"".join(chunks)
