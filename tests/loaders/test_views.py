"""Stored views (loaders/views.py): parameters drawn per sample key within the augmentation's ranges, one
crop rule for both backends, and loaders that replay a view exactly: the same pixels for a sample's
view in any epoch and order, after a mid-epoch resume, and (the crop) the same geometry on DALI and the
reference loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flora.loaders import create_dataloaders
from flora.loaders.config import AugmentConfig
from flora.loaders.dali import HAVE_DALI
from flora.loaders.index import LoaderError
from flora.loaders.views import AREA, FIELDS, FLIP, HUE, LOG_RATIO, Replay, crop_box, draw

from .conftest import data_cfg

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")),
    "torch",
]
PLAIN = {"rotate_degrees": 0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}


def test_views_are_drawn_per_key_within_the_configured_ranges():
    aug = AugmentConfig(scale=[0.3, 0.9], ratio=[0.5, 2.0], hflip=0.25, hue=0.05)
    keys = [f"s{i:05d}" for i in range(4000)]
    p = draw(keys, 3, aug, seed=7)
    assert p.shape == (4000, 3, len(FIELDS)) and p.dtype == np.float32
    assert p[..., AREA].min() >= 0.3 and p[..., AREA].max() <= 0.9
    assert p[..., LOG_RATIO].min() >= math.log(0.5) - 1e-6 and p[..., LOG_RATIO].max() <= math.log(2) + 1e-6
    assert abs(p[..., HUE]).max() <= 0.05 + 1e-6
    assert p[..., FLIP].mean() == pytest.approx(0.25, abs=0.02)
    assert abs(np.corrcoef(p[:, 0, AREA], p[:, 1, AREA])[0, 1]) < 0.05  # views independent
    # a sample keeps its views whatever else the split holds; another seed draws others
    assert np.array_equal(draw(keys[::-7], 3, aug, seed=7), p[::-7])
    assert not np.allclose(draw(keys[:10], 3, aug, seed=8), p[:10])


def test_the_crop_box_fits_the_image_and_follows_area_ratio_and_position():
    row = np.zeros(len(FIELDS), np.float32)
    row[AREA], row[LOG_RATIO] = 0.25, 0.0
    assert crop_box(row, 200, 400) == (0, 0, 141, 141)  # sqrt(0.25 * 80000), left/top
    row[[2, 3]] = 1.0  # x, y: right/bottom
    assert crop_box(row, 200, 400) == (259, 59, 141, 141)
    row[AREA], row[LOG_RATIO] = 1.0, math.log(4.0)  # 566 x 141 is wider than the image: clipped to it
    assert crop_box(row, 200, 400) == (0, 59, 400, 141)


def test_the_view_rule_cycles_each_sample_through_its_views():
    params = np.zeros((5, 3, len(FIELDS)), np.float32)
    replay = Replay(params, np.array([0, 1, 2, 0, 1]))
    ids = np.arange(5)
    assert replay.view_of(0, ids).tolist() == [0, 1, 2, 0, 1]
    assert replay.view_of(4, ids).tolist() == [1, 2, 0, 1, 2]
    assert sorted(replay.view_of(e, [2])[0] for e in range(3)) == [0, 1, 2]
    assert replay.with_view(2).view_of(9, ids).tolist() == [2] * 5
    with pytest.raises(ValueError, match="view 3 of 3"):
        replay.with_view(3)


def _replay_loader(shard_root, backend, fixed=None, views=3, **over):
    train, _, _ = create_dataloaders(
        data_cfg(shard_root, backend=backend, worker_start="fork", train_remainder="pad", **over)
    )
    keys = train.index.keys
    params = draw(keys, views, train.cfg.augment, seed=0)
    train.set_replay(Replay.for_keys(params, keys, 0, fixed))
    return train


def _images(loader, epoch) -> dict[tuple[int, int], torch.Tensor]:
    loader.set_epoch(epoch)
    out = {}
    for batch in loader:
        keep = batch["valid"]
        for i, v, image in zip(
            batch["index"][keep].tolist(), batch["view"][keep].tolist(), batch["image"][keep], strict=True
        ):
            out[(i, v)] = image
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_view_is_replayed_pixel_for_pixel_in_any_epoch(shard_root, backend):
    loader = _replay_loader(shard_root, backend, fixed=1)  # every read: view 1
    first, second = _images(loader, 0), _images(loader, 1)  # two epochs: other orders
    assert set(first) == set(second) and len(first) == len(loader.index)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the training rule: view (h(key) + epoch) mod 3; the batch says which, and view 1 is the same pixels
    loader.set_replay(Replay.for_keys(loader.replay.params, loader.index.keys, 0))
    cycled = _images(loader, 0)
    views = {v for _, v in cycled}
    assert views == {0, 1, 2}
    ones = [k for k in cycled if k[1] == 1]
    assert ones and all(torch.equal(cycled[k], first[k]) for k in ones)
    others = [k for k in cycled if k[1] != 1]
    differ = [not torch.allclose(cycled[k], first[(k[0], 1)]) for k in others]
    assert sum(differ) >= 0.9 * len(others)  # another view is another crop
    with pytest.raises(LoaderError, match="stored views for 4 samples"):
        loader.set_replay(Replay(np.zeros((4, 2, len(FIELDS)), np.float32), np.zeros(4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_epoch_replays_the_same_views(shard_root, backend):
    loader = _replay_loader(shard_root, backend)
    loader.set_epoch(2)
    batches = iter(loader)
    head = [next(batches) for _ in range(3)]
    state = loader.state_dict()
    rest = list(batches)
    again = _replay_loader(shard_root, backend)
    again.load_state_dict(state)
    resumed = list(again)
    assert len(resumed) == len(rest)
    for a, b in zip(rest, resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["view"], b["view"])
        assert torch.equal(a["image"], b["image"])
    assert all("view" in b for b in head)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_dali_and_the_reference_loader_crop_a_stored_view_alike(shard_root):
    """The same box in pixels on both backends (views.py's ``crop_box``): without rotation and colour,
    the two differ by the resize's arithmetic only (~0.002 of a normalised unit), another sample's
    image by ~1."""
    got = {b: _images(_replay_loader(shard_root, b, fixed=0, augment=PLAIN), 0) for b in ("dali", "torch")}
    keys = sorted(set(got["dali"]) & set(got["torch"]))
    assert len(keys) == len(got["torch"])
    same = np.array([(got["dali"][k] - got["torch"][k]).abs().mean().item() for k in keys])
    other = np.array(
        [(got["dali"][k] - got["torch"][keys[j - 1]]).abs().mean().item() for j, k in enumerate(keys)]
    )
    assert np.median(same) < 0.01 and same.max() < 0.02
    assert np.median(other) > 0.3
