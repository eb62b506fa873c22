"""Near-duplicate images: perceptual hashes of each stored JPEG, and which samples copy an earlier one.

Owns three things:

* ``perceptual_hash``: a 64-bit DCT hash (pHash, the definition of the ``imagehash`` package) of the
  *stored* JPEG's bytes: luma decoded at a reduced scale (libjpeg's DCT scaling, Pillow's ``draft``), a
  32x32 Lanczos downscale (Pillow 13's arithmetic, bit for bit, as exact matrix products: resample.py), the
  8x8 lowest frequencies of its 2-D DCT, one bit per coefficient (above their median). The resample and the
  DCT are exact integer products and the median an integer comparison, so the hash is the same on every
  machine and does not move with Pillow's resize (13.0 changed its pass order); and since it is a function
  of the stored bytes, a cold build, a warm rebuild from a cache entry written before the hash existed, and
  a reader checking a shard all get the same 16 hex digits. ``perceptual_hashes`` adds, from the same
  decode, the pHashes of 9 crop windows (95% of each side at offsets 0, 2.5% and 5%, resampled sub-pixel): a
  copy cropped by 5% is then within ~1% of the size and position of one of them, where its whole-image pHash
  moves 8-20 bits.
* ``near_pairs``: every pair of hashes within Hamming distance ``k``, without comparing all pairs
  (multi-index hashing, Norouzi et al. 2012): the 64 bits are cut into ``m`` bands with radii ``r_i``,
  ``sum(r_i + 1) > k``, so two hashes within ``k`` differ in at most ``r_i`` bits of some band i
  (pigeonhole). Per band, each hash's band value XOR each mask of at most ``r_i`` bits is looked up in
  a table of the sorted band values; candidates are verified by popcount. ``plan_bands`` picks ``m``
  and the radii from a cost model (mask lookups + expected candidates for ``n`` hashes), so 900k
  hashes take minutes and O(n) memory. ``brute_pairs`` is the quadratic reference. ``cross_pairs``:
  every pair of a query set and an index within ``k`` (the whole-image hashes against all crop
  hashes), the same bands over the index, so crops are never compared with each other.
* ``judge``: the decision. Two samples are within ``k`` when their whole-image hashes are, or one's
  whole-image hash and one of the other's crop hashes (either way round). Samples are taken in the
  order given (the build's job order: train, then val, then test, then retry rounds); a sample
  within ``threshold`` of an earlier *kept* sample is a near-duplicate when that one is in another
  split, or in the same split when ``within_split`` is ``drop``. So the earliest split keeps its
  copy, and a decision never depends on later samples (a retry round cannot change what was already
  published). ``NearDupConfig`` is the config section.

Leaves out: exact duplicates (finalize.py's content index runs first; identical bytes never reach
``judge``), writing the log (finalize.py), decoding for the shard (images.py).
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from flora.config import ConfigError
from flora.sharding.images.resample import Plan, resample
from flora.sharding.images.resample import plan as resample_plan

try:  # a dependency (setup.cfg); the hashes are the same without it (Pillow's decode), only slower
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

HASH_BITS = 64
#: imagehash's pHash: a 32x32 downscale (hash_size 8 x highfreq_factor 4), its 8x8 lowest frequencies.
HASH_SIDE = 32
LOW_FREQ = 8
#: The DCT basis scaled to integers (12 bits): coefficients stay exact in int64 (< 2^43).
_DCT_SCALE = 1 << 12
#: Default threshold, measured by ``benchmarks/neardup.py`` (docs/near-duplicates.md): with crop
#: hashes, the smallest distance at which resized, re-encoded and 5%-cropped copies are all found
#: (world and photos), distinct images of the sample world matching at 0.001% of pairs.
DEFAULT_THRESHOLD = 8
#: Crop windows hashed besides the whole image: 95% of each side (what a 5% crop keeps), at offsets
#: 0, 2.5% and 5% of each side, so a 5% crop is within 1.25% of the width and height of one of them.
CROP_KEEP = 0.95
CROP_OFFSETS = (0.0, 0.025, 0.05)
N_CROPS = len(CROP_OFFSETS) ** 2
#: Hamming distances above this find a large share of unrelated photos (pHash of distinct photos:
#: mean 32, standard deviation ~4-8): refused as a config value.
MAX_THRESHOLD = 24
#: Band widths up to this use a direct-address table (2^22 + 1 int64 = 32 MiB); wider bands search.
TABLE_BITS = 22
#: Candidate pairs verified per block: bounds the temporary memory of one lookup pass (~200 MB).
CANDIDATE_BLOCK = 4_000_000
#: JPEG colour spaces whose luma simplejpeg decodes as Pillow's draft("L") does (Y samples as they are).
_SIMPLE_COLORSPACES = frozenset({"YCbCr", "Gray"})
#: Below this side two DCT scales can give the same decoded size: Pillow decodes those.
_SIMPLE_MIN_SIDE = 16
#: Resampling plans kept, one per luma size (~200 KB each for 43x32; a build resizes to a few sizes).
PLAN_CACHE = 64


def _dct_matrix() -> np.ndarray:
    x = np.arange(HASH_SIDE)
    u = np.arange(LOW_FREQ)[:, None]
    basis = np.cos(np.pi * (2 * x + 1) * u / (2 * HASH_SIDE))
    basis[0] *= math.sqrt(1 / HASH_SIDE)
    basis[1:] *= math.sqrt(2 / HASH_SIDE)
    return np.round(basis * _DCT_SCALE).astype(np.int64)


_DCT = _dct_matrix()  # LOW_FREQ x HASH_SIDE
_DCT_F = _DCT.astype(np.float64)  # the same integers; float64 products of them stay exact (< 2^53)


@dataclass
class NearDupConfig:
    """The build config's ``near_duplicates`` section."""

    #: Drop near-duplicates at finalize (the hash is computed and stored in every sample either way).
    enabled: bool = True
    #: Largest Hamming distance between two pHashes that counts as the same photograph.
    threshold: int = DEFAULT_THRESHOLD
    #: Near-duplicates within one split: ``keep`` both, or ``drop`` the later one.
    within_split: Literal["keep", "drop"] = "keep"

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= MAX_THRESHOLD:
            raise ConfigError(
                f"near_duplicates.threshold must be in 0..{MAX_THRESHOLD} bits, got {self.threshold}"
            )
        if self.within_split not in ("keep", "drop"):
            raise ConfigError(f"near_duplicates.within_split must be keep or drop, got {self.within_split!r}")


