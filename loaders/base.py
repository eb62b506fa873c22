"""What both loaders share: epochs, the remainder policy across ranks, and the resumable position.

Owns ``EpochLoader``, the iterable a training loop sees: ``set_epoch(e)`` then ``for batch in
loader``; ``len(loader)`` batches per epoch; ``state_dict()`` / ``load_state_dict()`` for a mid-epoch
checkpoint. A batch is a dict: ``image`` (float NCHW, normalised; channels_last memory on request),
``label`` (int64), ``index`` (int64 sample ids of the SampleIndex, for audits) and ``valid`` (bool:
False only on ``train_remainder: pad`` filler rows), and ``view`` (int64) when the loader replays
stored views (``set_replay``, views.py): the stored view each row is.

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
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch

from flora.loaders.config import DataConfig
from flora.loaders.index import LoaderError, SampleIndex, rank_bounds
from flora.loaders.jpeg import SKIP_REASONS
from flora.loaders.plan import Planner, RankPlan, pack, unpack
from flora.loaders.recheck import recheck
from flora.loaders.views import Replay

STATE_FORMAT = 2  # 2: sampling, epoch_length, segment_base; a list of every rank's states
#: States this version resumes (1: before sampling, the same ranks only).
ACCEPTED_FORMATS = (1, 2)
log = logging.getLogger(__name__)


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
        self.planner = Planner(index, cfg, train)
        #: A segment of the current epoch: the positions its reads had consumed when this run took it
        #: over from a run on another number of ranks (``load_state_dict`` with every rank's state).
        self._segment: dict | None = None
        if self.policy == "drop" and self.batches_for(0) == 0:
            raise LoaderError(
                f"train_remainder=drop: {self.planner.length(0)} samples over {world_size} ranks fill no "
                f"batch of {self.batch_size}; lower batch_size or use train_remainder: pad"
            )
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
        #: Stored views to replay instead of fresh random augmentation (views.py; ``set_replay``).
        self.replay: Replay | None = None

    def set_replay(self, replay: Replay | None) -> None:
        """Replay stored views (views.py) from the next epoch on: every read uses its view's stored
        crop, flip, rotation and colour, and each batch carries ``view`` (the view each row used);
        ``None`` returns to the configured augmentation."""
        if replay is not None and len(replay.params) != len(self.index):
            raise LoaderError(
                f"stored views for {len(replay.params)} samples, the {self.index.split!r} split has "
                f"{len(self.index)}"
            )
        self.replay = replay

    def _base(self, epoch: int) -> np.ndarray | None:
        """The positions of ``epoch`` consumed before this run took it over (None: a whole epoch)."""
        seg = self._segment
        return seg["base"] if seg is not None and seg["epoch"] == epoch else None

    def batches_for(self, epoch: int) -> int:
        """Batches this rank yields in ``epoch`` (the same on every rank for training)."""
        base = self._base(epoch)
        return self.planner.batches(
            epoch, self.world_size, self.batch_size, self.policy, self.rank_size_for(epoch), base
        )

    def rank_size_for(self, epoch: int) -> int:
        """This rank's cut of ``epoch`` (of its segment), before samples found bad are left out."""
        lo, hi = rank_bounds(self.planner.segment_size(epoch, self._base(epoch)), self.rank, self.world_size)
        return hi - lo

    @property
    def batches(self) -> int:
        """Batches of the current epoch (``set_epoch``); constant unless ``repeat_factor`` draws the
        epoch's length or the epoch is a segment resumed on another number of ranks."""
        return self.batches_for(self.epoch)

    @property
    def rank_size(self) -> int:
        return self.rank_size_for(self.epoch)

    def __len__(self) -> int:
        return self.batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank hands out in the current epoch (``valid`` rows only)."""
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

    def rank_plan(self, epoch: int) -> RankPlan:
        """This rank's reads of ``epoch`` (positions in the epoch list and sample ids), in reading order
        (before the shuffle buffer), less the samples found bad before the epoch."""
        gone = [sid for sid, (_reason, first) in self.runtime_skips.items() if first <= epoch]
        return self.planner.rank_plan(epoch, self.rank, self.world_size, self._base(epoch), gone)

    def plan(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch`` in reading order (before the shuffle buffer)."""
        return self.rank_plan(epoch).ids

    def sampling_summary(self, epoch: int | None = None) -> dict:
        """The policy and what the epoch's list realises: draws per species (min, median, max, the most
        and least drawn), distinct samples, and each stream's share (``info.sampling`` is epoch 0's)."""
        return self.planner.summary(self.epoch if epoch is None else epoch)

    def _recheck(self, epoch: int) -> None:
        """``verify_every``: re-checks this rank's samples of ``epoch`` before it starts."""
        every = self.cfg.verify_every
        if not every or epoch % every:
            return
        started = time.perf_counter()
        samples = np.unique(self.plan(epoch))  # a sample drawn twice is checked once
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
        total = self.batches_for(epoch)  # once: a taken-over epoch's count sums a bitmap of the epoch
        if self._done < total:
            for images, ids in self._raw_batches(epoch, resume):
                if self._done >= total:
                    break  # drop: the rank's tail beyond the common count
                batch = self._make(images, ids, epoch)
                if self.train and len(ids) < self.batch_size:  # pad, or runtime skips under drop
                    batch = _pad(batch, self.batch_size)
                last = batch
                self._done += 1
                yield batch
        while self.train and self._done < total:
            filler = last if last is not None else self._filler(epoch)
            last = {**filler, "valid": torch.zeros_like(filler["valid"])}
            self._done += 1
            yield last
        self.epoch, self._done = epoch + 1, 0
        if self._segment is not None and self._segment["epoch"] <= epoch:
            self._segment = None  # the segment is read: later epochs are whole

    def _filler(self, epoch: int) -> dict:
        """A batch of repeated samples for a rank that has no real rows left (pad policy only)."""
        images, ids = next(iter(self._raw_batches(epoch, None)))
        return _pad(self._make(images, ids, epoch), self.batch_size)

    def _make(self, images: torch.Tensor, ids: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        labels = torch.from_numpy(self.index.labels[ids])
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        valid = torch.ones(len(ids), dtype=torch.bool)
        # One path for every device: on the CPU these are no-ops, on a GPU asynchronous copies.
        labels = labels.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        valid = valid.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = {"image": images, "label": labels, "index": index, "valid": valid}
        if self.replay is not None:
            batch["view"] = torch.from_numpy(self.replay.view_of(epoch, ids)).to(
                self.device, non_blocking=True
            )
        return batch

    # -------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """The position after the batches handed out so far; store it with the training checkpoint
        (every rank's, so that a run on another number of ranks can take the epoch over)."""
        if self._done >= self.batches:
            epoch, done, extra = self.epoch + 1, 0, {}
        else:
            epoch, done = self.epoch, self._done
            extra = self._subclass_state() if done else {}
        base = self._base(epoch)
        if base is not None:  # a taken-over epoch, even before its first batch: the reads done before
            extra["segment_base"] = pack(base)
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
            "sampling": self._sampling_key(),
            "epoch_length": self.planner.length(epoch),
            "runtime_skips": {
                str(sid): [reason, first] for sid, (reason, first) in self.runtime_skips.items()
            },
            **extra,
        }

    def _sampling_key(self) -> dict:
        """What fixes the epoch lists besides the data and seed: the sampling section, as a mapping."""
        return asdict(self.cfg.sampling) if self.train else {}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resumes at ``state``: the next iteration of ``state['epoch']`` yields only unseen samples.

        ``state`` is this rank's state, or the list of every rank's states of the run that saved it
        (what the training checkpoint keeps). A list from another number of ranks, or another batch
        size, is taken over: the rest of the epoch is exactly the reads that no old rank had consumed,
        each once, cut across this run's ranks (a *segment*; plan.py); later epochs are a fresh run's.
        """
        states = state if isinstance(state, list) else [state]
        if not states:
            raise LoaderError("cannot resume: the loader state list is empty")
        for s in states:
            self._check_state(s)
        first = states[0]
        same_world = int(first["world_size"]) == self.world_size and len(states) in (1, self.world_size)
        if same_world and int(first["batch_size"]) == self.batch_size:
            mine = states[self.rank] if len(states) > 1 else first
            if int(mine["rank"]) != self.rank and len(states) > 1:
                raise LoaderError(f"cannot resume: state {self.rank} of the list is rank {mine['rank']}'s")
            self._restore(mine)
            return
        if len(states) != int(first["world_size"]):
            raise LoaderError(
                f"cannot resume on {self.world_size} rank(s) with batch size {self.batch_size}: the "
                f"checkpoint holds {len(states)} loader state(s) of a {first['world_size']}-rank run, batch "
                f"size "
                f"{first['batch_size']}; taking an epoch over needs every rank's state"
            )
        self._take_over(states)

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") not in ACCEPTED_FORMATS:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise LoaderError(f"loader state format {found!r} is not one of {list(ACCEPTED_FORMATS)}")
        mine = {"split": self.index.split, "samples": len(self.index), "seed": self.cfg.seed,
                "backend": self.backend}  # fmt: skip
        if state.get("format", 1) >= 2:
            mine["sampling"] = self._sampling_key()
        for key, value in mine.items():
            if state.get(key) != value:
                raise LoaderError(
                    f"cannot resume: the checkpoint's loader had {key}={state.get(key)!r}, this one has "
                    f"{value!r} (a resume needs the same data, seed, backend and sampling)"
                )

    def _restore(self, state: dict) -> None:
        """The same ranks and batch size: this rank's own state, exactly (DALI's checkpoint too)."""
        self.epoch = int(state["epoch"])
        self._done = int(state["batches_done"])
        self._resume = dict(state) if self._done else None
        self._segment = None
        if state.get("segment_base"):
            self._segment = {
                "epoch": self.epoch,
                "base": unpack(state["segment_base"], state["epoch_length"]),
            }
        self._set_skips(state.get("runtime_skips", {}))

    def _set_skips(self, *skip_maps: dict) -> None:
        self.runtime_skips = {}
        for skips in skip_maps:
            for sid, (reason, first) in skips.items():
                old = self.runtime_skips.get(int(sid))
                if old is None or int(first) < old[1]:
                    self.runtime_skips[int(sid)] = (str(reason), int(first))
        self.skipped.clear()  # in place: LoaderInfo.skipped holds this very Counter
        self.skipped.update(self.index.skipped)
        self.skipped.update(reason for reason, _first in self.runtime_skips.values())

    def _take_over(self, states: list[dict]) -> None:
        """Another number of ranks (or batch size): a segment of the reads no old rank consumed."""
        ranks = sorted(int(s["rank"]) for s in states)
        if ranks != list(range(len(states))):
            raise LoaderError(
                f"cannot resume: the loader states are of ranks {ranks}, expected 0..{len(states) - 1}"
            )
        at = {(int(s["epoch"]), int(s["batches_done"])) for s in states}
        if len(at) != 1:
            raise LoaderError(f"cannot resume: the ranks' loader states are at different places {sorted(at)}")
        ((epoch, done),) = at
        self._set_skips(*(s.get("runtime_skips", {}) for s in states))
        self.epoch, self._done, self._resume, self._segment = epoch, 0, None, None
        if not done and not any(s.get("segment_base") for s in states):
            return  # at an epoch's start: a fresh run's epoch
        length = self.planner.length(epoch)
        if any(int(s.get("epoch_length", length)) != length for s in states):
            raise LoaderError(
                f"cannot resume: the checkpoint's epoch {epoch} had {states[0].get('epoch_length')} reads, "
                f"this data and config give {length}"
            )
        consumed = np.zeros(length, dtype=bool)
        for s in states:
            consumed[self._consumed(s, length)] = True
        self._segment = {"epoch": epoch, "base": consumed}
        left = int((~consumed).sum())
        log.info("%s loader: took over epoch %d from %d rank(s): %d of %d reads left for %d rank(s)",
                 self.backend, epoch, len(states), left, length, self.world_size)  # fmt: skip

    def _old_plan(self, state: dict, length: int) -> RankPlan:
        """The plan an old rank's ``state`` was reading (its own skips, its own segment)."""
        epoch = int(state["epoch"])
        base = unpack(state["segment_base"], length) if state.get("segment_base") else None
        skips = state.get("runtime_skips", {})
        gone = [int(sid) for sid, (_reason, first) in skips.items() if int(first) <= epoch]
        return self.planner.rank_plan(epoch, int(state["rank"]), int(state["world_size"]), base, gone)

    def _consumed(self, state: dict, length: int) -> np.ndarray:
        """Positions of the epoch list that an old rank's ``state`` had consumed (its segment's base
        included): the first ``batches_done * batch_size`` reads of its order (the reference loader's
        way; dali.py overrides it with the reads its iterator returned)."""
        plan = self._old_plan(state, length)
        taken = min(int(state["batches_done"]) * int(state["batch_size"]), len(plan.ids))
        order = self.planner.reference_order(plan, int(state["rank"]))
        return np.concatenate([self._old_base(state, length), plan.positions[order[:taken]]])

    @staticmethod
    def _old_base(state: dict, length: int) -> np.ndarray:
        return (
            np.flatnonzero(unpack(state.get("segment_base"), length))
            if state.get("segment_base")
            else np.zeros(0, np.int64)
        )


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
