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

A file ``torch.load`` cannot read (truncated, garbage, a pickle of arbitrary objects) is refused with
one line naming the path and torch's reason in short, ``not a Flora checkpoint (torch.load: ...)``,
without torch's advice to retry with the safe loading turned off. A run killed mid-write leaves its
temporary (``.last_checkpoint.pt.<random>.tmp``); ``remove_stale_temporaries`` deletes those of a run
folder when the next run starts there.

Leaves out: deciding when to write (loop.py) and what evaluation adds (evaluate.py writes the fitted
temperature back through ``update_checkpoint``).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from flora.errors import FloraError

FORMAT = 1
LAST = "last_checkpoint.pt"
BEST = "best_model.pt"
#: Temporary names ``save_checkpoint`` writes (``tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")``).
TEMPORARY_GLOBS = tuple(f".{name}.*.tmp" for name in (LAST, BEST))
#: First bytes of torch's (zip) checkpoint format.
ZIP_MAGIC = b"PK\x03\x04"
#: First byte of a pickle of protocol 2 or later (torch's legacy format is one).
PICKLE_PROTO = b"\x80"
#: Longest reason from torch quoted in a refusal (torch's messages run to several paragraphs).
REASON_CHARS = 160
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: How torch names the class of a pickled object that weights_only loading refuses.
_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
#: Sentences of torch's message that advise turning the safe loading off: never passed on.
_ADVICE = re.compile(r"weights.only|trusted source|safe_globals|add_safe_globals", re.IGNORECASE)


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


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Deletes the temporaries a killed run left in ``run_dir`` (``TEMPORARY_GLOBS`` only); the removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = sorted({p for pattern in TEMPORARY_GLOBS for p in run_dir.glob(pattern) if p.is_file()})
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _short_reason(exc: BaseException, path: Path) -> str:
    """What ``torch.load`` found wrong with ``path``, in one short line, without its advice on unsafe
    loading (torch's own message runs to paragraphs, and a cut-short archive gets a bare errno)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError:
        head = b""
    text = _ANSI.sub("", str(exc))
    if "WeightsUnpickler error:" in text:  # torch's unpickler refused something: keep what, not the advice
        found = [
            line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()
        ]
        what = found[0] if found else "an object torch refused"
        unsafe = _GLOBAL.search(what)
        text = "it holds more than plain data: " + (f"a pickled {unsafe.group(1)}" if unsafe else what)
    sentences = [s.strip().rstrip(".") for s in re.split(r"\.\s+|\n", text) if s.strip()]
    kept = [s for s in sentences if not _ADVICE.search(s)]
    reason = f"{type(exc).__name__}: {kept[0]}" if kept else type(exc).__name__
    if not head:
        reason = "the file is empty"
    elif head == ZIP_MAGIC and isinstance(exc, OSError | RuntimeError):
        reason = f"a damaged or cut-short torch archive, {reason}"
    elif head != ZIP_MAGIC and not head.startswith(PICKLE_PROTO):
        reason = f"neither a torch archive nor a pickle, {reason}"
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a Flora checkpoint with ``weights_only=True``; one clear line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning says nothing the error does not
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe Flora checkpoint"
        raise CheckpointError(
            f"{path}: not a Flora checkpoint (torch.load: {_short_reason(exc, path)})"
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
