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
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

from .conftest import killed_save

REPO = Path(__file__).resolve().parents[2]
#: What torch's refusal says about loading unsafely; never passed on to the user.
ADVICE = ("weights_only", "weights only", "trusted source", "safe_globals")


class Payload:  # anything that is not plain data must not be unpickled
    pass


def _minimal():
    return {"model": {"w": torch.ones(2)}, "class_mapping": {"a": 0}, "config": {}, "preprocessing": {}}


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {**_minimal(), "rng": [rng_state()]})
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["format"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, **_minimal(), "x": Payload()}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a Flora checkpoint (torch.load: UnpicklingError: ")
    assert "Payload" in message and "\n" not in message  # what it holds, in one line
    assert not [a for a in ADVICE if a in message.lower()], message


def _damaged(tmp_path: Path, damage: str) -> Path:
    """A real Flora checkpoint cut in half, or other bytes where one should be."""
    good = save_checkpoint(tmp_path / "good.pt", {**_minimal(), "rng": [rng_state()]}).read_bytes()
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


def test_not_a_flora_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Flora checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _minimal())
    with pytest.raises((TypeError, AttributeError)):
        save_checkpoint(path, {**_minimal(), "bad": lambda: 0})  # cannot be pickled: fails mid-write
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {**_minimal(), "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
