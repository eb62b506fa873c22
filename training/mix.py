"""Mixed batches: Mixup and CutMix as batch operations of the training loop (``train.mix``).

Owns ``BatchMix``: the loop may replace a training batch by its Mixup or CutMix (one draw per batch,
from torch's RNG, so a resumed run draws the same); the batch then carries ``mixed_label``, the
per-row label distribution (``lam`` of the row's own one-hot, ``1 - lam`` of its partner's), which
every objective's label term (objectives.py, ``TaskLoss``) uses in place of ``label``. Partners are
the valid rows in reverse order (timm's ``flip``); filler rows (``valid == False``) are neither mixed
nor mixed in. A student's online teachers see the mixed images too (consistent teaching).

Leaves out: the losses (objectives.py, distill.py) and when to mix (loop.py: training batches only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class BatchMix:
    """Mixup / CutMix of training batches (``train.mix``; timm's ``Mixup`` in its ``batch`` mode, with
    torch's RNG and valid rows).

    Per batch: with probability ``prob`` the batch is mixed; with both alphas > 0, CutMix is chosen
    with probability ``switch_prob``. ``lam ~ Beta(alpha, alpha)``; Mixup blends each valid row with
    its partner (``lam`` of its own); CutMix pastes the partner's pixels in a box of side
    ``sqrt(1 - lam)`` times the image's centred at a uniform point, clipped at the borders, and ``lam``
    becomes the share of the row's own pixels. Every draw comes from torch's global (CPU) generator,
    which the loop seeds per rank and checkpoints.
    """

    def __init__(self, cfg, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes

    def draw(self, height: int, width: int) -> tuple[float, tuple[int, int, int, int] | None] | None:
        """This batch's ``(lam, box)`` (``box``: ``(top, bottom, left, right)`` for CutMix, None for
        Mixup), or None when the batch is left as it is."""
        cfg = self.cfg
        if not cfg.enabled or float(torch.rand(())) >= cfg.prob:
            return None
        cutmix = cfg.mixup_alpha == 0 or (cfg.cutmix_alpha > 0 and float(torch.rand(())) < cfg.switch_prob)
        alpha = torch.tensor(cfg.cutmix_alpha if cutmix else cfg.mixup_alpha, dtype=torch.float64)
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if not cutmix:
            return lam, None
        side = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * side), int(width * side)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
        return 1.0 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch mixed (new ``image``, added ``mixed_label``; the rest as it was), or ``batch``."""
        images = batch["image"]
        drawn = self.draw(images.shape[-2], images.shape[-1])
        if drawn is None:
            return batch
        lam, box = drawn
        partner = mix_partners(batch["valid"])
        if box is None:
            mixed = images.lerp(images[partner], 1.0 - lam)  # exact on rows that are their own partner
        else:
            top, bottom, left, right = box
            mixed = images.clone()
            mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
        one_hot = F.one_hot(batch["label"], self.num_classes).float()
        return {**batch, "image": mixed, "mixed_label": one_hot * lam + one_hot[partner] * (1.0 - lam)}


def mix_partners(valid: torch.Tensor) -> torch.Tensor:
    """Each row's mixing partner: the valid rows in reverse order; an invalid row is its own."""
    rows = torch.arange(len(valid), device=valid.device)
    real = rows[valid.bool()]
    partner = rows.clone()
    partner[real] = real.flip(0)
    return partner
