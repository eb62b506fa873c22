"""The data config: which shards feed training, how they are decoded, augmented and batched.

Owns ``DataConfig`` (the ``data:`` section of a training YAML) and ``AugmentConfig``, their range
checks, and the values derived from them in one place (``val_resize``, the per-split batch size).
Both loaders (DALI and the torch reference) read exactly these fields, so a config means the same
thing whichever backend runs it.

Leaves out: which device actually exists (factory.py resolves ``device: auto``) and the shard layout
(index.py reads the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flora.config import ConfigError, apply_overrides, from_dict, read_yaml
from flora.loaders.backends import backend_names
from flora.loaders.sampling import SamplingConfig
from flora.store import S3Url, StoreError, is_remote

#: ImageNet statistics (torchvision's and timm's defaults), in [0, 1] units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: timm's default center-crop fraction: validation resizes the shorter side to size / 0.875.
DEFAULT_CROP_PCT = 0.875
#: DALI's own defaults for its ``mixed`` JPEG decoder (the operator schema of nvidia-dali 2.4; NVIDIA's
#: measurements behind them: ``hw_decoder_load`` 0.65 sends 65% of the images to the A100/H100/H200
#: hardware decoder and the rest to nvJPEG's CUDA decoder, the split that gave the best tail latency).
DALI_HW_DECODER_LOAD = 0.65
DALI_DEVICE_MEMORY_PADDING = 16 * 1024 * 1024  # bytes: nvJPEG's device buffers grow in such steps
DALI_HOST_MEMORY_PADDING = 8 * 1024 * 1024  # bytes: ... and its pinned host buffers


@dataclass
class AugmentConfig:
    """Training augmentations (the seed's list); validation only resizes and center-crops.

    Color jitter factors follow torchvision's ``ColorJitter``: brightness/contrast/saturation ``b``
    draw a factor in ``[1 - b, 1 + b]``; ``hue`` draws a shift in ``[-hue, hue]`` of a full turn.
    """

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # ... and aspect-ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    rotate_degrees: float = 15.0  # uniform in [-d, d]; 0 turns rotation off
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    crop_pct: float = DEFAULT_CROP_PCT  # validation: resize shorter side to image_size / crop_pct

    def __post_init__(self) -> None:
        for name in ("scale", "ratio"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ConfigError(f"augment.{name}: expected [low, high] with 0 < low <= high, got {lo_hi}")
        if self.scale[1] > 1:
            raise ConfigError(f"augment.scale: the area fraction cannot exceed 1, got {self.scale}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"augment.hflip: expected a probability in [0, 1], got {self.hflip}")
        if not 0 <= self.rotate_degrees <= 180:
            raise ConfigError(f"augment.rotate_degrees: expected 0..180, got {self.rotate_degrees}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"augment.{name}: expected a jitter in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"augment.hue: expected a shift in [0, 0.5] of a turn, got {self.hue}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"augment.mean/std: expected 3 values each, std > 0, got {self.mean} / {self.std}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"augment.crop_pct: expected (0, 1], got {self.crop_pct}")


@dataclass
class DecoderConfig:
    """DALI's JPEG decoder on a GPU (``device: gpu`` decodes on ``mixed``: the hardware JPEG decoder
    of A100/H100/H200 for ``hw_decoder_load`` of the images, nvJPEG's CUDA decoder for the rest).

    DALI applies these to its ``mixed`` backend only; the CPU graph passes the same values, which
    DALI's CPU decoder ignores, so both devices share one graph definition. Defaults are DALI's.
    """

    hw_decoder_load: float = DALI_HW_DECODER_LOAD  # share of images sent to the hardware decoder
    device_memory_padding: int = DALI_DEVICE_MEMORY_PADDING  # bytes added to nvJPEG's GPU buffers
    host_memory_padding: int = DALI_HOST_MEMORY_PADDING  # bytes added to nvJPEG's pinned host buffers
    #: Largest expected image (pixels): the hardware decoder preallocates for it; 0 = no hint. Set them
    #: to the shards' size (e.g. 500 x 500 when the sharder resized the longer side to 500).
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0
    #: The CPU decoder's chroma upsampling on the GPU too (closer CPU/GPU parity, a little slower).
    jpeg_fancy_upsampling: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.hw_decoder_load <= 1:
            raise ConfigError(
                f"decoder.hw_decoder_load: expected a share in [0, 1], got {self.hw_decoder_load}"
            )
        for name in (
            "device_memory_padding",
            "host_memory_padding",
            "preallocate_width_hint",
            "preallocate_height_hint",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"decoder.{name}: expected >= 0, got {getattr(self, name)}")

    def dali_args(self) -> dict:
        """The keyword arguments of DALI's image decoders."""
        return {
            "hw_decoder_load": float(self.hw_decoder_load),
            "device_memory_padding": self.device_memory_padding,
            "host_memory_padding": self.host_memory_padding,
            "preallocate_width_hint": self.preallocate_width_hint,
            "preallocate_height_hint": self.preallocate_height_hint,
            "jpeg_fancy_upsampling": self.jpeg_fancy_upsampling,
        }


@dataclass
class DataConfig:
    """The ``data:`` section of a config. Batch sizes are per rank."""

    #: Shard root: manifest.json, {split}/{region}/*.tar + .idx, class_mapping*.json; a folder or an
    #: object-store prefix ``s3://bucket/prefix`` (endpoint and credentials from the AWS environment).
    shards: str = ""
    train_split: str = "train"
    val_split: str = "val"
    #: ``null``/``all``: every region; a name (``EU_SW``) or a list of names.
    region_filter: str | list[str] | None = None
    #: ``global``: the shards' class indices; ``region``: the single filtered region's own mapping
    #: (``class_mapping_<region>.json`` beside the manifest), as regional teachers need.
    label_space: Literal["global", "region"] = "global"
    production_only: bool = False  # keep only samples whose license_class is permissive
    image_size: int = 224
    batch_size: int = 64
    val_batch_size: int | None = None  # default: batch_size
    threads: int = 2  # DALI CPU threads / DataLoader workers
    backend: str = "dali"  # a registered backend (backends.py): dali | torch
    device: Literal["gpu", "cpu", "auto"] = "auto"
    seed: int = 0
    shuffle_buffer: int = 1024  # DALI initial_fill (the reference loader uses the same size)
    prefetch: int = 2  # batches queued ahead
    #: How the torch loader starts its worker processes each epoch: ``forkserver`` (default: from a
    #: clean server process; a fork of a training process with threads can hang a worker), ``fork``
    #: (no server; a script's top level need not be guarded by ``if __name__ == "__main__":``) or
    #: ``spawn``. With ``forkserver``/``spawn`` an unguarded script's top level would run again.
    worker_start: Literal["forkserver", "fork", "spawn"] = "forkserver"
    #: Training remainder across ranks: ``drop`` gives every rank the same number of full batches
    #: (static shapes; < world_size * (batch_size + 1) samples sit out each epoch, a different set
    #: every epoch); ``pad`` keeps every sample exactly once and fills the last batches with
    #: repeated samples flagged ``valid == False``. Validation is never dropped or padded.
    train_remainder: Literal["drop", "pad"] = "drop"
    channels_last: bool = False
    dtype: Literal["float32", "float16"] = "float32"
    #: ``full``: check each image's sha256 against its json (cached per shard); ``header``: only
    #: the JPEG markers and the json's width/height. Failing samples are skipped and counted.
    verify: Literal["full", "header"] = "full"
    #: Re-check this rank's samples of an epoch at the ``verify`` level before epochs 0, N, 2N, ...
    #: (a cached scan is trusted while a tar's size and mtime stay, which bit rot does not change);
    #: a sample that fails is left out from that epoch on and counted. 0: only the first scan.
    verify_every: int = 0
    #: Where per-shard scan results are cached: ``auto`` (or true) = ``loader_index/`` under the cache
    #: root; ``off`` (YAML reads it as false) or null: no cache; else a folder.
    index_cache: bool | str | None = "auto"
    #: Root of the derived caches (scan results, soft labels), never inside the shard store: null =
    #: ``$FLORA_CACHE_DIR``, else ``~/.cache/flora`` (sharding/cache/derived.py).
    cache_root: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    #: Which samples, how often, make a training epoch (sampling.py): ``policy: uniform`` (each sample
    #: once, the default), ``class_balanced``, ``power``, ``repeat_factor``; ``streams`` to mix regions
    #: or licence classes by proportion. Validation and test are never sampled.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise ConfigError(f"data.backend: expected one of {backend_names()}, got {self.backend!r}")
        if not self.shards:
            raise ConfigError("data.shards: the shard root (the folder with manifest.json) is required")
        if is_remote(self.shards):
            try:
                S3Url.parse(self.shards)
            except StoreError as exc:
                raise ConfigError(f"data.shards: {exc}") from None
        for name in ("image_size", "batch_size", "threads", "shuffle_buffer", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: expected >= 1, got {getattr(self, name)}")
        if self.verify_every < 0:
            raise ConfigError(
                f"data.verify_every: expected epochs >= 0 (0: never re-check), got {self.verify_every}"
            )
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ConfigError(f"data.val_batch_size: expected >= 1, got {self.val_batch_size}")
        if isinstance(self.region_filter, list) and not self.region_filter:
            raise ConfigError("data.region_filter: an empty list selects nothing; use null for all regions")
        if self.label_space == "region" and len(self.regions or []) != 1:
            raise ConfigError(
                "data.label_space: 'region' needs exactly one region in region_filter, "
                f"got {self.region_filter!r}"
            )

    @property
    def regions(self) -> list[str] | None:
        """The selected region names, or None for all."""
        if self.region_filter is None or self.region_filter == "all":
            return None
        return [self.region_filter] if isinstance(self.region_filter, str) else list(self.region_filter)

    @property
    def val_resize(self) -> int:
        """Validation: the shorter side is resized to this, then center-cropped to image_size."""
        return int(round(self.image_size / self.augment.crop_pct))

    def batch_for(self, train: bool) -> int:
        return self.batch_size if train or self.val_batch_size is None else self.val_batch_size


def load_data_config(source: str | Path | dict, overrides: list[str] | None = None) -> DataConfig:
    """The ``data`` section of a YAML file (or of an already-read mapping), plus ``data.x=y`` overrides.

    Other top-level sections (``model``, ``optim``...) belong to other components and are left alone;
    within ``data`` every key is checked.
    """
    raw = read_yaml(source) if not isinstance(source, dict) else source
    raw = apply_overrides(raw, overrides)
    if "data" not in raw:
        raise ConfigError(f"{source}: no 'data' section (expected data: {{shards: ..., ...}})")
    section = raw["data"]
    if not isinstance(section, dict):
        raise ConfigError(f"data: expected a mapping, got {type(section).__name__}")
    return from_dict(DataConfig, section, "data")
