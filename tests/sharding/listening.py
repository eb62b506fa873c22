"""Which TCP sockets the processes a test started are listening on, read from procfs (Linux).

``descendants(pid)`` follows parent ids in ``/proc/<pid>/stat``; ``listening(pids)`` joins the LISTEN
rows of ``/proc/net/tcp`` and ``/proc/net/tcp6`` (socket inode -> address) with each process's open
file descriptors (``/proc/<pid>/fd`` -> ``socket:[inode]``). psutil would do the same; it is not a
dependency of the project, and procfs is all it reads on Linux.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: ``st`` column value of a listening TCP socket (include/net/tcp_states.h: TCP_LISTEN = 10).
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str  # the process's command line, first word (or its comm)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.address)


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``, an IPv6 socket's view)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def parse_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as ``/proc/net/tcp{,6}`` writes it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening_inodes() -> dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    found = {}
    for table in ("tcp", "tcp6"):
        path = PROC / "net" / table
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != TCP_LISTEN:
                continue
            address, port = fields[1].split(":")
            found[fields[9]] = (parse_address(address), int(port, 16))
    return found


def _name(pid: int) -> str:
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        return argv[0].decode(errors="replace").strip() or (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def listening(pids: set[int]) -> list[Listener]:
    """Every listening TCP socket held by one of ``pids``."""
    inodes = _listening_inodes()
    out = set()
    for pid in pids:
        fd_dir = PROC / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                address, port = inodes[target[8:-1]]
                out.add(Listener(pid, _name(pid), address, port))
    return sorted(out, key=lambda s: (s.pid, s.port))
