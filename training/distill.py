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

Leaves out: the loop (loop.py), the cache files (soft_labels.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint
from .config import DistillConfig, TeacherConfig
from .models import ModelError, model_from_checkpoint
from .objectives import Objective, masked_mean, register_objective

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """A frozen teacher network with its class mapping and preprocessing."""

    def __init__(self, network: nn.Module, class_mapping: dict[str, int], preprocessing: dict, name: str):
        super().__init__()
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.class_mapping, self.name = class_mapping, name
        self.image_size = int(preprocessing["image_size"])
        self.register_buffer("mean", torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing["std"]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> Teacher:
        try:
            checkpoint = load_checkpoint(cfg.checkpoint)
        except Exception as exc:
            raise ModelError(f"distill.teachers: {exc}") from exc
        name = cfg.name or Path(cfg.checkpoint).resolve().parent.name
        return cls(
            model_from_checkpoint(checkpoint), checkpoint["class_mapping"], checkpoint["preprocessing"], name
        )

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Logits for the student's batch ``images`` (normalised with ``mean``/``std``): the same view,
        re-normalised with the teacher's own statistics and resized to its image size."""
        x = images.float() * (std / self.std) + (mean - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.network(x.contiguous()).float()


class TeacherMix(nn.Module):
    """Teachers' tempered probabilities mapped into the student's species and mixed (see module doc)."""

    def __init__(
        self,
        teachers: list[Teacher],
        weights: list[float],
        student_mapping: dict[str, int],
        temperature: float,
        mixing: str,
        student_mean: list[float],
        student_std: list[float],
    ):
        super().__init__()
        if mixing not in ("per_class", "per_sample"):
            raise ValueError(f"mixing: expected per_class or per_sample, got {mixing!r}")
        self.teachers = nn.ModuleList(teachers)
        self.temperature, self.mixing, self.num_classes = temperature, mixing, len(student_mapping)
        total = sum(weights)
        self.register_buffer("weights", torch.tensor([w / total for w in weights]), persistent=False)
        known = torch.zeros(len(teachers), self.num_classes, dtype=torch.bool)
        for t, teacher in enumerate(teachers):
            student_ids, teacher_ids = [], []
            for name, s in student_mapping.items():
                if name in teacher.class_mapping:
                    student_ids.append(s)
                    teacher_ids.append(teacher.class_mapping[name])
            if not student_ids:
                raise ModelError(
                    f"teacher {teacher.name!r} shares no species with the student's class mapping"
                )
            known[t, student_ids] = True
            self.register_buffer(f"student_ids_{t}", torch.tensor(student_ids), persistent=False)
            self.register_buffer(f"teacher_ids_{t}", torch.tensor(teacher_ids), persistent=False)
            log.info(
                "teacher %s: %d of the student's %d species", teacher.name, len(student_ids), self.num_classes
            )
        self.register_buffer("known", known, persistent=False)
        self.register_buffer("mean", torch.tensor(student_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(student_std).view(1, 3, 1, 1), persistent=False)

    def coverage(self) -> dict[str, int]:
        return {teacher.name: int(self.known[t].sum()) for t, teacher in enumerate(self.teachers)}

    def mapped(self, t: int, logits: torch.Tensor) -> torch.Tensor:
        """Teacher ``t``'s tempered probabilities in the student's species (renormalised over those)."""
        probs = (logits / self.temperature).softmax(dim=1)
        q = probs.new_zeros(probs.shape[0], self.num_classes)
        q[:, getattr(self, f"student_ids_{t}")] = probs[:, getattr(self, f"teacher_ids_{t}")]
        return q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def mix(self, mapped: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The mixture of already-mapped teacher distributions (rows sum to 1)."""
        q = torch.stack(mapped)  # teachers x batch x classes
        w = self.weights.view(-1, 1, 1)
        if self.mixing == "per_class":
            denominator = (self.weights.view(-1, 1) * self.known).sum(dim=0)  # classes
            m = (w * q).sum(dim=0) / denominator.clamp_min(1e-12)
            m = m * (denominator > 0)
        else:
            takes_part = self.known[:, labels].float()  # teachers x batch
            none = takes_part.sum(dim=0) == 0
            takes_part[:, none] = 1.0
            sample_w = self.weights.view(-1, 1) * takes_part
            sample_w = sample_w / sample_w.sum(dim=0, keepdim=True)
            m = (sample_w.unsqueeze(-1) * q).sum(dim=0)
        return m / m.sum(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mapped = [
            self.mapped(t, teacher(images, self.mean, self.std)) for t, teacher in enumerate(self.teachers)
        ]
        return self.mix(mapped, labels)


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


def build_mixer(cfg: DistillConfig, info) -> TeacherMix:
    teachers = [Teacher.from_config(t) for t in cfg.teachers]
    return TeacherMix(
        teachers,
        [t.weight for t in cfg.teachers],
        info.class_mapping,
        cfg.temperature,
        cfg.mixing,
        info.mean,
        info.std,
    )


@register_objective("distill")
def _distillation(cfg, info, device, train_loader=None, ddp=None) -> Distillation:
    """The ``distill`` objective of an experiment (its ``distill`` section)."""
    mixer = build_mixer(cfg.distill, info).to(device)
    cache = None
    if cfg.distill.soft_labels == "cached":
        from .soft_labels import ensure_cache

        if train_loader is None:
            raise ValueError("distill.soft_labels: cached needs the training loader's sample index")
        cache = ensure_cache(cfg, mixer, train_loader.index, device, ddp)
        mixer.teachers = nn.ModuleList()  # a cached epoch runs no teacher: free their memory
    return Distillation(cfg.distill, mixer, cfg.train.label_smoothing, cache)
