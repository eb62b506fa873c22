"""The LMDB side of the image cache: LRU bookkeeping inside a write transaction, and one environment
per cache directory and process, safe across forks.

Owns ``_Writer`` (a write transaction's view of the four sub-databases: ``entries``, ``index``
(key -> tick, size), ``recency`` (tick -> key; the first key is the least recently used) and
``state`` (the logical clock and the byte total); touch, insert, remove, evict to a target) and the
environment registry (``_acquire`` / ``_release``: LMDB must not open an environment twice in one
process; ``os.register_at_fork`` closes every environment before a fork so parent and child reopen
their own).

Leaves out: the cache's API, map sizing and counters (cache.py), the record format (cache_record.py).
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from flora.sharding.cache.record import decode_record

_INDEX = struct.Struct(">QQ")  # tick, record size
_U64 = struct.Struct(">Q")
_CLOCK_KEY = b"clock"
_BYTES_KEY = b"bytes"


@dataclass(frozen=True)
class _Dbs:
    entries: Any
    index: Any
    recency: Any
    state: Any


def _total(txn: lmdb.Transaction, dbs: _Dbs) -> int:
    raw = txn.get(_BYTES_KEY, db=dbs.state)
    return _U64.unpack(raw)[0] if raw is not None else 0


class _MapExhausted(RuntimeError):
    """The map is full and already at ``max_map_bytes``."""


class _CacheFault(RuntimeError):
    """LMDB (or the disk under it) failed: disk full, I/O error, an unopenable folder."""


def verify_scan(txn: lmdb.Transaction, dbs: _Dbs) -> dict[str, int]:
    """``ImageCache.verify``'s report, from one read transaction."""
    report = dict.fromkeys(("entries", "corrupt", "inconsistent", "bytes"), 0)
    for key, record in txn.cursor(db=dbs.entries):
        report["entries"] += 1
        report["corrupt"] += isinstance(decode_record(record), str)
        raw = txn.get(key, db=dbs.index)
        if raw is None:
            report["inconsistent"] += 1
            continue
        tick, size = _INDEX.unpack(raw)
        report["bytes"] += size
        report["inconsistent"] += size != len(record) or txn.get(_U64.pack(tick), db=dbs.recency) != key
    indexed, ticked = txn.stat(dbs.index)["entries"], txn.stat(dbs.recency)["entries"]
    report["inconsistent"] += abs(indexed - report["entries"]) + abs(ticked - report["entries"])
    report["bytes_recorded"] = _total(txn, dbs)
    return report


class _Writer:
    """One write transaction's view of the bookkeeping: clock, byte total and eviction count."""

    def __init__(self, txn: lmdb.Transaction, dbs: _Dbs):
        self.txn, self.dbs = txn, dbs
        raw = txn.get(_CLOCK_KEY, db=dbs.state)
        self.clock = _U64.unpack(raw)[0] if raw is not None else 0
        self.total = _total(txn, dbs)
        self.evicted = 0

    def save(self) -> None:
        self.txn.put(_CLOCK_KEY, _U64.pack(self.clock), db=self.dbs.state)
        self.txn.put(_BYTES_KEY, _U64.pack(self.total), db=self.dbs.state)

    def _link(self, key: bytes, size: int) -> None:
        self.clock += 1
        self.txn.put(key, _INDEX.pack(self.clock, size), db=self.dbs.index)
        self.txn.put(_U64.pack(self.clock), key, db=self.dbs.recency)

    def touch(self, key: bytes) -> bool:
        """Moves ``key`` to the most recently used end; False if it is gone."""
        raw = self.txn.get(key, db=self.dbs.index)
        if raw is None:
            return False
        tick, size = _INDEX.unpack(raw)
        self.txn.delete(_U64.pack(tick), db=self.dbs.recency)
        self._link(key, size)
        return True

    def remove(self, key: bytes) -> bool:
        """Deletes the entry, its index row and its recency tick; False if there was no entry."""
        raw = self.txn.get(key, db=self.dbs.index)
        if raw is not None:
            tick, size = _INDEX.unpack(raw)
            self.txn.delete(_U64.pack(tick), db=self.dbs.recency)
            self.txn.delete(key, db=self.dbs.index)
            self.total = max(0, self.total - size)
        return self.txn.delete(key, db=self.dbs.entries) or raw is not None

    def insert(self, key: bytes, record: bytes) -> None:
        """Stores a record under ``key``, which must have no entry (``remove`` it first)."""
        self.txn.put(key, record, db=self.dbs.entries)
        self._link(key, len(record))
        self.total += len(record)

    def evict_until(self, target: int) -> None:
        """Deletes least recently used entries until the total is at most ``target``."""
        cursor = self.txn.cursor(db=self.dbs.recency)
        while self.total > target and cursor.first():
            (tick,), key = _U64.unpack(cursor.key()), cursor.value()
            cursor.delete()
            raw = self.txn.get(key, db=self.dbs.index)
            if raw is None or _INDEX.unpack(raw)[0] == tick:  # else a stale tick of a re-ticked entry
                self.evicted += self.remove(key)


class _Shared:
    """This process's one environment for a cache directory, shared by its ``ImageCache`` objects.

    LMDB must not open an environment twice in one process (closing either copy drops the other's
    file locks), and ``set_mapsize`` needs every transaction of the process finished: hence one
    environment and one lock per directory and process.
    """

    def __init__(self, key: str):
        self.key = key
        self.lock = threading.RLock()
        self.env: lmdb.Environment | None = None
        self.dbs: _Dbs | None = None
        self.users = 0


_REGISTRY: dict[str, _Shared] = {}
_REGISTRY_LOCK = threading.Lock()


def _acquire(path: Path) -> _Shared:
    with _REGISTRY_LOCK:
        key = str(path.resolve())
        shared = _REGISTRY.setdefault(key, _Shared(key))
        shared.users += 1
        return shared


def _close_env(shared: _Shared) -> None:
    if shared.env is not None:
        shared.env.close()
        shared.env, shared.dbs = None, None


def _release(shared: _Shared) -> None:
    """Drops one user of ``shared``; the last one closes the environment."""
    with _REGISTRY_LOCK:
        shared.users -= 1
        if shared.users > 0:
            return
        if _REGISTRY.get(shared.key) is shared:
            del _REGISTRY[shared.key]
        with shared.lock:
            _close_env(shared)


def _before_fork() -> None:
    """Closes every environment before a fork, with every lock taken (so no transaction is running).

    An environment must not cross a fork, and a child cannot reopen one its parent holds: py-lmdb
    refuses a second open of the same files in what it sees as the same process, and closing the
    inherited copy would wipe the parent's reader slots. Parent and child reopen on next use.
    """
    _REGISTRY_LOCK.acquire()
    for shared in _REGISTRY.values():
        shared.lock.acquire()
        _close_env(shared)


def _after_fork_in_parent() -> None:
    for shared in _REGISTRY.values():
        shared.lock.release()
    _REGISTRY_LOCK.release()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY.clear()  # instances notice the new pid and attach afresh
    _REGISTRY_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )
