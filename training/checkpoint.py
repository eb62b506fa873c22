"""Checkpoints: the ``Checkpoint`` type a run writes to resume exactly and evaluation and export read.

Owns the checkpoint format (``FORMAT``) and its type, as ``Manifest`` and ``SampleMeta`` are the
shards': ``Checkpoint`` (the network's weights and architecture, the class mapping, the typed
``Preprocessing``, the experiment config as plain data, the counters, the calibrated temperature),
with ``TrainingState`` (what only ``last_checkpoint.pt`` holds: optimizer, scheduler, scaler, EMA,
best so far, every rank's RNG states, loader position and partial epoch losses). One way in,
``load_checkpoint`` (``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts
only, never an arbitrary pickled object; then every field checked), and one way out,
``save_checkpoint`` (atomic: a temporary file in the same folder, fsync, ``os.replace``: a crash
mid-write leaves the previous checkpoint intact). The RNG states of every generator the loop touches
(Python, NumPy, torch CPU and CUDA) are stored as plain tensors and lists so they pass ``weights_only``.

On disk a checkpoint stays a plain dict (``Checkpoint.as_state``): ``format``, ``kind`` (``last`` |
``best``), ``model`` (the unwrapped state dict), ``model_name``, ``class_mapping`` (species name ->
index), ``timm_args`` (the ``timm.create_model`` keyword arguments that rebuild the network: ``model_name``,
``num_classes``, ``img_size`` for models built for the input size, the dropout rates; with the
``model`` key timm's own ``checkpoint_path`` loader reads, a checkpoint is
``timm.create_model(**ckpt["timm_args"], checkpoint_path=path)`` in plain timm), ``preprocessing``
({image_size, mean, std, crop_pct, val_resize, and the exact geometry: interpolation, antialias,
rounding, scale, layout}), ``class_counts`` (training samples per class), ``config``, ``epoch``
(the epoch in progress), ``step`` (optimizer steps), ``world_size``, ``temperature`` (set by
evaluation's calibration, with ``temperature_split``); a best one adds ``metrics`` (the validation
metrics it was chosen by) and ``ema_weights``; a last one adds the ``TrainingState`` fields
(``optimizer``, ``scheduler``, ``scaler``, ``ema``, ``best`` ({metric, value, epoch, step}), ``rng``,
``loader``, ``epoch_losses``: the last three per rank). Keys a reader does not know are ignored;
fields added later (``timm_args``, the geometry of ``preprocessing``) have defaults, so older
checkpoints load.

Locations in ``config`` (``LOCATIONS``: the shard root, cache folders, teacher and init checkpoints)
are stored absolute (the loop writes ``absolute_locations``, against its working folder; ``s3://``
URLs as they are), so a checkpoint works from any folder. An older checkpoint's relative location is read
against the checkpoint's own folder when it exists there, else left as written.

Anything else is refused with one line naming the path, what was found and what was expected: a
file ``torch.load`` cannot read (truncated, garbage, a pickle of arbitrary objects: torch's reason in
short, ``not a Flora checkpoint (torch.load: ...)``, without its advice to retry with the safe
loading turned off), another program's dict, a field of the wrong type. A run killed mid-write
leaves its temporary (``.last_checkpoint.pt.<random>.tmp``); ``remove_stale_temporaries`` deletes
those of a run folder when the next run starts there.

Leaves out: deciding when to write and what (loop.py), rebuilding the network (models.py) and what
evaluation adds (evaluate.py writes the fitted temperature back through ``update_checkpoint``).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flora.errors import FloraError
from flora.training.locations import absolute_locations, located_beside  # noqa: F401 - re-exported

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


#: What a checkpoint is for: ``last`` resumes a run, ``best`` is evaluated and exported.
KINDS = ("last", "best")
#: Keys of a dict that is not a checkpoint named in a refusal (a state dict has hundreds).
LISTED_KEYS = 4
#: Longest value quoted in a refusal.
VALUE_CHARS = 40


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_counts(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def _is_rgb(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 3 and all(_is_number(v) for v in value)


def _is_class_mapping(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_int(v) for k, v in value.items())


def _is_timm_args(value: Any) -> bool:
    return isinstance(value, dict) and _is_str(value.get("model_name"))


def _is_optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _found(value: Any) -> str:
    """``value`` in a few words, for a refusal: its type and a short repr (a dict: its first keys)."""
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:LISTED_KEYS])
        return f"a dict with keys {keys}{', ...' if len(value) > LISTED_KEYS else ''}" if value else "{}"
    text = repr(value)
    text = text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."
    return f"{type(value).__name__} {text}"


def _field(raw: dict, key: str, check: Callable[[Any], bool], expected: str, where: str = "") -> Any:
    """``raw[key]`` when ``check`` accepts it; else a CheckpointError saying what was found and expected."""
    if key not in raw:
        if check(None):
            return None
        raise CheckpointError(f"the checkpoint has no {where}{key!r} ({expected} expected)")
    value = raw[key]
    if not check(value):
        raise CheckpointError(f"the checkpoint's {where}{key} is {_found(value)}, expected {expected}")
    return value


#: The one geometry Flora's loaders implement (DALI's ``resize_shorter`` + centre ``crop``, and
#: loaders.reference.ResizeShorterCenterCrop): the defaults of ``Preprocessing``'s geometry fields.
INTERPOLATION = "bilinear"
#: ``half_up``: the resized longer side is ``floor(longer * val_resize / shorter + 0.5)`` (at least
#: ``val_resize``) and the crop's offset ``floor((resized - image_size) / 2 + 0.5)``, per axis.
ROUNDING = "half_up"
PIXEL_SCALE = 1 / 255  # 8-bit RGB to [0, 1], before the mean and std
LAYOUT = "NCHW"  # the PyTorch network's input


@dataclass
class Preprocessing:
    """The input the network was trained for: evaluation's transform (the shorter side resized to
    ``val_resize`` and the longer side in proportion, ``interpolation`` with ``antialias``; a centre
    crop of ``image_size``, sizes and offsets rounded per ``rounding``), pixels times ``scale``, then
    the per-channel normalisation, in ``layout``. The geometry fields have the defaults every Flora
    checkpoint was trained with, so a checkpoint written before they were stored reads the same."""

    image_size: int
    mean: list[float]
    std: list[float]
    crop_pct: float
    val_resize: int
    interpolation: str = INTERPOLATION
    antialias: bool = True
    rounding: str = ROUNDING
    scale: float = PIXEL_SCALE
    layout: str = LAYOUT
    #: False for a checkpoint read without the geometry fields: rewritten as it was (without them).
    geometry_stored: bool = field(default=True, repr=False, compare=False)

    @classmethod
    def from_state(cls, raw: dict) -> Preprocessing:
        where = "preprocessing."
        geometry = {
            key: _field(raw, key, check, expected, where)
            for key, check, expected in (
                ("interpolation", lambda v: v == INTERPOLATION, repr(INTERPOLATION)),
                ("antialias", lambda v: v is True, "true"),
                ("rounding", lambda v: v == ROUNDING, repr(ROUNDING)),
                ("scale", lambda v: _is_number(v) and v > 0, "a positive number"),
                ("layout", lambda v: v == LAYOUT, repr(LAYOUT)),
            )
            if key in raw
        }
        return cls(
            image_size=_field(raw, "image_size", _is_int, "an integer", where),
            mean=list(_field(raw, "mean", _is_rgb, "3 numbers", where)),
            std=list(_field(raw, "std", _is_rgb, "3 numbers", where)),
            crop_pct=_field(raw, "crop_pct", _is_number, "a number", where),
            val_resize=_field(raw, "val_resize", _is_int, "an integer", where),
            **geometry,
            geometry_stored=bool(geometry),
        )

    def as_state(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "geometry_stored"}
        if not self.geometry_stored:
            state = {key: state[key] for key in ("image_size", "mean", "std", "crop_pct", "val_resize")}
        return {**state, "mean": list(self.mean), "std": list(self.std)}


@dataclass
class TrainingState:
    """What a ``last`` checkpoint adds for an exact resume; ``rng``, ``loader`` and ``epoch_losses``
    hold one entry per rank (``epoch_losses``: ``{"sums", "seen"}`` of the epoch in progress)."""

    optimizer: dict
    scheduler: dict
    scaler: dict
    ema: dict | None  # the EMA's weights, or None without EMA
    best: dict  # {metric, value, epoch, step} of the best validation so far
    rng: list[dict]
    loader: list[dict]
    epoch_losses: list[dict]

    @classmethod
    def from_state(cls, raw: dict) -> TrainingState:
        return cls(
            **{k: _field(raw, k, _is_dict, "a dict") for k in ("optimizer", "scheduler", "scaler", "best")},
            ema=_field(raw, "ema", _is_optional(_is_dict), "a state dict or None"),
            **{
                k: _field(raw, k, _is_list, "a list, one per rank") for k in ("rng", "loader", "epoch_losses")
            },
        )

    def as_state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: the tensors as they are


@dataclass
class Checkpoint:
    """A Flora checkpoint: a network, what it predicts, how its input is made, and how it was trained."""

    kind: str  # "last" | "best" (KINDS)
    model: dict[str, torch.Tensor]  # the unwrapped network's state dict (the EMA's when ema_weights)
    model_name: str  # the timm architecture
    class_mapping: dict[str, int]  # species name -> class index
    preprocessing: Preprocessing
    config: dict  # the experiment config as plain data (ExperimentConfig.as_dict())
    epoch: int | None = None
    step: int | None = None
    world_size: int | None = None  # the ranks of the run that wrote it
    temperature: float | None = None  # fitted by evaluation on ``temperature_split``; None: never calibrated
    temperature_split: str | None = None
    metrics: dict | None = None  # best: the validation metrics it was chosen by
    ema_weights: bool | None = None  # best: whether ``model`` holds the EMA's weights
    #: Training-split samples per class index (the run's label space; None: written before Flora kept
    #: them): the class prior of long-tail objectives, the many/medium/few-shot buckets, labels.json.
    class_counts: list[int] | None = None
    training: TrainingState | None = None  # last: what an exact resume restores
    #: ``timm.create_model`` keyword arguments rebuilding the network (``model_name``, ``num_classes``,
    #: ``img_size``...); None: written before Flora kept them (models.timm_args_of derives them).
    timm_args: dict | None = None

    @property
    def data(self) -> dict:
        """The run's data config section (shards, selection, label space), as plain data."""
        return self.config.get("data") or {}

    @classmethod
    def from_state(cls, state: Any) -> Checkpoint:
        """What ``torch.load`` returned, checked field by field; CheckpointError (without the path)."""
        if not isinstance(state, dict) or "format" not in state:
            raise CheckpointError(
                f"not a Flora checkpoint: found {_found(state)}, expected a dict with 'format': {FORMAT}, "
                "'model', 'class_mapping', 'preprocessing' and 'config'"
            )
        if state["format"] != FORMAT:
            raise CheckpointError(
                f"not a Flora checkpoint of format {FORMAT}: found format {state['format']!r}"
            )
        kind = _field(state, "kind", lambda v: v in KINDS, " or ".join(map(repr, KINDS)))
        config = _field(state, "config", _is_dict, "the experiment config as a dict")
        optional_int = _is_optional(_is_int)
        return cls(
            kind=kind,
            model=_field(state, "model", _is_dict, "a state dict"),
            model_name=_model_name(state, config),
            class_mapping=_field(state, "class_mapping", _is_class_mapping, "species name -> index"),
            preprocessing=Preprocessing.from_state(_field(state, "preprocessing", _is_dict, "a dict")),
            config=config,
            epoch=_field(state, "epoch", optional_int, "an integer"),
            step=_field(state, "step", optional_int, "an integer"),
            world_size=_field(state, "world_size", optional_int, "an integer"),
            temperature=_field(state, "temperature", _is_optional(_is_number), "a number or None"),
            temperature_split=_field(state, "temperature_split", _is_optional(_is_str), "a split name"),
            metrics=_field(state, "metrics", _is_optional(_is_dict), "a dict"),
            ema_weights=_field(state, "ema_weights", _is_optional(_is_bool), "true or false"),
            class_counts=_field(
                state, "class_counts", _is_optional(_is_counts), "a list of counts per class"
            ),
            training=TrainingState.from_state(state) if kind == "last" else None,
            timm_args=_field(state, "timm_args", _is_optional(_is_timm_args), "a dict with 'model_name'"),
        )

    def as_state(self) -> dict:
        """The dict ``save_checkpoint`` writes (without ``format``); fields that are None and only one
        kind has are left out, as the loop always wrote them."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "training"}
        state["preprocessing"] = self.preprocessing.as_state()
        if self.timm_args is not None:  # one architecture name in the file: model_name's
            state["timm_args"] = {**self.timm_args, "model_name": self.model_name}
        for name in ("temperature_split", "metrics", "ema_weights", "class_counts", "timm_args"):
            if state[name] is None:
                del state[name]
        state.update(self.training.as_state() if self.training is not None else {})
        return state


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


def _model_name(state: dict, config: dict) -> str:
    """``model_name``, else the config's ``model.name`` (the same timm name in every file Flora wrote)."""
    model = config.get("model")
    name = state.get("model_name") or (model.get("name") if isinstance(model, dict) else None)
    if not isinstance(name, str):
        raise CheckpointError(
            f"the checkpoint's model_name is {_found(name)}, expected a timm model name "
            "(or one in config.model.name)"
        )
    return name


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The Flora checkpoint at ``path`` (read ``weights_only``); one clear line for anything else."""
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
    try:
        checkpoint = Checkpoint.from_state(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return replace(checkpoint, config=located_beside(checkpoint.config, path.resolve().parent))


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Writes ``checkpoint`` to ``path`` atomically (never a half-written file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **checkpoint.as_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def update_checkpoint(path: str | Path, **changes: Any) -> None:
    """Rewrites a checkpoint with some fields replaced (atomically), e.g. ``temperature=1.3``."""
    save_checkpoint(path, replace(load_checkpoint(path), **changes))


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
