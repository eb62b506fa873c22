"""Mixed precision: which autocast dtype a run uses and the context that applies it.

``amp: auto`` is bf16 on a GPU and off on the CPU; ``bf16`` runs CPU autocast too (tested there);
``fp16`` pairs with a GradScaler (loop.py creates it).

Leaves out: the scaler's use (loop.py).
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
