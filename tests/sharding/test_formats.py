"""Which reader a ``--source`` gets (sharding/catalog/formats.py): detection by name and folder
contents, ``--format`` forcing it, sources read together as one catalog, and the one-line refusals
(a folder of neither format, a MongoDB URI under another format, ``columns:`` with no table)."""

import json
from pathlib import Path

import pytest

import world
from flora.sharding.__main__ import main
from flora.sharding.catalog.formats import detect_format
from flora.sharding.catalog.sources import SourceError
from world.dwca import write_dwca
from world.table_files import write_table

SPEC = world.WorldSpec(n_species=12, n_records=600, seed=4, duplicate_rate=0.2)


def catalog(out: Path, *sources: Path | str, extra: tuple[str, ...] = ()) -> int:
    argv = ["catalog", "--out", str(out), "--no-progress", *extra]
    for source in sources:
        argv += ["--source", str(source)]
    return main(argv)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jsonl", "jsonl"), ("a.jsonl.gz", "jsonl"), ("export.json", "jsonl"), ("noext", "jsonl"),
        ("gbif.zip", "dwca"), ("a.csv", "csv"), ("a.CSV.gz", "csv"), ("a.tsv", "tsv"), ("a.tab.gz", "tsv"),
        ("a.parquet", "parquet"), ("a.pq", "parquet"), ("mongodb://h:1/db.c", "mongodb"),
        ("mongodb+srv://u@h/db.c", "mongodb"),
    ],
)  # fmt: skip
def test_the_format_follows_the_name(name, expected):
    assert detect_format(name) == expected


def test_a_folder_is_a_darwin_core_archive_or_inaturalist_data_or_refused(tmp_path):
    (tmp_path / "dwca").mkdir()
    (tmp_path / "dwca" / "meta.xml").write_text("<archive/>")
    assert detect_format(str(tmp_path / "dwca")) == "dwca"
    inat = tmp_path / "inat"
    inat.mkdir()
    for name in ("photos.csv.gz", "observations.csv"):
        (inat / name).write_bytes(b"")
    assert detect_format(str(inat)) == "inat"
    with pytest.raises(SourceError, match="neither a Darwin Core Archive .* nor iNaturalist open data"):
        detect_format(str(tmp_path))


def test_sources_given_together_are_one_catalog_deduplicated_across_them(tmp_path):
    records = world.generate_catalog(SPEC)
    half = len(records) // 2
    world.write_jsonl(records[:half], tmp_path / "first.jsonl")
    write_dwca(records[half - 50 :], tmp_path / "rest.zip")  # 50 records in both
    world.write_jsonl(records, tmp_path / "all.jsonl")
    assert catalog(tmp_path / "both", tmp_path / "first.jsonl", tmp_path / "rest.zip") == 0
    assert catalog(tmp_path / "one", tmp_path / "all.jsonl") == 0
    stats = json.loads((tmp_path / "both" / "export_stats.json").read_text())
    assert stats["source"] == "jsonl:first.jsonl + dwca:rest.zip"
    assert stats["accounting_ok"] and stats["input_records"] == len(records) + 50
    sources = json.loads((tmp_path / "both" / "sources.json").read_text())["sources"]
    assert [(s["format"], s["name"]) for s in sources] == [("jsonl", "first.jsonl"), ("dwca", "rest.zip")]
    positions = [json.loads(line)["position"] for line in (tmp_path / "both" / "rejects.jsonl").open()]
    assert positions and all(p.startswith(("jsonl:first.jsonl line ", "dwca:rest.zip ")) for p in positions)

    def urls(folder: Path) -> set[str]:
        rows = (folder / "dataset_splits.jsonl").read_text().splitlines()
        return {json.loads(line)["image_url"] for line in rows}

    # the records present in both sources are duplicates of each other: the same images are kept
    assert urls(tmp_path / "both") == urls(tmp_path / "one")


def test_format_forces_a_reader_and_refuses_what_cannot_be_that_format(tmp_path, capsys):
    records = world.generate_catalog(SPEC)
    write_table(records, tmp_path / "plants.txt", "tsv")
    assert catalog(tmp_path / "out", tmp_path / "plants.txt", extra=("--format", "tsv")) == 0
    assert json.loads((tmp_path / "out" / "sources.json").read_text())["sources"][0]["format"] == "tsv"
    assert catalog(tmp_path / "bad", "mongodb://127.0.0.1:9/db.c", extra=("--format", "csv")) == 2
    assert "is a MongoDB URI, but --format is csv" in one_error_line(capsys)
    assert not (tmp_path / "bad").exists()


def test_columns_without_a_table_source_is_one_line(tmp_path, capsys):
    world.write_jsonl(world.generate_catalog(SPEC), tmp_path / "a.jsonl")
    assert catalog(tmp_path / "out", tmp_path / "a.jsonl", extra=("columns.image_url=url",)) == 2
    assert "columns: maps the columns of CSV, TSV and Parquet tables, but no source is one" in one_error_line(
        capsys
    )
    assert not (tmp_path / "out").exists()
