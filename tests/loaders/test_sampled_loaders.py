"""Sampling in the loaders (loaders/plan.py over loaders/sampling.py), on both backends, with ranks in one
process: each rank reads exactly its cut of the epoch's list (repeats included), the batch counts agree,
validation is never sampled, a mid-epoch resume reads exactly the rest, and a run on another number of
ranks (or batch size) takes an epoch over: the reads no old rank consumed, each once, then the epochs of
a fresh run. The same under torchrun: test_distributed.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from flora.loaders import create_dataloaders
from flora.loaders.__main__ import main as loaders_main
from flora.loaders.dali import HAVE_DALI
from flora.loaders.index import LoaderError, SampleIndex
from flora.loaders.plan import MAX_WINDOW, MIN_RUN, reading_window, window_order
from flora.loaders.sampling import target_frequencies
from flora.sharding.format.reader import Shard

from .conftest import data_cfg
from .test_sampling import tv, tv_bound

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")),
    "torch",
]
BALANCED = {"policy": "class_balanced"}


def loaders(shard_root, world_size: int, backend: str = "torch", sampling=BALANCED, **over):
    """The train loaders of every rank of a ``world_size``-rank run (and rank 0's info)."""
    over = {"train_remainder": "pad", **over}
    if sampling is not None:  # None: the default section (uniform, shard by shard)
        over["sampling"] = sampling
    cfg = data_cfg(shard_root, backend=backend, **over)
    made = [create_dataloaders(cfg, rank=r, world_size=world_size) for r in range(world_size)]
    return [m[0] for m in made], made[0][2]


def valid_ids(batch) -> list[int]:
    return batch["index"][batch["valid"]].tolist()


def read(loader, epoch: int | None = None) -> list[int]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return [i for b in loader for i in valid_ids(b)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_rank_reads_its_exact_cut_of_the_sampled_list(shard_root, backend):
    ranks, info = loaders(shard_root, 2, backend)
    listed = ranks[0].planner.epoch_list(0)
    assert len(listed) == info.samples["train"]  # epoch_samples: the split's size by default
    assert len(np.unique(listed)) < len(listed)  # drawn with replacement: repeats
    got = [read(r, 0) for r in ranks]
    assert len(ranks[0]) == len(ranks[1])  # the same batch count on every rank
    for r, ids in zip(ranks, got, strict=True):
        assert Counter(ids) == Counter(r.plan(0).tolist())  # this rank's cut, each read once
    assert Counter(got[0] + got[1]) == Counter(listed.tolist())  # together: the epoch's list
    again, _ = loaders(shard_root, 2, backend)
    assert np.array_equal(again[0].planner.epoch_list(0), listed)  # a pure function of its inputs
    assert not np.array_equal(again[0].planner.epoch_list(1), listed)  # a new draw per epoch


def test_drop_keeps_its_meaning_under_sampling(shard_root):
    ranks, _ = loaders(shard_root, 2, train_remainder="drop", batch_size=24)
    length = ranks[0].planner.length(0)
    for r in ranks:
        batches = list(r)
        assert len(batches) == len(r) == (length // 2) // 24  # equal full batches on every rank
        assert all(bool(b["valid"].all()) and len(b["label"]) == 24 for b in batches)


@pytest.mark.parametrize(
    "sampling",
    [BALANCED, {"policy": "power", "power": 0.5}, {"policy": "repeat_factor", "repeat_threshold": 0.05}],
    ids=["class_balanced", "power", "repeat_factor"],
)
def test_realised_frequencies_match_the_policy(shard_root, sampling):
    """Over 40 epochs' lists (~12,000 draws), the realised species shares are within three times the
    expected total variation of multinomial draws from the policy's target (test_sampling.tv_bound);
    uniform's shares are far outside that bound for the balanced and power policies."""
    (train,), _ = loaders(shard_root, 1, sampling=sampling)
    labels = train.index.labels
    ids = np.concatenate([train.planner.epoch_list(e) for e in range(40)])
    target = target_frequencies(labels, None, train.cfg.sampling)
    realised = np.bincount(labels[ids], minlength=len(target)) / len(ids)
    assert tv(realised, target) < tv_bound(target, len(ids))
    uniform = np.bincount(labels, minlength=len(target)) / len(labels)
    if sampling["policy"] != "repeat_factor":
        assert tv(uniform, target) > 3 * tv_bound(target, len(ids))


def test_validation_is_never_sampled(shard_root):
    cfg = data_cfg(shard_root, sampling={"policy": "power", "power": 0.0, "epoch_samples": 1000})
    train, val, info = create_dataloaders(cfg)
    assert train.planner.length(0) == 1000
    assert np.array_equal(val.planner.epoch_list(3), np.arange(info.samples["val"]))
    assert sorted(read(val, 3)) == list(range(info.samples["val"]))


def test_streams_hold_their_proportions(shard_root):
    (probe,), _ = loaders(shard_root, 1, sampling=None)
    regions = [s.region for s in probe.index.shards]
    region = Counter(np.repeat(regions, np.diff(probe.index.bounds))).most_common()[-1][0]  # the smallest
    streams = [{"name": "small", "regions": region, "proportion": 0.3}, {"name": "rest", "proportion": 0.7}]
    (train,), info = loaders(shard_root, 1, sampling={"policy": "uniform", "streams": streams})
    shares = info.sampling["epoch_0"]["stream_shares"]
    assert abs(shares["small"] - 0.3) < 0.01 and abs(shares["rest"] - 0.7) < 0.01
    small = {i for i, s in enumerate(train.index.shards) if s.region == region}
    ids = read(train, 0)
    in_small = np.isin(train.index.shards_of(np.asarray(ids)), list(small)).mean()
    assert abs(in_small - 0.3) < 0.01 + 16 / len(ids)  # pad's filler rows are not valid: none lost


def test_info_reports_the_policy_and_what_it_realised(shard_root):
    _, info = loaders(shard_root, 1)
    assert info.sampling["config"]["policy"] == "class_balanced"
    got = info.sampling["epoch_0"]
    assert got["policy"] == "class_balanced" and got["samples"] == info.samples["train"]
    assert got["species_seen"] <= got["species"] and got["draws_per_species"]["max"] >= 1
    _, plain = loaders(shard_root, 1, sampling=None)
    assert plain.sampling["epoch_0"]["distinct_samples"] == plain.samples["train"]  # uniform: each once


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_reads_exactly_the_rest_in_order(shard_root, backend):
    (whole,), _ = loaders(shard_root, 1, backend)
    full = list(whole)
    (first,), _ = loaders(shard_root, 1, backend)
    head = []
    for b in first:
        head.append(b)
        if len(head) == 4:
            state = first.state_dict()
            break
    (resumed,), _ = loaders(shard_root, 1, backend)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert [valid_ids(b) for b in head + tail] == [valid_ids(b) for b in full]
    assert torch.equal(tail[0]["image"], full[4]["image"])  # the same augmentation draws


def take_over(shard_root, old: int, new: int, backend: str, stop: int, sampling=BALANCED, **over):
    """Old ranks read ``stop`` batches of epoch 0 and save; new ranks take over. Returns (reads by the
    old ranks, reads by the new ranks in epoch 0, the new loaders, epoch 0's list)."""
    olds, _ = loaders(shard_root, old, backend, sampling, **over)
    consumed, states, running = [], [], []
    for loader in olds:
        it = iter(loader)
        for _ in range(stop):
            consumed += valid_ids(next(it))
        states.append(loader.state_dict())  # while the epoch runs: DALI's iterator is alive
        running.append(it)
    news, _ = loaders(shard_root, new, backend, sampling, **over)
    rest = []
    for loader in news:
        loader.load_state_dict(states)
        assert loader.epoch == 0
        rest += read(loader, 0)
    return consumed, rest, news, olds[0].planner.epoch_list(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3)])
def test_another_number_of_ranks_takes_the_epoch_over(shard_root, backend, old, new):
    consumed, rest, news, listed = take_over(shard_root, old, new, backend, stop=3)
    assert len(consumed) == old * 3 * 16
    assert Counter(consumed + rest) == Counter(listed.tolist())  # every read of the epoch exactly once
    fresh, _ = loaders(shard_root, new, backend)
    for taken, own in zip(news, fresh, strict=True):
        assert len(taken) == len(own)  # later epochs are a fresh run's, batch for batch
        assert read(taken, 1) == read(own, 1)


def test_a_new_batch_size_and_the_uniform_plan_take_over_too(shard_root):
    olds, _ = loaders(shard_root, 2, sampling=None)
    states = []
    for loader in olds:
        it = iter(loader)
        consumed = [valid_ids(next(it)) for _ in range(2)]
        states.append(loader.state_dict())
        del it, consumed
    olds_reads = []
    for loader in olds:
        order = loader.order(0)
        olds_reads += order[: 2 * 16].tolist()
    (single,), _ = loaders(shard_root, 1, sampling=None, batch_size=10)
    single.load_state_dict(states)
    rest = read(single, 0)
    assert sorted(olds_reads + rest) == list(range(len(single.index)))


def test_a_take_over_needs_every_rank_in_step(shard_root):
    olds, _ = loaders(shard_root, 2)
    states = []
    for n, loader in enumerate(olds):
        it = iter(loader)
        for _ in range(n + 1):
            next(it)
        states.append(loader.state_dict())
    (single,), _ = loaders(shard_root, 1)
    with pytest.raises(LoaderError, match="different places"):
        single.load_state_dict(states)
    with pytest.raises(LoaderError, match="every rank's state"):
        single.load_state_dict(states[:1])


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        ({"policy": "balanced"}, "sampling.policy: expected one of"),
        ({"policy": "uniform", "power": 0.5}, "only policy: power uses it"),
        ({"streams": [{"name": "mars", "regions": "MARS", "proportion": 1.0}]}, "selects no sample"),
        ({"policy": "repeat_factor"}, "needs a threshold"),
        ({"policy": "class_balanced", "epoch_samples": 0}, "sampling.epoch_samples: expected >= 1"),
    ],
)
def test_a_bad_sampling_section_is_one_line(shard_root, tmp_path, capsys, sampling, words):
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump(data_cfg(shard_root, backend="torch", sampling=sampling)))
    assert loaders_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora loaders: error: ") and words in err and "\n" not in err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("second", [1, 0], ids=["after-a-batch", "before-any-batch"])