# --------------------------------------------------------------------------------------------- hash
def _luma(jpeg: bytes) -> Image.Image:
    """The reference decode (any format): Pillow, luma only, at the smallest DCT scale >= 32 px."""
    img = Image.open(io.BytesIO(jpeg))
    img.draft("L", (HASH_SIDE, HASH_SIDE))  # JPEG: luma only, at the smallest DCT scale >= 32 px
    return img.convert("L")


def _luma_pixels(jpeg: bytes) -> np.ndarray:
    """``_luma``'s pixels (``h x w`` uint8). A colour or grey JPEG is decoded by ``simplejpeg``
    (libjpeg-turbo straight from C: ~0.17 ms for a 341x256 image, Pillow's open + draft + load ~0.4 ms)
    at the scale Pillow's ``draft`` picks: the same Y samples, byte for byte; anything else, a scale
    two sizes could share (a side under 16 px), or a file it refuses: Pillow."""
    if simplejpeg is not None:
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg)
            if colorspace in _SIMPLE_COLORSPACES and min(w, h) >= _SIMPLE_MIN_SIDE:
                s = _draft_scale(w, h)
                size = (-(-h // s), -(-w // s))
                out = simplejpeg.decode_jpeg(jpeg, colorspace="GRAY", min_height=size[0], min_width=size[1])
                if out.shape[:2] == size:
                    return out[:, :, 0]
        except ValueError:
            pass  # not a JPEG simplejpeg reads whole: Pillow decides
    return np.asarray(_luma(jpeg))


def _draft_scale(w: int, h: int) -> int:
    """The DCT scale divisor ``Image.draft("L", (32, 32))`` picks: the largest of 8, 4, 2, 1 that
    keeps both sides >= 32 in floor division."""
    fits = min(w // HASH_SIDE, h // HASH_SIDE)
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


def _phashes(luma: np.ndarray, boxes: tuple) -> list[str]:
    """The pHash of each box of ``luma`` (None: the whole image; a box is sub-pixel, resampled from
    the decoded pixels), in one batched integer DCT. The 32x32 Lanczos resamples are Pillow's, bit
    for bit (resample.py), done as two matrix products with coefficients cached per luma size."""
    pixels = resample(luma, _resample_plan(luma.shape[::-1], boxes))  # n x 32 x 32, exact
    coeffs = (_DCT_F @ pixels @ _DCT_F.T).reshape(len(boxes), -1)  # exact: integers < 2^43
    ranked = np.sort(coeffs, axis=1)
    half = coeffs.shape[1] // 2
    bits = 2 * coeffs > (ranked[:, half - 1] + ranked[:, half])[:, None]  # above the median, in integers
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


@functools.lru_cache(maxsize=PLAN_CACHE)
def _resample_plan(size: tuple[int, int], boxes: tuple) -> Plan:
    return resample_plan(size, (HASH_SIDE, HASH_SIDE), list(boxes))


def perceptual_hash(jpeg: bytes) -> str:
    """The 64-bit pHash of an encoded image, as 16 hex digits (see the module docstring)."""
    return _phashes(_luma_pixels(jpeg), (None,))[0]


@functools.lru_cache(maxsize=PLAN_CACHE)
def crop_boxes(w: int, h: int) -> tuple:
    """The windows ``perceptual_hashes`` hashes in a ``w x h`` luma: None (the whole image), then the
    ``CROP_KEEP`` windows at ``CROP_OFFSETS`` x ``CROP_OFFSETS`` (row by row), sub-pixel corners."""
    return (None, *((fx * w, fy * h, (fx + CROP_KEEP) * w, (fy + CROP_KEEP) * h)
                    for fy in CROP_OFFSETS for fx in CROP_OFFSETS))  # fmt: skip


def perceptual_hashes(jpeg: bytes) -> tuple[str, list[str]]:
    """``(perceptual_hash(jpeg), crop hashes)`` from one decode: the pHashes of the ``CROP_KEEP``
    windows at ``CROP_OFFSETS`` x ``CROP_OFFSETS`` (row by row), in the image's own proportions."""
    luma = _luma_pixels(jpeg)
    h, w = luma.shape
    whole, *crops = _phashes(luma, crop_boxes(w, h))
    return whole, crops


def hash_value(phash: str) -> int:
    return int(phash, 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# ------------------------------------------------------------------------------------ candidate search
@dataclass(frozen=True)
class Band:
    shift: int
    width: int
    radius: int


def _masks(width: int, radius: int) -> np.ndarray:
    out = [0]
    for r in range(1, radius + 1):
        out += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), r)]
    return np.asarray(out, dtype=np.uint64)


def _split_bands(m: int, k: int) -> list[Band]:
    widths = [HASH_BITS // m + (i < HASH_BITS % m) for i in range(m)]  # wider bands first
    slack = k + 1  # sum(radius + 1) must exceed k
    radii = [slack // m - 1 + (i < slack % m) for i in range(m)]  # larger radii on wider bands
    bands, shift = [], 0
    for width, radius in zip(widths, radii, strict=True):
        bands.append(Band(shift, width, radius))
        shift += width
    return bands


def _cost(bands: list[Band], n: int) -> float:
    """Lookup passes x (one lookup per hash + the expected candidates per hash)."""
    return sum(math.comb(b.width, r) * (1 + n / 2**b.width) for b in bands for r in range(b.radius + 1))


def plan_bands(n: int, k: int) -> list[Band]:
    """The bands (pigeonhole: ``sum(radius + 1) > k``) with the lowest cost for ``n`` hashes."""
    if not 0 <= k < HASH_BITS:
        raise ValueError(f"distance must be in 0..{HASH_BITS - 1}, got {k}")
    plans = [_split_bands(m, k) for m in range(1, min(k + 1, HASH_BITS) + 1)]
    return min(plans, key=lambda bands: _cost(bands, max(n, 1)))


def near_pairs(hashes: np.ndarray, k: int, bands: list[Band] | None = None) -> np.ndarray:
    """Every pair ``(i, j, distance)``, ``i < j``, of ``hashes`` (uint64) within Hamming ``k``, sorted.

    Per band the hashes are sorted by band value and looked up in sorted order (the XOR with a mask
    keeps most of that order, so the table is read almost sequentially); a pair of buckets ``v`` and
    ``v ^ mask`` is visited once, from the one whose bit under the mask's top bit is 0.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    bands = plan_bands(h.size, k) if bands is None else bands
    if sum(b.radius + 1 for b in bands) <= k or sum(b.width for b in bands) != HASH_BITS:
        raise ValueError(f"bands {bands} do not cover {HASH_BITS} bits with sum(radius + 1) > {k}")
    found = [np.empty((0, 3), dtype=np.int64)]
    for band in bands:
        vals = (h >> np.uint64(band.shift)) & np.uint64((1 << band.width) - 1)
        order = np.argsort(vals, kind="stable")
        ordered, in_order = vals[order], h[order]
        bucket = _buckets(ordered, band.width)
        everyone = np.arange(h.size)
        _, ends = bucket(ordered)
        close = [_verify(in_order, everyone, everyone + 1, ends, k)]  # pairs inside one bucket
        zero_bit = {}  # positions whose band value has bit t clear
        for mask in _masks(band.width, band.radius)[1:].tolist():
            top = mask.bit_length() - 1
            if top not in zero_bit:
                zero_bit[top] = np.flatnonzero((ordered >> np.uint64(top)) & np.uint64(1) == 0)
            queries = zero_bit[top]
            lo, hi = bucket(ordered[queries] ^ np.uint64(mask))
            close.append(_verify(in_order, queries, lo, hi, k))
        pairs = np.concatenate(close)
        a, b = order[pairs[:, 0]], order[pairs[:, 1]]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b), pairs[:, 2]], axis=1))
    pairs = np.concatenate(found)
    if pairs.size:
        pairs = np.unique(pairs, axis=0)  # a pair close in several bands is found once per band
    return pairs


def cross_pairs(
    queries: np.ndarray,
    index: np.ndarray,
    k: int,
    skip: np.ndarray | None = None,
    bands: list[Band] | None = None,
) -> np.ndarray:
    """Every ``(q, i, distance)`` with ``queries[q]`` and ``index[i]`` (uint64) within Hamming ``k``,
    sorted; not a self-join: pairs inside ``index`` or inside ``queries`` cost nothing.

    The index is banded and bucketed as in ``near_pairs``; each query (in band-value order) probes every
    mask. ``skip[i]``: a query that ``index[i]`` is never paired with (its own image), dropped as found.
    """
    q = np.ascontiguousarray(queries, dtype=np.uint64)
    x = np.ascontiguousarray(index, dtype=np.uint64)
    bands = plan_bands(x.size, k) if bands is None else bands
    if sum(b.radius + 1 for b in bands) <= k or sum(b.width for b in bands) != HASH_BITS:
        raise ValueError(f"bands {bands} do not cover {HASH_BITS} bits with sum(radius + 1) > {k}")
    found = [np.empty((0, 3), dtype=np.int64)]
    if not q.size or not x.size:
        return found[0]
    for band in bands:
        low = np.uint64((1 << band.width) - 1)
        vals = (x >> np.uint64(band.shift)) & low
        order = np.argsort(vals, kind="stable")
        bucket, x_in_order = _buckets(vals[order], band.width), x[order]
        qvals = (q >> np.uint64(band.shift)) & low
        qorder = np.argsort(qvals, kind="stable")
        qsorted, q_in_order = qvals[qorder], q[qorder]
        everyone = np.arange(q.size)
        for mask in _masks(band.width, band.radius).tolist():
            lo, hi = bucket(qsorted ^ np.uint64(mask))
            pairs = _verify(q_in_order, everyone, lo, hi, k, x_in_order)
            a, b = qorder[pairs[:, 0]], order[pairs[:, 1]]
            keep = slice(None) if skip is None else skip[b] != a
            found.append(np.stack([a[keep], b[keep], pairs[keep, 2]], axis=1))
    pairs = np.concatenate(found)
    if pairs.size:
        pairs = np.unique(pairs, axis=0)  # a pair close in several bands is found once per band
    return pairs


def _buckets(ordered: np.ndarray, width: int):
    """``values -> (lo, hi)``: where each band value's bucket lies in ``ordered`` (sorted band values)."""
    if width <= TABLE_BITS:  # bucket v is ordered[starts[v]:starts[v + 1]]
        starts = np.searchsorted(ordered, np.arange((1 << width) + 1, dtype=np.uint64))

        def bucket(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            at = values.astype(np.int64)  # an int64 index gathers ~5x faster than a uint64 one
            return starts[at], starts[at + 1]

        return bucket
    return lambda values: (
        np.searchsorted(ordered, values, "left"),
        np.searchsorted(ordered, values, "right"),
    )


def _verify(
    h: np.ndarray,
    queries: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    k: int,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """``(q, c, distance)`` for each query position ``q`` and candidate ``c`` in ``lo[q]..hi[q]-1``
    whose hashes (``h[q]``, ``candidates[c]``; both in ``h`` by default) are within ``k``; in blocks of
    ``CANDIDATE_BLOCK`` candidates."""
    candidates = h if candidates is None else candidates
    counts = (hi - lo).astype(np.int64)
    some = np.flatnonzero(counts > 0)
    out = [np.empty((0, 3), dtype=np.int64)]
    if not some.size:
        return out[0]
    ends = np.cumsum(counts[some])
    cuts = np.searchsorted(ends, np.arange(CANDIDATE_BLOCK, int(ends[-1]), CANDIDATE_BLOCK))
    for block in np.split(some, cuts):
        c = counts[block]
        total = int(c.sum())
        qi = np.repeat(queries[block], c)
        cj = np.repeat(lo[block] - (np.cumsum(c) - c), c) + np.arange(total)
        dist = np.bitwise_count(h[qi] ^ candidates[cj]).astype(np.int64)
        near = dist <= k
        out.append(np.stack([qi[near], cj[near], dist[near]], axis=1))
    return np.concatenate(out)


def brute_pairs(hashes: np.ndarray, k: int) -> np.ndarray:
    """The quadratic reference of ``near_pairs`` (same output)."""
    h = np.asarray(hashes, dtype=np.uint64)
    rows = []
    for i in range(h.size):
        dist = np.bitwise_count(h[i + 1 :] ^ h[i]).astype(np.int64)
        j = np.flatnonzero(dist <= k) + i + 1
        rows.append(np.stack([np.full(j.size, i), j, dist[j - i - 1]], axis=1))
    return np.concatenate(rows) if rows else np.empty((0, 3), dtype=np.int64)


# ---------------------------------------------------------------------------------------- the decision
def judge(
    hashes: np.ndarray,
    splits: np.ndarray,
    k: int,
    within_split: str,
    crops: np.ndarray | None = None,
    crop_owner: np.ndarray | None = None,
) -> dict[int, tuple[int, int]]:
    """Near-duplicates among samples in order: ``{sample: (kept sample it duplicates, distance)}``.

    Two samples are within ``k`` when their whole-image hashes are, or one's whole-image hash and one
    of the other's crop hashes (``crops[i]`` is a crop hash of sample ``crop_owner[i]``; a sample
    may have none); the distance is the smallest of these. A sample is dropped when an earlier kept
    sample is within ``k`` and in another split (or in the same one, ``within_split == "drop"``); it
    cites the closest such sample (ties: the earliest). Samples with equal hashes are grouped first,
    so a cluster of identical hashes costs no pairs; crop hashes are searched by the distinct whole
    hashes (``cross_pairs``), never against each other.
    """
    unique, group = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    group = group.ravel()
    pairs = near_pairs(unique, k)
    if crops is not None and len(crops):
        owner_group = group[np.asarray(crop_owner, dtype=np.int64)]
        across = cross_pairs(unique, np.asarray(crops, dtype=np.uint64), k, skip=owner_group)
        a, b = across[:, 0], owner_group[across[:, 1]]
        pairs = np.concatenate([pairs, np.stack([np.minimum(a, b), np.maximum(a, b), across[:, 2]], axis=1)])
        pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = (pairs[1:, :2] != pairs[:-1, :2]).any(axis=1)
        pairs = pairs[first]  # each pair of groups once, at its smallest distance
    neighbours: dict[int, list[tuple[int, int]]] = {}
    for a, b, d in pairs.tolist():
        neighbours.setdefault(a, []).append((b, d))
        neighbours.setdefault(b, []).append((a, d))
    sizes = np.bincount(group, minlength=unique.size)
    involved = np.flatnonzero((sizes[group] > 1) | np.isin(group, list(neighbours)))
    kept: dict[int, dict[int, int]] = {}  # group -> split -> its first kept sample
    dropped: dict[int, tuple[int, int]] = {}
    for s in involved.tolist():
        g, split = int(group[s]), int(splits[s])
        best = None
        for other, d in [(g, 0), *neighbours.get(g, [])]:
            for other_split, first in kept.get(other, {}).items():
                counts = other_split != split or within_split == "drop"
                if counts and (best is None or (d, first) < best[::-1]):
                    best = (first, d)
        if best is not None:
            dropped[s] = best
        else:
            kept.setdefault(g, {}).setdefault(split, s)
    return dropped
