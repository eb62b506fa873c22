"""The catalog on small hand-made inputs: each counter in the reports, odd and hostile lines, empty
and all-invalid inputs, and files left untouched by a failed run."""

import gzip
import json
import re

import pytest

from flora.config import load_config
from flora.io import read_jsonl
from flora.sharding.__main__ import main
from flora.sharding.catalog import run as catalog_module
from flora.sharding.catalog.intake import NoUsableRecordError
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig


def rec(i, name="Olea europaea", **fields):
    return {"plant_id": i, "latin_name": name, "image_url": f"http://h/{i}.jpg", "license": "cc-by", **fields}


def run(tmp_path, lines, *overrides, name="c.jsonl"):
    src = tmp_path / name
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if name.endswith(".gz"):
        src.write_bytes(gzip.compress(text.encode("utf-8", "surrogatepass")))
    else:
        src.write_bytes(text.encode("utf-8", "surrogatepass"))
    cfg = load_config(CatalogConfig, None, ["progress=false", *overrides])
    return run_catalog(str(src), tmp_path / "out", cfg).stats, tmp_path / "out"


def test_report_counters(tmp_path):
    lines = [
        rec(1, license="see website"),
        rec(2, license="see website", country="DE", region="EU_SW"),  # region conflict: country wins
        rec(3, license=None, country="Atlantis"),
        rec(4, image_url="HTTP://h/4.jpg#x", country="spain"),
        rec(5, "Abies alba", image_url="http://h/shared.jpg"),
        rec(6, "Betula pendula", image_url="http://h/shared.jpg"),  # one URL, two species
        *[rec(10 + i, "Pinus pinea", license="CC0 1.0 Universal", country="IT") for i in range(6)],
        rec(20, "Rosa canina"),
        rec(21, "Rosa canina"),  # two images: too few to stratify, wholly train
    ]
    stats, out = run(tmp_path, lines)
    assert stats["licenses_unknown_raw"] == {"<missing>": 1, "see website": 2}
    assert stats["region_conflicts"] == 1
    assert stats["regions_unknown_countries"] == {"Atlantis": 1}
    assert stats["conflicting_urls"] == 1 and stats["rejects_by_reason"] == {"url_species_conflict": 2}
    rows = {r["plant_id"]: r for r in read_jsonl(out / "dataset_splits.jsonl")}
    assert rows[4]["image_url"] == "http://h/4.jpg" and rows[4]["meta"]["image_url_raw"] == "HTTP://h/4.jpg#x"
    assert (rows[4]["country"], rows[4]["region"], rows[4]["meta"]["country_raw"]) == ("ES", "EU_SW", "spain")
    assert (rows[2]["country"], rows[2]["region"]) == ("DE", "EU_CENTRAL")
    assert rows[10]["meta"]["license_raw"] == "CC0 1.0 Universal" and rows[10]["license"] == "cc0"
    analysis = json.loads((out / "split_analysis.json").read_text())
    assert analysis["total"]["licenses"] == {"cc-by": 3, "cc0": 6, "unknown": 3}
    assert analysis["total"]["license_class"] == {"permissive": 9, "restrictive": 3}
    assert analysis["train_only_species"] == ["Rosa canina"]
    assert analysis["split_policy"]["too_few_to_stratify"] == ["Rosa canina"]
    assert {r["split"] for r in rows.values() if r["latin_name"] == "Rosa canina"} == {"train"}
    assert stats["permissive_fraction"]["written"] == 0.75


def test_rare_species_are_rejected_and_counted(tmp_path):
    lines = [rec(i, "Pinus pinea") for i in range(5)] + [rec(100 + i, "Rosa canina") for i in range(2)]
    stats, out = run(tmp_path, lines, "split.min_images_per_species=3")
    assert stats["rejects_by_reason"] == {"rare_species": 2} and stats["written"] == 5
    assert json.loads((out / "class_mapping.json").read_text()) == {"Pinus pinea": 0}


def test_hostile_lines_are_rejects_not_crashes(tmp_path):
    lines = [
        rec(1),
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than the recursion limit
        '{"plant_id": ' + "1" * 5000 + "}",  # integer over Python's 4300-digit limit
        b"\xff\xfe not utf-8".decode("latin-1"),
        rec(2, meta={"lone": "\ud800", "nan": float("nan")}),
    ]
    stats, out = run(tmp_path, lines)
    assert stats["rejects_by_reason"] == {"invalid_json": 3} and stats["written"] == 2
    for path in out.glob("*.json*"):
        text = path.read_text(encoding="utf-8")  # valid UTF-8 ...
        values = read_jsonl(path) if path.suffix == ".jsonl" else [json.loads(text)]
        json.dumps(values, allow_nan=False)  # ... and strict JSON (no bare NaN)
    row = [r for r in read_jsonl(out / "dataset_splits.jsonl") if r["plant_id"] == 2][0]
    assert row["meta"] == {"license_raw": "cc-by", "lone": "\ud800", "nan": "nan"}


def test_gzip_input_and_a_truncated_gzip(tmp_path, capsys):
    stats, _ = run(tmp_path, [rec(i) for i in range(5)], name="c.jsonl.gz")
    assert stats["written"] == 5
    data = (tmp_path / "c.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert main(["catalog", "--source", str(tmp_path / "cut.jsonl.gz"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.startswith("flora catalog: error: cannot read")


@pytest.mark.parametrize(
    ("lines", "overrides", "expected"),
    [
        ([], [], "no usable record in jsonl:c.jsonl: the file is empty; nothing was written to "),
        (["{bad", "[]"], [], "2 lines read, all rejected (invalid_json 1, not_an_object 1)"),
        (
            [rec(1, license="cc-by-nc")],
            ["production_only=true"],
            "1 line read, rejected as restrictive_license",
        ),
    ],
    ids=["empty", "all-invalid", "production-only-leaves-nothing"],
)
def test_degenerate_inputs_are_refused_and_write_nothing(tmp_path, lines, overrides, expected):
    """Zero usable records is an error naming the cause (test_catalog_hostile.py has every source kind)."""
    with pytest.raises(NoUsableRecordError, match=re.escape(expected)):
        run(tmp_path, lines, "regions=[EU_SW]", *overrides)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_the_previous_files(tmp_path, monkeypatch):
    run(tmp_path, [rec(i) for i in range(10)])
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(catalog_module, "_stage_subset", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path, [rec(i) for i in range(20)], "regions=[EU_SW]")
    assert {
        p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()
    } == before  # no .tmp left, nothing changed


def test_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text(json.dumps(rec(1)) + "\n")
    (tmp_path / "taken").write_text("x")
    assert main(["catalog", "--source", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora catalog: error: ") and err.count("\n") == 1
