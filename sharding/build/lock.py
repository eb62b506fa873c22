"""One build at a time per output folder: an exclusive lock on ``SHARDS/_build.lock``.

Owns ``output_lock(out, wait_s)``, held by ``build`` for the whole run (plan, jobs, finalize). The
lock is an ``fcntl.flock`` on ``_build.lock`` in the output folder; its JSON body (host, pid, start
time, command) is only for people and messages: ``output shards is locked by pid 4242 on host n1
since 2024-05-01T12:00:03+02:00 (another build is running)``. A second build on the same output
refuses at once with that line, or with ``wait_s`` (``--wait-lock [SECONDS]``, config key
``wait_lock_s``) polls with a bounded backoff (``POLL_FIRST_S`` doubling to ``POLL_MAX_S``) and
proceeds when the first one ends; the re-run is then incremental (finished chunks are reused).

Stale locks: the kernel drops a flock when its holder dies, however it dies, so a lock file left
by a killed build locks nothing; the next build takes it over (with a warning naming the dead
holder) whatever the file holds, an older or foreign format included. The holder removes the file
when it ends, while still holding the lock; a build that opened the old file before that removal
and then gets its lock finds the path no longer names the file it locked (``_is_current``) and
tries again on the new one, so two builds never hold "the" lock on two different files.

A full disk while the record is written is one line naming the lock file (``storage_error``), and
the file is removed again.

Only the driver (the process that calls ``build``) takes the lock: the descriptor is opened
close-on-exec, job workers (spawned processes, Ray tasks) never inherit or touch it, and a killed
driver releases it even while its workers are still exiting.

Builds that share an LMDB cache but write different outputs do not meet here (LMDB's own locking
serialises the cache). A filesystem without ``flock`` (some network mounts) is refused with one line
rather than built on unlocked. An ``s3://`` output is built in a local staging folder (remote.py),
and that folder is what is locked: two builds of one prefix from one machine never meet; drivers on
two machines are not kept apart (no lock every S3-compatible store honours).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from flora.errors import FloraError, storage_error

#: The lock file, beside ``_work/`` in the output folder (never inside it: a new plan removes ``_work``).
LOCK_FILE = "_build.lock"
#: Written into the body so that a reader can tell this record from another tool's file.
LOCK_FORMAT = "flora-build-lock/1"
#: Waiting for the lock: the first retry after 50 ms, doubling up to 1 s (a build takes seconds at
#: least, so a second of extra wait is noise, and idle waiters cost one syscall a second).
POLL_FIRST_S = 0.05
POLL_MAX_S = 1.0
#: A refused build gives the holder this long to write its record (it does so right after locking).
OWNER_RECORD_WAIT_S = 0.5
_OWNER_RECORD_POLL_S = 0.02
#: Bytes of the lock file read for the record (a real one is ~200 bytes; a stray big file is not read whole).
_MAX_RECORD_BYTES = 64 * 1024

log = logging.getLogger(__name__)


class OutputLockedError(FloraError, RuntimeError):
    """Another build holds the output folder, or its lock file cannot be used."""


@dataclass(frozen=True)
class Owner:
    """Who holds (or held) a lock: the lock file's body."""

    host: str
    pid: int
    started: str
    command: list[str] = field(default_factory=list)
    format: str = LOCK_FORMAT

    @classmethod
    def current(cls) -> Owner:
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(host=socket.gethostname(), pid=os.getpid(), started=started, command=list(sys.argv))

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        """The record in ``data``; None for an empty file, a torn write or another format."""
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(body, dict):
            return None
        host, pid, started = body.get("host"), body.get("pid"), body.get("started")
        if not (isinstance(host, str) and isinstance(pid, int) and isinstance(started, str)):
            return None
        command = body.get("command")
        command = [str(c) for c in command] if isinstance(command, list) else []
        return cls(host, pid, started, command, str(body.get("format", "")))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started}"

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode("utf-8")


