"""The long-tail benchmark, small: its world (every species in test, the imbalance), every available
variant trained and scored (wiring), each twice with the same seed (determinism), the floors and the
chart. The figures themselves are the benchmark's (benchmarks/longtail.py), not checked here."""

import json
import math

import numpy as np
import pytest

from benchmarks.longtail import (
    LONG_TAIL,
    METRICS,
    VARIANTS,
    Recipe,
    World,
    floor_lines,
    plot,
    prototypes,
    run,
    species_pixels,
    world_labels,
)
from benchmarks.results import portable
from flora.loaders.dali import HAVE_DALI

TINY = World(
    species=20, genera=5, samples=300, zipf=1.0, image_px=16, test_min=3, val_min=1, shard_samples=100
)
RECIPE = Recipe(
    model="test_efficientnet",
    teacher="test_resnet",
    epochs=2,
    batch=32,
    backend="dali" if HAVE_DALI else "torch",
)


def test_the_world_is_long_tailed_with_every_species_held_out():
    labels = world_labels(TINY)
    counts = np.bincount(labels["train"], minlength=TINY.species)
    assert counts.min() >= 1 and counts.max() / counts.min() >= 10
    for split in ("val", "test"):
        held_out = np.bincount(labels[split], minlength=TINY.species)
        assert held_out.min() >= (TINY.test_min if split == "test" else TINY.val_min)
    test = np.bincount(labels["test"], minlength=TINY.species)
    assert test[np.argmax(counts)] > test[np.argmin(counts)], "test follows the training distribution"
    # a species' images do not depend on its count: the same draw gives the same image
    proto = prototypes(TINY.species, TINY.genera)
    one = species_pixels(proto, 3, np.random.default_rng(7), 16)
    assert np.array_equal(one, species_pixels(proto, 3, np.random.default_rng(7), 16))
    assert not np.array_equal(one, species_pixels(proto, 4, np.random.default_rng(7), 16))


@pytest.mark.slow  # 16 small runs: about 3 minutes on 2 cores
def test_every_variant_runs_and_repeats_exactly(tmp_path):
    lines = []
    result = run(TINY, RECIPE, seeds=[0, 0], kd_seeds=[0, 0], work=tmp_path / "work", log=lines.append)
    by_name = {e["variant"]: e for e in result["variants"]}
    assert list(by_name) == [*VARIANTS, "teacher", "student_online", "student_cached", "student_stored_views"]
    assert result["world"]["species_in_test"] == TINY.species
    assert result["world"]["imbalance_ratio"] >= 10
    for name, entry in by_name.items():
        first, second = entry["runs"]
        for key in METRICS:
            if first[key] is not None:
                assert 0.0 <= first[key] <= 1.0 and math.isfinite(first[key]), (name, key)
            assert first[key] == second[key], f"{name}: {key} differs between two runs of one seed"
        assert entry["spread"]["top1"]["std"] == 0.0
    assert (tmp_path / "work" / "soft_labels").is_dir(), "the cached student built its soft labels"
    floors = result["floors"]
    assert floors["long_tail"]["best"]["variant"] in LONG_TAIL
    assert floors["student_online_vs_teacher"]["ratio"] > 0
    stored = floors["student_stored_views_vs_online"]
    assert stored["met"] == (stored["gap_pts"] <= 2) and stored["stored_views_top1"] > 0
    assert len(floor_lines(floors)) == 3 and len(lines) == 1 + 2 * (len(VARIANTS) + 4)
    json.dumps(portable(result))  # the result is plain JSON
    plot(result, tmp_path / "longtail.png")
    assert (tmp_path / "longtail.png").stat().st_size > 0
