"""The epoch plan: which samples each rank reads in an epoch, in which order, and how many batches.

Owns, for both loaders (so that they agree sample for sample):

* **The epoch list** ``E`` of one split and epoch: every read of the epoch, before the rank cut, as
  sample ids at *positions* ``0 .. L-1`` (a sample drawn twice holds two positions).

  - Validation and test, and training with ``sampling.policy: uniform`` (no streams, no
    ``epoch_samples``, no ``interleave``): the shards in the epoch's order (shuffled by ``(seed,
    epoch)`` for training), each shard's samples in tar order. Unchanged from before sampling existed.
  - Training otherwise: sampling.py's list (``epoch_samples``), already in random order.

* **Segments**: positions still to read. An epoch starts with all of them; a run resumed on another
  number of ranks (or batch size) starts a segment with the positions its predecessors had not
  consumed (``consumed``, ``merge``). Later epochs are whole again.
* **The rank cut**: rank ``r`` of ``w`` gets the segment's positions ``[m r // w, m (r + 1) // w)``
  (index.py's ``rank_bounds``, DALI's cut), less the samples found bad before the epoch.
* **The reading order** of a sampled (or interleaved) list: the rank's positions in windows of
  ``shuffle_buffer`` reads (widened when the plan touches many shards: ``reading_window``), each
  window sorted by sample id (so by shard, then tar offset). A window is a random subset of the
  epoch; DALI reads it as one index file per shard it touches and its shuffle buffer mixes it again,
  so a batch is close to an i.i.d. draw from the epoch list whatever the order of samples in the tars
  (measured: benchmarks/mixing.py). A shard-ordered list is read as it is, one run per shard.
* **Batches per rank**: ``drop``: ``(m // w) // batch``; ``pad``: ``ceil(ceil(m / w) / batch)``;
  validation: this rank's slice in batches, the last partial (``m`` is the segment's size).
* **What a rank's state says it consumed** (``consumed``) and the segment that N ranks' states leave
  for M ranks (``merge``).

Leaves out: the draws (sampling.py), reading and augmenting (dali.py, reference.py), the loop and its
state bookkeeping (base.py).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

from flora.loaders.config import DataConfig
from flora.loaders.index import LoaderError, SampleIndex, buffer_shuffle, rank_bounds
from flora.loaders.sampling import epoch_samples, stream_ids, summary

#: A sampled plan's window grows until its runs (reads of one shard in a row) average this many reads...
MIN_RUN = 8
#: ... but to at most this many shuffle buffers: a wider window mixes a species-sorted shard set worse.
MAX_WINDOW = 2
#: Seed salt of the reference loader's shuffle buffer (base.py's ``epoch_seed``; DALI uses 0, recovery 16+).
BUFFER_SALT = 1


def epoch_seed(seed: int, epoch: int, rank: int, salt: int = 0) -> int:
    """A 31-bit seed per (seed, epoch, rank): distinct streams, reproducible runs."""
    return int(np.random.SeedSequence([seed, epoch, rank, salt]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class RankPlan:
    """One rank's reads of one epoch (or segment), in reading order (before the shuffle buffer)."""

    epoch: int
    positions: np.ndarray  # int64 positions in the epoch list
    ids: np.ndarray  # int64 sample ids at those positions
    size: int  # the rank's cut before samples found bad were left out