def _open(path: Path) -> int:
    try:  # close-on-exec: spawned workers never inherit the lock; no symlink is followed
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise OutputLockedError(
            f"cannot open the build lock {path}: {exc.strerror} [Errno {exc.errno}]; "
            "expected a regular file there (or none)"
        ) from exc


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a finishing holder removes it)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_record(fd: int) -> bytes:
    return os.pread(fd, _MAX_RECORD_BYTES, 0)


def _holder(fd: int) -> Owner | None:
    """The record of the build holding ``fd``'s file, given a moment to appear if it just locked."""
    deadline = time.monotonic() + OWNER_RECORD_WAIT_S
    while True:
        owner = Owner.parse(_read_record(fd))
        if owner is not None or time.monotonic() >= deadline:
            return owner
        time.sleep(_OWNER_RECORD_POLL_S)


def _attempt(path: Path) -> tuple[int | None, Owner | None]:
    """One try without blocking: ``(fd, None)`` holding the lock, or ``(None, holder or None)``."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return None, _holder(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            os.close(fd)
            hint = "the output folder must be on a filesystem with flock (a local disk, NFSv4)"
            raise OutputLockedError(
                f"cannot lock {path}: {exc.strerror} [Errno {exc.errno}]; {hint}"
            ) from exc
        if _is_current(fd, path):
            return fd, None
        os.close(fd)  # the previous holder removed this file as it ended: lock the new one


def _refusal(out: Path, holder: Owner | None, wait_s: float) -> str:
    who = (
        f"by {holder.describe()}"
        if holder is not None
        else f"by another process ({out / LOCK_FILE} holds no owner record this version can read)"
    )
    if wait_s > 0:
        return f"output {out} is still locked {who} after waiting {wait_s:g} s (another build is running)"
    return f"output {out} is locked {who} (another build is running); use --wait-lock to wait"


def _take_over(out: Path, fd: int) -> None:
    """Reports what a lock file left behind says, then replaces it with this build's record."""
    left = _read_record(fd)
    previous = Owner.parse(left)
    if previous is not None:
        log.warning(
            "output %s: taking over the lock of %s, which ended without releasing it (killed?)",
            out,
            previous.describe(),
        )
    elif left.strip():
        log.warning("output %s: replacing a lock file of an unknown format (%d bytes)", out, len(left))
    os.ftruncate(fd, 0)
    os.pwrite(fd, Owner.current().to_bytes(), 0)


@contextmanager
def output_lock(out: str | Path, wait_s: float = 0.0) -> Iterator[Path]:
    """Holds the exclusive build lock of the folder ``out`` (created if missing) for the ``with`` body.

    Args:
        out: The output folder.
        wait_s: 0 refuses at once when another build holds it; otherwise wait up to this many seconds
            (``math.inf``: no limit) before refusing.

    Raises:
        OutputLockedError: held by another build (the message names it), or not lockable.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    deadline = time.monotonic() + wait_s
    delay, announced = POLL_FIRST_S, False
    while True:
        fd, holder = _attempt(path)
        if fd is not None:
            break
        now = time.monotonic()
        if now >= deadline:
            raise OutputLockedError(_refusal(out, holder, wait_s))
        if not announced:
            announced = True
            who = holder.describe() if holder is not None else "another process"
            limit = "without limit" if wait_s == float("inf") else f"up to {wait_s:g} s"
            log.warning("output %s is locked by %s (another build is running); waiting %s", out, who, limit)
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, POLL_MAX_S)
    try:
        try:
            _take_over(out, fd)
        except OSError as exc:  # a full disk: one line naming the file, as every write of the build
            raise storage_error("build: taking the output lock", path, exc) from exc
        yield path
    finally:
        try:
            if _is_current(fd, path):
                path.unlink()  # still holding the lock: see the module docstring for why this is safe
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("output %s: could not remove %s: %s", out, path, exc)
        os.close(fd)