def test_a_taken_over_epoch_can_be_taken_over_again(shard_root, backend, second):
    """2 ranks read 2 batches; 3 ranks take over and save after ``second`` batches; 1 rank takes over
    from those: the epoch's reads are still each read exactly once."""
    olds, _ = loaders(shard_root, 2, backend)
    reads, states, running = [], [], []
    for loader in olds:
        it = iter(loader)
        reads += [i for _ in range(2) for i in valid_ids(next(it))]
        states.append(loader.state_dict())
        running.append(it)
    middle, _ = loaders(shard_root, 3, backend)
    again = []
    for loader in middle:
        loader.load_state_dict(states)
        it = iter(loader)
        reads += [i for _ in range(second) for i in valid_ids(next(it))]
        again.append(loader.state_dict())
        running.append(it)
    assert all(s["segment_base"] for s in again)  # the reads before the first take-over travel on
    (last,), _ = loaders(shard_root, 1, backend)
    last.load_state_dict(again)
    reads += read(last, 0)
    assert Counter(reads) == Counter(olds[0].planner.epoch_list(0).tolist())


def test_the_reading_window_widens_when_a_plan_touches_many_shards():
    """A window holds ``MIN_RUN`` reads per shard touched (DALI: one index file per run), within one
    to ``MAX_WINDOW`` shuffle buffers."""
    shards = [Shard(path=f"{i}.tar", rel=f"train/R/{i}.tar", split="train", region="R") for i in range(100)]
    n = 100 * 10
    index = SampleIndex(
        root="shards", split="train", shards=shards, bounds=np.arange(0, n + 1, 10), keys=[""] * n,
        labels=np.zeros(n, np.int64), jpg_offset=np.zeros(n, np.int64), jpg_size=np.zeros(n, np.int64),
        class_mapping={"a": 0},
    )  # fmt: skip
    every = np.arange(n)
    assert reading_window(index, every, 1024) == 1024  # 100 shards x MIN_RUN fit in one buffer
    assert reading_window(index, every, 64) == MAX_WINDOW * 64  # capped
    assert reading_window(index, every, 512) == MIN_RUN * 100
    assert reading_window(index, every[:40], 16) == 32  # 4 shards touched: 4 x 8 reads
    ordered = window_order(every[::-1].copy(), every[::-1].copy(), 100)
    assert np.array_equal(ordered[:100], np.arange(900, 1000))  # a window sorted by id: by shard, offset
