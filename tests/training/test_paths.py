"""Checkpoints work from any folder: the locations in their config are stored absolute (URLs as they
are), an older checkpoint's relative shard root is found beside it; a run folder or an evaluation
output that is an existing file is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from flora.training import evaluate, train
from flora.training.checkpoint import absolute_locations, load_checkpoint
from flora.training.config import load_experiment
from flora.training.loop import Trainer
from tests.training.conftest import experiment


@pytest.fixture(scope="module")
def relative_run(shard_root, tmp_path_factory) -> Path:
    """best_model.pt of a one-epoch run started in a folder where the shards are ``shards`` and the
    run root ``runs``, both relative."""
    where = tmp_path_factory.mktemp("relative")
    (where / "shards").symlink_to(shard_root, target_is_directory=True)
    cfg = experiment(Path("shards"), Path("runs"), "rel", train={"epochs": 1})
    cwd = os.getcwd()
    os.chdir(where)
    try:
        Trainer(load_experiment(cfg)).fit()
    finally:
        os.chdir(cwd)
    return where / "runs" / "rel" / "best_model.pt"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_checkpoint_stores_its_locations_absolute(relative_run):
    config = torch.load(relative_run, weights_only=True)["config"]
    assert config["data"]["shards"] == str(relative_run.parents[2] / "shards")
    assert config["run"]["root"] == str(relative_run.parents[2] / "runs")


def test_evaluate_runs_from_another_folder(relative_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", str(relative_run), "--split", "test", "--no-calibration", "--out", "eval"]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "results.json").is_file()


def test_an_older_checkpoints_relative_shard_root_is_found_beside_it(
    relative_run, tmp_path, monkeypatch, capsys
):
    """A checkpoint whose config holds a shard root relative to its own folder (copied with its shards)."""
    (tmp_path / "shards").symlink_to(relative_run.parents[2] / "shards", target_is_directory=True)
    state = torch.load(relative_run, weights_only=True)
    state["config"]["data"]["shards"] = "../shards"
    (tmp_path / "copied").mkdir()
    torch.save(state, tmp_path / "copied" / "best_model.pt")
    assert load_checkpoint(tmp_path / "copied" / "best_model.pt").data["shards"] == str(tmp_path / "shards")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["--checkpoint", "../copied/best_model.pt", "--split", "test", "--no-calibration"]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "copied" / "eval_test" / "results.json").is_file()


def test_locations_are_made_absolute_and_urls_kept(tmp_path):
    config = {
        "run": {"root": "runs", "name": "x"},
        "data": {"shards": "s3://bucket/shards", "cache_root": "~/cache", "index_cache": "auto"},
        "model": {"name": "test_vit", "init_from": "teacher/best_model.pt", "pretrained_path": None},
        "distill": {
            "teachers": [{"checkpoint": "/abs/t.pt"}, {"checkpoint": "t2.pt"}],
            "cache": {"dir": None},
        },
    }
    out = absolute_locations(config, tmp_path)
    assert out["run"] == {"root": str(tmp_path / "runs"), "name": "x"}
    assert out["data"] == {
        "shards": "s3://bucket/shards", "cache_root": os.path.expanduser("~/cache"), "index_cache": "auto",
    }  # fmt: skip
    assert out["model"]["init_from"] == str(tmp_path / "teacher" / "best_model.pt")
    assert out["model"]["pretrained_path"] is None
    assert [t["checkpoint"] for t in out["distill"]["teachers"]] == ["/abs/t.pt", str(tmp_path / "t2.pt")]
    assert config["data"]["cache_root"] == "~/cache"  # a copy: the input is unchanged


def test_train_refuses_a_run_folder_that_is_a_file(shard_root, tmp_path, capsys):
    cfg = experiment(shard_root, tmp_path / "runs", "taken", train={"epochs": 1})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("not a folder")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(tmp_path / "exp.yaml")]) == 2
    err = _one_error_line(capsys)
    assert f"{tmp_path / 'runs' / 'taken'} is a file, expected a folder" in err


def test_evaluate_refuses_an_out_that_is_a_file(relative_run, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    args = [
        "--checkpoint",
        str(relative_run),
        "--split",
        "test",
        "--no-calibration",
        "--out",
        str(tmp_path / "out"),
    ]
    assert evaluate.main(args) == 2
    err = _one_error_line(capsys)
    assert err.startswith("flora evaluate: error:") and "is a file, expected a folder" in err
