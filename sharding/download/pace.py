"""Time limits of one download attempt: a wall-clock deadline and a minimum transfer rate.

Owns ``Pace`` (when the attempt must be over, the longest single read, the slowest acceptable rate
after a grace period), the calling thread's current pace (``Pace.applied``: download.py applies one
around each request; the guarded connections of ssrf.py read it where DNS, connect and the response
begin), ``PacedResponse`` (the response class of those connections) and the errors ``DeadlineExceeded``
and ``TooSlow``.

Why every ``recv`` is checked: a socket timeout bounds one read and restarts with every byte, and
http.client and urllib3 loop over reads until they have what they asked for, so a server that sends
one byte a second never trips ``read_timeout_s``. ``PacedResponse`` reads http.client's socket file
through a reader that, before each ``recv`` of the status line, headers and body alike, fails once the
deadline has passed or once the average rate since the response's first byte, after ``grace_s``, is
below ``min_rate``; each ``recv`` then waits at most until the deadline. The rate is measured from
the first byte, so a slow first byte (bounded by the read timeout and the deadline) is not a slow
transfer; it is checked only when more bytes are wanted, so a complete body is never refused.

The errors are not OSErrors on purpose: urllib3 and requests let them through unwrapped (as the
guard's ``BlockedAddressError``), closing the connection on the way, so download.py can tell them
from a per-read timeout and name the reason.

Leaves out: the values of the limits (``DownloadConfig``), retries and reasons (download.py), and the
DNS and connect steps that also stop at the deadline (ssrf.py).
"""

from __future__ import annotations

import http.client
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["DeadlineExceeded", "Pace", "PaceError", "PacedResponse", "TooSlow", "current"]

_local = threading.local()


class PaceError(Exception):
    """An attempt ran out of time or went too slowly (not an OSError: see the module docstring)."""


class DeadlineExceeded(PaceError):
    """The attempt's wall-clock deadline passed."""


class TooSlow(PaceError):
    """The response arrived slower than the minimum rate after the grace period."""


@dataclass(frozen=True)
class Pace:
    """The limits of one attempt.

    Attributes:
        deadline: ``time.monotonic()`` value by which the attempt must be over.
        budget_s: The attempt's whole budget in seconds (for messages).
        read_timeout_s: Longest wait for any single read (``DownloadConfig.read_timeout_s``).
        min_rate: Slowest acceptable average rate in bytes/s since the first byte; 0 turns the check off.
        grace_s: Seconds after the first byte before the rate is checked.
    """

    deadline: float
    budget_s: float
    read_timeout_s: float
    min_rate: float = 0.0
    grace_s: float = 0.0

    def remaining(self) -> float:
        """Seconds left, > 0.

        Raises:
            DeadlineExceeded: none are left.
        """
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"download.deadline_s ({self.budget_s:g} s) passed")
        return left

    @contextmanager
    def applied(self) -> Iterator[Pace]:
        """Make this the calling thread's pace (``current()``) inside the block."""
        previous = getattr(_local, "pace", None)
        _local.pace = self
        try:
            yield self
        finally:
            _local.pace = previous


def current() -> Pace | None:
    """The calling thread's pace, or None outside ``Pace.applied``."""
    return getattr(_local, "pace", None)


class _PacedReader(io.RawIOBase):
    """A socket file's bytes (``socket.SocketIO``), each ``recv`` checked against a ``Pace`` first.

    Wraps the socket file rather than the socket: the file holds a reference that keeps the socket
    open when http.client closes the connection of a response that ends with the connection.
    """

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, pace: Pace) -> None:
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._pace = pace
        self._first: float | None = None  # monotonic time the first byte arrived
        self.received = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket file's reference, as http.client's own file would drop it
        super().close()

    def readinto(self, buffer: Any) -> int | None:
        pace, now = self._pace, time.monotonic()
        left = pace.deadline - now
        if left <= 0:
            raise self._late()
        if pace.min_rate > 0 and self._first is not None:
            elapsed = now - self._first
            if elapsed >= pace.grace_s and self.received < pace.min_rate * elapsed:
                raise TooSlow(
                    f"{self.received} response bytes in {elapsed:.1f} s ({self.received / elapsed:.0f} B/s), "
                    f"below download.min_bytes_per_s {pace.min_rate:g}"
                )
        capped = left < pace.read_timeout_s
        self._sock.settimeout(left if capped else pace.read_timeout_s)
        try:
            n = self._raw.readinto(buffer)
        except TimeoutError as exc:
            if capped:  # the deadline, not the read timeout, ended the wait
                raise self._late() from exc
            raise
        if n and self._first is None:
            self._first = time.monotonic()
        self.received += n or 0
        return n

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"download.deadline_s ({self._pace.budget_s:g} s) passed after {self.received} response bytes"
        )


class PacedResponse(http.client.HTTPResponse):
    """http.client's response, read through a ``_PacedReader`` when the thread has a pace."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        pace = current()
        if pace is not None:  # keep http.client's socket file, read it through the pace
            self.fp = io.BufferedReader(_PacedReader(self.fp.detach(), sock, pace))
