"""The teachers of a distillation: frozen checkpoint networks, their label spaces aligned by species.

Owns ``Teacher`` (a frozen checkpoint network in eval mode, outside DDP, with its own class mapping,
normalisation and image size; it sees the student's augmented view, re-normalised and resized for it),
``TeacherMix`` (every teacher's tempered probabilities mapped into the student's species by name and
mixed by weight; the mixing rules are described in distill.py) and ``build_mixer`` (both from a
``distill`` config section). Used by the objective (distill.py) and the soft-label cache
(soft_labels.py), which both need the teachers and neither needs the other's module.

Leaves out: the KD loss (distill.py), the cache files (soft_labels.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flora.training.checkpoint import Preprocessing, load_checkpoint
from flora.training.config import DistillConfig, TeacherConfig
from flora.training.models import ModelError, model_from_checkpoint

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """A frozen teacher network with its class mapping and preprocessing."""

    def __init__(
        self, network: nn.Module, class_mapping: dict[str, int], preprocessing: Preprocessing, name: str
    ):
        super().__init__()
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.class_mapping, self.name = class_mapping, name
        self.image_size = preprocessing.image_size
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> Teacher:
        try:
            checkpoint = load_checkpoint(cfg.checkpoint)
        except Exception as exc:
            raise ModelError(f"distill.teachers: {exc}") from exc
        name = cfg.name or Path(cfg.checkpoint).resolve().parent.name
        return cls(
            model_from_checkpoint(checkpoint), checkpoint.class_mapping, checkpoint.preprocessing, name
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
