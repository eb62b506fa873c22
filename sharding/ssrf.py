"""The sharder's SSRF guard: connections that reach only the addresses the guard accepted.

The address check sits in the connection itself (``_GuardedConnectionMixin._new_conn``). A new
connection resolves the host once with ``socket.getaddrinfo``, refuses it when any address is
private, loopback, link-local, multicast, reserved, unspecified or otherwise not global (unless it
lies in ``allow_networks``), and then connects to exactly the addresses it checked: no DNS-rebinding
window between check and connect, a refused host is never contacted, and a pooled keep-alive
connection (checked when it was opened) is reused without another lookup. IP literals skip DNS.
``GuardedAdapter`` mounts it on a ``requests`` session. Also TCP_QUICKACK before each response (see
download.py).

Leaves out: redirects, retries and byte caps (download.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
from functools import lru_cache
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection

#: Linux only (TCP_QUICKACK, tcp(7)); elsewhere responses simply take the delayed-ACK path.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class BlockedAddressError(Exception):
    """A host resolves to an address the SSRF guard refuses (not an OSError: urllib3 must not wrap it)."""


class DnsError(Exception):
    """A host name does not resolve."""


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

    def __init__(self, allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()):
        self.allowed = allow_networks

    def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses of ``host`` to connect to, in resolver order.

        Raises:
            BlockedAddressError: any address is refused.
            DnsError: the name does not resolve.
        """
        literal = _ip_literal(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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
    """Connects only to addresses the ``AddressGuard`` accepted (checked at connect time)."""

    def __init__(self, *args: Any, guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        host, port = self._dns_host, self.port  # type: ignore[attr-defined]
        last: OSError | None = None
        for address in self._guard.addresses(host, port):
            try:
                sock = connection.create_connection(
                    (address, port),
                    self.timeout,  # type: ignore[attr-defined]
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
