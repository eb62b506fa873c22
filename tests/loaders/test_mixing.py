"""Batches that mix species: on shards written species by species, the sampled and interleaved reading
orders give batches with as many distinct species as i.i.d. batches of the same epoch list, and plain
uniform (the shards' own order through the shuffle buffer) gives far fewer: the reason for
``interleave``. Measured on the reference loader's plan (``train.order``: its reading order after the
shuffle buffer, which benchmarks/mixing.py checks it reads exactly); the benchmark measures both loaders
reading real epochs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.mixing import POLICIES, against_iid, iid_distinct, loader_config, write_shard_set
from benchmarks.sampling import zipf_labels
from flora.loaders import create_dataloaders

#: A long tail: 2,400 samples over 120 species (511 down to 3 samples per species), in 12 shards of 200.
LABELS = zipf_labels(2_400, 120, seed=0)
SHARD_SAMPLES = 200
BATCH, BUFFER = 32, 128  # the buffer holds 5% of the split: it cannot hide the order of the tars
EPOCHS = 3
#: How far from i.i.d. a mixing order may be. Over 10 seeds the sampled and interleaved orders on
#: species-sorted shards gave 0.985 to 1.003 of i.i.d.; an order that keeps runs of one shard gives
#: ~0.56 (plain uniform below).
WITHIN = 0.03
#: Plain uniform on species-sorted shards stays below this share of i.i.d. (0.56 to 0.57 over 10 seeds).
SORTED_UNIFORM_BELOW = 0.8


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mixing")
    return {
        order: write_shard_set(root / order, LABELS, order, shard_samples=SHARD_SAMPLES, val_samples=8)
        for order in ("flora", "by_species")
    }


def planned_ratio(root, policy: str) -> float:
    """Distinct species per batch of the reference loader's reading order over ``EPOCHS`` epochs (full
    batches, as ``train_remainder: drop`` yields them), over the i.i.d. expectation."""
    train, val, _ = create_dataloaders(
        loader_config(root, "torch", POLICIES[policy], BATCH, BUFFER, threads=1)
    )
    measured, iid = [], []
    try:
        for epoch in range(EPOCHS):
            labels = train.index.labels[train.order(epoch)]
            full = len(labels) // BATCH
            m, e = against_iid(
                list(labels[: full * BATCH].reshape(full, BATCH)),
                train.index.labels[train.planner.epoch_list(epoch)],
            )
            measured.append(m)
            iid.append(e)
    finally:
        train.close()
        val.close()
    return float(np.concatenate(measured).mean() / np.concatenate(iid).mean())


@pytest.mark.parametrize("policy", ["uniform+interleave", "class_balanced"])
def test_sampled_orders_mix_species_like_iid_on_species_sorted_shards(shard_sets, policy):
    ratio = planned_ratio(shard_sets["by_species"], policy)
    assert abs(ratio - 1.0) <= WITHIN, f"{policy}: {ratio:.3f} of i.i.d. distinct species per batch"


def test_plain_uniform_on_species_sorted_shards_is_far_from_iid(shard_sets):
    """The shuffle buffer alone mixes a shard or two: batches hold few species (interleave fixes it)."""
    ratio = planned_ratio(shard_sets["by_species"], "uniform")
    assert ratio < SORTED_UNIFORM_BELOW, f"plain uniform gave {ratio:.3f} of i.i.d."


def test_plain_uniform_on_flora_order_shards_mixes_like_iid(shard_sets):
    """The sharder's hash order makes any run of a shard a random sample of the split."""
    ratio = planned_ratio(shard_sets["flora"], "uniform")
    assert abs(ratio - 1.0) <= WITHIN, f"plain uniform on Flora's order: {ratio:.3f} of i.i.d."


def test_iid_expectation_matches_random_permutations():
    """The exact expectation against batches of random permutations of the same list."""
    rng = np.random.default_rng(1)
    draws = [len(np.unique(rng.permutation(LABELS)[:BATCH])) for _ in range(4_000)]
    # the mean of 4,000 draws has a standard error of ~0.04 species (a spread of ~2.4 per batch)
    assert abs(np.mean(draws) - iid_distinct(LABELS, BATCH)) < 0.2
    assert iid_distinct(LABELS, 1) == pytest.approx(1.0)
    assert iid_distinct(np.zeros(50, dtype=np.int64), BATCH) == pytest.approx(1.0)
