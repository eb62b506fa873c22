import random

import numpy as np
import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


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
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


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
