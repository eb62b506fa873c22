"""The image cache's settings: ``CacheConfig`` (validated on load), its defaults, the check that its
path can be the cache folder (``check_cache_dir``: not a file, nor under one; ``cache.path`` and the
sharder's ``--cache`` flag both go through it), the check that the byte cap fits the disk the cache
lives on (``cap_warning``), and where a node keeps its cache (``node_cache_dir``: ``$FLORA_IMAGE_CACHE_DIR``
on that node, else ``cache.path``).

Leaves out: the cache itself (cache.py).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.config import ConfigError

GiB = 2**30
MiB = 2**20
#: Default byte cap; real caches are 50-200 GB (the issue's sizing for a full rebuild without network).
DEFAULT_MAX_BYTES = 50 * GiB
DEFAULT_LOW_WATER = 0.9
DEFAULT_INITIAL_MAP_BYTES = 256 * MiB
#: Smallest map accepted: LMDB needs a handful of pages for its meta and sub-database roots, and a
#: 1 MiB map still holds a few typical (20-200 KB) images.
MIN_MAP_BYTES = 1 * MiB
#: Default max map = cap * factor + slack. Values over ~2 KB live in whole 4 KiB overflow pages (up to
#: one page lost per record), freed pages are reused only once no reader holds them, and runs of free
#: pages fragment; twice the cap covers that with room to spare. On Linux the map is virtual: the file
#: only grows as pages are written.
MAP_OVERHEAD_FACTOR = 2
MAP_SLACK_BYTES = 64 * MiB
#: This node's image cache folder, overriding ``cache.path`` where it is set: the build's config comes
#: from the driver, but each node of a Ray cluster keeps its own LMDB cache on its own disk. (Not
#: ``FLORA_CACHE_DIR``: that is the root of the derived caches, sharding/cache/derived.py.)
NODE_CACHE_ENV = "FLORA_IMAGE_CACHE_DIR"
#: Default queue length for recency updates of ``get`` hits: one write transaction (and its fsync) per
#: this many hits. Measured with 50 KB values: ~3.7k hits/s at 1, ~17k hits/s at 16 (2-core VM); a
#: warm rebuild of 100k images spent ~2.5 s in those fsyncs at 16, so 256 (the sharder also flushes
#: at the end of every chunk, so nothing is lost at a clean exit).
DEFAULT_RECENCY_BATCH = 256


def check_cache_dir(path: str, key: str = "cache.path") -> None:
    """Refuses a cache path that cannot be a folder: an existing file, or a path under one. ``key``
    names where the path came from (``cache.path`` or ``--cache``)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir():
        return
    what = "is a file" if probe.is_file() else "is not a directory"
    where = f"{key} {path}" if probe == Path(path) else f"{key} {path}: {probe}"
    raise ConfigError(f"{where} {what}; expected a directory (the LMDB cache folder)")


def node_cache_dir(cfg_cache: CacheConfig) -> str | None:
    """The image cache folder of the node this runs on: ``$FLORA_IMAGE_CACHE_DIR`` when set, else
    ``cfg_cache.path``; None when the build has no cache (the variable moves a cache, it does not
    turn one on). A string, as ``CacheConfig.path`` holds it."""
    if cfg_cache.path is None:
        return None
    return os.environ.get(NODE_CACHE_ENV) or cfg_cache.path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class CacheConfig:
    """Where the image cache lives and how big it may grow (see the module docstring)."""

    #: Cache directory; ``None``: no cache, the sharder downloads every time.
    path: str | None = None
    #: Byte cap of the stored records (image bytes + meta JSON + a 20-byte header each).
    max_bytes: int = DEFAULT_MAX_BYTES
    #: When the cap is reached, evict down to this fraction of ``max_bytes``.
    low_water: float = DEFAULT_LOW_WATER
    initial_map_bytes: int = DEFAULT_INITIAL_MAP_BYTES
    #: Largest LMDB map (roughly the most disk the file may take); ``None``: twice the cap + 64 MiB.
    max_map_bytes: int | None = None
    #: ``get`` hits whose recency updates share one write transaction.
    recency_batch: int = DEFAULT_RECENCY_BATCH

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError(f"cache.path must be a directory path or null, got {self.path!r}")
        if self.path is not None:
            check_cache_dir(self.path)
        if not _is_int(self.max_bytes) or self.max_bytes < 1:
            raise ConfigError(f"cache.max_bytes must be a positive integer, got {self.max_bytes!r}")
        if not (_is_int(self.low_water) or isinstance(self.low_water, float)) or not 0 < self.low_water <= 1:
            raise ConfigError(f"cache.low_water must be in (0, 1], got {self.low_water!r}")
        if not _is_int(self.initial_map_bytes) or self.initial_map_bytes < MIN_MAP_BYTES:
            got = self.initial_map_bytes
            raise ConfigError(f"cache.initial_map_bytes must be an integer >= {MIN_MAP_BYTES}, got {got!r}")
        if self.max_map_bytes is not None and (
            not _is_int(self.max_map_bytes) or self.max_map_bytes < self.initial_map_bytes
        ):
            raise ConfigError(
                f"cache.max_map_bytes must be null or an integer >= initial_map_bytes "
                f"({self.initial_map_bytes}), got {self.max_map_bytes!r}"
            )
        if not _is_int(self.recency_batch) or self.recency_batch < 1:
            raise ConfigError(f"cache.recency_batch must be an integer >= 1, got {self.recency_batch!r}")

    def effective_max_map_bytes(self) -> int:
        """``max_map_bytes``, or the default derived from the cap."""
        if self.max_map_bytes is not None:
            return self.max_map_bytes
        return max(self.initial_map_bytes, self.max_bytes * MAP_OVERHEAD_FACTOR + MAP_SLACK_BYTES)


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def cap_warning(cfg: CacheConfig) -> str | None:
    """A warning when ``cfg.max_bytes`` cannot fit: the cache's filesystem has less free space than
    the cap minus what the cache already takes, so the disk fills up before the cap is reached (a
    failing write is then counted and the build goes on without caching). None when it fits."""
    if cfg.path is None:
        return None
    path = Path(cfg.path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return None  # a file where the folder should be: refused on load (check_cache_dir)
    free = shutil.disk_usage(probe).free
    data = path / "data.mdb"
    used = data.stat().st_size if data.is_file() else 0
    if used + free >= cfg.max_bytes:
        return None
    return (
        f"image cache {path}: cache.max_bytes is {_size(cfg.max_bytes)} but its filesystem has "
        f"{_size(free)} free (the cache already takes {_size(used)}): the disk fills up before the cap; "
        f"set cache.max_bytes to at most {_size(used + free)}, or free space"
    )
