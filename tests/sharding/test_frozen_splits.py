"""Frozen splits (``catalog --previous``): a catalog grown v1 -> v2 -> v3 (additions, removals, new
species, a URL that becomes a species conflict) keeps every split, moves new data toward the target
fractions, records its lineage, keeps class indices, and refuses an unusable previous version."""

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from flora.cli import main as flora_main
from flora.sharding.__main__ import main
from flora.sharding.catalog.records import Record, normalize_latin_name, normalize_url
from flora.sharding.catalog.split import FrozenSplits, allocate, assign_splits, key_digest
from flora.sharding.config import SplitConfig
from world import WorldSpec, generate_catalog, species_names, write_jsonl

REPO = Path(__file__).resolve().parents[2]
#: v1 is this share of the world's lines; v3 drops this share of v2's lines (plus one whole species).
V1_SHARE, V3_DROP = 0.6, 0.1
N_SPECIES, N_NEW_SPECIES = 40, 8
OUTPUTS = [
    "dataset_splits.jsonl",
    "class_mapping.json",
    "split_analysis.json",
    "catalog_version.json",
    "split_species.jsonl",
    "split_changes.jsonl",
    "export_stats.json",
    "duplicates.jsonl",
    "class_mapping_eu_sw.json",
    "dataset_eu_sw_train.jsonl",
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def splits_of(out: Path) -> dict[str, dict]:
    return {row["image_url"]: row for row in read_jsonl(out / "dataset_splits.jsonl")}


def catalog(src, out, *extra) -> int:
    return main(
        ["catalog", "--source", str(src), "--out", str(out), "--no-progress", "--region", "EU_SW", *extra]
    )


@pytest.fixture(scope="module")
def growth(tmp_path_factory):
    """Sources and outputs of v1 (a sample of the world), v2 (all of it, --previous v1) and v3 (v2
    minus some lines and one whole species, plus a second world with new species and a record that
    turns a v1 URL into a species conflict; --previous v2)."""
    root = tmp_path_factory.mktemp("growth")
    world = generate_catalog(WorldSpec(n_species=N_SPECIES, n_records=3000, seed=5), "http://127.0.0.1:9")
    rng = random.Random(0)
    chosen = set(rng.sample(range(len(world)), int(V1_SHARE * len(world))))
    v1 = [r for n, r in enumerate(world) if n in chosen]
    write_jsonl(v1, root / "v1.jsonl")
    write_jsonl(world, root / "v2.jsonl")
    assert catalog(root / "v1.jsonl", root / "s1") == 0
    assert catalog(root / "v2.jsonl", root / "s2", "--previous", str(root / "s1")) == 0

    s1 = splits_of(root / "s1")
    counts = Counter(row["latin_name"] for row in s1.values())
    retired = min((n, name) for name, n in counts.items() if n >= 3)[1]  # a small species, stratified in v1
    conflict_url, relabel_url = [u for u, row in sorted(s1.items()) if row["latin_name"] != retired][:2]
    other = next(
        n
        for n in sorted(counts)
        if n not in (retired, s1[conflict_url]["latin_name"], s1[relabel_url]["latin_name"])
    )

    def name(raw):
        try:
            return normalize_latin_name(raw.get("latin_name") or "")
        except ValueError:
            return None

    def url(raw):
        try:
            return normalize_url(raw["image_url"])
        except (ValueError, KeyError):
            return None

    # v3: 10% of the lines dropped (never the conflict URL's), every line of one species and of one URL
    v3 = [r for r in world if (rng.random() >= V3_DROP or url(r) == conflict_url) and name(r) != retired]
    v3 = [r for r in v3 if url(r) != relabel_url]
    extra = generate_catalog(
        WorldSpec(n_species=N_SPECIES + N_NEW_SPECIES, n_records=1200, seed=6), "http://127.0.0.1:10"
    )
    v3 += [r for r in extra if name(r) != retired]
    for u in (conflict_url, relabel_url):  # a second species for one URL; another species for the other
        v3.append(
            {"plant_id": 7, "latin_name": other, "image_url": u, "license": "cc-by", "source": "Legacy"}
        )
    write_jsonl(v3, root / "v3.jsonl")
    assert catalog(root / "v3.jsonl", root / "s3", "--previous", str(root / "s2")) == 0
    return {
        "root": root,
        "retired": retired,
        "conflict_url": conflict_url,
        "relabel_url": relabel_url,
        "other": other,
        "world": world,
        "v3": v3,
    }


def test_every_previous_image_keeps_its_split_through_v1_v2_v3(growth):
    root = growth["root"]
    for before, after in (("s1", "s2"), ("s2", "s3")):
        old, new = splits_of(root / before), splits_of(root / after)
        both = set(old) & set(new)
        assert len(both) > 0.8 * len(old) and len(new) > len(both), "each version keeps most and adds some"
        assert [u for u in both if old[u]["split"] != new[u]["split"]] == []
        growth_ = json.loads((root / after / "split_analysis.json").read_text())["growth"]
        assert growth_["moved"] == 0 and growth_["moved_by_reason"] == {}
        assert growth_["kept"] == len(both)
        assert growth_["new"] == len(new) - len(both)
        assert growth_["removed"] == len(set(old) - set(new))
        stats = json.loads((root / after / "export_stats.json").read_text())
        assert stats["growth"] == {k: growth_[k] for k in ("kept", "new", "removed", "moved")}
        assert stats["leakage_ok"]


def test_removed_records_are_listed_with_their_reason(growth):
    root = growth["root"]
    s2, s3 = splits_of(root / "s2"), splits_of(root / "s3")
    changes = read_jsonl(root / "s3" / "split_changes.jsonl")
    removed = {row["image_url"]: row for row in changes if row["change"] == "removed"}
    assert set(removed) == set(s2) - set(s3)
    assert all(
        row["previous_split"] == s2[url]["split"] and row["split"] is None for url, row in removed.items()
    )
    assert removed[growth["conflict_url"]]["reason"] == "url_species_conflict"
    reasons = Counter(row["reason"] for row in removed.values())
    assert reasons["not_in_source"] > 0
    retired_rows = [row for row in removed.values() if row["latin_name"] == growth["retired"]]
    assert retired_rows and all(row["reason"] == "not_in_source" for row in retired_rows)
    analysis = json.loads((root / "s3" / "split_analysis.json").read_text())
    assert analysis["growth"]["removed_by_reason"] == dict(sorted(reasons.items()))
    assert changes == sorted(changes, key=lambda r: (r["change"], r["reason"], r["image_url"]))
    assert read_jsonl(root / "s1" / "split_changes.jsonl") == []  # no --previous: nothing to compare


def test_new_groups_fill_the_splits_below_target_and_never_push_one_past_it(growth):
    root = growth["root"]
    for before, after in (("s1", "s2"), ("s2", "s3")):
        old = splits_of(root / before)
        held: dict[str, Counter] = {}
        for url, row in splits_of(root / after).items():
            if url in old:
                held.setdefault(row["latin_name"], Counter())[row["split"]] += 1
        rows = read_jsonl(root / after / "split_species.jsonl")
        assert sum(r["new_groups"] for r in rows) > 0
        for r in rows:
            kept = held.get(r["species"], Counter())
            for split in ("train", "val", "test"):
                added = r["groups"][split] - kept[split]
                assert added >= 0, r
                if added and r["stratified"]:
                    assert r["groups"][split] <= r["fresh"][split], (
                        f"new groups pushed {split} past target: {r}"
                    )
        fractions = json.loads((root / after / "split_analysis.json").read_text())["fractions"]
        big = [r for r in rows if sum(r["groups"].values()) >= 30]
        assert big and max(r["deviation"] for r in big) <= 0.05, "grown species stay near 80/10/10"
        assert fractions["max_deviation"] == max(r["deviation"] for r in rows if r["stratified"])


def test_new_species_are_split_like_a_fresh_catalog(growth):
    root = growth["root"]
    new_names = {name for name, _, _ in species_names(N_SPECIES + N_NEW_SPECIES)[N_SPECIES:]}
    rows = {r["species"]: r for r in read_jsonl(root / "s3" / "split_species.jsonl")}
    present = new_names & set(rows)
    assert len(present) >= N_NEW_SPECIES // 2
    for name in present:
        r = rows[name]
        assert r["new_groups"] == sum(r["groups"].values()) and r["groups_off_fresh"] == 0


def test_lineage_is_recorded_by_fingerprint(growth):
    root = growth["root"]
    fingerprints = []
    for out in ("s1", "s2", "s3"):
        digest = hashlib.sha256((root / out / "dataset_splits.jsonl").read_bytes()).hexdigest()
        fingerprints.append(f"sha256:{digest}")
        version = json.loads((root / out / "catalog_version.json").read_text())
        assert version["fingerprint"] == fingerprints[-1]
        assert version["lineage"] == fingerprints
        assert version["previous"] == (
            None
            if out == "s1"
            else {
                "fingerprint": fingerprints[-2],
                "records": len(read_jsonl(root / ("s1" if out == "s2" else "s2") / "dataset_splits.jsonl")),
            }
        )
        assert version["split"] == {
            "seed": 42,
            "fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
            "group_by": None,
            "min_for_stratify": 3,
        }
    assert (
        json.loads((root / "s3" / "split_analysis.json").read_text())["growth"]["previous"] == fingerprints[1]
    )


def test_class_indices_survive_growth_and_new_species_are_appended(growth):
    root = growth["root"]
    for before, after, mapping_file in (
        ("s1", "s2", "class_mapping.json"),
        ("s2", "s3", "class_mapping.json"),
        ("s2", "s3", "class_mapping_eu_sw.json"),
    ):
        old = json.loads((root / before / mapping_file).read_text())
        new = json.loads((root / after / mapping_file).read_text())
        assert {k: new[k] for k in old} == old
        appended = sorted(new, key=new.get)[len(old) :]
        assert appended == sorted(set(new) - set(old))
        assert sorted(new.values()) == list(range(len(new)))
    s3 = json.loads((root / "s3" / "class_mapping.json").read_text())
    assert len(s3) > len(json.loads((root / "s2" / "class_mapping.json").read_text()))
    analysis = json.loads((root / "s3" / "split_analysis.json").read_text())
    rows = splits_of(root / "s3").values()
    assert growth["retired"] in analysis["retired_classes"] and growth["retired"] in s3
    assert not set(analysis["retired_classes"]) & {row["latin_name"] for row in rows}
    assert all(row["label"] == s3[row["latin_name"]] for row in rows)


def test_a_relabelled_url_keeps_its_split_and_is_listed(growth):
    root = growth["root"]
    s2, s3 = splits_of(root / "s2"), splits_of(root / "s3")
    url = growth["relabel_url"]
    assert s3[url]["latin_name"] == growth["other"] and s3[url]["split"] == s2[url]["split"]
    changed = [
        row for row in read_jsonl(root / "s3" / "split_changes.jsonl") if row["change"] == "species_changed"
    ]
    assert changed == [
        {
            "change": "species_changed",
            "reason": "source_relabelled",
            "image_url": url,
            "latin_name": s2[url]["latin_name"],
            "previous_split": s2[url]["split"],
            "split": s2[url]["split"],
            "latin_name_now": growth["other"],
        }
    ]


def test_frozen_outputs_are_byte_identical_in_any_input_order(growth, tmp_path):
    root = growth["root"]
    shuffled = list(growth["v3"])
    random.Random(9).shuffle(shuffled)
    write_jsonl(shuffled, tmp_path / "v3.jsonl")
    assert catalog(tmp_path / "v3.jsonl", tmp_path / "again", "--previous", str(root / "s2")) == 0
    for name in OUTPUTS:
        assert (tmp_path / "again" / name).read_bytes() == (root / "s3" / name).read_bytes(), name


def test_a_previous_catalog_without_version_file_is_read_through_its_export_stats(growth, tmp_path):
    """A v1 written before catalog_version.json existed: same splits, its lineage starts there."""
    root = growth["root"]
    legacy = tmp_path / "legacy_s1"
    legacy.mkdir()
    for path in (root / "s1").iterdir():
        if path.name != "catalog_version.json":
            (legacy / path.name).write_bytes(path.read_bytes())
    assert catalog(root / "v2.jsonl", tmp_path / "s2", "--previous", str(legacy)) == 0
    for name in OUTPUTS:
        assert (tmp_path / "s2" / name).read_bytes() == (root / "s2" / name).read_bytes(), name


# ------------------------------------------------------------------------------- the rule, in units
def rec(species, n, **meta):
    url = normalize_url(f"http://127.0.0.1:9/{species.replace(' ', '_')}/{n}.jpg")
    return Record(
        plant_id=n,
        latin_name=species,
        image_url=url,
        license="cc-by",
        license_class="permissive",
        source="iNaturalist",
        country="ES",
        region="EU_SW",
        meta=meta,
    )


def frozen_from(records, group_by=None):
    groups = {}
    if group_by:
        groups = {
            key_digest(f"{group_by}={json.dumps(r.meta[group_by[5:]])}"): ("train", "val", "test").index(
                r.split
            )
            for r in records
            if group_by[5:] in r.meta
        }
    urls = {key_digest(r.url_key): ("train", "val", "test").index(r.split) for r in records}
    return FrozenSplits(urls=urls, groups=groups)


@pytest.mark.parametrize(
    ("held", "new", "expected"),
    [
        (
            {"train": 8, "val": 1, "test": 1},
            10,
            {"train": 16, "val": 2, "test": 2},
        ),  # in step with the target
        (
            {"train": 2, "val": 5, "test": 3},
            10,
            {"train": 12, "val": 5, "test": 3},
        ),  # eval over: all to train
        ({"train": 2}, 3, {"train": 3, "val": 1, "test": 1}),  # crosses min_for_stratify: val/test from new
        ({"train": 2}, 1, {"train": 2, "val": 1, "test": 0}),  # as far as new data allows (ties: val)
        ({"val": 1, "test": 1}, 0, {"val": 1, "test": 1}),  # train removed, nothing new: old splits kept
        ({"val": 1, "test": 1}, 1, {"train": 1, "val": 1, "test": 1}),  # ... and its next new image trains
    ],
)
def test_new_groups_go_to_the_largest_deficit(held, new, expected):
    old = [rec("Olea europaea", n) for n in range(sum(held.values()))]
    for r, split in zip(
        old, [s for s in ("train", "val", "test") for _ in range(held.get(s, 0))], strict=True
    ):
        r.split = split
    frozen = frozen_from(old)
    records = [rec("Olea europaea", n) for n in range(sum(held.values()) + new)]
    random.Random(1).shuffle(records)
    result = assign_splits(records, SplitConfig(seed=3), frozen)
    by_url = {r.image_url: r.split for r in records}
    assert all(by_url[r.image_url] == r.split for r in old), "old groups keep their split"
    assert Counter(by_url.values()) == Counter(expected)
    n = sum(held.values()) + new
    fresh = (
        allocate(n, SplitConfig().fractions)
        if n >= SplitConfig().min_for_stratify
        else {"train": n, "val": 0, "test": 0}
    )
    assert result.species["Olea europaea"]["target"] == fresh
    assert result.species["Olea europaea"]["new"] == new and result.moved == {}


def test_without_previous_the_split_is_the_fresh_one():
    records = [rec(f"Species {k % 7}", k) for k in range(300)]
    assign_splits(records, SplitConfig(seed=2))
    fresh = {r.image_url: r.split for r in records}
    again = [rec(f"Species {k % 7}", k) for k in range(300)]
    assign_splits(again, SplitConfig(seed=2), FrozenSplits(urls={}, groups={}))
    assert {r.image_url: r.split for r in again} == fresh


def test_group_by_groups_keep_their_split_and_a_group_spanning_two_is_a_counted_move():
    cfg = SplitConfig(seed=4, group_by="meta.obs")
    old = [rec("Olea europaea", n, obs=n // 2) for n in range(40)]  # 20 observations of 2 photos
    assign_splits(old, cfg)
    frozen = frozen_from(old, "meta.obs")
    split_of_obs = {r.meta["obs"]: r.split for r in old}
    val_obs = next(o for o, s in sorted(split_of_obs.items()) if s == "val")
    train_obs = next(o for o, s in sorted(split_of_obs.items()) if s == "train")
    test_obs = next(o for o, s in sorted(split_of_obs.items()) if s == "test")
    new = [rec("Olea europaea", n, obs=n // 2) for n in range(40) if n // 2 != val_obs]  # val obs photos gone
    new.append(rec("Olea europaea", 100, obs=val_obs))  # a new photo of the val observation
    mover = next(r for r in new if r.meta["obs"] == test_obs)
    mover.meta["obs"] = train_obs  # an old test photo now says it belongs to a train observation
    new += [rec("Olea europaea", 200 + n, obs=1000 + n) for n in range(10)]
    result = assign_splits(new, cfg, frozen)
    by_n = {r.plant_id: r.split for r in new}
    assert by_n[100] == "val", "a new photo of an old observation takes the observation's split"
    assert by_n[mover.plant_id] == "train" and by_n[2 * train_obs] == "train"
    assert result.moved == {f"meta.obs={train_obs}": "group_spans_splits"}
    old_split = {r.plant_id: r.split for r in old}
    changed = [n for n, s in by_n.items() if n in old_split and old_split[n] != s]
    assert changed == [mover.plant_id], "only the record of the spanning group moves"


def test_group_spanning_catalog_run_lists_the_move(tmp_path):
    rows = [
        {
            "plant_id": n,
            "latin_name": "Olea europaea",
            "image_url": f"http://127.0.0.1:9/o/{n}.jpg",
            "license": "cc-by",
            "obs": n // 2,
        }
        for n in range(40)
    ]
    write_jsonl(rows, tmp_path / "v1.jsonl")
    assert (
        main(
            [
                "catalog",
                "--source",
                str(tmp_path / "v1.jsonl"),
                "--out",
                str(tmp_path / "s1"),
                "--no-progress",
                "split.group_by=meta.obs",
            ]
        )
        == 0
    )
    s1 = splits_of(tmp_path / "s1")
    obs_split = {row["meta"]["obs"]: row["split"] for row in s1.values()}
    train_obs = next(o for o, s in sorted(obs_split.items()) if s == "train")
    eval_row = next(r for r in rows if obs_split[r["obs"]] != "train")
    eval_row["obs"] = train_obs
    write_jsonl(rows, tmp_path / "v2.jsonl")
    assert (
        main(
            [
                "catalog",
                "--source",
                str(tmp_path / "v2.jsonl"),
                "--out",
                str(tmp_path / "s2"),
                "--no-progress",
                "--previous",
                str(tmp_path / "s1"),
                "split.group_by=meta.obs",
            ]
        )
        == 0
    )
    changes = read_jsonl(tmp_path / "s2" / "split_changes.jsonl")
    assert changes == [
        {
            "change": "moved",
            "reason": "group_spans_splits",
            "image_url": eval_row["image_url"],
            "latin_name": "Olea europaea",
            "previous_split": s1[eval_row["image_url"]]["split"],
            "split": "train",
        }
    ]
    growth = json.loads((tmp_path / "s2" / "split_analysis.json").read_text())["growth"]
    assert (growth["moved"], growth["moved_by_reason"], growth["groups_not_kept"]) == (
        1,
        {"group_spans_splits": 1},
        1,
    )


# ------------------------------------------------------------------------------ bad --previous
def refused(capsys, argv):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flora catalog: error: --previous "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--seed", "7"], ["split.seed 42 (this run: 7)"]),
        (
            ["split.fractions={train: 0.7, val: 0.2, test: 0.1}"],
            ["split.fractions", "'train': 0.8", "0.7"],
        ),
        (["split.group_by=meta.observation_id"], ["split.group_by None (this run: 'meta.observation_id')"]),
    ],
)
def test_previous_built_with_other_split_settings_is_refused(growth, tmp_path, capsys, extra, words):
    root = growth["root"]
    argv = ["catalog", "--source", str(root / "v2.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"]
    line = refused(capsys, [*argv, "--previous", str(root / "s1"), *extra])
    assert all(w in line for w in words), line
    assert "same seed, fractions and group key" in line
    assert not (tmp_path / "out").exists(), "refused before anything is read or written"


def test_previous_that_is_not_a_catalog_output_is_refused(growth, tmp_path, capsys):
    root = growth["root"]
    argv = ["catalog", "--source", str(root / "v2.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"]
    line = refused(capsys, [*argv, "--previous", str(tmp_path / "nowhere")])
    assert "no such folder" in line
    (tmp_path / "world").mkdir()
    write_jsonl(growth["world"][:5], tmp_path / "world" / "catalog.jsonl")
    line = refused(capsys, [*argv, "--previous", str(tmp_path / "world")])
    assert "is not a catalog output: no dataset_splits.jsonl, class_mapping.json" in line
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in (root / "s1").iterdir():
        (edited / path.name).write_bytes(path.read_bytes())
    lines = (edited / "dataset_splits.jsonl").read_text().splitlines(keepends=True)
    (edited / "dataset_splits.jsonl").write_text("".join(lines[1:]))
    assert "the file was changed after the catalog wrote it" in refused(
        capsys, [*argv, "--previous", str(edited)]
    )
    (edited / "dataset_splits.jsonl").write_text('{"image_url": "http://127.0.0.1:9/x.jpg"}\n')
    (edited / "catalog_version.json").unlink()
    assert "line 1: not a catalog row" in refused(capsys, [*argv, "--previous", str(edited)])
    assert not (tmp_path / "out").exists()


def test_flora_command_and_python_m_refuse_the_same_way(growth, tmp_path, capsys):
    root = growth["root"]
    argv = [
        "catalog",
        "--source",
        str(root / "v2.jsonl"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--previous",
        str(root / "s1"),
        "--seed",
        "8",
    ]
    assert flora_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flora catalog: error: --previous ") and "split.seed" in err[0]
    proc = subprocess.run(
        [sys.executable, "-m", "flora.sharding", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == err


def test_previous_may_be_the_output_folder_itself(growth, tmp_path):
    """``--out splits --previous splits``: the previous files are read before the new ones replace them."""
    root = growth["root"]
    inplace = tmp_path / "splits"
    inplace.mkdir()
    for path in (root / "s1").iterdir():
        (inplace / path.name).write_bytes(path.read_bytes())
    assert catalog(root / "v2.jsonl", inplace, "--previous", str(inplace)) == 0
    for name in OUTPUTS:
        assert (inplace / name).read_bytes() == (root / "s2" / name).read_bytes(), name
