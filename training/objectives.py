"""Objectives: what the one training loop minimises, as modules that return a dict of losses.

Owns the objective registry (``register_objective`` / ``build_objective``), the interface every
objective follows (timm's ``timm/task`` convention): ``objective(model, batch)`` returns
``{'loss': scalar to backpropagate, 'output': the model's logits, 'task_loss': ..., ...}``; more terms
(``kd_loss``) are logged when present. The loop knows nothing else about an objective, so a teacher
(``classification``) and a student (``distill``) train in the same loop.

Also owns the label term every objective shares (``TaskLoss``) and what it reads:

* ``classification``: cross-entropy with label smoothing.
* ``logit_adjusted`` (Menon et al. 2021, "Long-tail learning via logit adjustment", the loss form):
  ``CE(logits + tau * log prior, label)`` in training; predictions use the raw logits, which thus
  estimate the class-balanced posterior. ``prior`` is the training split's class frequencies
  (``LoaderInfo.class_counts``; a class without a training sample counts ``PRIOR_MIN_COUNT``, so its
  log prior is finite).
* ``balanced_softmax`` (Ren et al. 2020, "Balanced meta-softmax"): ``CE(logits + log prior, label)``,
  logit adjustment at ``tau = 1`` under its own name.

Label smoothing applies on top of each (the adjusted logits against the smoothed target), and the
``distill`` objective takes any of them as its label term (``distill.task``).

A mixed batch (mix.py, ``train.mix``) carries ``mixed_label``, the per-row label distribution, which
``TaskLoss`` uses in place of ``label``.

Rows flagged ``valid == False`` (the loaders' ``train_remainder: pad`` filler) carry no loss: every
objective averages over valid rows only.

Leaves out: the optimizer, schedule, AMP and accumulation (loop.py); the class-balanced *sampling*
of a long tail (loaders' ``data.sampling``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Registered objectives: name -> builder(cfg, info, device, **context). A module registers its own
#: with ``@register_objective``; importing the module registers it.
OBJECTIVES: dict[str, Callable[..., Objective]] = {}
#: The label terms (``TaskLoss``): each is also an objective of its own name, and ``distill.task``.
TASKS = ("classification", "logit_adjusted", "balanced_softmax")
#: The objectives that ship with Flora and the module that registers each: ``objective.kind`` is
#: validated against these names when a config loads, before any of them is imported.
BUILTIN = {**dict.fromkeys(TASKS, __name__), "distill": "flora.training.distill"}
#: Logit adjustment's scale when ``objective.tau`` is null: Menon et al.'s choice (tau = 1 is the
#: Bayes-optimal adjustment for the balanced error).
DEFAULT_TAU = 1.0
#: The count a class without training samples takes in the prior: its log prior is then that of a
#: species seen once, finite, instead of -inf (which would make its adjusted logit -inf).
PRIOR_MIN_COUNT = 1


def register_objective(name: str):
    def deco(builder):
        OBJECTIVES[name] = builder
        return builder

    return deco


def objective_names() -> list[str]:
    """Every objective a config may name: the built-in ones and any registered since."""
    return sorted({*BUILTIN, *OBJECTIVES})


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over rows where ``valid`` (0 with a live graph when there are none)."""
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------- the label term
def class_prior(class_counts: Sequence[int]) -> torch.Tensor:
    """The training split's class frequencies (float32, summing to 1), each count at least
    ``PRIOR_MIN_COUNT``."""
    if not len(class_counts):
        raise ValueError("a class prior needs the training split's class counts (LoaderInfo.class_counts)")
    counts = torch.tensor(list(class_counts), dtype=torch.float64).clamp(min=PRIOR_MIN_COUNT)
    return (counts / counts.sum()).float()


class TaskLoss(nn.Module):
    """Per-row cross-entropy against the label (or a mixed batch's ``mixed_label``) with label
    smoothing, on the logits plus a fixed per-class ``adjustment`` (``tau * log prior``; None: plain)."""

    def __init__(self, label_smoothing: float = 0.0, adjustment: torch.Tensor | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("adjustment", adjustment, persistent=False)

    def forward(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = logits.float()
        if self.adjustment is not None:
            logits = logits + self.adjustment
        target = batch["mixed_label"] if "mixed_label" in batch else batch["label"]
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")


def build_task_loss(kind: str, cfg, info) -> TaskLoss:
    """The label term ``kind`` (one of ``TASKS``) of an experiment: label smoothing from
    ``train.label_smoothing``, ``tau`` from ``objective.tau``, the prior from ``info.class_counts``."""
    smoothing = cfg.train.label_smoothing
    if kind == "classification":
        return TaskLoss(smoothing)
    if kind not in TASKS:
        raise ValueError(f"task loss: expected one of {list(TASKS)}, got {kind!r}")
    if len(info.class_counts) != info.num_classes:
        raise ValueError(
            f"{kind}: info.class_counts has {len(info.class_counts)} classes, the run {info.num_classes}"
        )
    sampling = cfg.data.sampling
    if sampling.policy != "uniform" or sampling.streams:
        log.warning(
            "%s adjusts for the training split's class prior, but data.sampling (policy %s%s) changes the "
            "classes' frequencies in the batches: the two corrections add up",
            kind, sampling.policy, ", streams" if sampling.streams else "",
        )  # fmt: skip
    tau = 1.0  # balanced softmax
    if kind == "logit_adjusted":
        tau = DEFAULT_TAU if cfg.objective.tau is None else cfg.objective.tau
    return TaskLoss(smoothing, tau * class_prior(info.class_counts).log())


# -------------------------------------------------------------------------------------- objectives
class Objective(nn.Module):
    """Base: subclasses implement ``forward(model, batch) -> dict`` with at least ``loss`` and ``output``."""

    #: Extra loss terms the loop should log, besides ``loss``.
    terms: tuple[str, ...] = ("task_loss",)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Classification(Objective):
    """The label term alone (teachers): cross-entropy, logit-adjusted or balanced softmax."""

    def __init__(self, task: TaskLoss | None = None):
        super().__init__()
        self.task = task if task is not None else TaskLoss()

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        loss = masked_mean(self.task(logits, batch), batch["valid"])
        return {"loss": loss, "output": logits, "task_loss": loss.detach()}


def _classification(cfg, info, device, **context) -> Classification:  # noqa: ARG001 - uniform signature
    return Classification(build_task_loss(cfg.objective.kind, cfg, info))


for _kind in TASKS:
    register_objective(_kind)(_classification)


def build_objective(cfg, info, device: torch.device, **context) -> Objective:
    """The objective named by ``cfg.objective.kind``, built from the experiment config and loader info.

    ``context``: what some objectives need from the run (``train_loader``, ``ddp``).
    """
    kind = cfg.objective.kind
    if kind not in OBJECTIVES:
        where = f" (import {BUILTIN[kind]} to register it)" if kind in BUILTIN else ""
        raise ValueError(
            f"objective.kind: {kind!r} is not registered{where}; registered: {sorted(OBJECTIVES)}"
        )
    return OBJECTIVES[kind](cfg, info, device, **context)
