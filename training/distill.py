"""Multi-teacher knowledge distillation: frozen teachers, label spaces aligned by species, the KD objective.

Owns ``Teacher`` (a frozen checkpoint network in eval mode, outside DDP, with its own class mapping,
normalisation and image size; it sees the student's augmented view, re-normalised and resized for it),
``TeacherMix`` (every teacher's tempered probabilities mapped into the student's species by name and
mixed by weight), and ``Distillation``, the objective the training loop runs for a student::

    loss = alpha * T^2 * KL(p_mix(T) || p_student(T)) + (1 - alpha) * task(student, label)

with the KL summed over classes and averaged over the batch's valid rows (not over batch x classes,
which would shrink the KD term by the class count). ``task`` is the label term ``distill.task`` names
(objectives.py's ``TaskLoss``: cross-entropy, logit-adjusted or balanced softmax, with label
smoothing); ``task_loss`` is it, ``kd_loss`` is ``T^2 * KL``; both are logged. The KD term always
compares the student's *raw* logits with the teachers'.

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
precomputed on fixed views (soft_labels.py) so a student epoch runs no teacher: the validation view,
or ``distill.cache.views`` stored augmented views that the training loader then replays (each batch
says which view each row is, and the lookup takes that view's mixture). A mixed batch
(Mixup/CutMix, ``train.mix``) reaches the teachers as it reaches the student: online, both see the
same mixed images ("consistent teaching", Beyer et al. 2022, "Knowledge distillation: a good teacher
is patient and consistent"); the task term reads its ``mixed_label``. Cached soft labels belong to
unmixed views, so a config refuses mixing with them. ``per_sample`` mixing of a mixed row follows the
row's own label.

Leaves out: the teachers and their mixture (teachers.py), the loop (loop.py), the cache files
(soft_labels.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from flora.training.config import DistillConfig
from flora.training.objectives import Objective, TaskLoss, build_task_loss, masked_mean, register_objective
from flora.training.soft_labels import ensure_cache
from flora.training.teachers import Teacher, TeacherMix, build_mixer

__all__ = ["Distillation", "Teacher", "TeacherMix", "build_mixer", "kd_terms"]

log = logging.getLogger(__name__)


def kd_terms(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    task: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """``loss = alpha * T^2 * KL(targets || softmax(s / T)) + (1 - alpha) * task``, each term averaged
    over the valid rows; ``task``: the label term per row (``TaskLoss``)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (torch.xlogy(targets, targets) - targets * log_p).sum(dim=1)  # per sample, summed over classes
    kd = masked_mean(kl, valid) * temperature**2
    task_loss = masked_mean(task, valid)
    return {
        "loss": alpha * kd + (1 - alpha) * task_loss,
        "task_loss": task_loss.detach(),
        "kd_loss": kd.detach(),
    }


class Distillation(Objective):
    """The student's objective: KD from the teacher mixture (online or cached) plus the label term."""

    terms = ("task_loss", "kd_loss")

    def __init__(self, cfg: DistillConfig, mixer: TeacherMix, task: TaskLoss | None = None, cache=None):
        super().__init__()
        self.cfg, self.mixer = cfg, mixer
        self.task = task if task is not None else TaskLoss()
        self.cache = cache  # soft_labels.SoftLabels (cached mode) or None

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.lookup(batch["index"], self.mixer.num_classes, batch.get("view"))
        return self.mixer(batch["image"], batch["label"])

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        targets = self.targets(batch)
        logits = model(batch["image"])
        out = kd_terms(
            logits, targets, self.task(logits, batch), batch["valid"], self.cfg.temperature, self.cfg.alpha
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
        if cache.views:  # the student sees the stored views the teachers judged, not fresh random ones
            train_loader.set_replay(cache.replay(train_loader.index.keys, cfg.data.seed))
        mixer.teachers = nn.ModuleList()  # a cached epoch runs no teacher: free their memory
    return Distillation(cfg.distill, mixer, build_task_loss(cfg.distill.task, cfg, info), cache)
