"""Models: timm networks built for a run's classes and image size, their weights, and head re-mapping.

Owns ``build_model`` (``timm.create_model`` with the run's class count; ViT-family models are built
for the data's image size, timm resampling position embeddings of pretrained weights; the arguments
that rebuild the architecture are kept on the model as ``TIMM_ARGS`` and stored in the checkpoint as
``timm_args``, so plain timm rebuilds it), where
pretrained weights come from (a local file through timm's own loader, else the hub when online; an
offline run without a file fails at once with a message, not a hang in a download), and
``init_from``: a Flora checkpoint's backbone copied and its classifier rows copied *by species name*
into this run's class mapping (the regional teacher from the global one).

Leaves out: what is trained (objectives.py) and the checkpoint format (checkpoint.py).
"""

from __future__ import annotations

import logging
import os
import socket

import timm
import torch
from torch import nn

from flora.errors import FloraError
from flora.training.checkpoint import Checkpoint
from flora.training.config import ModelConfig

log = logging.getLogger(__name__)

#: The attribute of a built model holding its ``timm.create_model`` arguments (without the weights').
TIMM_ARGS = "flora_timm_args"
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect; a sandbox without network answers at once or never


class ModelError(FloraError, RuntimeError):
    """A model cannot be built or initialised as configured."""


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A timm model with ``num_classes`` outputs for ``image_size`` inputs, weights as configured.

    ``init_from`` is applied separately (``init_from_checkpoint``): it needs the class mappings. The
    ``timm.create_model`` arguments that rebuild the architecture are the model's ``TIMM_ARGS``.
    """
    args = {"model_name": cfg.name, "num_classes": num_classes, "drop_rate": cfg.drop_rate}
    if cfg.drop_path_rate:
        args["drop_path_rate"] = cfg.drop_path_rate
    kwargs = {}
    pretrained = cfg.pretrained
    if pretrained:
        if cfg.pretrained_path:
            if not os.path.isfile(cfg.pretrained_path):
                raise ModelError(f"model.pretrained_path: no such file {cfg.pretrained_path!r}")
            kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(cfg.pretrained_path)}
        elif not _hub_reachable():
            raise ModelError(
                f"model.pretrained: true for {cfg.name!r} but the Hugging Face hub is unreachable (offline); "
                "download the weights elsewhere and set model.pretrained_path to the .safetensors/.pth file"
            )
    if not timm.is_model(cfg.name):
        raise ModelError(f"model.name: timm has no model {cfg.name!r}")
    try:  # ViT-family models take the input size; CNNs are size-agnostic and refuse the argument
        model = timm.create_model(**args, img_size=image_size, pretrained=pretrained, **kwargs)
        args["img_size"] = image_size
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(**args, pretrained=pretrained, **kwargs)
    setattr(model, TIMM_ARGS, args)
    return model


def timm_args_of(model: nn.Module) -> dict:
    """The ``timm.create_model`` arguments ``build_model`` built ``model`` with (plain data)."""
    args = getattr(model, TIMM_ARGS, None)
    if args is None:
        raise ModelError(
            f"{type(model).__name__} was not built by build_model: its timm arguments are unknown"
        )
    return dict(args)


def head_prefix(model: nn.Module) -> str:
    """The classifier's parameter prefix (``head``, ``classifier``, ``head.fc``...), from timm's cfg."""
    name = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if not name:
        raise ModelError(f"{type(model).__name__}: timm does not name its classifier; cannot re-map the head")
    return name


def remap_head(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    prefix: str,
    source_mapping: dict[str, int],
    target_mapping: dict[str, int],
) -> tuple[dict[str, torch.Tensor], int]:
    """``target``'s head tensors with each species' row copied from ``source`` where both know it.

    Returns the new head tensors (``prefix.weight``, ``prefix.bias``...) and how many species were copied;
    rows of species the source does not know keep the target's fresh initialisation.
    """
    pairs = [(t, source_mapping[name]) for name, t in target_mapping.items() if name in source_mapping]
    out = {}
    for key, value in target.items():
        if not key.startswith(prefix + "."):
            continue
        if key not in source:
            raise ModelError(f"init_from: the source checkpoint has no {key!r}; is it the same architecture?")
        src = source[key]
        if src.shape[1:] != value.shape[1:] or src.shape[0] != len(source_mapping):
            raise ModelError(
                f"init_from: {key} has shape {tuple(src.shape)} in the source, expected "
                f"({len(source_mapping)}, {', '.join(map(str, value.shape[1:]))})"
            )
        new = value.clone()
        if pairs:
            rows_t = torch.tensor([p[0] for p in pairs])
            rows_s = torch.tensor([p[1] for p in pairs])
            new[rows_t] = src[rows_s].to(new.dtype)
        out[key] = new
    return out, len(pairs)


def init_from_checkpoint(
    model: nn.Module, checkpoint: Checkpoint, class_mapping: dict[str, int]
) -> dict[str, int | str]:
    """Loads a Flora checkpoint's weights into ``model``: the backbone as is, the head by species name.

    The checkpoint must be the same architecture (its ``model_name``); image size may differ for
    ViTs only if timm can resample (not done here: the position embeddings must match).
    """
    source = checkpoint.model
    source_mapping = checkpoint.class_mapping
    prefix = head_prefix(model)
    target = model.state_dict()
    head, copied = remap_head(source, target, prefix, source_mapping, class_mapping)
    state = {}
    for key, value in target.items():
        if key in head:
            state[key] = head[key]
        elif key not in source:
            raise ModelError(f"init_from: the source checkpoint lacks {key!r}; is it the same architecture?")
        elif source[key].shape != value.shape:
            raise ModelError(
                f"init_from: {key} is {tuple(source[key].shape)} in the source and {tuple(value.shape)} here "
                "(a different model or image size?)"
            )
        else:
            state[key] = source[key]
    model.load_state_dict(state)
    report = {
        "species_copied": copied,
        "species_new": len(class_mapping) - copied,
        "source_species": len(source_mapping),
        "head": prefix,
    }
    log.info("init_from: backbone loaded; head rows copied for %d of %d species", copied, len(class_mapping))
    return report


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """A Flora checkpoint's network: ``timm.create_model(**timm_args)`` (what plain timm does) with its
    weights; a checkpoint written before it kept ``timm_args``: its ``model_name`` for its classes and
    image size, as ``build_model`` makes it."""
    if checkpoint.timm_args is not None:
        args = {**checkpoint.timm_args, "model_name": checkpoint.model_name}
        model = timm.create_model(**args)
        setattr(model, TIMM_ARGS, args)
    else:
        model = build_model(
            ModelConfig(name=checkpoint.model_name),
            num_classes=len(checkpoint.class_mapping),
            image_size=checkpoint.preprocessing.image_size,
        )
    model.load_state_dict(checkpoint.model)
    return model
