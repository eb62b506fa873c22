"""The training loop: one loop for every objective (teachers now, the distilled student later).

Owns a run from start to summary: process group (torchrun's environment; NCCL on GPUs, gloo on the
CPU), loaders (``loaders.create_dataloaders``), model (models.py) and objective (objectives.py),
timm's optimizer (weight-decay groups, optional layer decay) and scheduler (stepped per optimizer
update: warmup, then cosine), AMP (bf16 on a GPU; fp16 with a GradScaler on request), gradient
accumulation (``no_sync`` on all but the last micro-batch), clipping, EMA (timm ``ModelEmaV3``),
``torch.compile``, channels_last, DDP; validation each ``eval_every`` epochs with exact metrics across
ranks; ``last_checkpoint.pt`` every ``checkpoint_every`` steps and each epoch, ``best_model.pt`` by
validation top-1; TensorBoard scalars, ``metrics.json`` and a progress bar on rank 0.

Resume: ``resume=True`` restores model, optimizer, scheduler, scaler, EMA, counters, every rank's
RNG states and loader position from ``last_checkpoint.pt``; on the CPU a resumed run reaches the
same weights as an uninterrupted one (tests/training/test_resume.py). ``stop_after`` ends a run
cleanly after that many optimizer steps with a checkpoint written, as a preempted job would.

Leaves out: what the loss is (objectives.py), the file format (checkpoint.py), metrics (metrics.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from flora.distributed import torchrun_env
from flora.errors import FloraError
from loaders import create_dataloaders
from loaders.base import EpochLoader

from .checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ExperimentConfig
from .metrics import Predictions, summarize
from .models import ModelError, build_model, init_from_checkpoint
from .objectives import Objective, build_objective

log = logging.getLogger(__name__)

#: Config sections a resume must not change (the rest, e.g. train.progress or run.root, may differ).
RESUME_FIXED = ("data", "model", "optim", "schedule", "objective", "distill")


class TrainingError(FloraError, RuntimeError):
    """A run cannot start or continue as configured."""


# --------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def gather(self, obj):
        """Every rank's ``obj``, in rank order (one element when not distributed)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device_kind: str) -> Dist:
    """The process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)."""
    env = torchrun_env()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    if world_size > 1 and not dist.is_initialized():
        use_nccl = device_kind != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return Dist(rank, world_size, local_rank)


# ------------------------------------------------------------------------------------------------ AMP
def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ evaluate
@torch.no_grad()
def predict(
    model: nn.Module,
    loader: EpochLoader,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    keep_logits: bool = False,
) -> Predictions:
    """This rank's predictions over one epoch of ``loader`` (validation/test: each sample once)."""
    was_training = model.training
    model.eval()
    preds = Predictions.keeping_logits() if keep_logits else Predictions()
    loader.set_epoch(epoch)
    for batch in loader:
        with autocast(device, amp_dtype):
            logits = model(batch["image"])
        preds.add(logits, batch["label"], batch["index"], batch["valid"])
    model.train(was_training)
    return preds


def gather_predictions(model, loader, device, amp_dtype, ddp: Dist, keep_logits: bool = False) -> dict:
    """Every rank's predictions over one pass of ``loader``, merged on every rank and checked: each
    sample of the split exactly once."""
    preds = predict(model, loader, 0, device, amp_dtype, keep_logits=keep_logits)
    merged = Predictions.merge(ddp.gather(preds.arrays()))
    if len(merged["index"]) != len(loader.index):
        raise TrainingError(
            f"evaluation of {loader.index.split!r} counted {len(merged['index'])} samples, "
            f"the split has {len(loader.index)}"
        )
    return merged


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``model`` in DDP as every rank runs it: on a GPU one device per process (``device_ids``, output
    on it); on the CPU (gloo) the same call without them. Gradients are views of DDP's all-reduce
    buckets (no second copy of every gradient: less memory, one copy fewer per step)."""
    ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, output_device=ids[0] if ids else None, gradient_as_bucket_view=True
    )


def destroy_distributed() -> None:
    """Ends the process group, if one was started (entry points call it on the way out)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
        self.history: list[dict] = []
        #: One row per ``log_every`` window (this session): throughput and data wait as they went.
        self.windows: list[dict] = []
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
        self.writer = None

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
        metrics_file = self.run_dir / "metrics.json"
        if metrics_file.is_file():
            history = json.loads(metrics_file.read_text()).get("epochs", [])
            self.history = [h for h in history if h["epoch"] < self.epoch]
        self._resume_state = {"rng": state["rng"]}
        if self.ddp.main:
            log.info("resumed %s at epoch %d, step %d", self.run_dir, self.epoch, self.step)

    # ------------------------------------------------------------------------------------ training
    @property
    def eval_model(self) -> nn.Module:
        if self.ema is not None and self.cfg.train.ema.evaluate:
            return self.ema.module
        return self.model

    def _writer(self):
        if self.writer is None and self.ddp.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)
        return self.writer

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        writer = self._writer()
        if writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    writer.add_scalar(key, value, step)

    def fit(self) -> dict:
        """Trains to ``total_steps`` (or ``stop_after``), validating and checkpointing; the summary."""
        if self.ddp.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
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
                self._log_scalars({f"val/{k}": v for k, v in val.items() if k != "samples"}, self.step)
                if self.best["value"] is None or val["top1"] > self.best["value"]:
                    self.best = {"metric": "top1", "value": val["top1"], "epoch": epoch, "step": self.step}
                    self._save_best(val)
            self.history.append(record)
            self.epoch = epoch + 1 if stats["epoch_done"] else epoch
            self.save_last()
            self._write_metrics()
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
        self._write_metrics(summary)
        if self.ddp.main and self.history:
            from .plots import training_curves

            training_curves(self.history, self.run_dir / "curves.png", title=self.cfg.run.name)
        if self.writer is not None:
            self.writer.close()
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
                self._log_scalars(scalars, self.step)
                self.windows.append(
                    {
                        "epoch": self.epoch,
                        "step": self.step,
                        "first_in_epoch": window_first,
                        "images_per_s": scalars["train/images_per_s"],
                        "data_wait_fraction": scalars["train/data_wait_fraction"],
                    }
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

    def _write_metrics(self, summary: dict | None = None) -> None:
        if not self.ddp.main:
            return
        path = self.run_dir / "metrics.json"
        data = {"epochs": self.history}
        if summary is not None:
            data["summary"] = summary
        elif path.is_file():
            previous = json.loads(path.read_text())
            if "summary" in previous:
                data["summary"] = previous["summary"]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in values.items()}


def _fmt(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
