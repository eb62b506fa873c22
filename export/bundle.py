"""What an export carries besides the network: labels, preprocessing, temperature, sample images.

Owns reading a Flora checkpoint for export (``load_bundle``: the network in eval mode, the labels in
the checkpoint's index order, its preprocessing and calibrated temperature - never from a side
channel), the two files every export writes next to the model (``labels.json``: by class index, the species'
name and its training images;
``preprocess.json``: input size, resize, mean, std, layout, output kind and the temperature to
apply, with the exact geometry under ``geometry``: the checkpoint's own ``Preprocessing`` fields, from
which docs/export.md's torchvision-only function and export/web/flora.js reproduce evaluation's
input; its ``attribution`` entry says where the training images' credits are: ``ATTRIBUTION.csv``
copied beside the model from a local shard root, else the file's location in the store), the
credits (``attribution``), and the reference inputs parity is measured on (``sample_inputs``: real
images from the checkpoint's own test shards, preprocessed exactly as evaluation does).

Probabilities are defined once, here: ``softmax(logits / temperature)``. The exported graphs output
raw logits (so parity compares the network itself); the temperature fitted by
``training.evaluate`` (1.0 when the checkpoint was never calibrated) travels in ``preprocess.json``
and every consumer (the Node parity check, the browser page) applies it the same way.

Leaves out: the conversions themselves (onnx.py, tfjs.py) and running TF.js (parity.py).
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flora.errors import FloraError
from flora.io import sha256_file
from flora.sharding.format.reader import ShardReader
from flora.sharding.format.schema import ATTRIBUTION, MANIFEST, ShardFormatError
from flora.store import StoreError, is_remote
from flora.training.checkpoint import CheckpointError, Preprocessing, load_checkpoint

FORMAT = 1
#: A species with fewer training images is few-shot (the long-tail literature's bucket, as evaluation's
#: default): ``preprocess.json`` carries it so an application can say a prediction is a rare species.
FEW_SHOT_BELOW = 20


class ExportError(FloraError, RuntimeError):
    """An export cannot be produced or fails its parity check; the message says why."""


class ParityError(ExportError):
    """The exported model disagrees with PyTorch beyond the error threshold (exit status 1)."""


@dataclass
class Bundle:
    """A checkpoint's network and everything a consumer needs to use it."""

    checkpoint: Path
    model: torch.nn.Module
    model_name: str
    labels: list[str]  # index -> species, the checkpoint's order
    preprocessing: Preprocessing  # the checkpoint's: image_size, mean, std, crop_pct, val_resize
    temperature: float  # 1.0 when never calibrated
    calibrated: bool
    data: dict  # the checkpoint's data config (where its shards are)
    #: index -> the species' training images (the checkpoint's ``class_counts``); None: not recorded
    training_images: list[int] | None = None

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @cached_property
    def transform(self):
        """The evaluation transform of the loaders (loaders.reference.eval_transform) for this checkpoint."""
        from flora.loaders.reference import eval_transform

        p = self.preprocessing
        return eval_transform(p.image_size, p.val_resize, p.mean, p.std)


def labels_in_order(class_mapping: dict[str, int]) -> list[str]:
    """Species names by class index; the indices must be exactly 0..n-1."""
    by_index = sorted(class_mapping.items(), key=lambda kv: kv[1])
    indices = [index for _, index in by_index]
    if indices != list(range(len(indices))):
        raise ExportError(f"class mapping indices must be 0..{len(indices) - 1}, got {indices[:10]}...")
    return [name for name, _ in by_index]


def load_bundle(checkpoint: str | Path) -> Bundle:
    """Reads a Flora checkpoint (``weights_only``) and rebuilds its network on the CPU, in eval mode."""
    from flora.training.models import ModelError, model_from_checkpoint

    path = Path(checkpoint)
    try:
        state = load_checkpoint(path)
        model = model_from_checkpoint(state)
    except (CheckpointError, ModelError) as exc:
        raise ExportError(str(exc)) from exc
    except RuntimeError as exc:  # load_state_dict: the weights do not fit the named architecture
        raise ExportError(f"{path}: the weights do not match model {state.model_name!r}: {exc}") from exc
    return Bundle(
        checkpoint=path,
        model=model.eval(),
        model_name=state.model_name,
        labels=labels_in_order(state.class_mapping),
        training_images=list(state.class_counts) if state.class_counts is not None else None,
        preprocessing=state.preprocessing,
        temperature=float(state.temperature) if state.temperature else 1.0,
        calibrated=bool(state.temperature),
        data=dict(state.data),
    )


