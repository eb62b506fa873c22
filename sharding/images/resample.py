"""Pillow's Lanczos resampling of 8-bit images, bit for bit, as integer matrices (for the pHashes).

``neardup.perceptual_hashes`` resamples ten windows of one small luma image to 32x32. Pillow does
that in ten ``Image.resize`` calls, each recomputing its filter coefficients (``sin`` per tap) and
running two passes in C; here the coefficients of all ten windows are computed once per luma size
(cached) and the passes are two matrix products for all windows together.

The arithmetic is Pillow 13.0's (``src/libImaging/Resample.c``): per output pixel the filter taps
are computed in doubles (``precompute_coeffs``: the box corners as C floats, ``xmin``/``xmax``
truncated, taps normalized to sum 1), turned into fixed point with 22 fractional bits
(``normalize_coeffs_8bpc``: rounded half away from zero), accumulated as integers from ``2**21`` and
shifted right by 22 with a clip to 0..255 (``clip8``); two passes, each rounding to 8 bits, in
Pillow 13's order (``Plan.vertical_first``; Pillow 12 and older always ran the horizontal pass first,
which rounds differently where the height shrinks much more than the width, e.g. portrait photos:
hashes computed there could differ from these); a pass that changes
nothing (``need_horizontal`` / ``need_vertical``) is an identity here. The products are done in float64 on
integer values that stay below 2**53 (8-bit pixels x 22-bit taps, a few taps), so every partial sum
is exact and the result is the same integer whatever order a BLAS adds in: the same bits on every
machine, whichever Pillow is installed.
``tests/sharding/test_resample.py`` checks it against ``Image.resize`` on random sizes and boxes.

Leaves out: other filters and modes (only what the hashes use), reducing_gap.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2).
PRECISION_BITS = 22
_ONE = 1 << PRECISION_BITS
_HALF = float(1 << (PRECISION_BITS - 1))
_SCALE_DOWN = 1.0 / _ONE  # a power of two: multiplying by it is exact
#: Pillow's LANCZOS filter support (a = 3).
SUPPORT = 3.0

Box = tuple[float, float, float, float]
#: Axes kept (size, window, output): a few per stored size; each at most out x in float64 (~11 KB for
#: the hashes' 43 -> 32), read-only.
TAPS_CACHE = 256


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _f32(x: float) -> float:
    """A Python float rounded to a C float, as Pillow receives box corners (``"(ffff)"``)."""
    return float(np.float32(x))


@functools.lru_cache(maxsize=TAPS_CACHE)
def taps(in_size: int, in0: float, in1: float, out_size: int) -> np.ndarray:
    """The ``out_size x in_size`` fixed-point Lanczos matrix of one axis (``precompute_coeffs`` then
    ``normalize_coeffs_8bpc``), as float64 holding integers; ``in0``/``in1`` are C floats."""
    scale = float(np.float32(in1) - np.float32(in0)) / out_size  # (double)(in1 - in0) in C floats
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    inv_filterscale = 1.0 / filterscale
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [_lanczos((x + xmin - center + 0.5) * inv_filterscale) for x in range(xmax)]
        total = 0.0
        for w in ws:  # C's left-to-right sum
            total += w
        for x, w in enumerate(ws):
            k = w / total if total != 0.0 else w
            out[xx, xmin + x] = int(-0.5 + k * _ONE) if k < 0 else int(0.5 + k * _ONE)
    out.setflags(write=False)  # cached and shared: nobody may change it
    return out


def identity(size: int) -> np.ndarray:
    """A skipped pass: each pixel times 2**22, shifted back (the same bytes)."""
    return np.eye(size, dtype=np.float64) * _ONE


@dataclass(frozen=True)
class Plan:
    """The matrices of ``n`` windows of one image size, and the pass order."""

    #: Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    #: pixels as the width (``horizontal_first`` in ImagingResampleInner; Pillow <= 12: never).
    vertical_first: bool
    #: ``n x w x out_w``: each window's horizontal taps, transposed (``pixels @ horizontal[i]``).
    horizontal: np.ndarray
    #: ``n x out_h x h``: each window's vertical taps (``vertical[i] @ pixels``).
    vertical: np.ndarray


def plan(size: tuple[int, int], out: tuple[int, int], boxes: list[Box | None]) -> Plan:
    """The ``Plan`` of an image of ``size`` resized to ``out`` in each of ``boxes`` (None: the whole
    image, else sub-pixel corners)."""
    w, h = size
    ow, oh = out
    kxs, kys = [], []
    for box in boxes:
        x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if box is None else tuple(_f32(v) for v in box)
        need_h = ow != w or x0 != 0 or x1 != ow  # Pillow's need_horizontal, as written there
        need_v = oh != h or y0 != 0 or y1 != oh
        kxs.append((taps(w, x0, x1, ow) if need_h else identity(w)).T)
        kys.append(taps(h, y0, y1, oh) if need_v else identity(h))
    vertical_first = h - oh > 0 and h - oh > (w - ow) * 2
    horizontal, vertical = np.ascontiguousarray(np.stack(kxs)), np.stack(kys)
    horizontal.setflags(write=False)  # plans are cached (neardup) and shared by threads
    vertical.setflags(write=False)
    return Plan(vertical_first, horizontal, vertical)


def resample(pixels: np.ndarray, p: Plan) -> np.ndarray:
    """``pixels`` (``h x w``, 8-bit values) through a ``plan``: ``n x out_h x out_w`` float64 arrays of
    8-bit integer values, Pillow's results, in the order of the plan's boxes.

    Every product is one window's (stacked: numpy runs them one by one): a few ten thousand
    multiply-adds each, under the size at which OpenBLAS starts its own threads. One product for all
    windows together was big enough for that, and OpenBLAS's spinning threads on top of a build's 32
    download threads cost more CPU than the whole resample (measured: 7.8 vs 6.3 ms a build image)."""
    image = pixels.astype(np.float64)
    if p.vertical_first:
        return _clip8(_clip8(p.vertical @ image) @ p.horizontal)
    return _clip8(p.vertical @ _clip8(image @ p.horizontal))


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8((1 << 21) + sum)``: floor of the sum / 2**22 (exact: a power of two), 0..255."""
    return np.clip(np.floor((acc + _HALF) * _SCALE_DOWN), 0.0, 255.0)
