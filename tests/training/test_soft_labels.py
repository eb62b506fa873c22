"""Cached soft labels are kept per shard: after an incremental build (tests/sharding/test_incremental.py)
the teachers run on the new shards' samples only, and the rows equal a cache computed from scratch."""

import shutil
from types import SimpleNamespace

import torch
from torch import nn

from flora.loaders.config import load_data_config
from flora.loaders.index import build_index
from flora.sharding.build.run import build
from flora.training.soft_labels import ensure_cache

from ..sharding.test_incremental import config, grown  # noqa: F401  (grown: the module's fixture)

CLASSES = 8


class CountingMixer(nn.Module):
    """A stand-in for the teachers' mixture: a fixed per-sample function of the image; counts samples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, CLASSES)
        self.num_classes = CLASSES
        self.seen = 0

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return self.head(images.float().mean(dim=(2, 3))).softmax(dim=1)


def soft_cfg(shards, cache_dir, checkpoint):
    data = {"shards": str(shards), "backend": "torch", "device": "cpu", "image_size": 32, "threads": 1,
            "index_cache": "off", "batch_size": 16}  # fmt: skip
    distill = SimpleNamespace(
        teachers=[SimpleNamespace(checkpoint=str(checkpoint), weight=1.0)],
        temperature=1.0,
        mixing="mean",
        cache=SimpleNamespace(top_k=3, dir=str(cache_dir), views=0),
    )
    return SimpleNamespace(data=load_data_config({"data": data}), distill=distill)


def test_incremental_store_computes_soft_labels_for_new_shards_only(grown, tmp_path):  # noqa: F811
    out = tmp_path / "shards"
    shutil.copytree(grown.root / "v1", out)
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"stands in for a teacher checkpoint: the cache key stats it")
    cfg = soft_cfg(out, tmp_path / "soft", checkpoint)
    mixer = CountingMixer()
    v1 = build_index(cfg.data, "train")
    first = ensure_cache(cfg, mixer, v1, torch.device("cpu"))
    assert first.computed == mixer.seen == len(v1)

    manifest = build(grown.root / "splits_v2", out, config(grown.cache))
    new = {s["path"] for s in manifest["shards"] if s["version"] == manifest["version"]}
    v2 = build_index(cfg.data, "train")
    new_samples = sum(int(v2.bounds[i + 1] - v2.bounds[i]) for i, s in enumerate(v2.shards) if s.rel in new)
    assert 0 < new_samples < len(v2)
    mixer.seen = 0
    grown_cache = ensure_cache(cfg, mixer, v2, torch.device("cpu"))
    assert grown_cache.computed == mixer.seen == new_samples, "the teachers ran on the new samples only"

    fresh = ensure_cache(soft_cfg(out, tmp_path / "fresh", checkpoint), mixer, v2, torch.device("cpu"))
    ids = torch.arange(len(v2))
    assert torch.allclose(grown_cache.lookup(ids, CLASSES), fresh.lookup(ids, CLASSES), atol=1e-6)


def test_a_key_in_two_shards_gets_the_row_of_the_shard_that_serves_it(tmp_path):
    """A record relabelled (or moved to another region) is tombstoned in its old shard, whose cached
    file still holds its old row, and live in a new shard: the index's sample must get the new shard's
    row, whatever the order of the shards."""
    import numpy as np

    from flora.training.soft_labels import load_cache

    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    np.savez(new, keys=np.array(["a", "k"]), classes=np.array([[1], [2]], dtype=np.int32),
             probs=np.ones((2, 1), dtype=np.float32))  # fmt: skip
    np.savez(old, keys=np.array(["k", "b"]), classes=np.array([[7], [3]], dtype=np.int32),
             probs=np.ones((2, 1), dtype=np.float32))  # fmt: skip
    index = SimpleNamespace(keys=["a", "k", "b"], bounds=np.array([0, 2, 3]))  # "k" is tombstoned in old
    cache = load_cache(tmp_path, [new, old], index)
    assert cache.classes[cache.rows].squeeze(1).tolist() == [1, 2, 3]
