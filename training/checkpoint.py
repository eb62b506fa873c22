"""Checkpoints: what a run writes to resume exactly and what evaluation and export read.

Owns the checkpoint format (``FORMAT``), atomic writes (a temporary file in the same folder, fsync,
``os.replace``: a crash mid-write leaves the previous checkpoint intact), safe loading
(``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, never an
arbitrary pickled object), and the RNG states of every generator the loop touches (Python, NumPy,
torch CPU and CUDA), stored as plain tensors and lists so they pass ``weights_only``.

A checkpoint is a dict:
``format``, ``kind`` (``last`` | ``best``), ``model`` (the unwrapped state dict), ``ema`` (or None),
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the epoch in progress), ``step`` (optimizer
steps), ``best`` ({metric, value, epoch}), ``rng`` (per rank), ``loader`` (per rank: each rank's
loader position), ``config`` (the experiment as plain data), ``class_mapping`` (species name ->
index), ``preprocessing`` ({image_size, mean, std, crop_pct, val_resize}), ``temperature`` (set by
evaluation's calibration), ``model_name``, ``metrics`` (the validation metrics it was chosen by).

Leaves out: deciding when to write (loop.py) and what evaluation adds (evaluate.py writes the fitted
temperature back through ``update_checkpoint``).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from flora.errors import FloraError

FORMAT = 1
LAST = "last_checkpoint.pt"
BEST = "best_model.pt"


class CheckpointError(FloraError, RuntimeError):
    """A checkpoint is missing, unreadable, of another format or not what the caller needs."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Writes ``state`` to ``path`` atomically (never a half-written file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a Flora checkpoint with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe Flora checkpoint"
        raise CheckpointError(
            f"{path}: cannot be read as a Flora checkpoint with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a Flora checkpoint of format {FORMAT} (found {found!r})")
    for key in ("model", "class_mapping", "config", "preprocessing"):
        if key not in state:
            raise CheckpointError(f"{path}: the checkpoint has no {key!r}")
    return state


def update_checkpoint(path: str | Path, **changes) -> None:
    """Rewrites a checkpoint with some keys replaced (atomically)."""
    state = load_checkpoint(path)
    state.update(changes)
    state.pop("format", None)
    save_checkpoint(path, state)


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """Every generator the loop uses, as weights_only-safe values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
