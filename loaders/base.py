"""What both loaders share: epochs, the remainder policy across ranks, and the resumable position.

Owns ``EpochLoader``, the iterable a training loop sees: ``set_epoch(e)`` then ``for batch in
loader``; ``len(loader)`` batches per epoch; ``state_dict()`` / ``load_state_dict()`` for a mid-epoch
checkpoint. A batch is a dict: ``image`` (float NCHW, normalised; channels_last memory on request),
``label`` (int64), ``index`` (int64 sample ids of the SampleIndex, for audits) and ``valid`` (bool:
False only on ``train_remainder: pad`` filler rows).

Remainder policy (the numbers every rank agrees on without talking to the others):

* validation / test: each rank yields exactly its own slice, the last batch partial; nothing is
  dropped or repeated, so summed metrics are exact. Ranks may differ by one batch.
* train, ``drop``: every rank yields ``(n // world_size) // batch_size`` full batches.
* train, ``pad``: every rank yields ``ceil(ceil(n / world_size) / batch_size)`` batches of full
  size; rows past the rank's slice repeat real samples with ``valid == False``.

Leaves out: reading and augmenting (the subclasses: dali.py, reference.py yield raw batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .config import DataConfig
from .index import LoaderError, SampleIndex, rank_bounds

STATE_FORMAT = 1


def epoch_seed(seed: int, epoch: int, rank: int, salt: int = 0) -> int:
    """A 31-bit seed per (seed, epoch, rank): distinct streams, reproducible runs."""
    return int(np.random.SeedSequence([seed, epoch, rank, salt]).generate_state(1)[0] & 0x7FFFFFFF)


class EpochLoader:
    """Base of the DALI and reference loaders. Subclasses implement ``_raw_batches``."""

    backend = "base"

    def __init__(
        self,
        index: SampleIndex,
        cfg: DataConfig,
        train: bool,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        self.index, self.cfg, self.train = index, cfg, train
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size = cfg.batch_for(train)
        self.policy = cfg.train_remainder if train else "partial"
        n = len(index)
        if n < world_size:
            raise LoaderError(f"split {index.split!r} has {n} samples, fewer than world_size={world_size}")
        lo, hi = rank_bounds(n, rank, world_size)
        self.rank_size = hi - lo
        if self.policy == "drop":
            self.batches = (n // world_size) // self.batch_size
            if self.batches == 0:
                raise LoaderError(
                    f"train_remainder=drop: {n} samples over {world_size} ranks fill no batch of "
                    f"{self.batch_size}; lower batch_size or use train_remainder: pad"
                )
        elif self.policy == "pad":
            self.batches = math.ceil(math.ceil(n / world_size) / self.batch_size)
        else:
            self.batches = math.ceil(self.rank_size / self.batch_size)
        self.epoch = 0
        self._done = 0  # batches handed out in self.epoch
        self._resume: dict | None = None
        self.skipped_at_runtime = 0  # samples a decoder rejected (the scan should have caught them)

    def __len__(self) -> int:
        return self.batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank hands out per epoch (``valid`` rows only)."""
        if self.policy == "drop":
            return self.batches * self.batch_size
        return self.rank_size

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch already handed out (or restored by ``load_state_dict``)."""
        return self._done

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the next iteration runs (a pending resume of another epoch is dropped)."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        if epoch != self.epoch:
            self._done = 0
        self.epoch = epoch

    def plan(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch`` in reading order (before the shuffle buffer)."""
        order = self.index.shard_order(epoch, self.cfg.seed, shuffle=self.train)
        return self.index.rank_samples(order, self.rank, self.world_size)

    # ----------------------------------------------------------------------------------- iteration
    def _raw_batches(self, epoch: int, resume: dict | None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Yields (images on self.device, sample ids) for this rank's epoch, resumed at ``resume``."""
        raise NotImplementedError

    def _subclass_state(self) -> dict:
        return {}

    def close(self) -> None:
        """Releases what the backend holds between epochs (nothing, by default)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        resume = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        self._resume = None
        self._done = resume["batches_done"] if resume else 0
        last: dict | None = None
        if self._done < self.batches:
            for images, ids in self._raw_batches(epoch, resume):
                if self._done >= self.batches:
                    break  # drop: the rank's tail beyond the common count
                batch = self._make(images, ids)
                if self.policy == "pad" and len(ids) < self.batch_size:
                    batch = _pad(batch, self.batch_size)
                last = batch
                self._done += 1
                yield batch
        while self.policy == "pad" and self._done < self.batches:
            filler = last if last is not None else self._filler(epoch)
            last = {**filler, "valid": torch.zeros_like(filler["valid"])}
            self._done += 1
            yield last
        self.epoch, self._done = epoch + 1, 0

    def _filler(self, epoch: int) -> dict:
        """A batch of repeated samples for a rank that has no real rows left (pad policy only)."""
        images, ids = next(iter(self._raw_batches(epoch, None)))
        return _pad(self._make(images, ids), self.batch_size)

    def _make(self, images: torch.Tensor, ids: np.ndarray) -> dict[str, torch.Tensor]:
        labels = torch.from_numpy(self.index.labels[ids])
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        valid = torch.ones(len(ids), dtype=torch.bool)
        # One path for every device: on the CPU these are no-ops, on a GPU asynchronous copies.
        labels = labels.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        valid = valid.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"image": images, "label": labels, "index": index, "valid": valid}

    # -------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """The position after the batches handed out so far; store it with the training checkpoint."""
        if self._done >= self.batches:
            epoch, done, extra = self.epoch + 1, 0, {}
        else:
            epoch, done = self.epoch, self._done
            extra = self._subclass_state() if done else {}
        return {
            "format": STATE_FORMAT,
            "backend": self.backend,
            "split": self.index.split,
            "epoch": epoch,
            "batches_done": done,
            "rank": self.rank,
            "world_size": self.world_size,
            "samples": len(self.index),
            "batch_size": self.batch_size,
            "seed": self.cfg.seed,
            **extra,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at ``state``: the next iteration of ``state['epoch']`` yields only unseen samples."""
        if state.get("format") != STATE_FORMAT:
            raise LoaderError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
        mine = {
            "split": self.index.split,
            "world_size": self.world_size,
            "samples": len(self.index),
            "batch_size": self.batch_size,
            "seed": self.cfg.seed,
        }
        for key, value in mine.items():
            if state.get(key) != value:
                raise LoaderError(
                    f"cannot resume: the checkpoint's loader had {key}={state.get(key)!r}, this one has "
                    f"{value!r} (an exact resume needs the same data, batch size, seed and world size)"
                )
        self.epoch = int(state["epoch"])
        self._done = int(state["batches_done"])
        self._resume = dict(state) if self._done else None


def _pad(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    n = batch["label"].shape[0]
    if n >= size:
        return batch
    reps = torch.arange(size, device=batch["label"].device) % n
    out = {k: v.index_select(0, reps) for k, v in batch.items()}
    out["valid"] = torch.arange(size, device=out["valid"].device) < n
    if batch["image"].is_contiguous(memory_format=torch.channels_last) and not batch["image"].is_contiguous():
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out
