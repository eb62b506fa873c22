"""``flora catalog --out`` naming an existing file (or a path under one): one line saying a folder was
expected, before the source is read, and the file left as it was."""

from __future__ import annotations

import json

from flora.sharding.__main__ import main
from world import WorldSpec, generate_catalog


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_an_out_that_is_a_file_is_one_line_expecting_a_folder(tmp_path, capsys):
    source = tmp_path / "catalog.jsonl"
    records = generate_catalog(WorldSpec(n_records=60, n_species=4, seed=1), base_url="http://127.0.0.1:9")
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    taken = tmp_path / "splits"
    taken.write_text("not a folder\n")
    assert main(["catalog", "--source", str(source), "--out", str(taken), "--no-progress"]) == 2
    err = error_line(capsys)
    assert err == f"flora catalog: error: output folder {taken}: {taken} is a file, expected a folder (--out)"
    assert taken.read_text() == "not a folder\n"


def test_a_file_above_the_out_folder_is_refused_before_the_source_is_read(tmp_path, capsys):
    taken = tmp_path / "runs"
    taken.write_text("")
    out = taken / "splits"
    missing = tmp_path / "no-such-catalog.jsonl"  # read first, this would be the error instead
    assert main(["catalog", "--source", str(missing), "--out", str(out), "--no-progress"]) == 2
    assert error_line(capsys).endswith(f"output folder {out}: {taken} is a file, expected a folder (--out)")
