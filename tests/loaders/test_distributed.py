"""Two real ranks under torchrun (gloo): every sample exactly once per epoch, across ranks, on both
backends; validation neither drops nor repeats anything."""

import json
import subprocess
import sys

import pytest

from flora.loaders.dali import HAVE_DALI


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_torchrun_two_ranks_exact_epochs(shard_root, tmp_path, backend):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data: {{shards: {shard_root}, image_size: 64, batch_size: 16, threads: 1, device: cpu,"
        f" backend: {backend}, train_remainder: pad, index_cache: off}}\n"
    )
    audit = tmp_path / "audit.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "flora.loaders", "--config", str(config), "--epochs", "2", "--audit", str(audit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
