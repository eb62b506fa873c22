"""The checkpoint type: one load function, one error line, the files the loop wrote before the type."""

import pickle
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flora.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    Preprocessing,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    update_checkpoint,
)

from .conftest import killed_save, make_checkpoint

REPO = Path(__file__).resolve().parents[2]
#: What torch's refusal says about loading unsafely; never passed on to the user.
ADVICE = ("weights_only", "weights only", "trusted source", "safe_globals")


class Payload:  # anything that is not plain data must not be unpickled
    pass


def test_round_trip_with_weights_only(tmp_path):
    written = make_checkpoint("last", temperature=1.25, temperature_split="val")
    path = save_checkpoint(tmp_path / "c.pt", written)
    read = load_checkpoint(path)
    assert isinstance(read, Checkpoint) and isinstance(read.preprocessing, Preprocessing)
    assert torch.equal(read.model["w"], torch.ones(2)) and torch.load(path, weights_only=True)["format"] == 1
    assert read.preprocessing == written.preprocessing and read.class_mapping == {"a": 0, "b": 1}
    assert read.kind == "last" and read.model_name == "test_vit" and read.step == 3
    assert read.temperature == 1.25 and read.temperature_split == "val"
    assert read.training.epoch_losses == [{"sums": {"loss": 1.5}, "seen": 2}]
    assert torch.equal(read.training.rng[0]["torch"], written.training.rng[0]["torch"])
    assert read.data == {"shards": "shards"} and read.metrics is None
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def _as_the_loop_wrote(kind: str) -> dict:
    """A checkpoint dict exactly as the loop wrote it before the type existed (files on disk)."""
    identity = {
        "config": {"model": {"name": "test_vit"}, "data": {"shards": "/data/shards"}},
        "class_mapping": {"a": 0, "b": 1},
        "model_name": "test_vit",
        "preprocessing": {"image_size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.95,
                          "val_resize": 51},
        "temperature": None,
        "world_size": 1,
    }  # fmt: skip
    if kind == "best":
        return {"kind": "best", "model": {"w": torch.ones(2)}, "ema_weights": False, "epoch": 0, "step": 9,
                "metrics": {"top1": 0.5}, **identity, "temperature": 0.39,
                "temperature_split": "val"}  # fmt: skip
    return {
        "kind": "last", "model": {"w": torch.ones(2)}, "ema": None,
        "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 4}, "scaler": {},
        "epoch": 0, "step": 4,
        "best": {"metric": "top1", "value": None, "epoch": None, "step": None}, "rng": [rng_state()],
        "loader": [{"epoch": 0, "rank": 0, "batches_done": 8}],
        "epoch_losses": [{"sums": {"loss": 9.5}, "seen": 8}], **identity,
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["best", "last"])
def test_checkpoints_written_before_the_type_load_and_are_rewritten_unchanged(tmp_path, kind):
    old = _as_the_loop_wrote(kind)
    torch.save({"format": 1, **old}, tmp_path / "old.pt")
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint.kind == kind and checkpoint.preprocessing.val_resize == 51
    assert (checkpoint.training is None) == (kind == "best")
    rewritten = checkpoint.as_state()
    assert sorted(rewritten) == sorted(old)  # the same keys, nothing added, nothing lost
    for key, value in old.items():
        if key not in ("model", "rng"):
            assert rewritten[key] == value and type(rewritten[key]) is type(value), key
    assert torch.equal(rewritten["model"]["w"], old["model"]["w"])