def label_entries(bundle: Bundle) -> list[dict]:
    """``labels.json``: by class index, each species' name and training images (null: not recorded)."""
    counts = bundle.training_images
    if counts is not None and len(counts) != len(bundle.labels):
        raise ExportError(
            f"{bundle.checkpoint}: class_counts has {len(counts)} entries, the class mapping "
            f"{len(bundle.labels)}"
        )
    return [
        {"name": name, "training_images": None if counts is None else int(counts[i])}
        for i, name in enumerate(bundle.labels)
    ]


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def preprocess_spec(bundle: Bundle, layout: str, input_name: str, output_name: str) -> dict:
    """The ``preprocess.json`` document: how to turn an image into the model's input and back."""
    p = bundle.preprocessing
    size = bundle.image_size
    shape = [None, size, size, 3] if layout == "NHWC" else [None, 3, size, size]
    return {
        "format": FORMAT,
        "model": bundle.model_name,
        "num_classes": len(bundle.labels),
        "input": {"name": input_name, "layout": layout, "shape": shape, "dtype": "float32", "color": "RGB"},
        "image_size": size,
        "resize_shorter": p.val_resize,
        "crop": "center",
        "interpolation": "bilinear, antialiased",
        "scale": p.scale,
        "mean": [float(v) for v in p.mean],
        "std": [float(v) for v in p.std],
        "normalize": "x = (pixel * scale - mean) / std, per RGB channel",
        "geometry": geometry(p),
        "output": {"name": output_name, "kind": "logits"},
        "temperature": bundle.temperature,
        "calibrated": bundle.calibrated,
        "probabilities": "softmax(logits / temperature)",
        "labels": "labels.json: by class index, {name, training_images}",
        "few_shot_below": FEW_SHOT_BELOW,
        "checkpoint": {"path": str(bundle.checkpoint), "sha256": sha256_file(bundle.checkpoint)},
        "attribution": attribution(bundle),
    }


def geometry(p: Preprocessing) -> dict:
    """``preprocess.json``'s ``geometry``: every step from decoded 8-bit RGB pixels to the network's input,
    as fields (a consumer reads them; docs/export.md's reference function does) and formulas."""
    return {
        "resize": {
            "shorter_side": p.val_resize,
            "longer_side": "max(shorter_side, floor(longer * shorter_side / shorter + 0.5))",
            "interpolation": p.interpolation,
            "antialias": p.antialias,
        },
        "crop": {
            "size": p.image_size,
            "position": "center",
            "offset": "floor((resized - size) / 2 + 0.5), per axis (top, left)",
        },
        "rounding": p.rounding,
        "scale": p.scale,
        "mean": [float(v) for v in p.mean],
        "std": [float(v) for v in p.std],
        "color": "RGB, 8 bits per channel, no colour management",
        "steps": "decode -> resize -> crop -> x = (pixel * scale - mean) / std -> input layout",
    }


def attribution(bundle: Bundle) -> dict:
    """Where the training images' credits are, for ``preprocess.json``'s ``attribution``: the checkpoint's
    local shard root's ``ATTRIBUTION.csv``, which ``write_metadata`` copies beside the model (``kind:
    file``), else where it lives (``kind: link``: an ``s3://`` shard root's, not fetched), or why there is
    none (``kind: none``: no shard root recorded, or a local one without the file: built before it)."""
    shards = bundle.data.get("shards")
    if not shards:
        return {"kind": "none", "reason": "the checkpoint names no shard root"}
    if is_remote(shards):
        return {"kind": "link", "location": f"{str(shards).rstrip('/')}/{ATTRIBUTION}", "format": "csv"}
    source = Path(shards) / ATTRIBUTION
    if not source.is_file():
        return {"kind": "none", "reason": f"{source} does not exist (shards built before it; rebuild them)"}
    digest = sha256_file(source)
    return {"kind": "file", "file": ATTRIBUTION, "source": str(source), "sha256": digest, "format": "csv"}


