"""The catalog stage end to end on the sample world: accounting, files, determinism, leakage,
production_only, regional subsets and the command line's error handling."""

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from flora.config import load_config
from flora.sharding.__main__ import main
from flora.sharding.catalog.records import OUTPUT_FIELDS
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from world import WorldSpec, generate_catalog

REPO = Path(__file__).resolve().parents[2]
BAD_LINES = ['{"plant_id": 1, "latin_name": "Olea', "[1, 2, 3]", '"just a string"']
SPLIT_FILES = ["dataset_train.jsonl", "dataset_val.jsonl", "dataset_test.jsonl"]


@pytest.fixture(scope="module")
def raw_records():
    return generate_catalog(WorldSpec(n_records=1500, n_species=30, seed=3), base_url="http://127.0.0.1:9")


def write_source(path, records, bad_lines=BAD_LINES):
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in bad_lines:
            fh.write(line + "\n")
    return path


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def run(raw_records, tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    src = write_source(root / "catalog.jsonl", raw_records)
    cfg = load_config(CatalogConfig, None, ["regions=[EU_SW]", "progress=false"])
    result = run_catalog(str(src), root / "out", cfg)
    return result, root / "out"


def test_accounting_every_record_in_exactly_one_place(run, raw_records):
    result, out = run
    stats = result.stats
    n_in = len(raw_records) + len(BAD_LINES)
    written = read_jsonl(out / "dataset_splits.jsonl")
    rejects = read_jsonl(out / "rejects.jsonl")
    dups = read_jsonl(out / "duplicates.jsonl")
    assert stats["input_records"] == n_in
    assert len(written) + len(rejects) + len(dups) == n_in
    assert (stats["written"], stats["rejected"], stats["duplicates"]) == (
        len(written),
        len(rejects),
        len(dups),
    )
    assert stats["accounting_ok"] is True
    assert len(dups) > 0.15 * len(raw_records), "the sample world is built with ~30% duplicate URLs"
    # each bad line is rejected with its position and reason
    by_pos = {r["position"]: r for r in rejects}
    first_bad = len(raw_records) + 1
    assert by_pos[f"line {first_bad}"]["reason"] == "invalid_json"
    assert by_pos[f"line {first_bad + 1}"]["reason"] == "not_an_object"
    assert by_pos[f"line {first_bad + 2}"]["reason"] == "not_an_object"
    assert {"missing_field", "bad_scheme"} <= set(stats["rejects_by_reason"])


def test_output_records_carry_the_contract(run):
    _, out = run
    mapping = json.loads((out / "class_mapping.json").read_text())
    assert list(mapping.values()) == list(range(len(mapping)))
    assert list(mapping) == sorted(mapping)
    for split_file in SPLIT_FILES:
        split = split_file.split("_")[1].split(".")[0]
        rows = read_jsonl(out / split_file)
        assert rows
        for row in rows:
            assert tuple(row) == OUTPUT_FIELDS
            assert row["split"] == split
            assert mapping[row["latin_name"]] == row["label"]
            assert row["license_class"] in ("permissive", "restrictive")
            assert row["region"]
            assert "license_raw" in row["meta"] or row["license"] == "unknown"


def test_no_url_in_two_splits_and_dedup_is_complete(run):
    _, out = run
    seen = defaultdict(set)
    for split_file in SPLIT_FILES:
        for row in read_jsonl(out / split_file):
            seen[row["image_url"]].add(row["split"])
    assert all(len(s) == 1 for s in seen.values())
    total = len(read_jsonl(out / "dataset_splits.jsonl"))
    assert len(seen) == total, "every written URL is unique"
    analysis = json.loads((out / "split_analysis.json").read_text())
    assert analysis["leakage"]["ok"] and analysis["leakage"]["urls_checked"] == total
    sizes = {s: analysis["splits"][s]["records"] for s in ("train", "val", "test")}
    assert 0.75 < sizes["train"] / total < 0.85


def test_duplicates_name_what_they_duplicate(run):
    _, out = run
    written = {r["image_url"]: r for r in read_jsonl(out / "dataset_splits.jsonl")}
    rejected_urls = {
        r["record"]["image_url"] for r in read_jsonl(out / "rejects.jsonl") if isinstance(r["record"], dict)
    }
    for dup in read_jsonl(out / "duplicates.jsonl"):
        url = dup["record"]["image_url"]
        assert dup["duplicate_of"]["image_url"] == url
        assert url in written or url in rejected_urls


def test_same_input_in_any_order_gives_identical_files(raw_records, run, tmp_path):
    _, out = run
    shuffled = list(raw_records)
    random.Random(11).shuffle(shuffled)
    src = write_source(tmp_path / "shuffled.jsonl", shuffled, BAD_LINES[::-1])
    cfg = load_config(CatalogConfig, None, ["regions=[EU_SW]", "progress=false"])
    run_catalog(str(src), tmp_path / "out", cfg)
    for path in sorted(out.iterdir()):
        if path.name == "export_stats.json":
            a, b = json.loads(path.read_text()), json.loads((tmp_path / "out" / path.name).read_text())
            assert {**a, "source": None} == {**b, "source": None}
        elif path.name == "sources.json":  # the source is another file: its name and digest differ
            assert json.loads(path.read_text())["sources"][0]["bytes"] == src.stat().st_size
        elif path.name == "rejects.jsonl":  # same rejects in the same order; only positions follow the input
            blank = lambda p: [json.dumps({**r, "position": None}) for r in read_jsonl(p)]  # noqa: E731
            assert blank(path) == blank(tmp_path / "out" / path.name)
        else:
            assert path.read_bytes() == (tmp_path / "out" / path.name).read_bytes(), path.name
    other = tmp_path / "seed"
    run_catalog(str(src), other, load_config(CatalogConfig, None, ["split.seed=1", "progress=false"]))
    assert (other / "dataset_train.jsonl").read_bytes() != (out / "dataset_train.jsonl").read_bytes()


def test_production_only_keeps_permissive_and_accounts_the_rest(raw_records, run, tmp_path):
    _, out = run
    src = write_source(tmp_path / "c.jsonl", raw_records)
    result = run_catalog(
        str(src),
        tmp_path / "prod",
        load_config(CatalogConfig, None, ["production_only=true", "progress=false"]),
    )
    rows = read_jsonl(tmp_path / "prod" / "dataset_splits.jsonl")
    assert rows and {r["license_class"] for r in rows} == {"permissive"}
    everything = read_jsonl(out / "dataset_splits.jsonl")
    n_permissive = sum(r["license_class"] == "permissive" for r in everything)
    assert len(rows) + result.stats["rejects_by_reason"].get("rare_species", 0) == n_permissive
    assert result.stats["rejects_by_reason"]["restrictive_license"] == len(everything) - n_permissive
    assert result.stats["accounting_ok"]


def test_regional_subset(run):
    _, out = run
    mapping = json.loads((out / "class_mapping_eu_sw.json").read_text())
    global_rows = {r["image_url"]: r for r in read_jsonl(out / "dataset_splits.jsonl")}
    n = 0
    for split in ("train", "val", "test"):
        for row in read_jsonl(out / f"dataset_eu_sw_{split}.jsonl"):
            n += 1
            assert row["region"] == "EU_SW" and row["country"] in {"ES", "PT", "FR", "IT", None}
            assert row["label"] == mapping[row["latin_name"]]
            g = global_rows[row["image_url"]]
            assert (g["split"], g["label"]) == (split, row["global_label"])
    assert n == sum(r["region"] == "EU_SW" for r in global_rows.values()) > 0
    assert 0 < len(mapping) < len(json.loads((out / "class_mapping.json").read_text()))
    assert json.loads((out / "analysis_eu_sw.json").read_text())["total"]["records"] == n


def test_cli_summary_and_one_line_errors(raw_records, tmp_path, capsys):
    src = write_source(tmp_path / "c.jsonl", raw_records[:200])
    assert (
        main(
            [
                "catalog",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
                "--region",
                "eu_sw",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "records in =" in printed and "region EU_SW" in printed
    assert main(["catalog", "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    missing = tmp_path / "missing.jsonl"
    assert capsys.readouterr().err.strip() == f"flora catalog: error: source file not found: {missing}"
    assert main(["catalog", "--source", str(src), "--out", str(tmp_path / "o"), "split.sede=1"]) == 2
    assert "split.sede" in capsys.readouterr().err
    assert main(["catalog", "--source", str(src), "--out", str(tmp_path / "o"), "--region", "EU_XX"]) == 2
    assert "unknown region 'EU_XX'" in capsys.readouterr().err


def test_python_dash_m_entry_point(raw_records, tmp_path):
    src = write_source(tmp_path / "c.jsonl", raw_records[:100])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flora.sharding",
            "catalog",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--config",
            "config/catalog_smoke.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "dataset_eu_sw_train.jsonl").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "flora.sharding", "catalog", "--source", str(src)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--out" in bad.stderr
