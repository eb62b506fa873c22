"""The training loop: one loop for every objective (teachers and the distilled student).

Owns a run from start to summary: process group (torchrun's environment; NCCL on GPUs, gloo on the CPU),
loaders, model (models.py) and objective (objectives.py), timm's optimizer (weight-decay groups, layer
decay) and scheduler (per optimizer update: warmup, cosine), AMP (bf16 on a GPU; fp16 with a GradScaler),
gradient accumulation (``no_sync``), Mixup/CutMix (``train.mix``, mix.py; off by default), clipping, EMA
(timm ``ModelEmaV3``), ``torch.compile``, channels_last, DDP; validation each ``eval_every`` epochs,
exact across ranks; ``last_checkpoint.pt`` every ``checkpoint_every`` steps and each epoch,
``best_model.pt`` by validation top-1 (config locations stored absolute, locations.py); TensorBoard,
``metrics.json`` and a progress bar on rank 0. A run first deletes a killed run's checkpoint temporaries.

Resume: ``resume=True`` restores model, optimizer, scheduler, scaler, EMA, counters, every rank's
RNG states and loader position from ``last_checkpoint.pt``; on the CPU a resumed run reaches the
same weights as an uninterrupted one; on another number of ranks the loader takes the epoch over
(loaders/base.py), RNG streams start afresh. ``stop_after`` ends a run after that many optimizer steps
with a checkpoint written, as a preempted job would.

Leaves out: process group and DDP (distributed.py), autocast (precision.py), predictions (predict.py),
records (runlog.py), the loss (objectives.py), the file format (checkpoint.py), metrics (metrics.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from flora.io import expect_folder, refuse_overlap
from flora.loaders import create_dataloaders
from flora.loaders.index import LoaderError
from flora.training import distill  # noqa: F401 - registers the "distill" objective
from flora.training.checkpoint import (
    BEST,
    LAST,
    Checkpoint,
    CheckpointError,
    Preprocessing,
    TrainingState,
    absolute_locations,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flora.training.config import ExperimentConfig, with_added_keys
from flora.training.distributed import Dist, destroy_distributed, init_distributed, wrap_ddp
from flora.training.errors import TrainingError
from flora.training.metrics import summarize
from flora.training.mix import BatchMix
from flora.training.models import ModelError, build_model, init_from_checkpoint, timm_args_of
from flora.training.objectives import Objective, build_objective
from flora.training.precision import autocast, autocast_dtype
from flora.training.predict import gather_predictions, predict
from flora.training.runlog import RunLog, Window

__all__ = [  # the loop's public names, including those now owned by their own modules
    "RESUME_FIXED", "Dist", "Trainer", "TrainingError", "autocast", "autocast_dtype", "destroy_distributed",
    "gather_predictions", "init_distributed", "predict", "wrap_ddp"]  # fmt: skip

log = logging.getLogger(__name__)

#: Config sections a resume must not change (the rest, e.g. train.progress or run.root, may differ).
RESUME_FIXED = ("data", "model", "optim", "schedule", "objective", "distill")


# --------------------------------------------------------------------------------------------- train
class Trainer:
    """One run of an experiment config. ``Trainer(cfg).fit()`` returns the summary dict."""

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None):
        self.cfg, self.resume, self.stop_after = cfg, resume, stop_after
        self.run_dir = cfg.run.dir
        self._check_run_dir()
        self.ddp = init_distributed(cfg.data.device)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        loaders = create_dataloaders(cfg.data, rank=self.ddp.rank, world_size=self.ddp.world_size)
        self.train_loader, self.val_loader, self.info = loaders
        self.device = torch.device(self.info.device)
        self.model = build_model(cfg.model, self.info.num_classes, self.info.image_size)
        self.init_report = self._init_from() if cfg.model.init_from else None
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.objective: Objective = build_objective(
            cfg, self.info, self.device, train_loader=self.train_loader, ddp=self.ddp
        ).to(self.device)
        self.mix = BatchMix(cfg.train.mix, self.info.num_classes) if cfg.train.mix.enabled else None
        self._build_optimization()
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.train.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema.decay)
        self.step, self.epoch = 0, 0
        self.best = {"metric": "top1", "value": None, "epoch": None, "step": None}
        self.log = RunLog(self.run_dir, self.ddp.main)
        self.epoch_window = Window()  # the epoch's loss sums (checkpointed) and this session's throughput
        self._loader_position: list[dict] | None = None  # every rank's, when an epoch was left early
        self._resume_rng: list | None = None  # every rank's RNG states, restored after the seeding
        if resume:
            self._restore()
        torch.manual_seed(cfg.train.seed * 1000 + self.ddp.rank + 1 + self.step)  # dropout streams per rank
        if self._resume_rng is not None:  # the same ranks: each its own streams again
            set_rng_state(self._resume_rng[self.ddp.rank])
            self._resume_rng = None
        forward_model = torch.compile(self.model) if cfg.train.compile else self.model
        if self.ddp.active:
            forward_model = wrap_ddp(forward_model, self.device)
        self.forward_model = forward_model
        self._purge_step = self.step  # TensorBoard events past a resumed step are rewritten

    # -------------------------------------------------------------------------------------- setup
    def _check_run_dir(self) -> None:
        expect_folder(self.run_dir, "run folder (run.root/run.name)")
        refuse_overlap("train", self.run_dir, {"data.shards": self.cfg.data.shards})
        last = self.run_dir / LAST
        if self.resume and not last.is_file():
            raise TrainingError(f"--resume: no {LAST} in {self.run_dir}")
        if not self.resume and last.is_file():
            raise TrainingError(
                f"{self.run_dir} holds a run ({LAST}); pass --resume, or choose another run.name"
            )

    def _init_from(self) -> dict:
        path = self.cfg.model.init_from
        try:
            source = load_checkpoint(path)
        except CheckpointError as exc:
            raise ModelError(f"model.init_from: {exc}") from exc
        if source.model_name != self.cfg.model.name:
            raise ModelError(
                f"model.init_from: {path} is a {source.model_name!r}, this run builds {self.cfg.model.name!r}"
            )
        return init_from_checkpoint(self.model, source, self.info.class_mapping)

    def _build_optimization(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        self.lr = cfg.effective_lr(self.ddp.world_size)
        self.optimizer = create_optimizer_v2(
            self.model,
            opt=cfg.optim.name,
            lr=self.lr,
            weight_decay=cfg.optim.weight_decay,
            layer_decay=cfg.optim.layer_decay,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        micro = len(self.train_loader)
        self.updates_per_epoch = math.ceil(micro / cfg.train.grad_accum)
        self.total_steps = cfg.train.epochs * self.updates_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.epochs = math.ceil(self.total_steps / self.updates_per_epoch)
        # Laid out in optimizer steps (1 "epoch" = 1 step for timm), so max_steps ends the cosine too.
        warmup = min(cfg.schedule.warmup_epochs * self.updates_per_epoch, max(self.total_steps - 1, 0))
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.schedule.name,
            num_epochs=max(self.total_steps - warmup, 1),  # the cosine after the warmup prefix
            warmup_epochs=warmup,
            warmup_lr=cfg.schedule.warmup_lr,
            min_lr=cfg.schedule.min_lr,
            warmup_prefix=True,  # the cosine starts at the peak, after warmup
            step_on_epochs=False,
            updates_per_epoch=1,
        )
        self.scheduler.step_update(0)

    # ------------------------------------------------------------------------------ checkpointing
    def _checkpoint(self, kind: str, model: dict, **parts) -> Checkpoint:
        """This run's checkpoint of ``kind`` holding ``model``'s weights; ``parts``: what that kind adds."""
        cfg, info = self.cfg, self.info
        preprocessing = Preprocessing(
            info.image_size, list(info.mean), list(info.std), cfg.data.augment.crop_pct, cfg.data.val_resize
        )
        return Checkpoint(
            kind=kind, model=model, model_name=cfg.model.name, class_mapping=dict(info.class_mapping),
            preprocessing=preprocessing, config=absolute_locations(cfg.as_dict()), epoch=self.epoch,
            step=self.step, world_size=self.ddp.world_size, class_counts=list(info.class_counts),
            timm_args=timm_args_of(self.model), **parts,
        )  # fmt: skip

    def _last(self) -> Checkpoint:
        """The resume checkpoint (collective: every rank must call it)."""
        rngs = self.ddp.gather(rng_state())
        loaders = self._loader_position or self.ddp.gather(self.train_loader.state_dict())
        partial = {"sums": dict(self.epoch_window.sums), "seen": self.epoch_window.seen}
        training = TrainingState(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            best=dict(self.best),
            rng=rngs,
            loader=loaders,
            epoch_losses=self.ddp.gather(partial),
        )
        return self._checkpoint("last", self.model.state_dict(), training=training)

    def save_last(self) -> None:
        state = self._last()
        if self.ddp.main:
            save_checkpoint(self.run_dir / LAST, state)
        self.ddp.barrier()

    def _save_best(self, metrics: dict) -> None:
        if not self.ddp.main:
            return
        ema_weights = self.ema is not None and self.cfg.train.ema.evaluate
        best = self._checkpoint(
            "best", self.eval_model.state_dict(), metrics=metrics, ema_weights=ema_weights
        )
        save_checkpoint(self.run_dir / BEST, best)

    def _restore(self) -> None:
        checkpoint = load_checkpoint(self.run_dir / LAST, map_location=self.device)
        state = checkpoint.training
        if state is None:
            raise TrainingError(
                f"--resume: {self.run_dir / LAST} is a {checkpoint.kind!r} checkpoint, not a run's last"
            )
        ranks, world = int(checkpoint.world_size), self.ddp.world_size
        if len(state.loader) != ranks or len(state.epoch_losses) != ranks or len(state.rng) != ranks:
            raise TrainingError(
                f"--resume: the checkpoint was written by {ranks} rank(s) but holds {len(state.loader)} "
                "loader states; it is damaged or not a Flora checkpoint"
            )
        now, stored = absolute_locations(self.cfg.as_dict()), absolute_locations(checkpoint.config)
        for section in RESUME_FIXED:  # locations compared resolved: the checkpoint stores them absolute
            if with_added_keys(section, stored.get(section)) != now.get(section):
                raise TrainingError(
                    f"--resume: config section {section!r} differs from the checkpoint's; resume with the "
                    "same config (or start a new run.name)"
                )
        self.model.load_state_dict(checkpoint.model)
        if self.ema is not None:
            self.ema.module.load_state_dict(state.ema)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        self.step, self.epoch, self.best = int(checkpoint.step), int(checkpoint.epoch), dict(state.best)
        try:  # every rank's state: on another number of ranks the loader takes the epoch over
            self.train_loader.load_state_dict(list(state.loader))
        except LoaderError as exc:
            raise TrainingError(f"--resume: {exc}") from None
        mine = state.epoch_losses if ranks != world else [state.epoch_losses[self.ddp.rank]]
        self.epoch_window = Window.mean_of(mine)  # another number of ranks: the old ranks' mean
        self._resume_rng = state.rng if ranks == world else None
        self.log.restore(self.epoch)
        if self.ddp.main:
            log.info("resumed %s at epoch %d, step %d", self.run_dir, self.epoch, self.step)
        if self.ddp.main and ranks != world:
            accum = int(checkpoint.config.get("train", {}).get("grad_accum", 1))
            log.warning("resumed on %d rank(s) a run of %d: the rest of epoch %d is the samples no old "
                        "rank had read; the global batch is now %d images (batch_size x grad_accum x "
                        "ranks; it was %d)", world, ranks, self.epoch, self.cfg.global_batch(world),
                        self.cfg.data.batch_size * accum * ranks)  # fmt: skip

    # ------------------------------------------------------------------------------------ training
    @property
    def eval_model(self) -> nn.Module:
        if self.ema is not None and self.cfg.train.ema.evaluate:
            return self.ema.module
        return self.model

    def fit(self) -> dict:
        """Trains to ``total_steps`` (or ``stop_after``), validating and checkpointing; the summary."""
        if self.ddp.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temporaries(self.run_dir)  # half-written checkpoints of a killed run
            if stale:
                log.info("removed %d stale checkpoint temporaries from %s", len(stale), self.run_dir)
            (self.run_dir / "config.json").write_text(json.dumps(self.cfg.as_dict(), indent=2))
        start_step, started = self.step, time.perf_counter()
        images_total, wait_total, busy_total = 0, 0.0, 0.0
        stopped = False
        self.forward_model.train()
        while self.epoch < self.epochs and self.step < self.total_steps and not stopped:
            stats = self._train_epoch(start_step)
            images_total += stats["images"]
            wait_total += stats["data_wait_s"]
            busy_total += stats["seconds"]
            stopped = stats["stopped"]
            if stopped and not stats["epoch_done"]:
                self.save_last()
                break
            epoch = self.epoch
            last_epoch = self.step >= self.total_steps
            record = {
                "epoch": epoch,
                "step": self.step,
                "lr": self._lr(),
                **_prefixed("train", stats["losses"]),
            }
            record["images_per_s"] = stats["images"] * self.ddp.world_size / max(stats["seconds"], 1e-9)
            record["data_wait_fraction"] = stats["data_wait_s"] / max(stats["seconds"], 1e-9)
            if (epoch + 1) % self.cfg.train.eval_every == 0 or last_epoch:
                merged = gather_predictions(
                    self.eval_model, self.val_loader, self.device, self.amp_dtype, self.ddp
                )
                val = summarize(merged)
                record.update(_prefixed("val", val))
                self._scalars({f"val/{k}": v for k, v in val.items() if k != "samples"})
                if self.best["value"] is None or val["top1"] > self.best["value"]:
                    self.best = {"metric": "top1", "value": val["top1"], "epoch": epoch, "step": self.step}
                    self._save_best(val)
            self.history.append(record)
            self.epoch = epoch + 1 if stats["epoch_done"] else epoch
            self.save_last()
            self.log.write_metrics()
            if self.ddp.main:
                log.info("epoch %d: %s", epoch, _fmt(record))
            if stopped:
                break
        elapsed = time.perf_counter() - started
        summary = {
            "run_dir": str(self.run_dir),
            "status": "stopped" if stopped else "finished",
            "steps": self.step,
            "epochs_done": self.epoch,
            "steps_this_session": self.step - start_step,
            "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9),  # validation included
            "train_steps_per_s": (self.step - start_step) / max(busy_total, 1e-9),
            "images_per_s": images_total * self.ddp.world_size / max(busy_total, 1e-9),
            "data_wait_fraction": wait_total / max(busy_total, 1e-9),
            "best": self.best,
            "world_size": self.ddp.world_size,
            "backend": self.info.backend,
            "device": str(self.device),
            "num_classes": self.info.num_classes,
            "init_from": self.init_report,
        }
        if self.history:
            summary["last_epoch"] = self.history[-1]
        self.log.finish(summary, title=self.cfg.run.name)
        return summary

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _train_epoch(self, start_step: int) -> dict:
        """Runs (the rest of) ``self.epoch``: micro-batches, an optimizer step per accumulation group, a
        log window every ``log_every`` steps, a checkpoint every ``checkpoint_every``; returns the epoch's
        figures and whether it ended or was stopped."""
        cfg, loader = self.cfg.train, self.train_loader
        micro, micro_total = self._start_epoch()
        bar = self._progress_bar(micro, micro_total)
        window = Window(first_in_epoch=True)  # the epoch's first window also holds the loader's start-up
        epoch = self.epoch_window = self.epoch_window.restarted() if micro else Window()
        # per micro-batch: loss terms + valid rows, on the device until the step
        group: list[torch.Tensor] = []
        stopped, batches = False, _timed(loader)  # batches lives to the return: so does the loader's iterator
        for batch, waited in batches:
            epoch.wait, window.wait = epoch.wait + waited, window.wait + waited
            group_size, last_in_group = self._group_of(micro, micro_total)
            keys, terms = self._micro_step(batch, group_size, last_in_group)
            group.append(terms)
            micro += 1
            bar.update(1)
            if not last_in_group:
                continue
            self._add_losses(keys, group, epoch, window)
            group = []
            self._optimizer_step()
            if self.step % cfg.log_every == 0:
                window = self._log_window(window, bar)
            stopped = self.stop_after is not None and self.step - start_step >= self.stop_after
            if self.step >= self.total_steps or stopped:
                if micro < micro_total:  # taken while the loader's iterator is alive: the exact position
                    self._loader_position = self.ddp.gather(loader.state_dict())
                break
            if self.step % cfg.checkpoint_every == 0 and micro < micro_total:
                self.save_last()
        bar.close()
        return {
            "images": epoch.images,
            "data_wait_s": epoch.wait,
            "seconds": time.perf_counter() - epoch.start,
            "losses": {k: self.ddp.mean(v) for k, v in epoch.means().items()},
            "stopped": stopped,
            "epoch_done": micro >= micro_total,
        }

    def _start_epoch(self) -> tuple[int, int]:
        """Sets the loader to ``self.epoch``; its micro-batches done (> 0: resumed mid-epoch) and in all."""
        self.train_loader.set_epoch(self.epoch)
        self._loader_position = None
        return self.train_loader.batches_done, len(self.train_loader)

    def _progress_bar(self, done: int, total: int):
        """tqdm over the epoch's micro-batches, on rank 0 with ``train.progress`` (else a disabled one)."""
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=f"epoch {self.epoch}", leave=False, dynamic_ncols=True,
                    disable=not (self.ddp.main and self.cfg.train.progress))  # fmt: skip

    def _group_of(self, micro: int, micro_total: int) -> tuple[int, bool]:
        """The size of micro-batch ``micro``'s accumulation group, and whether it is the group's last."""
        accum = self.cfg.train.grad_accum
        group_start = (micro // accum) * accum
        group_size = min(accum, micro_total - group_start)
        return group_size, micro - group_start == group_size - 1

    def _micro_step(
        self, batch: dict, group_size: int, last_in_group: bool
    ) -> tuple[list[str], torch.Tensor]:
        """Forward and backward of one micro-batch, its loss scaled for its group (DDP syncs gradients on
        the group's last only); the loss terms' names, and their values with the valid rows, on the device."""
        if self.mix is not None:  # drawn from this rank's torch RNG, which a checkpoint carries
            batch = self.mix(batch)
        if last_in_group or not self.ddp.active:
            sync = contextlib.nullcontext()
        else:
            sync = self.forward_model.no_sync()
        with sync:
            with autocast(self.device, self.amp_dtype):
                out = self.objective(self.forward_model, batch)
            self.scaler.scale(out["loss"] / group_size).backward()
        keys = [k for k in ("loss", *self.objective.terms) if k in out]
        return keys, torch.stack([*(out[k].detach().float() for k in keys), batch["valid"].sum().float()])

    def _add_losses(self, keys: list[str], group: list[torch.Tensor], *windows: Window) -> None:
        """The group's loss terms, checked finite, added to each of ``windows``."""
        rows = torch.stack(group).tolist()  # one device sync per optimizer step, not per value
        for row in rows:
            if not math.isfinite(row[0]):
                raise TrainingError(f"loss is {row[0]} at epoch {self.epoch}, step {self.step}")
        for window in windows:
            window.add(keys, rows)

    def _log_window(self, window: Window, bar) -> Window:
        """The window's mean losses, learning rate, images/s and data wait to TensorBoard, the run log and
        the progress bar; the next window, starting now."""
        now = time.perf_counter()
        images_per_s, wait = window.rates(now, self.ddp.world_size)
        losses = window.means()
        scalars = {f"train/{k}": self.ddp.mean(v) for k, v in losses.items()}
        scalars.update({"train/lr": self._lr(), "train/images_per_s": images_per_s,
                        "train/data_wait_fraction": wait})  # fmt: skip
        self._scalars(scalars)
        self.log.window(self.epoch, self.step, window.first_in_epoch, images_per_s, wait)
        bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{self._lr():.2e}")
        return Window(start=now)

    def _optimizer_step(self) -> None:
        clip = self.cfg.optim.clip_grad
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def _scalars(self, values: dict[str, float]) -> None:
        self.log.scalars(values, self.step, self._purge_step)

    @property
    def history(self) -> list[dict]:
        return self.log.history

    @property
    def windows(self) -> list[dict]:
        return self.log.windows


def _timed(batches: Iterable) -> Iterator[tuple[Any, float]]:
    """``batches``' items, each with the seconds spent waiting for it (the data wait)."""
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in values.items()}


def _fmt(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
