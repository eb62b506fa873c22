"""The sharder's SSRF guard: connections that reach only the addresses the guard accepted.

The address check sits in the connection itself (``_GuardedConnectionMixin._new_conn``). A new
connection resolves the host once with ``socket.getaddrinfo``, refuses it when any address is
private, loopback, link-local, multicast, reserved, unspecified or otherwise not global (unless it
lies in ``allow_networks``), and then connects to exactly the addresses it checked: no DNS-rebinding
window between check and connect, a refused host is never contacted, and a pooled keep-alive
connection (checked when it was opened) is reused without another lookup. IP literals skip DNS.
``GuardedAdapter`` mounts it on a ``requests`` session. Also TCP_QUICKACK before each response (see
download.py).

Time limits: the lookup runs in a daemon thread and is given up after ``dns_timeout_s`` (or the
attempt's deadline, if sooner; ``DnsTimeoutError``), since ``getaddrinfo`` itself cannot be
interrupted and the system resolver's timeouts and attempts multiply; a stuck lookup's thread ends
when the resolver returns. The connect timeout is cut to what is left of the deadline, and responses
are read through ``pace.PacedResponse``, which holds the headers and body to the deadline and minimum rate.

Leaves out: redirects, retries and byte caps (download.py), the deadline and rate checks (pace.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import sys
import threading
from functools import lru_cache
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection

from flora.sharding.download.pace import PacedResponse, current

#: Linux only (TCP_QUICKACK, tcp(7)); elsewhere responses simply take the delayed-ACK path.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class BlockedAddressError(Exception):
    """A host resolves to an address the SSRF guard refuses (not an OSError: urllib3 must not wrap it)."""


class DnsError(Exception):
    """A host name does not resolve."""


class DnsTimeoutError(Exception):
    """The resolver gave no answer in time (not an OSError, for the same reason as above)."""


def _resolve(host: str, port: int, timeout: float | None) -> list[tuple]:
    """``socket.getaddrinfo`` for a stream socket, given up after ``timeout`` s (None, inf: no limit)."""
    if timeout is None or timeout == math.inf:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    outcome: list = []
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread, which re-raises it
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name=f"dns-{host}"[:64], daemon=True).start()
    if not done.wait(timeout):
        raise DnsTimeoutError(f"no DNS answer for {host!r} within {timeout:.3g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@lru_cache(maxsize=4096)
def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def refusal(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
) -> str | None:
    """Why the guard refuses ``address`` (e.g. ``"loopback"``), or None when it may be contacted."""
    if any(address in net for net in allowed if net.version == address.version):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal(address.ipv4_mapped, allowed)  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


class AddressGuard:
    """Resolves a host and refuses it unless every address is public or explicitly allowed."""

    def __init__(
        self,
        allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
        dns_timeout_s: float | None = None,
    ):
        self.allowed = allow_networks
        #: Longest wait for the resolver (None: the system's own limits); the thread's pace may cut it.
        self.dns_timeout_s = dns_timeout_s

    def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses of ``host`` to connect to, in resolver order.

        Raises:
            BlockedAddressError: any address is refused.
            DnsError: the name does not resolve.
            DnsTimeoutError: no answer within ``dns_timeout_s`` or the pace's deadline.
            pace.DeadlineExceeded: the pace's deadline passed before the lookup.
        """
        literal = _ip_literal(host)
        if literal is not None:
            found = [literal]
        else:
            timeout, pace = self.dns_timeout_s, current()
            if pace is not None:
                left = pace.remaining()
                timeout = left if timeout is None else min(timeout, left)
            try:
                infos = _resolve(host, port, timeout)
            except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
                raise DnsError(f"cannot resolve {host!r}: {exc}") from exc
            found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
        for address in found:
            why = refusal(address, self.allowed)
            if why is not None:
                shown = host if literal is not None else f"{host} ({address})"
                raise BlockedAddressError(f"{shown} is a {why} address, not in download.allow_networks")
        return [str(a) for a in found]


class _GuardedConnectionMixin:
    """Connects only to addresses the ``AddressGuard`` accepted (checked at connect time), within the
    thread's pace (pace.py) when it has one."""

    response_class = PacedResponse

    def __init__(self, *args: Any, guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        host, port = self._dns_host, self.port  # type: ignore[attr-defined]
        last: OSError | None = None
        for address in self._guard.addresses(host, port):
            timeout, pace = self.timeout, current()  # type: ignore[attr-defined]
            if pace is not None and isinstance(timeout, int | float):
                timeout = min(timeout, pace.remaining())
            try:
                sock = connection.create_connection(
                    (address, port),
                    timeout,
                    source_address=self.source_address,  # type: ignore[attr-defined]
                    socket_options=self.socket_options,  # type: ignore[attr-defined]
                )
            except TimeoutError as exc:
                raise ConnectTimeoutError(self, f"connection to {host} ({address}) timed out") from exc
            except OSError as exc:
                last = exc
                continue
            sys.audit("http.client.connect", self, host, port)
            return sock
        raise NewConnectionError(self, f"failed to connect to {host}: {last}")  # type: ignore[arg-type]

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        # The request is out; ask the kernel to ACK the response's first segment at once. A server that
        # writes headers and body separately without TCP_NODELAY (http.server does) otherwise holds the
        # body back (Nagle) until our delayed ACK fires: ~30 ms per response on Linux loopback.
        if _QUICKACK is not None and self.sock is not None:  # type: ignore[attr-defined]
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[attr-defined]
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _GuardedPoolManager(PoolManager):
    """A PoolManager whose pools open only guarded connections."""

    def __init__(self, guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = guard

    def _new_pool(self, scheme: str, host: str, port: int, request_context: dict | None = None) -> Any:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.ConnectionCls = _GuardedHTTPSConnection if scheme == "https" else _GuardedHTTPConnection
        pool.conn_kw = {**pool.conn_kw, "guard": self._guard}
        return pool


class GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: AddressGuard, **kwargs: Any) -> None:
        self._guard = guard  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any):
        self._pool_connections, self._pool_maxsize, self._pool_block = connections, maxsize, block
        self.poolmanager = _GuardedPoolManager(
            self._guard, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )
