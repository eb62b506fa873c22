"""The training loop: one loop for every objective (teachers now, the distilled student later).

Owns a run from start to summary: process group (torchrun's environment; NCCL on GPUs, gloo on the
CPU), loaders (``loaders.create_dataloaders``), model (models.py) and objective (objectives.py),
timm's optimizer (weight-decay groups, optional layer decay) and scheduler (stepped per optimizer
update: warmup, then cosine), AMP (bf16 on a GPU; fp16 with a GradScaler on request), gradient
accumulation (``no_sync`` on all but the last micro-batch), clipping, EMA (timm ``ModelEmaV3``),
``torch.compile``, channels_last, DDP; validation each ``eval_every`` epochs with exact metrics across
ranks; ``last_checkpoint.pt`` every ``checkpoint_every`` steps and each epoch, ``best_model.pt`` by
validation top-1; TensorBoard scalars, ``metrics.json`` and a progress bar on rank 0. A run starts by
deleting the checkpoint temporaries a killed run left in its folder (checkpoint.remove_stale_temporaries).

Resume: ``resume=True`` restores model, optimizer, scheduler, scaler, EMA, counters, every rank's
RNG states and loader position from ``last_checkpoint.pt``; on the CPU a resumed run reaches the
same weights as an uninterrupted one (tests/training/test_resume.py). ``stop_after`` ends a run
cleanly after that many optimizer steps with a checkpoint written, as a preempted job would.

Leaves out: the process group and DDP (distributed.py), autocast (precision.py), predictions over a
loader (predict.py), what a run records (runlog.py), what the loss is (objectives.py), the file
format (checkpoint.py), metrics (metrics.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time

import torch
from torch import nn

from flora.loaders import create_dataloaders
from flora.training import distill  # noqa: F401 - registers the "distill" objective
from flora.training.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flora.training.config import ExperimentConfig
from flora.training.distributed import Dist, destroy_distributed, init_distributed, wrap_ddp
from flora.training.errors import TrainingError
from flora.training.metrics import summarize
from flora.training.models import ModelError, build_model, init_from_checkpoint
from flora.training.objectives import Objective, build_objective
from flora.training.precision import autocast, autocast_dtype
from flora.training.predict import gather_predictions, predict
from flora.training.runlog import RunLog

__all__ = [  # the loop's public names, including those now owned by their own modules
    "RESUME_FIXED", "Dist", "Trainer", "TrainingError", "autocast", "autocast_dtype", "destroy_distributed",
    "gather_predictions", "init_distributed", "predict", "wrap_ddp",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Config sections a resume must not change (the rest, e.g. train.progress or run.root, may differ).
RESUME_FIXED = ("data", "model", "optim", "schedule", "objective", "distill")


# --------------------------------------------------------------------------------------------- train
class Trainer:
    """One run of an experiment config. ``Trainer(cfg).fit()`` returns the summary dict."""

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None):
        self.cfg, self.resume, self.stop_after = cfg, resume, stop_after
        self.run_dir = cfg.run.dir
        self.ddp = init_distributed(cfg.data.device)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.train_loader, self.val_loader, self.info = create_dataloaders(
            cfg.data, rank=self.ddp.rank, world_size=self.ddp.world_size
        )
        self.device = torch.device(self.info.device)
        self._check_run_dir()
        self.model = build_model(cfg.model, self.info.num_classes, self.info.image_size)
        self.init_report = self._init_from() if cfg.model.init_from else None
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.objective: Objective = build_objective(
            cfg, self.info, self.device, train_loader=self.train_loader, ddp=self.ddp
        ).to(self.device)
        self._build_optimization()
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.train.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema.decay)
        self.step, self.epoch, self.best = (
            0,
            0,
            {"metric": "top1", "value": None, "epoch": None, "step": None},
        )
        self.log = RunLog(self.run_dir, self.ddp.main)
        self.epoch_sums: dict[str, float] = {}  # loss terms summed over this epoch's micro-batches
        self.epoch_seen = 0
        self._loader_position: list[dict] | None = None  # every rank's, when an epoch was left early
        if resume:
            self._restore()
        torch.manual_seed(cfg.train.seed * 1000 + self.ddp.rank + 1 + self.step)  # dropout streams per rank
        if resume:
            set_rng_state(self._resume_state["rng"][self.ddp.rank])
            self._resume_state = None
        forward_model = torch.compile(self.model) if cfg.train.compile else self.model
        if self.ddp.active:
            forward_model = wrap_ddp(forward_model, self.device)
        self.forward_model = forward_model
        self._purge_step = self.step  # TensorBoard events past a resumed step are rewritten

    # -------------------------------------------------------------------------------------- setup
    def _check_run_dir(self) -> None:
        last = self.run_dir / LAST
        if self.resume and not last.is_file():
            raise TrainingError(f"--resume: no {LAST} in {self.run_dir}")
        if not self.resume and last.is_file():
            raise TrainingError(
                f"{self.run_dir} already holds a run ({LAST}); pass --resume to continue it, "
                "or choose another run.name"
            )

    def _init_from(self) -> dict:
        path = self.cfg.model.init_from
        try:
            source = load_checkpoint(path)
        except CheckpointError as exc:
            raise ModelError(f"model.init_from: {exc}") from exc
        source_model = source["config"]["model"]["name"]
        if source_model != self.cfg.model.name:
            raise ModelError(
                f"model.init_from: {path} is a {source_model!r}, this run builds {self.cfg.model.name!r}"
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
    def _state(self, kind: str) -> dict:
        """The checkpoint dict (collective: every rank must call it)."""
        rngs = self.ddp.gather(rng_state())
        loaders = self._loader_position or self.ddp.gather(self.train_loader.state_dict())
        return {
            "kind": kind,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": dict(self.best),
            "rng": rngs,
            "loader": loaders,
            "epoch_losses": self.ddp.gather({"sums": dict(self.epoch_sums), "seen": self.epoch_seen}),
            **self._identity(),
        }

    def _identity(self) -> dict:
        cfg, info = self.cfg, self.info
        return {
            "config": cfg.as_dict(),
            "class_mapping": dict(info.class_mapping),
            "model_name": cfg.model.name,
            "preprocessing": {
                "image_size": info.image_size,
                "mean": list(info.mean),
                "std": list(info.std),
                "crop_pct": cfg.data.augment.crop_pct,
                "val_resize": cfg.data.val_resize,
            },
            "temperature": None,
            "world_size": self.ddp.world_size,
        }

    def save_last(self) -> None:
        state = self._state("last")
        if self.ddp.main:
            save_checkpoint(self.run_dir / LAST, state)
        self.ddp.barrier()

    def _save_best(self, metrics: dict) -> None:
        if not self.ddp.main:
            return
        weights = self.eval_model.state_dict()
        save_checkpoint(
            self.run_dir / BEST,
            {
                "kind": "best",
                "model": weights,
                "ema_weights": self.ema is not None and self.cfg.train.ema.evaluate,
                "epoch": self.epoch,
                "step": self.step,
                "metrics": metrics,
                **self._identity(),
            },
        )

    def _restore(self) -> None:
        state = load_checkpoint(self.run_dir / LAST, map_location=self.device)
        if state.get("world_size") != self.ddp.world_size:
            raise TrainingError(
                f"--resume: the checkpoint was written by {state.get('world_size')} rank(s), this run has "
                f"{self.ddp.world_size}; an exact resume needs the same number"
            )
        now = self.cfg.as_dict()
        for section in RESUME_FIXED:
            if state["config"].get(section) != now.get(section):
                raise TrainingError(
                    f"--resume: config section {section!r} differs from the checkpoint's; resume with the "
                    "same config (or start a new run.name)"
                )
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.best = int(state["step"]), int(state["epoch"]), dict(state["best"])
        self.train_loader.load_state_dict(state["loader"][self.ddp.rank])
        partial = state["epoch_losses"][self.ddp.rank]
        self.epoch_sums, self.epoch_seen = dict(partial["sums"]), int(partial["seen"])
        self.log.restore(self.epoch)
        self._resume_state = {"rng": state["rng"]}
        if self.ddp.main:
            log.info("resumed %s at epoch %d, step %d", self.run_dir, self.epoch, self.step)

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
        """Runs (the rest of) ``self.epoch``; returns counts and whether it ended or was stopped."""
        cfg, loader = self.cfg.train, self.train_loader
        loader.set_epoch(self.epoch)
        micro_total = len(loader)
        micro = loader.batches_done  # > 0 when resuming mid-epoch
        self._loader_position = None
        if micro == 0:  # else: resumed mid-epoch, the sums so far came with the checkpoint
            self.epoch_sums, self.epoch_seen = {}, 0
        sums, window, window_seen = self.epoch_sums, {}, 0
        images, wait, stopped = 0, 0.0, False
        group: list[
            torch.Tensor
        ] = []  # per micro-batch: loss terms + valid rows, on the device until the step
        bar = None
        if self.ddp.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=micro_total, initial=micro, desc=f"epoch {self.epoch}", leave=False, dynamic_ncols=True
            )
        window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        window_first = True  # the epoch's first window also holds the loader's start-up
        epoch_start = time.perf_counter()
        iterator = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            waited = time.perf_counter() - t0
            wait += waited
            window_wait += waited
            group_start = (micro // cfg.grad_accum) * cfg.grad_accum
            group_size = min(cfg.grad_accum, micro_total - group_start)
            last_in_group = micro - group_start == group_size - 1
            sync = (
                contextlib.nullcontext()
                if last_in_group or not self.ddp.active
                else self.forward_model.no_sync()
            )
            with sync:
                with autocast(self.device, self.amp_dtype):
                    out = self.objective(self.forward_model, batch)
                self.scaler.scale(out["loss"] / group_size).backward()
            keys = [k for k in ("loss", *self.objective.terms) if k in out]
            group.append(
                torch.stack([*(out[k].detach().float() for k in keys), batch["valid"].sum().float()])
            )
            micro += 1
            if bar is not None:
                bar.update(1)
            if not last_in_group:
                continue
            for row in torch.stack(group).tolist():  # one device sync per optimizer step, not per value
                if not math.isfinite(row[0]):
                    raise TrainingError(f"loss is {row[0]} at epoch {self.epoch}, step {self.step}")
                for key, value in zip(keys, row, strict=False):
                    sums[key] = sums.get(key, 0.0) + value
                    window[key] = window.get(key, 0.0) + value
                images += int(row[-1])
                window_images += int(row[-1])
            self.epoch_seen += len(group)
            window_seen += len(group)
            group = []
            self._optimizer_step()
            if self.step % cfg.log_every == 0:
                now = time.perf_counter()
                span = max(now - window_start, 1e-9)
                scalars = {f"train/{k}": self.ddp.mean(v / window_seen) for k, v in window.items()}
                scalars.update(
                    {
                        "train/lr": self._lr(),
                        "train/images_per_s": window_images * self.ddp.world_size / span,
                        "train/data_wait_fraction": window_wait / span,
                    }
                )
                self._scalars(scalars)
                self.log.window(
                    self.epoch, self.step, window_first, scalars["train/images_per_s"], window_wait / span
                )
                window_first = False
                if bar is not None:
                    bar.set_postfix(loss=f"{window['loss'] / window_seen:.4f}", lr=f"{self._lr():.2e}")
                window_start, window_images, window_wait, window, window_seen = now, 0, 0.0, {}, 0
            done_now = self.step - start_step
            stopped = self.stop_after is not None and done_now >= self.stop_after
            if self.step >= self.total_steps or stopped:
                if micro < micro_total:  # taken while the loader's iterator is alive: the exact position
                    self._loader_position = self.ddp.gather(loader.state_dict())
                break
            if self.step % cfg.checkpoint_every == 0 and micro < micro_total:
                self.save_last()
        if bar is not None:
            bar.close()
        epoch_done = micro >= micro_total
        return {
            "images": images,
            "data_wait_s": wait,
            "seconds": time.perf_counter() - epoch_start,
            "losses": {k: self.ddp.mean(v / max(self.epoch_seen, 1)) for k, v in sums.items()},
            "stopped": stopped,
            "epoch_done": epoch_done,
        }

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


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in values.items()}


def _fmt(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
