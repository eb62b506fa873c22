"""A damaged line in the catalog's own splits file is refused with one line naming it, unless the user
passes ``--allow-damaged-splits`` (or sets ``allow_damaged_splits``), where it is a counted
``bad_record`` failure and every other record is still sharded."""

import json
import shutil
from types import SimpleNamespace

import pytest

from flora.config import load_config
from flora.io import read_jsonl
from flora.sharding.__main__ import main
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from world import ImageServer, WorldSpec, build_world

ARGS = ["progress=false", "shards.max_samples=40", "download.allow_networks=[127.0.0.1/32]", "processes=1"]
DAMAGE = {
    "truncated": lambda line: line[: len(line) // 2],
    "not json": lambda line: "<<garbage>>",
    "no image_url": lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "image_url"}),
    "not an object": lambda line: "[1, 2]",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged-world")
    (root / "images").mkdir()
    server = ImageServer(root / "images")
    w = build_world(
        root, WorldSpec(n_records=60, n_species=4, seed=3, fault_rate=0.0), base_url=server.base_url
    )
    run_catalog(str(w.catalog_path), root / "splits", load_config(CatalogConfig, None, ["progress=false"]))
    with server:
        yield SimpleNamespace(splits=root / "splits")


def damaged_copy(world, tmp_path, how: str, line_no: int = 7):
    splits = tmp_path / "splits"
    shutil.copytree(world.splits, splits)
    path = splits / "dataset_splits.jsonl"
    lines = path.read_text().splitlines()
    lines[line_no - 1] = DAMAGE[how](lines[line_no - 1])
    path.write_text("\n".join(lines) + "\n")
    return splits, len(lines)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_line_is_refused_naming_it(world, tmp_path, capsys, how):
    splits, _ = damaged_copy(world, tmp_path, how)
    code = main(["build", "--splits", str(splits), "--out", str(tmp_path / "out"), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"flora build: error: {splits / 'dataset_splits.jsonl'} line 7 is damaged (")
    assert "--allow-damaged-splits" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("how", ["flag", "config key"])
def test_allowed_damage_is_a_counted_bad_record(world, tmp_path, capsys, how):
    splits, n_lines = damaged_copy(world, tmp_path, "truncated")
    allow = ["--allow-damaged-splits"] if how == "flag" else ["allow_damaged_splits=true"]
    out = tmp_path / "out"
    assert main(["build", "--splits", str(splits), "--out", str(out), *ARGS, *allow]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    accounting = manifest["accounting"]
    assert accounting["ok"] and accounting["records_in"] == n_lines
    assert manifest["failures_by_reason"] == {"bad_record": 1}
    bad = [f for f in read_jsonl(out / "failures.jsonl") if f["reason"] == "bad_record"]
    assert len(bad) == 1 and bad[0]["line"] == 7
    assert accounting["sharded"] + accounting["content_duplicates"] == n_lines - 1


def test_the_config_key_is_validated_as_a_bool(world, tmp_path, capsys):
    code = main(["build", "--splits", str(world.splits), "--out", str(tmp_path / "o"), *ARGS,
                 "allow_damaged_splits=maybe"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "allow_damaged_splits" in err
