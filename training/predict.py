"""Predictions over a loader: one rank's pass, and every rank's merged and checked.

Owns ``predict`` (eval mode, autocast, each sample once on this rank) and ``gather_predictions``
(all ranks' predictions merged on every rank; the count must equal the split's samples).

Leaves out: what is computed from them (metrics.py) and where they are written (evaluate.py).
"""

from __future__ import annotations

import torch
from torch import nn

from flora.loaders.base import EpochLoader
from flora.training.distributed import Dist
from flora.training.errors import TrainingError
from flora.training.metrics import Predictions
from flora.training.precision import autocast


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