def test_update_checkpoint_replaces_fields_and_keeps_the_rest(tmp_path):
    path = save_checkpoint(tmp_path / "best_model.pt", make_checkpoint(metrics={"top1": 0.25}))
    update_checkpoint(path, temperature=1.5, temperature_split="val")
    updated = load_checkpoint(path)
    assert (updated.temperature, updated.temperature_split, updated.metrics) == (1.5, "val", {"top1": 0.25})
    assert updated.kind == "best" and updated.preprocessing == make_checkpoint().preprocessing
    assert torch.equal(updated.model["w"], torch.ones(2)) and updated.class_mapping == {"a": 0, "b": 1}
    with pytest.raises(TypeError):
        update_checkpoint(path, temprature=2.0)  # a field the type does not have
    assert load_checkpoint(path).temperature == 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "not a Flora checkpoint of format 1: found format 2"),
        ({"kind": "final"}, "the checkpoint's kind is str 'final', expected 'last' or 'best'"),
        ({"class_mapping": ["a", "b"]}, "the checkpoint's class_mapping is list ['a', 'b'], expected "),
        ({"preprocessing": {"image_size": "48"}}, "the checkpoint's preprocessing.image_size is str '48', "),
        ({"temperature": "warm"}, "the checkpoint's temperature is str 'warm', expected a number or None"),
    ],
)
def test_a_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, change, message):
    path = tmp_path / "c.pt"
    torch.save({"format": 1, **_as_the_loop_wrote("best"), **change}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert str(refused.value).startswith(f"{path}: {message}") and "\n" not in str(refused.value)


@pytest.mark.parametrize("missing", ["model", "preprocessing", "optimizer", "rng"])
def test_a_missing_field_is_one_line_naming_it(tmp_path, missing):
    state = {"format": 1, **_as_the_loop_wrote("last")}
    del state[missing]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=rf"c\.pt: the checkpoint has no '{missing}' \(.+ expected\)$"):
        load_checkpoint(tmp_path / "c.pt")


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, **make_checkpoint().as_state(), "x": Payload()}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a Flora checkpoint (torch.load: UnpicklingError: ")
    assert "Payload" in message and "\n" not in message  # what it holds, in one line
    assert not [a for a in ADVICE if a in message.lower()], message


def _damaged(tmp_path: Path, damage: str) -> Path:
    """A real Flora checkpoint cut in half, or other bytes where one should be."""
    good = save_checkpoint(tmp_path / "good.pt", make_checkpoint("last")).read_bytes()
    content = {
        "truncated": good[: len(good) // 2],
        "garbage": b"this is not a checkpoint\n" * 40,
        "empty": b"",
        "plain_pickle": pickle.dumps({"model": [1, 2]}),  # not torch's format; protocol 5
    }[damage]
    path = tmp_path / f"{damage}.pt"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncated", "a damaged or cut-short torch archive, "),
        ("garbage", "neither a torch archive nor a pickle, "),
        ("empty", "the file is empty"),
        ("plain_pickle", "UnpicklingError: it holds more than plain data: "),
    ],
)
def test_an_unreadable_checkpoint_is_one_line_without_torch_advice(tmp_path, damage, reason):
    path = _damaged(tmp_path, damage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning would be a second line
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a Flora checkpoint (torch.load: {reason}") and message.endswith(
        ")"
    )
    assert "\n" not in message and len(message) < len(str(path)) + 200
    assert not [a for a in ADVICE if a in message.lower()], message


def test_every_command_reading_a_checkpoint_says_so_in_one_line(tmp_path):
    path = _damaged(tmp_path, "truncated")
    commands = {
        "evaluate": ["flora.training.evaluate", "--checkpoint", str(path)],
        "export onnx": ["flora.export.onnx", "--checkpoint", str(path), "--out", str(tmp_path / "onnx")],
    }
    procs = {
        stage: subprocess.Popen(
            [sys.executable, "-m", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for stage, argv in commands.items()
    }
    for stage, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (stage, err)
        assert err.startswith(f"flora {stage}: error: {path}: not a Flora checkpoint (torch.load: "), err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert not [a for a in ADVICE if a in err.lower()], err
    assert not (tmp_path / "onnx").exists()


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    run = tmp_path / "run"
    leftover = killed_save(run / "last_checkpoint.pt")
    best_leftover = run / ".best_model.pt.x1y2z3.tmp"
    best_leftover.write_bytes(b"partial")
    kept = [run / ".notes.tmp", run / "last_checkpoint.pt.tmp", run / "metrics.json"]
    for path in kept:
        path.write_text("not a checkpoint temporary")
    assert remove_stale_temporaries(run) == sorted([leftover, best_leftover])
    assert sorted(run.iterdir()) == sorted(kept)
    assert remove_stale_temporaries(run) == [] and remove_stale_temporaries(tmp_path / "none") == []


#: Files that are not Flora checkpoints -> the start of the one line that refuses them (after the path).
NOT_CHECKPOINTS = {
    "other.pt": (
        lambda path: torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path),
        "not a Flora checkpoint: found a dict with keys 'state_dict', 'epoch', expected a dict with "
        "'format': 1, 'model', 'class_mapping', 'preprocessing' and 'config'",
    ),
    "weights.pt": (
        lambda path: torch.save([torch.ones(2)], path),
        "not a Flora checkpoint: found list [tensor([1., 1.])], expected a dict with 'format': 1,",
    ),
    "notes.txt": (
        lambda path: path.write_text("epoch 3: top-1 0.91\n" * 20),
        "not a Flora checkpoint (torch.load: neither a torch archive nor a pickle, ",
    ),
}


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_not_a_flora_checkpoint(tmp_path, name):
    make, message = NOT_CHECKPOINTS[name]
    make(tmp_path / name)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / name)
    assert str(refused.value).startswith(f"{tmp_path / name}: {message}"), refused.value
    assert "\n" not in str(refused.value) and len(str(refused.value)) < len(str(tmp_path)) + 220
    with pytest.raises(CheckpointError, match=r"^no checkpoint at .*missing\.pt$"):
        load_checkpoint(tmp_path / "missing.pt")


def test_the_cli_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path):
    """``flora evaluate --checkpoint X`` (the flora command, as ``python -m flora``): exit 2, one line."""
    procs = {}
    for name, (make, _) in NOT_CHECKPOINTS.items():
        make(tmp_path / name)
        argv = [sys.executable, "-m", "flora", "evaluate", "--checkpoint", str(tmp_path / name)]
        procs[name] = subprocess.Popen(
            argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == "", (name, err)
        assert err.startswith(f"flora evaluate: error: {tmp_path / name}: {NOT_CHECKPOINTS[name][1]}"), err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        save_checkpoint(
            path, make_checkpoint(metrics={"bad": lambda: 0})
        )  # cannot be pickled: fails mid-write
    assert torch.equal(load_checkpoint(path).model["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", make_checkpoint("last"))  # make_checkpoint records rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt").training.rng[0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
