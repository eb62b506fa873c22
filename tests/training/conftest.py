"""Helpers of the training tests: a tiny experiment on the shared test shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora.training.checkpoint import Checkpoint, Preprocessing, TrainingState, rng_state
from flora.training.config import load_experiment
from flora.training.loop import Trainer


def experiment(shards: Path, run_root: Path, name: str = "run", **sections) -> dict:
    """A test_vit experiment at 48 px on CPU (a few seconds per epoch), as a mapping; ``sections``
    update the defaults one section at a time (``train={"epochs": 1}``)."""
    cfg = {
        "run": {"name": name, "root": str(run_root)},
        "data": {
            "shards": str(shards),
            "image_size": 48,
            "batch_size": 16,
            "val_batch_size": 32,
            "threads": 2,
            "device": "cpu",
            "shuffle_buffer": 64,
            "index_cache": "off",
            "verify": "header",
            "augment": {"rotate_degrees": 0.0, "scale": [0.5, 1.0]},
        },
        "model": {"name": "test_vit"},
        "optim": {"lr": 2e-3, "weight_decay": 0.05},
        "schedule": {"warmup_epochs": 0, "min_lr": 1e-5},
        "train": {
            "epochs": 2,
            "checkpoint_every": 5,
            "log_every": 2,
            "progress": False,
            "label_smoothing": 0.1,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def make_checkpoint(kind: str = "best", **fields) -> Checkpoint:
    """A small valid checkpoint of ``kind`` (a ``last`` one with a training state); ``fields`` replace
    any of its fields."""
    values = {
        "kind": kind,
        "model": {"w": torch.ones(2)},
        "model_name": "test_vit",
        "class_mapping": {"a": 0, "b": 1},
        "preprocessing": Preprocessing(
            image_size=32, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=0.9, val_resize=36
        ),
        "config": {"model": {"name": "test_vit"}, "data": {"shards": "shards"}},
        "epoch": 0,
        "step": 3,
        "world_size": 1,
    }
    if kind == "last":
        values["training"] = TrainingState(
            optimizer={"state": {}, "param_groups": []}, scheduler={}, scaler={}, ema=None,
            best={"metric": "top1", "value": None, "epoch": None, "step": None}, rng=[rng_state()],
            loader=[{"epoch": 0, "rank": 0}], epoch_losses=[{"sums": {"loss": 1.5}, "seen": 2}],
        )  # fmt: skip
    return Checkpoint(**{**values, **fields})


def killed_save(path: Path) -> Path:
    """Runs ``save_checkpoint(path)`` in a process that dies after writing the bytes and before the
    rename, as a run killed mid-write does; returns the temporary it leaves behind."""
    script = (
        "import os, sys, torch\n"
        "from flora.training.checkpoint import Checkpoint, Preprocessing, save_checkpoint\n"
        "os.fsync = lambda fd: os._exit(9)\n"
        "pre = Preprocessing(32, [0.5] * 3, [0.5] * 3, 0.9, 36)\n"
        "best = Checkpoint('best', {'w': torch.ones(4)}, 'test_vit', {'a': 0}, pre, {})\n"
        "save_checkpoint(sys.argv[1], best)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(path)], cwd=Path(__file__).parents[2])
    assert killed.returncode == 9 and not path.exists()
    (leftover,) = path.parent.glob(f".{path.name}.*.tmp")
    assert leftover.stat().st_size > 0
    return leftover


@pytest.fixture(scope="session")
def teachers(shard_root, tmp_path_factory) -> dict[str, Path]:
    """best_model.pt of a global test_vit teacher (3 epochs) and of an EU_SW one initialised from it."""
    root = tmp_path_factory.mktemp("teachers")
    Trainer(load_experiment(experiment(shard_root, root, "global", train={"epochs": 3}))).fit()
    regional = experiment(
        shard_root,
        root,
        "regional",
        train={"epochs": 1},
        model={"name": "test_vit", "init_from": str(root / "global" / "best_model.pt")},
    )
    regional["data"].update({"region_filter": "EU_SW", "label_space": "region", "train_remainder": "pad"})
    Trainer(load_experiment(regional)).fit()
    return {"global": root / "global" / "best_model.pt", "regional": root / "regional" / "best_model.pt"}
