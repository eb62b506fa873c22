"""A Flora checkpoint in plain timm: ``timm.create_model(**ckpt["timm_args"], checkpoint_path=path)``
(docs/training.md) gives the network Flora evaluates, logit for logit, for a ViT built at a size other
than its default and for a convnet."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from flora.training.checkpoint import load_checkpoint
from flora.training.config import load_experiment
from flora.training.loop import Trainer
from flora.training.models import model_from_checkpoint
from tests.training.conftest import experiment

#: Each architecture and the image size it is trained at (test_vit's default is 160 px).
ARCHITECTURES = {"test_vit": 48, "test_efficientnet": 64}


@pytest.fixture(scope="module")
def checkpoints(shard_root, tmp_path_factory) -> dict[str, Path]:
    """best_model.pt of a one-epoch run of each architecture."""
    root = tmp_path_factory.mktemp("timm")
    paths = {}
    for name, size in ARCHITECTURES.items():
        cfg = experiment(shard_root, root, name, model={"name": name}, train={"epochs": 1})
        cfg["data"]["image_size"] = size
        Trainer(load_experiment(cfg)).fit()
        paths[name] = root / name / "best_model.pt"
    return paths


def _flora_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model_from_checkpoint(load_checkpoint(path)).eval()(x)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_plain_timm_loads_a_flora_checkpoint(checkpoints, name):
    path = checkpoints[name]
    ckpt = torch.load(path, weights_only=True)  # the loading side: torch and timm only
    size = ARCHITECTURES[name]
    assert ckpt["timm_args"]["model_name"] == name
    assert ckpt["timm_args"]["num_classes"] == len(ckpt["class_mapping"])
    assert ckpt["timm_args"].get("img_size") == (size if name == "test_vit" else None)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = timm.create_model(**ckpt["timm_args"], checkpoint_path=str(path)).eval()  # timm's own loader
    two_lines = timm.create_model(**ckpt["timm_args"])
    two_lines.load_state_dict(ckpt["model"])
    with torch.no_grad():
        plain, loaded = model(x), two_lines.eval()(x)
    flora = _flora_logits(path, x)
    assert torch.equal(plain, flora) and torch.equal(loaded, flora)
    assert plain.shape == (4, len(ckpt["class_mapping"]))


def test_without_the_stored_image_size_timm_cannot_load_the_vit(checkpoints):
    """Why ``timm_args`` carries ``img_size``: the position embeddings are the trained size's."""
    path = checkpoints["test_vit"]
    ckpt = torch.load(path, weights_only=True)
    with pytest.raises(RuntimeError, match="pos_embed"):
        timm.create_model("test_vit", num_classes=len(ckpt["class_mapping"]), checkpoint_path=str(path))


def test_a_checkpoint_without_timm_args_still_loads(checkpoints, tmp_path):
    """A checkpoint written before Flora kept ``timm_args``: rebuilt from its name, classes and size."""
    ckpt = torch.load(checkpoints["test_vit"], weights_only=True)
    del ckpt["timm_args"]
    torch.save(ckpt, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.timm_args is None
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rebuilt = model_from_checkpoint(old).eval()(x)
    assert torch.equal(rebuilt, _flora_logits(checkpoints["test_vit"], x))
