"""The replay benchmark, small: both modes read the same number of images per backend and the ratio is
theirs (wiring; the figures are the benchmark's, benchmarks/replay.py)."""

from argparse import Namespace

import pytest

from benchmarks.replay import measure
from flora.loaders.dali import HAVE_DALI

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")),
    "torch",
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_and_fresh_read_the_same_images(shard_root, backend):
    args = Namespace(size=32, batch=16, threads=2, buffer=64, views=2, epochs=2)
    res = measure(shard_root, args, backend)
    assert res["images"]["fresh"] == res["images"]["replay"] > 0
    rate = res["img_per_s"]
    assert res["replay_vs_fresh"] == pytest.approx(rate["replay"] / rate["fresh"])
    assert len(res["per_epoch"]["replay"]) == 2
