"""Multi-teacher knowledge distillation: frozen teachers, label spaces aligned by species, the KD objective.

Owns ``Teacher`` (a frozen checkpoint network in eval mode, outside DDP, with its own class mapping,
normalisation and image size; it sees the student's augmented view, re-normalised and resized for it),
``TeacherMix`` (every teacher's tempered probabilities mapped into the student's species by name and
mixed by weight), and ``Distillation``, the objective the training loop runs for a student::

    loss = alpha * T^2 * KL(p_mix(T) || p_student(T)) + (1 - alpha) * CE(student, label)

with the KL summed over classes and averaged over the batch's valid rows (not over batch x classes,
which would shrink the KD term by the class count). ``task_loss`` is the CE, ``kd_loss`` is
``T^2 * KL``; both are logged.

Label spaces. Teacher ``t`` (weight ``w_t``) gives ``q_t``: its softmax at temperature T over *its*
classes, restricted to the species the student also has (matched by name) and renormalised there;
species the student lacks carry no mass. A student species teacher ``t`` does not know gets nothing
from ``t``. Mixing rules (``distill.mixing``):

* ``per_class`` (default): ``m[c] = sum_t w_t q_t[c] / sum_{t knows c} w_t`` (each species averaged
  over the teachers that know it; species no teacher knows get 0), then ``m`` renormalised to sum 1.
  A regional teacher thus sharpens its region's species without diluting the others.
* ``per_sample``: only teachers that know the sample's label take part, weights renormalised over
  them (``m = sum_t w_t a_t q_t / sum_t w_t a_t``, ``a_t = 1`` if t knows the label); when none
  does, all teachers take part.

Soft labels come from the teachers online (every batch), or from the cache of top-k mixtures
precomputed on fixed views (soft_labels.py) so a student epoch runs no teacher.

Leaves out: the teachers and their mixture (teachers.py), the loop (loop.py), the cache files
(soft_labels.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from flora.training.config import DistillConfig
from flora.training.objectives import Objective, masked_mean, register_objective
from flora.training.soft_labels import ensure_cache
from flora.training.teachers import Teacher, TeacherMix, build_mixer

__all__ = ["Distillation", "Teacher", "TeacherMix", "build_mixer", "kd_terms"]

log = logging.getLogger(__name__)


def kd_terms(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """``loss = alpha * T^2 * KL(targets || softmax(s / T)) + (1 - alpha) * CE(s, label)``, batch-averaged."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (torch.xlogy(targets, targets) - targets * log_p).sum(dim=1)  # per sample, summed over classes
    kd = masked_mean(kl, valid) * temperature**2
    ce = masked_mean(
        F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing, reduction="none"),
        valid,
    )
    return {"loss": alpha * kd + (1 - alpha) * ce, "task_loss": ce.detach(), "kd_loss": kd.detach()}


class Distillation(Objective):
    """The student's objective: KD from the teacher mixture (online or cached) plus label CE."""

    terms = ("task_loss", "kd_loss")

    def __init__(self, cfg: DistillConfig, mixer: TeacherMix, label_smoothing: float, cache=None):
        super().__init__()
        self.cfg, self.mixer, self.label_smoothing = cfg, mixer, label_smoothing
        self.cache = cache  # soft_labels.SoftLabels (cached mode) or None

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.lookup(batch["index"], self.mixer.num_classes)
        return self.mixer(batch["image"], batch["label"])

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        targets = self.targets(batch)
        logits = model(batch["image"])
        out = kd_terms(
            logits,
            targets,
            batch["label"],
            batch["valid"],
            self.cfg.temperature,
            self.cfg.alpha,
            self.label_smoothing,
        )
        out["output"] = logits
        return out


@register_objective("distill")
def _distillation(cfg, info, device, train_loader=None, ddp=None) -> Distillation:
    """The ``distill`` objective of an experiment (its ``distill`` section)."""
    mixer = build_mixer(cfg.distill, info).to(device)
    cache = None
    if cfg.distill.soft_labels == "cached":
        if train_loader is None:
            raise ValueError("distill.soft_labels: cached needs the training loader's sample index")
        cache = ensure_cache(cfg, mixer, train_loader.index, device, ddp)
        mixer.teachers = nn.ModuleList()  # a cached epoch runs no teacher: free their memory
    return Distillation(cfg.distill, mixer, cfg.train.label_smoothing, cache)
