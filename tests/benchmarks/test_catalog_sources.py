"""benchmarks/catalog_sources.py end to end on a small world: every format is written in its publisher's
layout, catalogued in a child process with its peak memory read, and accounted for."""

from benchmarks.catalog_sources import FORMATS, run_size


def test_every_format_is_catalogued_and_accounted_for(tmp_path):
    rows = run_size(600, list(FORMATS), tmp_path)
    assert rows[0]["source"].startswith("baseline")
    by_source = {row["source"]: row for row in rows[1:]}
    assert sorted(by_source) == sorted(FORMATS)
    for fmt, row in by_source.items():
        assert row["accounting_ok"], fmt
        assert row["records_in"] > 0 and row["written"] > 0, fmt
        assert 0 < row["peak_mib"] < 1024, fmt
    # the same world: the JSON Lines file holds every generated record
    assert by_source["jsonl"]["records_in"] == 600
    assert not (tmp_path / "world_600").exists()  # each size cleans up after itself
