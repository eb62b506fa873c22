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
* train, either policy, after samples were skipped at runtime (below): a short batch is filled to
  full size and missing batches are filler, all with ``valid == False``, so every rank still yields
  ``len(loader)`` batches of one shape and the ranks stay in step.

Samples found bad after the scan (runtime skips) are the loader's to count: ``skipped`` is the
scan's count by reason (jpeg.py's ``SKIP_REASONS``) plus these, live (``LoaderInfo.skipped`` shows
the same object). A sample found bad is left out of the plan from the next epoch on (``skip``); the
epoch it was found in keeps its plan, so a mid-epoch state stays exact. With ``verify_every: N``
this rank's samples of epochs 0, N, 2N... are re-checked (recheck.py) before the epoch starts, and
the bad ones left out of that epoch already (the first re-check skips shards the scan has just
checked). The runtime skips travel in ``state_dict()``, so a resumed run plans the same epochs.

Leaves out: reading and augmenting (the subclasses: dali.py, reference.py yield raw batches).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from flora.loaders.config import DataConfig
from flora.loaders.index import LoaderError, SampleIndex, rank_bounds
from flora.loaders.jpeg import SKIP_REASONS
from flora.loaders.recheck import recheck

STATE_FORMAT = 1
log = logging.getLogger(__name__)


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
        #: reason -> samples left out: the scan's, then those found bad at runtime (live).
        self.skipped: Counter = Counter(index.skipped)
        #: sample id -> (reason, first epoch whose plan leaves it out): found bad after the scan.
        self.runtime_skips: dict[int, tuple[str, int]] = {}
        #: The re-checks run so far: {epoch, samples, bad, seconds} each (``verify_every``).
        self.rechecks: list[dict] = []
        self._fresh_pending = bool(index.fresh)  # the next re-check may skip shards scanned just now

    def __len__(self) -> int:
        return self.batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank hands out per epoch (``valid`` rows only)."""
        if self.policy == "drop":
            return self.batches * self.batch_size
        return self.rank_size

    @property
    def skipped_at_runtime(self) -> int:
        """Samples found bad after the scan (by a decoder or a re-check), each counted once."""
        return len(self.runtime_skips)

    def skip(self, found: dict[int, str], from_epoch: int) -> None:
        """Records samples found bad after the scan (``{sample id: reason}``): left out of the plans of
        ``from_epoch`` and later, counted once in ``skipped``; a reason must be one of ``SKIP_REASONS``."""
        for sid, reason in sorted(found.items()):
            if reason not in SKIP_REASONS:
                raise ValueError(f"skip reason must be one of {SKIP_REASONS}, got {reason!r}")
            if sid in self.runtime_skips:
                continue
            self.runtime_skips[sid] = (reason, from_epoch)
            self.skipped[reason] += 1
            shard = self.index.shards[self.index.shard_of(sid)].rel
            log.warning(
                "%s loader: sample %s of %s is bad (%s); left out from epoch %d on",
                self.backend, self.index.keys[sid], shard, reason, from_epoch,
            )  # fmt: skip

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
        samples = self.index.rank_samples(order, self.rank, self.world_size)
        gone = [sid for sid, (_reason, first) in self.runtime_skips.items() if first <= epoch]
        return samples[~np.isin(samples, gone)] if gone else samples

    def _recheck(self, epoch: int) -> None:
        """``verify_every``: re-checks this rank's samples of ``epoch`` before it starts."""
        every = self.cfg.verify_every
        if not every or epoch % every:
            return
        started = time.perf_counter()
        samples = self.plan(epoch)
        if self._fresh_pending:  # the scan of this process checked these shards moments ago
            samples = samples[~np.isin(self.index.shards_of(samples), list(self.index.fresh))]
        bad = recheck(self.index, samples, self.cfg.verify, self.cfg.threads)
        self.skip(bad, from_epoch=epoch)
        seconds = time.perf_counter() - started
        self.rechecks.append({"epoch": epoch, "samples": len(samples), "bad": len(bad), "seconds": seconds})

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
        if resume is None:
            self._recheck(epoch)  # only at an epoch's start: a started epoch keeps its plan
        self._fresh_pending = False
        last: dict | None = None
        if self._done < self.batches:
            for images, ids in self._raw_batches(epoch, resume):
                if self._done >= self.batches:
                    break  # drop: the rank's tail beyond the common count
                batch = self._make(images, ids)
                if self.train and len(ids) < self.batch_size:  # pad, or runtime skips under drop
                    batch = _pad(batch, self.batch_size)
                last = batch
                self._done += 1
                yield batch
        while self.train and self._done < self.batches:
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
            "runtime_skips": {
                str(sid): [reason, first] for sid, (reason, first) in self.runtime_skips.items()
            },
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
        self.runtime_skips = {
            int(sid): (str(r), int(e)) for sid, (r, e) in state.get("runtime_skips", {}).items()
        }
        self.skipped.clear()  # in place: LoaderInfo.skipped holds this very Counter
        self.skipped.update(self.index.skipped)
        self.skipped.update(reason for reason, _first in self.runtime_skips.values())


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
