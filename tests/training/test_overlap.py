"""A training run, an evaluation or a soft-label cache never writes into the shard store it reads: an
output folder that is, holds or lies inside ``data.shards`` is refused in one line before any work."""

import shutil

import pytest

from flora.io import OverlapError
from flora.training.config import load_experiment
from flora.training.evaluate import main as evaluate_main
from flora.training.loop import Trainer
from flora.training.soft_labels import main as soft_labels_main

from .conftest import experiment


def test_a_run_folder_inside_the_shards_is_refused(shard_copy):
    with pytest.raises(OverlapError, match="lies inside data.shards"):
        Trainer(load_experiment(experiment(shard_copy, shard_copy / "runs")))
    assert not (shard_copy / "runs").exists()


def test_an_evaluation_into_the_shards_is_one_line(shard_root, teachers, tmp_path, capsys):
    checkpoint = tmp_path / "best_model.pt"
    shutil.copyfile(teachers["global"], checkpoint)
    argv = ["--checkpoint", str(checkpoint), "--split", "val", "--out", str(shard_root / "eval")]
    code = evaluate_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "lies inside the shards it evaluates on" in err
    assert not (shard_root / "eval").exists()


def test_a_soft_label_cache_inside_the_shards_is_one_line(shard_copy, teachers, tmp_path, capsys):
    import yaml

    cfg = experiment(shard_copy, tmp_path, "s", objective={"kind": "distill"})
    cfg["distill"] = {
        "teachers": [{"name": "global", "checkpoint": str(teachers["global"])}],
        "soft_labels": "cached",
        "cache": {"dir": str(shard_copy / "soft")},
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert soft_labels_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lies inside data.shards" in err and len(err.splitlines()) == 1
    assert not (shard_copy / "soft").exists()
