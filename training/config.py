"""The training config: one YAML per experiment, typed and validated on load, dotted overrides.

Owns ``ExperimentConfig`` and its sections: ``run`` (name and folder), ``data`` (``loaders``'
``DataConfig``, unchanged), ``model`` (timm name, weights, ``init_from``), ``optim`` (timm optimizer,
learning rate, weight decay, clipping), ``schedule`` (timm scheduler, warmup), ``train`` (epochs,
steps, accumulation, AMP, EMA, Mixup/CutMix, compile, checkpoints) and ``objective`` (what the loop
minimises, with logit adjustment's ``tau``). Values derived from several sections (the learning rate
scaled by the global batch) are computed here once (``effective_lr``), not in the loop; checks that
span sections (a ``tau`` no loss uses, mixing with cached soft labels) are made in
``load_experiment``.

Leaves out: what the objectives need beyond their name (objectives.py reads its own section) and
anything the data config already says (the loaders own it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flora.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from flora.loaders.config import DataConfig
from flora.loaders.views import MAX_VIEWS

SECTIONS = ("run", "data", "model", "optim", "schedule", "train", "objective", "distill")


@dataclass
class RunConfig:
    name: str = "experiment"  # the run folder is <root>/<name>
    root: str = "runs"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name: expected a folder name without '/', got {self.name!r}")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"  # any timm model name
    #: ImageNet weights: from ``pretrained_path`` (safetensors or a timm/torch checkpoint) when set,
    #: else from the Hugging Face hub (online only; offline that is an error, not a hang).
    pretrained: bool = False
    pretrained_path: str | None = None
    #: A Flora checkpoint (e.g. the global teacher's best_model.pt): backbone copied, head rows copied
    #: by species name into this run's class mapping.
    init_from: str | None = None
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.pretrained_path and not self.pretrained:
            raise ConfigError(
                "model.pretrained_path is set but model.pretrained is false; set pretrained: true"
            )
        if self.pretrained and self.init_from:
            raise ConfigError("model: pretrained and init_from both load weights; choose one")
        for name in ("drop_path_rate", "drop_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: expected [0, 1), got {getattr(self, name)}")


@dataclass
class OptimConfig:
    name: str = "adamw"  # timm.optim.create_optimizer_v2 name
    lr: float = 1e-5
    #: When set, the lr is for this global batch and is scaled linearly to the actual global batch
    #: (batch_size x grad_accum x world_size); null uses ``lr`` as given.
    lr_base_batch: int | None = None
    weight_decay: float = 0.05  # not applied to biases, norms and tokens (timm's param groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    layer_decay: float | None = None  # ViT layer-wise lr decay (timm), e.g. 0.75
    clip_grad: float | None = 1.0  # max global gradient norm; null = no clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: expected >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad: expected > 0 or null, got {self.clip_grad}")
        if self.lr_base_batch is not None and self.lr_base_batch < 1:
            raise ConfigError(f"optim.lr_base_batch: expected >= 1 or null, got {self.lr_base_batch}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay: expected (0, 1] or null, got {self.layer_decay}")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "tanh", "poly"] = "cosine"  # timm scheduler, stepped per optimizer update
    warmup_epochs: int = 1
    warmup_lr: float = 1e-7
    min_lr: float = 1e-7

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            raise ConfigError(f"schedule.warmup_epochs: expected >= 0, got {self.warmup_epochs}")
        if self.min_lr < 0 or self.warmup_lr < 0:
            raise ConfigError(
                f"schedule: min_lr / warmup_lr must be >= 0, got {self.min_lr} / {self.warmup_lr}"
            )


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9998
    #: Validate (and pick best_model.pt) with the EMA weights instead of the raw ones.
    evaluate: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise ConfigError(f"train.ema.decay: expected (0, 1), got {self.decay}")


@dataclass
class MixConfig:
    """Mixup / CutMix on training batches (mix.py: ``BatchMix``); off while both alphas are 0."""

    mixup_alpha: float = 0.0  # > 0: mixup, the batch blended with its reverse by lam ~ Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0: cutmix, a box of ~(1 - lam) of the area pasted from the reverse
    prob: float = 1.0  # share of training batches mixed
    switch_prob: float = 0.5  # both on: share of the mixed batches that use cutmix

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"train.mix.{name}: expected >= 0 (0: off), got {getattr(self, name)}")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.mix.{name}: expected [0, 1], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass
class TrainConfig:
    epochs: int = 15
    #: Stop after this many optimizer steps (smoke runs); the schedule is laid out over the shorter
    #: of ``epochs`` and ``max_steps``.
    max_steps: int | None = None
    grad_accum: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.1
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on a GPU, off on the CPU
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # model memory format (set data.channels_last too for the inputs)
    ema: EmaConfig = field(default_factory=EmaConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    checkpoint_every: int = 500  # optimizer steps between last_checkpoint.pt writes (and each epoch)
    eval_every: int = 1  # epochs between validations
    log_every: int = 20  # optimizer steps between scalar logs
    seed: int = 0
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum", "checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: expected >= 1 or null, got {self.max_steps}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: expected [0, 1), got {self.label_smoothing}")


@dataclass
class ObjectiveConfig:
    #: A registered objective (training/objectives.py: ``objective_names()``): ``classification``,
    #: ``logit_adjusted``, ``balanced_softmax``, ``distill`` or one registered by the user.
    kind: str = "classification"
    #: Logit adjustment's scale: training adds ``tau * log prior`` to the logits. Only for
    #: ``logit_adjusted`` (and ``distill`` with ``distill.task: logit_adjusted``); null = 1.0.
    tau: float | None = None

    def __post_init__(self) -> None:
        from flora.training.objectives import objective_names

        if self.kind not in objective_names():
            raise ConfigError(f"objective.kind: expected one of {objective_names()}, got {self.kind!r}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau >= 0):
            raise ConfigError(f"objective.tau: expected >= 0 (null: 1.0), got {self.tau}")


@dataclass
class TeacherConfig:
    checkpoint: str = ""  # a Flora checkpoint (best_model.pt of a teacher run)
    weight: float = 1.0  # its share of the mixture (renormalised over the teachers; see objectives.py)
    name: str | None = None  # for logs and reports; default: the checkpoint's run folder

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("distill.teachers[].checkpoint: a teacher checkpoint path is required")
        if self.weight <= 0:
            raise ConfigError(f"distill.teachers[].weight: expected > 0, got {self.weight}")


@dataclass
class SoftLabelCacheConfig:
    #: Where the cache lives; null = ``soft_labels/`` under the cache root (``data.cache_root``; never
    #: inside the shard store), one folder per key.
    dir: str | None = None
    top_k: int = 20  # mixture probabilities kept per sample (renormalised over the kept classes)
    #: 0: one entry per sample, the teachers on the fixed validation view. N >= 1: N stored augmented
    #: views per sample (crop box, flip, rotation, colour from ``data.augment``'s ranges; loaders/views.py),
    #: each with the teachers' top-k; the training loader replays them (view ``(h(key) + epoch) mod N``),
    #: so the student sees the very crops the teachers judged. Costs N teacher passes once, N x the
    #: cache's size, and the student's own random augmentation (it sees N views per sample in all).
    views: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"distill.cache.top_k: expected >= 1, got {self.top_k}")
        if not 0 <= self.views <= MAX_VIEWS:
            raise ConfigError(f"distill.cache.views: expected 0..{MAX_VIEWS}, got {self.views}")


@dataclass
class DistillConfig:
    """Multi-teacher knowledge distillation (objectives.py: ``Distillation``)."""

    teachers: list[TeacherConfig] = field(default_factory=list)
    temperature: float = 3.0
    alpha: float = 0.7  # weight of the KD term; 1 - alpha on the label cross-entropy
    #: How teachers that do not know a species are handled: ``per_class`` (each species' mixture is
    #: over the teachers that know it, weights renormalised per species, then the mixture renormalised)
    #: or ``per_sample`` (a teacher takes part in a sample's mixture only if it knows the sample's label).
    mixing: Literal["per_class", "per_sample"] = "per_class"
    #: The label term: cross-entropy (``classification``), or the long-tail losses ``logit_adjusted``
    #: (with ``objective.tau``) and ``balanced_softmax`` (objectives.py).
    task: Literal["classification", "logit_adjusted", "balanced_softmax"] = "classification"
    #: ``online``: teachers run on every batch, on the student's augmented view; ``cached``: their top-k
    #: mixture is precomputed once per sample (on the fixed validation view, or on ``cache.views``
    #: stored augmented views that the loader replays) and read from disk.
    soft_labels: Literal["online", "cached"] = "online"
    cache: SoftLabelCacheConfig = field(default_factory=SoftLabelCacheConfig)

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("distill.teachers: at least one teacher is required")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature: expected > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha: expected [0, 1], got {self.alpha}")


@dataclass
class ExperimentConfig:
    data: DataConfig
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    #: The distillation section (teachers, temperature, alpha); used when ``objective.kind`` is ``distill``.
    distill: DistillConfig | None = None

    def effective_lr(self, world_size: int) -> float:
        """The peak learning rate: ``optim.lr``, scaled to the global batch when ``lr_base_batch`` is set."""
        if self.optim.lr_base_batch is None:
            return self.optim.lr
        return self.optim.lr * self.global_batch(world_size) / self.optim.lr_base_batch

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step: ``data.batch_size x train.grad_accum x world_size``."""
        return self.data.batch_size * self.train.grad_accum * world_size

    def as_dict(self) -> dict:
        return to_dict(self)


