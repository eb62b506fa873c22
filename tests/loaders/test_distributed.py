"""Two real ranks under torchrun (gloo): every sample exactly once per epoch, across ranks, on both
backends; validation neither drops nor repeats anything; a sampled epoch cut exactly across the ranks
and taken over by a run on one rank."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from flora.loaders import create_dataloaders
from flora.loaders.dali import HAVE_DALI


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_torchrun_two_ranks_exact_epochs(shard_root, tmp_path, backend):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    config = write_config(tmp_path, shard_root, backend)
    audit = tmp_path / "audit.json"
    proc = torchrun(2, "--config", str(config), "--epochs", "2", "--audit", str(audit))
    result = json.loads(audit.read_text())
    assert result["world_size"] == 2
    orders = []
    for record in result["epochs"]:
        for split, per_rank in record.items():
            ids = per_rank[0] + per_rank[1]
            assert not set(per_rank[0]) & set(per_rank[1]), f"{split}: a sample on both ranks"
            assert sorted(ids) == list(range(result["samples"][split])), f"{split}: not every sample once"
        orders.append(record["train"][0])
    assert orders[0] != orders[1]  # a new order every epoch
    assert "images/s (all ranks)" in proc.stdout


def write_config(tmp_path, shard_root, backend: str, extra: str = ""):
    """A small two-rank data config (``extra``: more keys, each ending in a comma)."""
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data: {{shards: {shard_root}, image_size: 64, batch_size: 16, threads: 1, device: cpu,{extra}"
        f" backend: {backend}, train_remainder: pad, index_cache: off}}\n"
    )
    return config


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "flora.loaders", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_torchrun_sampled_epochs_and_a_take_over_on_one_rank(shard_root, tmp_path, backend):
    """class_balanced under two ranks: each rank reads its exact cut of the epoch's list, stopped after 3
    batches; resumed on two ranks, each reads exactly the rest of its cut in the same order; taken over
    by one rank, epoch 0 ends with exactly the unread draws, and epoch 1 is the one-rank run's own."""
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    config = write_config(tmp_path, shard_root, backend, " sampling: {policy: class_balanced},")
    state, before, after = tmp_path / "state.json", tmp_path / "before.json", tmp_path / "after.json"
    two = torchrun(2, "--config", str(config), "--epochs", "2", "--stop-after", "3",
                   "--save-state", str(state), "--audit", str(before))  # fmt: skip
    assert "policy=class_balanced" in two.stdout
    again = tmp_path / "again.json"
    torchrun(2, "--config", str(config), "--epochs", "1", "--resume", str(state), "--audit", str(again))
    torchrun(1, "--config", str(config), "--epochs", "2", "--resume", str(state), "--audit", str(after))
    first, then = json.loads(before.read_text()), json.loads(after.read_text())
    resumed = json.loads(again.read_text())["epochs"][0]["train"]
    assert then["first_epoch"] == 0 and len(json.loads(state.read_text())) == 2
    train, _, _ = create_dataloaders(str(config), rank=0, world_size=1)
    listed = train.planner.epoch_list(0).tolist()
    old = first["epochs"][0]["train"]
    assert [len(r) for r in old] == [3 * 16, 3 * 16]
    for rank, ids in enumerate(old):  # each rank: the head of its cut, then exactly the rest, in order
        cut, _, _ = create_dataloaders(str(config), rank=rank, world_size=2)
        whole = [i for b in cut for i in b["index"][b["valid"]].tolist()]
        assert Counter(whole) == Counter(cut.plan(0).tolist())
        assert ids + resumed[rank] == whole
    (rest,) = then["epochs"][0]["train"]
    assert Counter(old[0] + old[1] + rest) == Counter(listed)  # every draw of the epoch exactly once
    (later,) = then["epochs"][1]["train"]
    assert Counter(later) == Counter(train.plan(1).tolist())  # epoch 1: the one-rank run's own list
