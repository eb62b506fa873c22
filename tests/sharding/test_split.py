"""Dedup, species-conflict policy, the stratified split and the leakage check."""

import random
from collections import Counter

import pytest

from flora.config import ConfigError
from flora.sharding.catalog.records import Record, normalize_url, url_key
from flora.sharding.catalog.split import allocate, assign_splits, dedup, leakage_report
from flora.sharding.config import SplitConfig


def rec(name, url, license_class="permissive", **meta):
    # The restrictive license sorts first by content, so preferring permissive copies is a real rule.
    url = normalize_url(url)
    return Record(
        plant_id=1,
        latin_name=name,
        image_url=url,
        license="cc-by" if license_class == "permissive" else "all-rights-reserved",
        license_class=license_class,
        source="iNaturalist",
        country="ES",
        region="EU_SW",
        meta=meta,
    )


@pytest.mark.parametrize("n", range(0, 40))
def test_allocate_sums_and_covers_every_split(n):
    counts = allocate(n, {"train": 0.8, "val": 0.1, "test": 0.1})
    assert sum(counts.values()) == n
    if n >= 3:
        assert min(counts.values()) >= 1
        assert counts["train"] >= counts["val"] and counts["train"] >= counts["test"]
    assert abs(counts["train"] - 0.8 * n) <= 2


def test_allocate_survives_float_error_on_huge_species():
    counts = allocate(2_000_000, {"train": 0.8000005, "val": 0.1, "test": 0.1})
    assert sum(counts.values()) == 2_000_000


def test_allocate_respects_zero_fractions():
    assert allocate(10, {"train": 0.9, "val": 0.0, "test": 0.1}) == {"train": 9, "val": 0, "test": 1}


def test_dedup_keeps_one_per_url_and_prefers_permissive():
    a = rec("Olea europaea", "http://h/1.jpg", "restrictive", n=1)
    b = rec("Olea europaea", "http://h/1.jpg", "permissive", n=2)
    c = rec("Olea europaea", "http://h/2.jpg")
    for order in ([a, b, c], [c, b, a]):
        result = dedup(order)
        assert sorted(r.image_url for r in result.kept) == ["http://h/1.jpg", "http://h/2.jpg"]
        assert b in result.kept and a not in result.kept
        assert result.duplicates == [(a, b, "same_url")]


def test_http_https_and_percent_encoding_are_one_image_and_https_is_kept():
    a = rec("Olea europaea", "http://h/a%7eb.jpg")
    b = rec("Olea europaea", "https://h/a~b.jpg")
    result = dedup([a, b])
    assert result.kept == [b] and result.duplicates == [(a, b, "same_url")]
    assert url_key(normalize_url("http://h/%2f")) != url_key(normalize_url("http://h//"))  # reserved: kept


def test_species_conflict_drop_and_majority():
    recs = [rec("A a", "http://h/x"), rec("A a", "http://h/x", n=2), rec("B b", "http://h/x")]
    dropped = dedup(recs, "drop")
    assert not dropped.kept and len(dropped.rejected) == 3 and dropped.conflicting_urls == 1
    assert {reason for _, reason, _ in dropped.rejected} == {"url_species_conflict"}
    majority = dedup(recs, "majority")
    assert [r.latin_name for r in majority.kept] == ["A a"]
    assert Counter(reason for _, _, reason in majority.duplicates) == {
        "same_url": 1,
        "url_species_conflict": 1,
    }
    tie = dedup([rec("A a", "http://h/y"), rec("B b", "http://h/y")], "majority")
    assert not tie.kept and len(tie.rejected) == 2


def world(n_species=12, seed=0):
    rng = random.Random(seed)
    out = []
    for s in range(n_species):
        for i in range(2 + int(200 / (s + 1))):  # long tail: 202 ... 18 images
            out.append(rec(f"Species s{s:02d}", f"http://h/{s}/{i}.jpg", obs=rng.randrange(10_000)))
    out.append(rec("Rara avis", "http://h/r/1.jpg"))
    out.append(rec("Rara avis", "http://h/r/2.jpg"))
    return out


