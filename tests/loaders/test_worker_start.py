"""``data.worker_start``: the torch loader's workers give the same batches whether they start from the
fork server (the default) or by fork, and an unknown method is one config error naming the key."""

import pytest
import torch

from flora.config import ConfigError
from flora.loaders import create_dataloaders

from .conftest import data_cfg


def first_epoch(shard_root, method: str) -> list[dict]:
    train, _, _ = create_dataloaders(data_cfg(shard_root, backend="torch", worker_start=method))
    train.set_epoch(0)
    return list(train)


def test_fork_server_and_fork_give_the_same_batches(shard_root):
    served, forked = first_epoch(shard_root, "forkserver"), first_epoch(shard_root, "fork")
    assert len(served) == len(forked) > 1
    for a, b in zip(served, forked, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_an_unknown_start_method_is_refused_naming_the_key(shard_root):
    with pytest.raises(ConfigError, match="worker_start"):
        create_dataloaders(data_cfg(shard_root, backend="torch", worker_start="thread"))
