"""The many / medium / few-shot figures of two ranks are those of one: records are merged first."""

import json
import subprocess
import sys

import pytest

from flora.training.metrics import BUCKETS


@pytest.mark.slow
def test_bucket_figures_of_two_ranks_are_those_of_one(teachers, tmp_path):
    evaluate = ["-m", "flora.training.evaluate", "--checkpoint", str(teachers["global"]), "--split", "val"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for launcher, out in ((torchrun, tmp_path / "two"), ([sys.executable], tmp_path / "one")):
        argv = [*launcher, *evaluate, "--no-calibration", "--out", str(out)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("two", "one"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["metrics"]["macro_top5"] == one["metrics"]["macro_top5"]
    tail_two, tail_one = two["buckets"], one["buckets"]
    for key in ("thresholds", "rule", "species", "test_samples"):
        assert tail_two[key] == tail_one[key]
    assert list(tail_two["per_region"]) == list(tail_one["per_region"])
    sections = [(tail_two["metrics"], tail_one["metrics"])]
    sections += [(tail_two["per_region"][r], tail_one["per_region"][r]) for r in tail_one["per_region"]]
    for per_bucket_two, per_bucket_one in sections:
        for name in BUCKETS:
            a, b = per_bucket_two[name], per_bucket_one[name]
            assert (a is None) == (b is None)
            if b is not None:
                for key in ("samples", "species", "top1", "top5", "macro_top1"):
                    assert a[key] == b[key], (name, key)
                assert a["ece"] == pytest.approx(
                    b["ece"], abs=1e-6
                )  # confidences: other batches' float noise