def test_split_is_stratified_per_species():
    records = world()
    result = assign_splits(records, SplitConfig(seed=1))
    assert result.train_only == ["Rara avis"] and result.groups_moved_to_train == 0
    by_species = Counter((r.latin_name, r.split) for r in records)
    for s in range(12):
        name = f"Species s{s:02d}"
        n = sum(by_species[(name, x)] for x in ("train", "val", "test"))
        assert all(by_species[(name, x)] >= 1 for x in ("train", "val", "test"))
        assert abs(by_species[(name, "train")] - 0.8 * n) <= 1.5
    assert by_species[("Rara avis", "train")] == 2


def test_split_depends_on_seed_not_on_order():
    first = world()
    assign_splits(first, SplitConfig(seed=5))
    shuffled = world()
    random.Random(3).shuffle(shuffled)
    assign_splits(shuffled, SplitConfig(seed=5))
    assert {r.image_url: r.split for r in first} == {r.image_url: r.split for r in shuffled}
    other = world()
    assign_splits(other, SplitConfig(seed=6))
    assert {r.image_url: r.split for r in first} != {r.image_url: r.split for r in other}


def test_group_by_keeps_an_observation_in_one_split():
    records = [rec("A a", f"http://h/{i}.jpg", obs=i // 4) for i in range(200)]  # 4 photos per observation
    assign_splits(records, SplitConfig(seed=0, group_by="meta.obs"))
    splits_per_obs = {}
    for r in records:
        splits_per_obs.setdefault(r.meta["obs"], set()).add(r.split)
    assert all(len(s) == 1 for s in splits_per_obs.values())
    assert {r.split for r in records} == {"train", "val", "test"}
    assert leakage_report(records, "meta.obs")["ok"]
    # Without grouping, observations straddle splits: the check must see it.
    assign_splits(records, SplitConfig(seed=0))
    assert leakage_report(records, "meta.obs")["groups_in_multiple_splits"] > 0


def test_a_species_sharing_a_group_still_gets_a_train_image():
    # Betula's only photo shares an observation with ten of Abies: it follows Abies's group.
    records = [rec("Abies alba", f"http://h/a{i}.jpg", obs=i) for i in range(10)]
    records.append(rec("Betula pendula", "http://h/b.jpg", obs=0))
    for seed in range(20):
        result = assign_splits(records, SplitConfig(seed=seed, group_by="meta.obs"))
        assert {r.split for r in records if r.latin_name == "Betula pendula"} == {"train"}
        assert leakage_report(records, "meta.obs")["ok"]
        assert result.groups_moved_to_train in (0, 1)
    assert any(
        assign_splits(records, SplitConfig(seed=s, group_by="meta.obs")).groups_moved_to_train
        for s in range(20)
    )


def test_group_by_must_exist_and_be_a_known_field():
    with pytest.raises(ConfigError, match="split.group_by must be one of"):
        SplitConfig(group_by="position")
    records = [rec("A a", f"http://h/{i}.jpg") for i in range(5)]
    with pytest.raises(ConfigError, match="no record has a value for 'meta.observaton_id'"):
        assign_splits(records, SplitConfig(group_by="meta.observaton_id"))
    records[0].meta["obs"] = 1
    assert assign_splits(records, SplitConfig(group_by="meta.obs")).group_by_missing == 4


def test_leakage_report_finds_a_url_in_two_splits():
    a, b = rec("A a", "http://h/1"), rec("A a", "http://h/1")
    a.split, b.split = "train", "test"
    report = leakage_report([a, b])
    assert report == {  # the URL key drops the scheme
        "urls_checked": 1,
        "urls_in_multiple_splits": 1,
        "groups_in_multiple_splits": 0,
        "examples": ["h/1"],
        "ok": False,
    }