def model_preprocessing(raw: dict) -> dict:
    """A copy of ``raw`` with what the config leaves unset taken from the timm model's
    ``pretrained_cfg``: ``data.augment.mean``/``std``/``crop_pct`` and ``data.image_size``
    (timm's ``resolve_data_config`` does the same). Values the config sets are kept."""
    data = raw.get("data")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if not isinstance(data, dict):
        return raw
    try:
        import timm

        pretrained = timm.get_pretrained_cfg(model.get("name", ModelConfig.name))
    except (ImportError, RuntimeError, ValueError):
        pretrained = None
    if pretrained is None:  # an unknown model: build_model reports it
        return raw
    raw = {**raw, "data": {**data}}
    augment = raw["data"].get("augment")
    augment = {**augment} if isinstance(augment, dict) else {}
    augment.setdefault("mean", list(pretrained.mean))
    augment.setdefault("std", list(pretrained.std))
    if pretrained.crop_pct:
        augment.setdefault("crop_pct", float(pretrained.crop_pct))
    raw["data"]["augment"] = augment
    raw["data"].setdefault("image_size", int(pretrained.input_size[-1]))
    return raw


def load_experiment(source: str | Path | dict, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment from a YAML path (or a mapping) plus ``section.key=value`` overrides.

    Every section is checked: unknown sections and keys are errors naming the dotted key.
    """
    raw = read_yaml(source) if not isinstance(source, dict) else source
    raw = model_preprocessing(apply_overrides(raw, overrides))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source if not isinstance(source, dict) else 'config'}: unknown section(s) "
                          f"{unknown}; expected some of {list(SECTIONS)}")  # fmt: skip
    if "data" not in raw:
        raise ConfigError("config: no 'data' section (expected data: {shards: ..., ...})")
    cfg = ExperimentConfig(
        data=from_dict(DataConfig, _section(raw, "data"), "data"),
        run=from_dict(RunConfig, _section(raw, "run"), "run"),
        model=from_dict(ModelConfig, _section(raw, "model"), "model"),
        optim=from_dict(OptimConfig, _section(raw, "optim"), "optim"),
        schedule=from_dict(ScheduleConfig, _section(raw, "schedule"), "schedule"),
        train=from_dict(TrainConfig, _section(raw, "train"), "train"),
        objective=from_dict(ObjectiveConfig, _section(raw, "objective"), "objective"),
        distill=from_dict(DistillConfig, raw["distill"], "distill") if raw.get("distill") else None,
    )
    if cfg.objective.kind == "distill" and not cfg.distill:
        raise ConfigError(
            "objective.kind: 'distill' needs a 'distill' section (teachers, temperature, alpha)"
        )
    if cfg.objective.kind != "distill" and cfg.distill:
        raise ConfigError(f"distill: a distill section with objective.kind={cfg.objective.kind!r}; "
                          "set objective.kind: distill or remove the section")  # fmt: skip
    _check_across_sections(cfg)
    return cfg


def _check_across_sections(cfg: ExperimentConfig) -> None:
    """What one section's ``__post_init__`` cannot see: a ``tau`` no loss uses, mixing the teachers
    would not see."""
    task = cfg.distill.task if cfg.objective.kind == "distill" else cfg.objective.kind
    if cfg.objective.tau is not None and task != "logit_adjusted":
        where = f"distill.task: {task}" if cfg.objective.kind == "distill" else f"objective.kind: {task}"
        raise ConfigError(
            f"objective.tau: only logit_adjusted uses it (objective.kind, or distill.task), got "
            f"{cfg.objective.tau} with {where}"
        )
    if cfg.train.mix.enabled and cfg.distill and cfg.distill.soft_labels == "cached":
        raise ConfigError(
            "train.mix: mixup/cutmix need distill.soft_labels: online (the teachers see each mixed "
            "batch); cached soft labels are the teachers' outputs on unmixed fixed views"
        )


#: Keys a resume-fixed section gained after runs were checkpointed, each with the value that keeps
#: such a run's behaviour: a checkpoint's config without them compares as if it held them (loop.py).
ADDED_KEYS = {
    "objective": {"tau": None},
    "distill": {"task": "classification", "cache": {"views": 0}},
}


def with_added_keys(section: str, values: dict | None) -> dict | None:
    """A checkpoint's config ``section`` with the keys added since filled in (``ADDED_KEYS``; a nested
    mapping is filled in key by key)."""
    return _fill(ADDED_KEYS.get(section, {}), values)


def _fill(added: dict, values):
    if not isinstance(values, dict):
        return values
    out = dict(values)
    for key, default in added.items():
        if isinstance(default, dict):
            if key in out:
                out[key] = _fill(default, out[key])
        elif key not in out:
            out[key] = default
    return out


def _section(raw: dict, name: str) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
    return section
