"""``create_dataloaders(config)``: the one call a training script makes to get its batches.

Owns the decisions taken once per run: rank and world size (explicit, else torchrun's ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK``), the device (``auto`` = the local GPU when torch sees one), the
backend (``dali``, or ``torch``), and the ``LoaderInfo`` that tells the model what it is fed:
classes, mapping, samples and batches per split, backend, device, preprocessing, and the samples
left out by reason (live: runtime skips appear as the loaders find them).

Leaves out: everything per batch (dali.py, reference.py) and the sample selection (index.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flora.distributed import torchrun_env
from flora.loaders.backends import loader_class
from flora.loaders.base import EpochLoader
from flora.loaders.config import DataConfig, load_data_config
from flora.loaders.index import LoaderError, build_index


@dataclass
class LoaderInfo:
    """What a training script needs to know about its data (also readable as ``info["key"]``)."""

    num_classes: int
    class_mapping: dict[str, int]
    samples: dict[str, int]  # whole split, all ranks
    rank_samples: dict[str, int]  # this rank's valid samples per epoch
    batches_per_epoch: dict[str, int]  # this rank's batches
    backend: str
    device: str
    rank: int
    world_size: int
    image_size: int
    mean: list[float]
    std: list[float]
    label_space: str
    regions: list[str] | None
    #: split -> reason -> samples left out: the scan's, then those found bad at runtime (a decode
    #: failure, a ``verify_every`` re-check). Live: each split's mapping is its loader's ``skipped``.
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The training split's sampling: ``config`` (the ``data.sampling`` section) and ``epoch_0``, what
    #: epoch 0's list realises (draws per species, their spread and extremes, the streams' shares).
    #: ``train_loader.sampling_summary(e)`` gives any epoch's. Validation is never sampled.
    sampling: dict = field(default_factory=dict)
    #: Samples per class index in the training split (after the selection; what sampling weighs by).
    class_counts: list[int] = field(default_factory=list)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def as_dict(self) -> dict:
        return asdict(self)


def dist_env(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the arguments or torchrun's environment."""
    try:
        env = torchrun_env(rank, world_size)
    except ValueError as exc:
        raise LoaderError(str(exc)) from None
    return env.rank, env.world_size, env.local_rank


def resolve_device(cfg: DataConfig, local_rank: int) -> torch.device:
    """``auto``: the local GPU if torch can use one, else the CPU. ``gpu`` without one is an error."""
    want = cfg.device
    if want == "auto":
        want = "gpu" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LoaderError("data.device: 'gpu' was asked for but torch sees no CUDA device; use cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def make_loader(cfg: DataConfig, split: str, train: bool, rank: int, world_size: int, device) -> EpochLoader:
    """One split's loader on one rank, with the configured backend."""
    index = build_index(cfg, split)
    return loader_class(cfg.backend)(index, cfg, train, rank, world_size, device)


def create_dataloaders(
    config: str | Path | dict | DataConfig,
    rank: int | None = None,
    world_size: int | None = None,
    overrides: list[str] | None = None,
) -> tuple[EpochLoader, EpochLoader, LoaderInfo]:
    """The train and validation loaders of a config's ``data`` section, and what they carry.

    Args:
        config: a YAML path (its ``data:`` section is read), a mapping with a ``data`` key, or a
            ``DataConfig``.
        rank, world_size: this process's place; default from torchrun's environment (0 of 1).
        overrides: ``data.key=value`` strings applied on top of the file.

    Returns:
        ``(train_loader, val_loader, info)``. Iterate ``loader.set_epoch(e); for batch in loader``;
        a batch is a dict with ``image``, ``label``, ``index`` and ``valid`` on ``info.device``.
    """
    cfg = config if isinstance(config, DataConfig) else load_data_config(config, overrides)
    rank, world_size, local_rank = dist_env(rank, world_size)
    device = resolve_device(cfg, local_rank)
    train = make_loader(cfg, cfg.train_split, True, rank, world_size, device)
    val = make_loader(cfg, cfg.val_split, False, rank, world_size, device)
    if train.index.class_mapping != val.index.class_mapping:
        raise LoaderError("train and validation shards carry different class mappings")
    info = LoaderInfo(
        num_classes=train.index.num_classes,
        class_mapping=dict(train.index.class_mapping),
        samples={cfg.train_split: len(train.index), cfg.val_split: len(val.index)},
        rank_samples={cfg.train_split: train.samples_per_epoch, cfg.val_split: val.samples_per_epoch},
        batches_per_epoch={cfg.train_split: len(train), cfg.val_split: len(val)},
        backend=cfg.backend,
        device=str(device),
        rank=rank,
        world_size=world_size,
        image_size=cfg.image_size,
        mean=list(cfg.augment.mean),
        std=list(cfg.augment.std),
        label_space=cfg.label_space,
        regions=cfg.regions,
        skipped={cfg.train_split: train.skipped, cfg.val_split: val.skipped},
        sampling={"config": asdict(cfg.sampling), "epoch_0": train.sampling_summary(0)},
        class_counts=np.bincount(train.index.labels, minlength=train.index.num_classes).tolist(),
    )
    return train, val, info
