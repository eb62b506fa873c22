"""Stored augmented views: each sample's views' augmentation parameters, replayed exactly by both loaders.

Cached distillation with stored views (training/soft_labels.py, ``distill.cache.views: N``) keeps the
teachers' opinion of N augmented views of every training sample, so a student that trains from the
cache must see *those* views, not fresh random ones. This module owns what both loaders need for it:

* ``draw``: the parameters of ``N`` views per sample, drawn from ``data.augment``'s ranges (the same
  distributions as a fresh training view) by a counter-based hash of ``(seed, sample key, view,
  field)``: a sample keeps its views whatever else the split holds (an incremental build's new shards
  leave the old samples' views alone), and no RNG state is involved. One row per view, ``FIELDS``:

  ========== =========================================================================
  area       the crop's area as a fraction of the image (``augment.scale``)
  log_ratio  log of the crop's width / height (``augment.ratio``, log-uniform)
  x, y       where the crop sits in the room left for it: 0 = left/top, 1 = right/bottom
  flip       1: mirrored horizontally (``augment.hflip``), else 0
  angle      rotation in degrees (``augment.rotate_degrees``)
  brightness, contrast, saturation   factors (``augment.*``)
  hue        a shift in turns (``augment.hue``)
  ========== =========================================================================

* ``crop_box``: the crop in pixels for an image of ``height`` x ``width``, the one rule both loaders
  use (DALI gets the box in absolute pixels, so neither rounds a relative box on its own). A box wider
  or taller than the image is clipped to it (RandomResizedCrop would draw again; a stored view cannot).
* ``Replay``: what a loader replays: the parameters by the loader's sample id and the rule that says
  which view a read uses: ``view = (offset(key) + epoch) mod N`` for training (each sample goes through
  its N views in N epochs, starting at a view of its own; a sample drawn twice in an epoch by a
  sampling policy reads one view twice), or one fixed view (the teachers' pass over view ``v``).
  A batch then carries ``view`` next to ``index``, so the soft labels of exactly that view are looked up.

Replayed, a view is: crop at the box, resize to ``image_size`` x ``image_size`` (bilinear), rotate by
``angle`` about the centre (zero fill), colour (brightness, contrast, saturation, hue, in this order),
flip, normalise. DALI runs it with the parameters handed in by a ``python_function`` (dali.py); the
reference loader with torchvision's functional ops (reference.py). Within one backend a view is
replayed pixel for pixel; across backends the decoders and colour operators differ as they do for
fresh views.

Leaves out: the soft labels themselves (training/soft_labels.py), the pipelines (dali.py, reference.py).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from flora.loaders.config import AugmentConfig

FIELDS = ("area", "log_ratio", "x", "y", "flip", "angle", "brightness", "contrast", "saturation", "hue")
AREA, LOG_RATIO, X, Y, FLIP, ANGLE, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(len(FIELDS))
#: Most views a cache may keep per sample (each view is a teachers' pass over the split).
MAX_VIEWS = 64

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def key_hashes(keys: list[str], seed: int) -> np.ndarray:
    """A 64-bit hash of each sample key (blake2b, salted by ``seed``)."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, salt=salt).digest(), "little")
            for k in keys
        ),
        dtype=np.uint64,
        count=len(keys),
    )


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit words."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(hashes: np.ndarray, views: int) -> np.ndarray:
    """U[0, 1) numbers per (sample, view, field): [n, views, len(FIELDS)] float64."""
    counter = np.arange(views * len(FIELDS), dtype=np.uint64).reshape(1, views, len(FIELDS))
    with np.errstate(over="ignore"):
        words = _mix(hashes.reshape(-1, 1, 1) + (counter + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    return (words >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def draw(keys: list[str], views: int, aug: AugmentConfig, seed: int) -> np.ndarray:
    """The parameters of ``views`` views of each sample: [len(keys), views, len(FIELDS)] float32."""
    u = _uniform(key_hashes(keys, seed), views)
    out = np.empty_like(u)

    def between(lo: float, hi: float, field: int) -> np.ndarray:
        return lo + (hi - lo) * u[..., field]

    out[..., AREA] = between(aug.scale[0], aug.scale[1], AREA)
    out[..., LOG_RATIO] = between(math.log(aug.ratio[0]), math.log(aug.ratio[1]), LOG_RATIO)
    out[..., X] = u[..., X]
    out[..., Y] = u[..., Y]
    out[..., FLIP] = (u[..., FLIP] < aug.hflip).astype(np.float64)
    out[..., ANGLE] = between(-aug.rotate_degrees, aug.rotate_degrees, ANGLE)
    for field, name in ((BRIGHTNESS, "brightness"), (CONTRAST, "contrast"), (SATURATION, "saturation")):
        b = getattr(aug, name)
        out[..., field] = between(max(0.0, 1.0 - b), 1.0 + b, field)
    out[..., HUE] = between(-aug.hue, aug.hue, HUE)
    return out.astype(np.float32)


def crop_box(params: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, w, h)`` in pixels of a view's crop of an image of ``height`` x ``width``."""
    area = float(params[AREA]) * height * width
    ratio = math.exp(float(params[LOG_RATIO]))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    x0 = min(width - w, max(0, round(float(params[X]) * (width - w))))
    y0 = min(height - h, max(0, round(float(params[Y]) * (height - h))))
    return x0, y0, w, h


class Replay:
    """The stored views a loader replays: ``params`` [samples of the loader's index, views, fields]
    by the loader's sample id; ``offsets``: each sample's first view (a hash of its key); ``fixed``:
    the one view every read uses (a teachers' pass), else the training rule."""

    def __init__(self, params: np.ndarray, offsets: np.ndarray, fixed: int | None = None):
        if params.ndim != 3 or params.shape[2] != len(FIELDS):
            raise ValueError(
                f"stored views: expected [samples, views, {len(FIELDS)}] parameters, got {params.shape}"
            )
        if len(offsets) != len(params):
            raise ValueError(f"stored views: {len(offsets)} offsets for {len(params)} samples")
        self.params = np.ascontiguousarray(params, dtype=np.float32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.views = params.shape[1]
        if fixed is not None and not 0 <= fixed < self.views:
            raise ValueError(f"stored views: view {fixed} of {self.views}")
        self.fixed = fixed

    @classmethod
    def for_keys(cls, params: np.ndarray, keys: list[str], seed: int, fixed: int | None = None) -> Replay:
        views = params.shape[1]
        return cls(params, (key_hashes(keys, seed) % np.uint64(views)).astype(np.int64), fixed)

    def with_view(self, fixed: int) -> Replay:
        return Replay(self.params, self.offsets, fixed)

    def view_of(self, epoch: int, ids: np.ndarray) -> np.ndarray:
        """The view each read of ``ids`` uses in ``epoch`` (int64)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.fixed is not None:
            return np.full(len(ids), self.fixed, dtype=np.int64)
        return (self.offsets[ids] + epoch) % self.views

    def params_of(self, epoch: int, ids: np.ndarray) -> np.ndarray:
        """Each read's parameters in ``epoch``: [len(ids), len(FIELDS)] float32."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.params[ids, self.view_of(epoch, ids)]
