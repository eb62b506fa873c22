"""Objectives: what the one training loop minimises, as modules that return a dict of losses.

Owns the objective registry (``register_objective`` / ``build_objective``) and the interface every
objective follows (timm's ``timm/task`` convention): ``objective(model, batch)`` returns
``{'loss': scalar to backpropagate, 'output': the model's logits, 'task_loss': ..., ...}``; more terms
(``kd_loss``) are logged when present. The loop knows nothing else about an objective, so a teacher
(``classification``) and a student (``distill``) train in the same loop.

Rows flagged ``valid == False`` (the loaders' ``train_remainder: pad`` filler) carry no loss: every
objective averages over valid rows only.

Leaves out: the optimizer, schedule, AMP and accumulation (loop.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Registered objectives: name -> builder(cfg, info, device, **context). A module registers its own
#: with ``@register_objective``; importing the module registers it.
OBJECTIVES: dict[str, Callable[..., Objective]] = {}
#: The objectives that ship with Flora and the module that registers each: ``objective.kind`` is
#: validated against these names when a config loads, before any of them is imported.
BUILTIN = {"classification": __name__, "distill": "flora.training.distill"}


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


class Objective(nn.Module):
    """Base: subclasses implement ``forward(model, batch) -> dict`` with at least ``loss`` and ``output``."""

    #: Extra loss terms the loop should log, besides ``loss``.
    terms: tuple[str, ...] = ("task_loss",)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Classification(Objective):
    """Cross-entropy with label smoothing (teachers)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        per_sample = F.cross_entropy(
            logits.float(), batch["label"], label_smoothing=self.label_smoothing, reduction="none"
        )
        loss = masked_mean(per_sample, batch["valid"])
        return {"loss": loss, "output": logits, "task_loss": loss.detach()}


@register_objective("classification")
def _classification(cfg, info, device, **context) -> Classification:  # noqa: ARG001 - uniform signature
    return Classification(label_smoothing=cfg.train.label_smoothing)


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