def write_metadata(bundle: Bundle, out: Path, layout: str, input_name: str, output_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps(label_entries(bundle), indent=1, ensure_ascii=False) + "\n")
    spec = preprocess_spec(bundle, layout, input_name, output_name)
    if spec["attribution"]["kind"] == "file":
        (out / ATTRIBUTION).unlink(missing_ok=True)  # a link there is replaced, never written through
        shutil.copyfile(spec["attribution"]["source"], out / ATTRIBUTION)  # streamed
    (out / "preprocess.json").write_text(json.dumps(spec, indent=2) + "\n")


# ------------------------------------------------------------------------------------- sample inputs
def _images_from_shards(root: Path | str, split: str, limit: int) -> list[tuple[str, bytes]]:
    """The first ``limit`` JPEGs of ``split``'s shards, in the manifest's order, read by index (the
    shard format's reader; tombstoned samples are not served); ``root`` a folder or an ``s3://`` prefix
    (its metadata mirrored under the cache root, jpgs read by range)."""
    found: list[tuple[str, bytes]] = []
    try:
        reader = ShardReader(root)
        for shard in reader.shards(split):
            for sample in reader.samples(shard, ("jpg",)):
                if sample.jpg is not None:
                    found.append((f"{Path(shard.rel).name}/{sample.key}.jpg", sample.jpg))
                    if len(found) >= limit:
                        return found
    except (ShardFormatError, StoreError) as exc:
        raise ExportError(f"{exc}; pass --images (a folder of JPEGs or a shard root)") from None
    return found


def _images_from_folder(root: Path, limit: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    return [(str(p.relative_to(root)), p.read_bytes()) for p in files]


def sample_images(
    bundle: Bundle, images: str | Path | None, limit: int, split: str = "test"
) -> list[tuple[str, bytes]]:
    """Up to ``limit`` images: ``images`` (folder or shard root, local or ``s3://``), else the
    checkpoint's test shards."""
    if images is None:
        shards = bundle.data.get("shards")
        if not shards:
            raise ExportError("the checkpoint names no shard root: pass --images")
        root = shards if is_remote(shards) else Path(shards)
        if not is_remote(root) and not root.is_dir():
            raise ExportError(f"the checkpoint's shard root {root} does not exist here: pass --images")
        found = _images_from_shards(root, split, limit)
    elif is_remote(images):  # an s3:// shard root
        root = images
        found = _images_from_shards(root, split, limit)
    else:
        root = Path(images)
        if not root.exists():
            raise ExportError(f"--images {root} does not exist")
        if (root / MANIFEST).is_file():
            found = _images_from_shards(root, split, limit)
        else:
            found = _images_from_folder(root, limit)
    if not found:
        raise ExportError(f"no images found under {root}")
    return found


def preprocess(encoded: bytes, bundle: Bundle) -> torch.Tensor:
    """One image as evaluation sees it (the loaders' own eval transform), CHW float32."""
    return bundle.transform(Image.open(io.BytesIO(encoded)).convert("RGB"))


def sample_inputs(
    bundle: Bundle, images: str | Path | None = None, limit: int = 64
) -> tuple[list[str], torch.Tensor]:
    """Names and an NCHW float32 batch of real, preprocessed images."""
    found = sample_images(bundle, images, limit)
    return [name for name, _ in found], torch.stack([preprocess(data, bundle) for _, data in found])


@torch.no_grad()
def torch_logits(bundle: Bundle, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([bundle.model(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


@torch.no_grad()
def exact_logits(bundle: Bundle, x: torch.Tensor) -> np.ndarray:
    """The same network in float64: the yardstick for float32's own rounding (parity's fp32 floor)."""
    return copy.deepcopy(bundle.model).double()(x.double()).numpy()
