"""The sharder's on-disk image cache: URL -> (image bytes, metadata), LMDB-backed, byte-capped, LRU.

Owns ``ImageCache`` and its config ``CacheConfig``: one LMDB environment (a directory holding
``data.mdb`` and ``lock.mdb``) shared by every process of every sharder run that names it, so that a
rebuild or a resumed run needs no network. Four named sub-databases:

- ``entries``: sha256(url) -> record = header (magic, crc32, meta length, data length) + meta JSON +
  data. The crc32 covers everything after itself; a record that fails it (or is truncated, or whose
  meta is not a JSON object) is *corrupt*: ``get`` deletes it, counts it and reports a miss.
- ``index``: sha256(url) -> (tick, size): the entry's last use on the logical clock and its record
  size, the number the byte cap counts (header + meta + data, LMDB's own page overhead excluded).
- ``recency``: big-endian tick -> sha256(url); the first key is the least recently used entry.
- ``state``: ``clock`` (the last tick handed out) and ``bytes`` (the sum of record sizes).

Recency is a logical clock kept in the database, so it survives restarts and is shared by processes:
every write transaction reads the clock, hands out ticks, and writes it back (LMDB serialises writers
across processes, so ticks are unique). A ``get`` hit re-ticks the entry; to keep hits cheap the
re-ticks are queued in the process and written ``recency_batch`` at a time, and also by any write of
this process (a ``put`` applies them first, so within one process LRU order is exact; across processes
a queued use lands up to ``recency_batch - 1`` hits late, or not at all if the process dies).
Eviction happens inside ``put``'s transaction: when the new record would take the total past
``max_bytes``, the oldest entries go until the total plus the new record is at most
``low_water * max_bytes``, so eviction runs once per batch of puts, not on every one. A record larger
than ``max_bytes`` is refused (``too_large_for_cache``) without evicting anything.

Map size: the environment starts at ``initial_map_bytes`` and doubles on ``MapFullError`` up to
``max_map_bytes`` (by default twice the cap plus slack); at the maximum a ``put`` evicts a batch and
tries once more, then gives up (``map_full``), never raising. When another process has grown the map,
this one adopts the new size on ``MapResizedError``.

Faults: the cache is an accelerator, never the reason a build ends. A failing write (disk full, an
I/O error in ``mdb_txn_commit``, a folder that cannot be created) is warned about once, naming the
cache's path; the process then stops writing (each entry not stored counts in ``write_failures``) and
goes on; a failing read is a miss (``read_failures``). ``cache_config.cap_warning`` tells at start
when the byte cap cannot fit the free space of the cache's filesystem.

Processes: the environment is opened lazily in the process that uses it (``lock=True``); a forked
child opens its own and never touches the parent's, and pickling an ``ImageCache`` sends only its
parameters. Within a process one lock serialises the methods, so threads may share an instance.

Where the parts live: the settings (cache_config.py), the record format (cache_record.py), the LRU
bookkeeping in a write transaction and the fork-safe environment registry (cache_lmdb.py).

Leaves out: downloading and image validation (the caller stores what it has checked), what the
metadata means (stored as JSON and returned as parsed), time-based expiry, and shrinking the file
(LMDB reuses freed pages but never returns them to the file system).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from flora.sharding.cache.config import (
    DEFAULT_INITIAL_MAP_BYTES,
    DEFAULT_LOW_WATER,
    DEFAULT_RECENCY_BATCH,
    CacheConfig,
)
from flora.sharding.cache.lmdb_env import (
    _acquire,
    _CacheFault,
    _Dbs,
    _MapExhausted,
    _release,
    _Shared,
    _total,
    _Writer,
    verify_scan,
)
from flora.sharding.cache.record import MAX_RECORD_BYTES, CacheEntry, decode_record, encode_record, url_hash

__all__ = ["CacheConfig", "CacheEntry", "ImageCache", "encode_record", "url_hash"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Reader slots in lock.mdb (64 bytes each): one per process with a read open, so several sharder
#: runs of a few dozen workers each fit. LMDB's default is 126.
MAX_READERS = 512
#: A transaction is retried after MapResizedError and after each map doubling; 64 attempts cover
#: doubling from 1 MiB past any disk.
MAX_TXN_ATTEMPTS = 64

_COUNTERS = ("hits", "misses", "puts", "evictions", "corrupt", "too_large_for_cache")
_COUNTERS += ("map_full", "map_grows", "map_resized", "write_failures", "read_failures")


def _from_config(cfg: CacheConfig) -> ImageCache:
    return ImageCache.from_config(cfg)


class ImageCache:
    """URL -> ``CacheEntry`` on disk, byte-capped with LRU eviction, safe for concurrent processes.

    Threads may share an instance (its methods are serialised per directory), but not while one of
    them closes it. Instances for one directory in one process share one LMDB environment.

    Args:
        path: Cache directory (created if missing).
        max_bytes: Byte cap of the stored records.
        low_water: Fraction of ``max_bytes`` that eviction frees down to.
        initial_map_bytes: LMDB map size to start with (it grows on demand).
        max_map_bytes: Largest map; ``None``: ``max_bytes * 2 + 64 MiB``.
        recency_batch: ``get`` hits whose recency updates share one write transaction.
    """

    def __init__(
        self,
        path: str | Path,
        max_bytes: int,
        *,
        low_water: float = DEFAULT_LOW_WATER,
        initial_map_bytes: int = DEFAULT_INITIAL_MAP_BYTES,
        max_map_bytes: int | None = None,
        recency_batch: int = DEFAULT_RECENCY_BATCH,
    ):
        self.config = CacheConfig(
            path=str(path),
            max_bytes=max_bytes,
            low_water=low_water,
            initial_map_bytes=initial_map_bytes,
            max_map_bytes=max_map_bytes,
            recency_batch=recency_batch,
        )
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_map_bytes = self.config.effective_max_map_bytes()
        self._pid = os.getpid()
        self._attach_lock = threading.Lock()
        self._shared: _Shared | None = None
        self._pending: dict[bytes, None] = {}  # get hits not yet re-ticked, oldest first
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._refused: str | None = None  # why this process stopped writing (see _fault)
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> ImageCache | None:
        """The cache ``cfg`` describes, or None when ``cfg.path`` is None (no cache)."""
        if cfg.path is None:
            return None
        return cls(
            cfg.path,
            cfg.max_bytes,
            low_water=cfg.low_water,
            initial_map_bytes=cfg.initial_map_bytes,
            max_map_bytes=cfg.max_map_bytes,
            recency_batch=cfg.recency_batch,
        )

    def __reduce__(self) -> tuple:
        return _from_config, (self.config,)  # the worker opens its own environment

    def __repr__(self) -> str:
        return f"ImageCache({str(self.path)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------------------- environment

    def _guard(self) -> threading.RLock:
        """The lock of this directory in this process, attaching to its environment on first use."""
        if os.getpid() != self._pid:  # forked: the parent's queue and counters are not ours
            self._pid, self._shared = os.getpid(), None
            self._attach_lock = threading.Lock()
            self._pending = {}
            self._counters = dict.fromkeys(_COUNTERS, 0)
            self._refused, self._warned = None, set()
        if self._shared is None:
            with self._attach_lock:
                if self._shared is None:
                    self._shared = _acquire(self.path)
        return self._shared.lock

    def _open(self) -> tuple[lmdb.Environment, _Dbs]:
        shared = self._shared
        if shared.env is not None:
            return shared.env, shared.dbs
        self.path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(self.path),
            map_size=self.config.initial_map_bytes,
            subdir=True,
            lock=True,
            max_dbs=4,
            max_readers=MAX_READERS,
            readahead=False,  # random reads over a cache larger than RAM
            metasync=False,  # one fsync per commit instead of two; keeps integrity, may lose the last txn
        )
        env.reader_check()  # free reader slots of crashed processes, which would pin old pages
        names = (b"entries", b"index", b"recency", b"state")
        for _ in range(MAX_TXN_ATTEMPTS):
            try:
                shared.dbs = _Dbs(*(env.open_db(name) for name in names))
                break
            except lmdb.MapResizedError:  # another process grew the map since we opened it
                env.set_mapsize(0)
        shared.env = env
        return env, shared.dbs

    def _grow(self, env: lmdb.Environment) -> bool:
        """Doubles the map up to ``max_map_bytes``; False if it is already there."""
        current = env.info()["map_size"]
        if current >= self.max_map_bytes:
            return False
        env.set_mapsize(min(current * 2, self.max_map_bytes))
        self._counters["map_grows"] += 1
        return True

    def _fault(self, exc: BaseException, writing: bool) -> _CacheFault:
        """Counts an LMDB or disk failure and warns once per kind in this process. After a failed
        write this process writes no more (the cache is an accelerator: the build goes on, and what
        could not be cached is fetched again next time); reads are still tried."""
        kind = "write" if writing else "read"
        if writing:
            self._refused = f"{type(exc).__name__}: {exc}"
        else:
            self._counters["read_failures"] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            then = "stops writing to it in this process" if writing else "treats it as a miss"
            log.warning("image cache %s: a %s failed (%s: %s); the build %s", self.path, kind,
                        type(exc).__name__, exc, then)  # fmt: skip
        return _CacheFault(f"{self.path}: {kind} failed: {exc}")

    def _read(self, fn: Callable[[lmdb.Transaction, _Dbs], T]) -> T:
        for _ in range(MAX_TXN_ATTEMPTS):
            try:
                env, dbs = self._open()
                with env.begin() as txn:
                    return fn(txn, dbs)
            except lmdb.MapResizedError:  # another process grew the map past ours: adopt its size
                env.set_mapsize(0)
                self._counters["map_resized"] += 1
            except (lmdb.Error, OSError) as exc:  # an unopenable folder, an I/O error
                raise self._fault(exc, writing=False) from None
        raise RuntimeError(f"{self.path}: no read transaction after {MAX_TXN_ATTEMPTS} map resizes")

    def _write(self, fn: Callable[[_Writer], T]) -> T:
        """Runs ``fn`` in a write transaction after the queued recency updates; grows the map as needed.
        Raises ``_CacheFault`` when the disk fails (and from then on in this process)."""
        if self._refused is not None:
            raise _CacheFault(self._refused)
        for _ in range(MAX_TXN_ATTEMPTS):
            try:
                env, dbs = self._open()
                with env.begin(write=True) as txn:
                    writer = _Writer(txn, dbs)
                    for key in self._pending:
                        writer.touch(key)
                    result = fn(writer)
                    writer.save()
            except lmdb.MapResizedError:
                env.set_mapsize(0)
                self._counters["map_resized"] += 1
            except lmdb.MapFullError:
                if not self._grow(env):
                    raise _MapExhausted(
                        f"{self.path}: map full at max_map_bytes={self.max_map_bytes}"
                    ) from None
            except (lmdb.Error, OSError) as exc:  # disk full, I/O error (mdb_txn_commit), no folder
                raise self._fault(exc, writing=True) from None
            else:
                self._pending.clear()
                self._counters["evictions"] += writer.evicted
                return result
        raise RuntimeError(f"{self.path}: no write transaction after {MAX_TXN_ATTEMPTS} attempts")

    # ------------------------------------------------------------------------------------ public API

    def get(self, url: str) -> CacheEntry | None:
        """The cached entry for ``url`` (and a recency bump), or None on a miss or a corrupt entry."""
        key = url_hash(url)
        with self._guard():
            try:
                record = self._read(lambda txn, dbs: txn.get(key, db=dbs.entries))
            except _CacheFault:
                record = None
            if record is None:
                self._counters["misses"] += 1
                return None
            entry = decode_record(record)
            if isinstance(entry, str):
                log.warning("image cache %s: corrupt entry for %s (%s); deleted", self.path, url, entry)
                self._drop_corrupt(key, record)
                self._counters["corrupt"] += 1
                self._counters["misses"] += 1
                return None
            self._counters["hits"] += 1
            if self._refused is not None:
                return entry
            self._pending.pop(key, None)
            self._pending[key] = None
            if len(self._pending) >= self.config.recency_batch:
                self._flush()
            return entry

    def _drop_corrupt(self, key: bytes, record: bytes) -> None:
        def drop(writer: _Writer) -> None:
            if writer.txn.get(key, db=writer.dbs.entries) == record:  # not replaced meanwhile
                writer.remove(key)

        try:
            self._write(drop)
        except (_MapExhausted, _CacheFault) as exc:
            log.warning("image cache: could not delete a corrupt entry: %s", exc)

    def _flush(self) -> None:
        """Writes the queued recency updates (dropping them if the map cannot take them)."""
        if not self._pending:
            return
        try:
            self._write(lambda writer: None)
        except _MapExhausted as exc:
            log.warning("image cache: dropped %d recency updates: %s", len(self._pending), exc)
            self._pending.clear()
        except _CacheFault:
            self._pending.clear()  # warned once by _fault

    def put(self, url: str, data: bytes, meta: dict) -> bool:
        """Stores ``data`` and ``meta`` under ``url``, evicting LRU entries to stay under the cap.

        Returns:
            True if stored; False if the record is larger than the cap (``too_large_for_cache``), the
            map could not make room (``map_full``) or the disk failed (``write_failures``).
        """
        key = url_hash(url)
        record = encode_record(data, meta)
        size = len(record)
        with self._guard():
            if size > self.max_bytes or size > MAX_RECORD_BYTES:
                self._counters["too_large_for_cache"] += 1
                return False
            target = max(0, int(self.config.low_water * self.max_bytes) - size)

            def store(writer: _Writer) -> None:
                writer.remove(key)  # a replaced entry's bytes do not count against the new one
                if writer.total + size > self.max_bytes:
                    writer.evict_until(target)
                writer.insert(key, record)

            try:
                try:
                    self._write(store)
                except _MapExhausted:
                    try:  # free pages by evicting a batch in its own transaction, then try once more
                        self._write(
                            lambda w: w.evict_until(min(target, int(w.total * self.config.low_water)))
                        )
                        self._write(store)
                    except _MapExhausted as exc:
                        log.warning("image cache: %s not stored: %s", url, exc)
                        self._counters["map_full"] += 1
                        return False
            except _CacheFault:
                self._counters["write_failures"] += 1
                return False
            self._counters["puts"] += 1
            return True

    def put_many(self, items: list[tuple[str, bytes, dict]]) -> int:
        """Stores several ``(url, data, meta)`` entries in one write transaction: one commit, one
        fsync for all of them (a put's cost is mostly its fsync). Same rules as ``put``; returns how
        many were stored."""
        records, fitting = [], []
        for url, data, meta in items:
            record = encode_record(data, meta)
            if len(record) > self.max_bytes or len(record) > MAX_RECORD_BYTES:
                self._counters["too_large_for_cache"] += 1  # counted here, once
            else:
                records.append((url_hash(url), record))
                fitting.append((url, data, meta))
        if not records:
            return 0
        with self._guard():
            low = int(self.config.low_water * self.max_bytes)

            def store(writer: _Writer) -> None:
                for key, record in records:
                    writer.remove(key)
                    if writer.total + len(record) > self.max_bytes:
                        writer.evict_until(max(0, low - len(record)))
                    writer.insert(key, record)

            try:
                self._write(store)
            except _MapExhausted:  # one at a time, which can evict to make room (the too large are out)
                return sum(self.put(url, data, meta) for url, data, meta in fitting)
            except _CacheFault:
                self._counters["write_failures"] += len(records)
                return 0
            self._counters["puts"] += len(records)
            return len(records)

    def flush(self) -> None:
        """Writes the queued recency updates of ``get`` hits now (``close`` does it too)."""
        with self._guard():
            self._flush()

    def contains_many(self, urls: list[str]) -> set[str]:
        """The subset of ``urls`` that have an entry, in one read transaction (no recency bump).
        Lets a caller skip ``get`` for known misses, which would otherwise queue behind commits; the
        absent ones count as misses (the caller will not ``get`` them), the present ones count when
        they are fetched with ``get``."""
        keys = [(url, url_hash(url)) for url in urls]
        with self._guard():
            try:
                found = self._read(
                    lambda txn, dbs: {url for url, key in keys if txn.get(key, db=dbs.index) is not None}
                )
            except _CacheFault:
                found = set()
            self._counters["misses"] += len({url for url, _ in keys} - found)
            return found

    def contains(self, url: str) -> bool:
        """Whether ``url`` has an entry (not checked for corruption; no recency bump)."""
        key = url_hash(url)
        with self._guard():
            return self._read(lambda txn, dbs: txn.get(key, db=dbs.index) is not None)

    def delete(self, url: str) -> bool:
        """Removes the entry of ``url``; False if there was none."""
        key = url_hash(url)
        with self._guard():
            self._pending.pop(key, None)
            return self._write(lambda writer: writer.remove(key))

    def stats(self) -> dict[str, int]:
        """This process's counters plus the cache-wide ``bytes`` and ``entries`` (from the database).

        Counters: ``hits``, ``misses`` (corrupt entries included), ``puts``, ``evictions`` (entries
        this process evicted), ``corrupt``, ``too_large_for_cache``, ``map_full`` (puts refused for
        want of map space), ``map_grows``, ``map_resized`` (sizes adopted from other processes),
        ``write_failures`` (entries not stored because the disk failed) and ``read_failures``.
        """
        with self._guard():
            try:
                total, entries = self._read(
                    lambda txn, dbs: (_total(txn, dbs), txn.stat(dbs.index)["entries"])
                )
            except _CacheFault:
                total = entries = 0
            return {**self._counters, "bytes": total, "entries": entries}

    def verify(self) -> dict[str, int]:
        """Checks every record and the bookkeeping in one read snapshot; changes nothing.

        Returns:
            ``entries``, ``corrupt`` (records failing their checksum or parse), ``inconsistent``
            (records, index rows and ticks that do not pair up, or a size that differs), ``bytes``
            (the sum of index sizes) and ``bytes_recorded`` (the running total the cap is checked on).
        """

        with self._guard():
            return self._read(verify_scan)

    def close(self) -> None:
        """Writes queued recency updates and lets go of the environment; a later call reopens it."""
        with self._guard():
            self._flush()
            shared, self._shared = self._shared, None
        _release(shared)

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