class Planner:
    """The epoch lists of one split (see the module docstring); the last list built is kept."""

    def __init__(self, index: SampleIndex, cfg: DataConfig, train: bool):
        self.index, self.cfg, self.train = index, cfg, train
        self.sampling = cfg.sampling
        n = len(index)
        #: True when the epoch list comes from sampling.py (a random list), False: shard by shard.
        self.sampled = train and not self.sampling.unsampled(n)
        self.streams_of = None
        if self.sampled and self.sampling.streams:
            regions = np.repeat([s.region for s in index.shards], np.diff(index.bounds))
            self.streams_of = stream_ids(self.sampling.streams, regions, index.license_class)
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_list(self, epoch: int) -> np.ndarray:
        """The sample ids of every read of ``epoch`` in list order (int64; shared, do not modify)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.sampled:
            try:
                ids = epoch_samples(self.index.labels, self.streams_of, self.sampling, self.cfg.seed, epoch)
            except ValueError as exc:  # ConfigError: a stream that selects nothing, a threshold too low
                raise LoaderError(f"split {self.index.split!r}: {exc}") from None
        else:
            ids = self.index.epoch_samples(self.index.shard_order(epoch, self.cfg.seed, shuffle=self.train))
        ids.setflags(write=False)
        self._cached = (epoch, ids)
        return ids

    def length(self, epoch: int) -> int:
        return len(self.epoch_list(epoch))

    def segment_size(self, epoch: int, base: np.ndarray | None) -> int:
        """Positions left to read: all of the epoch, or those ``base`` does not mark consumed."""
        return self.length(epoch) if base is None else int((~base).sum())

    def rank_plan(
        self, epoch: int, rank: int, world_size: int, base: np.ndarray | None = None, gone=()
    ) -> RankPlan:
        """Rank ``rank`` of ``world_size``'s reads of ``epoch`` (of the segment ``base`` leaves), less
        the sample ids in ``gone`` (found bad before the epoch), in reading order."""
        ids_all = self.epoch_list(epoch)
        left = np.arange(len(ids_all), dtype=np.int64) if base is None else np.flatnonzero(~base)
        lo, hi = rank_bounds(len(left), rank, world_size)
        positions = left[lo:hi]
        size = len(positions)
        if len(gone):
            positions = positions[~np.isin(ids_all[positions], np.asarray(list(gone), dtype=np.int64))]
        if self.sampled:
            ids = ids_all[positions]
            positions = window_order(positions, ids, reading_window(self.index, ids, self.cfg.shuffle_buffer))
        return RankPlan(epoch, positions, ids_all[positions], size)

    def batches(self, epoch: int, world_size: int, batch: int, policy: str, rank_size: int, base=None) -> int:
        """Batches every rank yields (``drop``, ``pad``) or this rank yields (``partial``)."""
        m = self.segment_size(epoch, base)
        if policy == "drop":
            return (m // world_size) // batch
        if policy == "pad":
            return math.ceil(math.ceil(m / world_size) / batch)
        return math.ceil(rank_size / batch)

    def reference_order(self, plan: RankPlan, rank: int) -> np.ndarray:
        """Indices into ``plan`` in the order the reference loader reads them (its shuffle buffer for
        training, seeded per epoch and rank; the plan's own order otherwise)."""
        n = len(plan.ids)
        if not self.train:
            return np.arange(n, dtype=np.int64)
        return buffer_shuffle(np.arange(n, dtype=np.int64), self.cfg.shuffle_buffer,
                              epoch_seed(self.cfg.seed, plan.epoch, rank, BUFFER_SALT))  # fmt: skip

    def summary(self, epoch: int) -> dict:
        """What the epoch's list realises (sampling.py's ``summary``), with the policy."""
        ids = self.epoch_list(epoch)
        names = [s.name for s in self.sampling.streams] if self.streams_of is not None else None
        out = {"epoch": epoch, "policy": self.sampling.policy if self.train else "uniform"}
        out.update(summary(ids, self.index.labels, self.streams_of, names))
        return out


def reading_window(index: SampleIndex, ids: np.ndarray, buffer: int) -> int:
    """The window of a sampled plan: ``shuffle_buffer`` reads, widened (to at most ``MAX_WINDOW``
    buffers) until a window's runs average ``MIN_RUN`` reads of a shard (``MIN_RUN`` x the shards the
    plan touches). DALI reads each run through an index file of its own, at a cost of ~0.1 ms a file
    (CPU, 3,000 photos: 1,490 img/s with one read per run, 1,650-1,740 with 8 or more); a plan that
    touches 900 shards would have runs of ~4.5 reads in a window of 4,096. A wider window mixes a
    species-sorted shard set less: at the seed's scale (benchmarks/mixing.py, its computed part: 900
    shards, 8 ranks, buffer 4,096, batch 128) this window is 7,200 reads, 7.8 reads a run, and batches
    of an interleaved uniform epoch on shards sorted by species hold 0.986 of the i.i.d. number of
    distinct species (class_balanced 1.000; on Flora's own shards 1.000 for both)."""
    touched = int(np.count_nonzero(np.bincount(index.shards_of(ids), minlength=len(index.shards))))
    return int(min(max(buffer, MIN_RUN * touched), MAX_WINDOW * buffer))


def window_order(positions: np.ndarray, ids: np.ndarray, window: int) -> np.ndarray:
    """``positions`` in windows of ``window`` (in their order), each window sorted by sample id: by
    shard, then by offset in the tar (sample ids run in tar order within a shard)."""
    if not len(positions):
        return positions
    block = np.arange(len(positions), dtype=np.int64) // max(window, 1)
    return positions[np.lexsort((positions, ids, block))]


# ------------------------------------------------------------------------------ states across ranks
def pack(flags: np.ndarray) -> str:
    """A bool array as base64 bits (a loader state's bitmaps)."""
    return base64.b64encode(np.packbits(flags).tobytes()).decode("ascii")


def unpack(text: str | None, n: int) -> np.ndarray:
    if not text:
        return np.zeros(n, dtype=bool)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n)
    return bits.astype(bool)
