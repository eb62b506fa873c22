"""How much decoding memory a build process may have in flight: the budget, the cost of one image, the
default.

Owns ``DecodeBudget`` (a first-come, first-served counting semaphore over bytes: a worker thread
reserves an image's cost before decoding and gives it back once the pixels are freed),
``decode_cost`` (an image's peak working memory from facts its header gives, before any pixel is
decoded: size at the decode scale, mode, format, progressive scans, rotation, resize),
``budget_bytes`` (the configured budget, or the default: ``MEMORY_SHARE`` of the machine's memory, or
of the process's cgroup limit where lower, divided by the build's worker processes), and
``return_freed_memory`` (glibc's malloc set so that freed pixels leave the resident set: without it a
budget bounds the buffers alive at once but not the process's RSS, see ``MMAP_THRESHOLD_BYTES``).

An image whose cost is above the whole budget is not refused: it waits until nothing else is in
flight and then runs alone, holding the whole budget. So a process's decoding memory stays under
max(budget, the cost of the largest image ``images.max_pixels`` admits), and ``images.max_pixels``
(a ``decompression_bomb`` failure, recorded) is the knob that caps the second term. Reservations are
served in arrival order: a large image waiting for the budget to drain is not overtaken by a stream of
small ones, so it cannot starve, and since every holder releases in a ``finally`` there is no cycle to
deadlock on (a thread holds at most one reservation and waits for nothing while holding it).

The per-pixel figures are Pillow 13's own buffers (``PIXEL_BYTES``) and peaks measured per mode on
4000x4000 images (``benchmarks/decode_memory.py`` prints estimate against measured peak for each kind).

Leaves out: decoding itself and what is decoded at which scale (convert.py), the memory of downloads in
flight (bounded by the job's look-ahead window and ``download.max_bytes``), and memory that is not
decoding (the cache's map, the shard writer).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MIB = 2**20
#: Share of the machine's memory the default gives to decoding, split evenly across the worker
#: processes. The other half is for what a process holds besides pixels (interpreter and libraries,
#: ~150 MB; downloads in flight; the shard being written), the page cache of the image cache, and
#: the rest of the machine.
MEMORY_SHARE = 0.5
#: The default never goes below this: one 12 MP photo decoded in full with its RGB copy (~100 MB) and
#: a few small ones beside it.
MIN_DEFAULT_BYTES = 128 * MIB
#: Assumed when the operating system does not tell the machine's memory.
FALLBACK_MEMORY_BYTES = 8 * 2**30
#: Bytes per pixel of Pillow's image buffers: 8-bit single-band modes take one, 16-bit ones two, every
#: other mode (RGB included, stored as RGBX) four.
PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
RGB_BYTES = 4
#: WebP: libwebp decodes into its own RGBA buffer, Pillow copies it into a bytes object and then into
#: the image (measured peak of a 4000x4000 WebP: 16.3 bytes a pixel, without a resize).
WEBP_BYTES = 16
#: A progressive JPEG keeps every DCT coefficient (2 bytes) of the full-size image until its last scan,
#: whatever the decode scale (measured: 3.2 bytes a pixel for 4:2:0 at 1/8 scale).
COEFFICIENT_BYTES = 2
#: Transparency composited on white: the RGBA copy, the white RGB canvas and the alpha band.
ALPHA_EXTRA = RGB_BYTES + RGB_BYTES + 1
#: The encoded JPEG and its growing buffer, per stored pixel (quality 90 on noise is under 1 byte).
ENCODE_BYTES = 1
#: Pillow's file reads may copy the compressed stream once besides the caller's bytes.
COMPRESSED_COPIES = 2
#: glibc's malloc settings for a process with a budget (mallopt's parameter numbers, malloc.h). Buffers
#: from this size up (every image buffer worth counting) become mappings of their own, unmapped when
#: freed: by default glibc raises this threshold as big buffers are freed (up to 32 MiB), and buffers
#: under it stay in malloc's arenas after they are freed, so peak RSS grew with the threads rather
#: than with the budget. Measured, 16 threads, ten RGBA PNGs, a 64 MiB budget (one image at a time):
#: 2000x2000: 500 MiB above the baseline without a budget, 497 with it alone, 51 with these settings;
#: 3000x3000: 1,118, 566 and 115 MiB.
MMAP_THRESHOLD_BYTES = 4 * MIB
#: At most this many malloc arenas (glibc's default: 8 per core), as sharding/build/distribute.py sets
#: for its worker processes (``MALLOC_ARENA_MAX``): the small buffers freed per thread are kept in two
#: arenas, not in one per thread.
MALLOC_ARENAS = 2
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class DecodePlan:
    """What ``process_image`` will do with an opened image (its header read, ``draft`` applied)."""

    #: Size the pixels are decoded at (after ``draft``) and the image's full size in the file.
    decoded: tuple[int, int]
    full: tuple[int, int]
    mode: str
    #: Pillow's format name.
    format: str
    compressed_bytes: int
    #: Only validated and stored as downloaded (``keep_original_jpeg``): decoded, never converted.
    keep: bool
    rotates: bool
    #: Has transparency to composite (an alpha band or a palette's transparent entry).
    transparent: bool
    #: The stored size when the image is resized (None: stored at the decoded size).
    target: tuple[int, int] | None
    reducing_gap: float
    #: Components' (horizontal, vertical) sampling factors of a progressive JPEG; empty otherwise.
    progressive_sampling: tuple[tuple[int, int], ...] = ()


def plan_of(
    img: Image.Image,
    fmt: str,
    compressed_bytes: int,
    *,
    full: tuple[int, int],
    keep: bool,
    rotates: bool,
    target: tuple[int, int] | None,
    reducing_gap: float,
) -> DecodePlan:
    """The ``DecodePlan`` of an opened image (``draft`` already applied: its size and mode are the
    decode's); ``full`` is the size in the file, the rest is what ``process_image`` will do."""
    progressive = fmt == "JPEG" and ("progressive" in img.info or "progression" in img.info)
    sampling = tuple((h, v) for _id, h, v, _q in getattr(img, "layer", ())) if progressive else ()
    return DecodePlan(
        decoded=img.size,
        full=full,
        mode=img.mode,
        format=fmt,
        compressed_bytes=compressed_bytes,
        transparent=img.mode in _ALPHA_MODES or "transparency" in img.info,
        keep=keep,
        rotates=rotates,
        target=target,
        reducing_gap=reducing_gap,
        progressive_sampling=sampling,
    )


def decode_cost(plan: DecodePlan) -> int:
    """Peak bytes ``process_image`` holds for this image at once: the decoded buffer, the library's own
    buffers, then the largest of rotation, RGB conversion and resize copies alive together, and the
    encoded output. An upper estimate: the steps' buffers are summed as if all were alive at once."""
    w, h = plan.decoded
    pixels = w * h
    per_pixel = WEBP_BYTES if plan.format == "WEBP" else PIXEL_BYTES.get(plan.mode, RGB_BYTES)
    cost = pixels * per_pixel + plan.compressed_bytes * COMPRESSED_COPIES
    cost += _coefficient_bytes(plan.full, plan.progressive_sampling)
    if plan.keep:
        return cost
    if plan.rotates:
        cost += pixels * per_pixel
    if plan.transparent:
        cost += pixels * ALPHA_EXTRA
    elif plan.mode in _SIXTEEN_BIT_MODES:  # scaled in the same mode, then L, then RGB
        cost += pixels * (per_pixel + 1 + RGB_BYTES)
    elif plan.mode != "RGB":
        cost += pixels * RGB_BYTES
    stored = pixels
    if plan.target is not None and plan.target != plan.decoded:
        cost += _resize_bytes(plan.decoded, plan.target, plan.reducing_gap)
        stored = plan.target[0] * plan.target[1]
    return cost + stored * ENCODE_BYTES


def _coefficient_bytes(full: tuple[int, int], sampling: tuple[tuple[int, int], ...]) -> int:
    if not sampling:
        return 0
    hmax = max(hs for hs, _ in sampling)
    vmax = max(vs for _, vs in sampling)
    share = sum(hs * vs for hs, vs in sampling) / (hmax * vmax)  # 4:2:0 -> 1.5 coefficients a pixel
    return math.ceil(full[0] * full[1] * share * COEFFICIENT_BYTES)


def _resize_bytes(size: tuple[int, int], target: tuple[int, int], gap: float) -> int:
    """Pillow's resize with ``reducing_gap``: a ``reduce`` copy when it shrinks by gap x 2 or more,
    the first pass's intermediate image and the output, all RGB."""
    (w, h), (tw, th) = size, target
    fx, fy = max(1, int(w / tw / gap)), max(1, int(h / th / gap))
    rw, rh = -(-w // fx), -(-h // fy)
    reduced = rw * rh if fx > 1 or fy > 1 else 0
    return RGB_BYTES * (reduced + max(tw * rh, rw * th) + tw * th)


class DecodeBudget:
    """At most ``total`` bytes of estimated decoding memory reserved at once, served in arrival order.

    A cost above ``total`` is clipped to it: that image waits until nothing else holds the budget and
    then runs alone (counted in ``alone``). Thread-safe; one per process. Making one sets the process's
    malloc so that freed pixels leave the resident set (``return_freed_memory``).
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a decode budget must be >= 1 byte, got {total}")
        return_freed_memory()
        self.total = total
        self._cond = threading.Condition()
        self._held = 0
        self._queue: deque[int] = deque()  # tickets of the waiting reservations, first come first
        self._tickets = 0
        self._peak = 0
        self._alone = 0
        self._waited = 0
        self._reservations = 0

    @contextmanager
    def reserve(self, cost: int) -> Iterator[int]:
        """Holds ``min(cost, total)`` bytes of the budget for the ``with`` block; yields what it holds."""
        take = min(max(0, cost), self.total)
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            self._queue.append(ticket)
            fits = lambda: self._queue[0] == ticket and self._held + take <= self.total  # noqa: E731
            if not fits():
                self._waited += 1
                try:
                    self._cond.wait_for(fits)
                except BaseException:  # leave the queue, so that the ones behind are not stuck behind us
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                    raise
            self._queue.popleft()
            self._held += take
            self._peak = max(self._peak, self._held)
            self._reservations += 1
            self._alone += cost > self.total
            self._cond.notify_all()  # the next in line may fit beside us
        try:
            yield take
        finally:
            with self._cond:
                self._held -= take
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """``total``, ``held`` now, ``peak`` held, ``reservations`` made, ``waiting`` now, ``waited`` (had
        to wait) and ``alone`` (above the whole budget: ran with nothing else in flight)."""
        with self._cond:
            return {
                "total": self.total,
                "held": self._held,
                "peak": self._peak,
                "reservations": self._reservations,
                "waiting": len(self._queue),
                "waited": self._waited,
                "alone": self._alone,
            }


_malloc_set = False


def return_freed_memory() -> bool:
    """Sets glibc's malloc of this process to ``MMAP_THRESHOLD_BYTES`` and ``MALLOC_ARENAS`` (once; best
    made before the worker threads start). Returns whether it could: not on another C library."""
    global _malloc_set
    if not _malloc_set:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        except (OSError, AttributeError):
            return False
        _malloc_set = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
        )
    return _malloc_set


def budget_bytes(mib: int | None, processes: int) -> int:
    """The decode budget of one build process: ``mib`` MiB when configured, else the default
    (``MEMORY_SHARE`` of ``machine_memory_bytes()`` over ``processes``, at least ``MIN_DEFAULT_BYTES``)."""
    if mib is not None:
        return mib * MIB
    return max(MIN_DEFAULT_BYTES, int(machine_memory_bytes() * MEMORY_SHARE / max(1, processes)))


def machine_memory_bytes() -> int:
    """Physical memory, or this process's cgroup memory limit where that is lower (a container)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = FALLBACK_MEMORY_BYTES
    limits = [limit for limit in map(_read_limit, _cgroup_limit_files()) if limit is not None]
    return min([total, *limits]) if total > 0 else FALLBACK_MEMORY_BYTES


def _cgroup_limit_files() -> list[Path]:
    """cgroup v2's ``memory.max`` and v1's ``memory.limit_in_bytes`` of this process's group, and at
    the hierarchy's root (where a container sees its own group)."""
    root = Path("/sys/fs/cgroup")
    files = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        lines = Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return files
    for line in lines:
        _id, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and path.startswith("/"):  # v2's unified hierarchy
            files.append(root / path.lstrip("/") / "memory.max")
        elif "memory" in controllers.split(",") and path.startswith("/"):
            files.append(root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    return files


def _read_limit(path: Path) -> int | None:
    """A positive byte count from a cgroup limit file; None for ``max``, absent or unreadable."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
