"""Output folders a hostile (or hurried) user hands the catalog and the sharder: one that is, holds or lies
inside what the same command reads; a damaged ``manifest.json``; symbolic links inside the output. Each is
refused in one line with the way out, or handled, and nothing is ever written outside ``--out``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flora.io import OverlapError, refuse_overlap
from flora.sharding.__main__ import main
from flora.sharding.format.schema import MANIFEST

from .build_settings import TEST_OVERRIDES


def build_args(splits: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["build", "--splits", str(splits), "--out", str(out), "--cache", str(cache), *extra,
            *TEST_OVERRIDES]  # fmt: skip


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def built(small_world, tmp_path_factory):
    """A finished build of the small world (copied by the tests that damage it) and its warm cache."""
    root = tmp_path_factory.mktemp("safety")
    assert main(build_args(small_world.splits, root / "shards", root / "cache")) == 0
    return root


def copy_of(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "shards"
    shutil.copytree(built / "shards", out, symlinks=True)
    return out, built / "cache"


# ------------------------------------------------------------------------------------------ overlap
def test_the_overlap_rule(tmp_path):
    reads = tmp_path / "splits"
    (reads / "sub").mkdir(parents=True)
    (tmp_path / "file.jsonl").write_text("{}\n")
    for out, word in [(reads, "is the folder"), (reads / "sub", "lies inside"), (tmp_path, "contains")]:
        with pytest.raises(OverlapError, match=word):
            refuse_overlap("build", out, {"--splits": reads})
    link = tmp_path / "link"
    link.symlink_to(reads)
    with pytest.raises(OverlapError, match="is the folder --splits"):
        refuse_overlap("build", link, {"--splits": reads})  # a link to the input is the input
    with pytest.raises(OverlapError, match="is the file --source reads"):
        refuse_overlap("catalog", tmp_path / "file.jsonl", {"--source": tmp_path / "file.jsonl"})
    refuse_overlap("catalog", tmp_path / "out", {"--source": tmp_path / "file.jsonl", "--previous": None})
    refuse_overlap("build", "s3://bucket/prefix", {"--splits": reads, "mongo": "mongodb://h/db.c"})
    refuse_overlap("build", tmp_path / "sibling", {"--splits": reads})
    refuse_overlap("catalog", reads, {"--previous": reads}, same_ok=("--previous",))  # the in-place update
    with pytest.raises(OverlapError, match="lies inside --previous"):
        refuse_overlap("catalog", reads / "sub", {"--previous": reads}, same_ok=("--previous",))


def test_a_build_into_its_own_splits_is_refused_and_the_catalog_is_untouched(small_world, tmp_path, capsys):
    splits = tmp_path / "splits"
    shutil.copytree(small_world.splits, splits)
    before = {p.name: p.read_bytes() for p in splits.iterdir() if p.is_file()}
    assert main(build_args(splits, splits, tmp_path / "cache")) == 2
    assert "is the folder --splits" in error_line(capsys)
    assert main(build_args(splits, splits / "shards", tmp_path / "cache")) == 2
    assert "lies inside --splits" in error_line(capsys)
    assert main(build_args(splits, tmp_path / "shards", tmp_path / "shards" / "cache")) == 2
    assert "contains the cache" in error_line(capsys)
    after = {p.name: p.read_bytes() for p in splits.iterdir() if p.is_file()}
    assert after == before and not (splits / "_work").exists() and not (tmp_path / "shards").exists()


def test_a_catalog_over_its_previous_version_or_its_source_is_refused(small_world, tmp_path, capsys):
    previous = tmp_path / "v1"
    shutil.copytree(small_world.splits, previous)
    source = small_world.world.catalog_path
    argv = ["catalog", "--source", str(source), "--previous", str(previous), "progress=false"]
    assert (
        main([*argv, "--out", str(previous / "v2")]) == 2
    )  # (--out DIR --previous DIR: the in-place update)
    assert "lies inside --previous" in error_line(capsys)
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "contains --previous" in error_line(capsys)
    assert main([*argv, "--out", str(source)]) == 2
    assert "is the file --source reads" in error_line(capsys)


# --------------------------------------------------------------------------------- damaged manifest
@pytest.mark.parametrize(
    "damage",
    ["truncated", "not_json", "binary", "a_list", "link_elsewhere", "a_folder"],
)
def test_a_damaged_manifest_is_one_line_with_the_way_out(
    built, small_world, tmp_path, capsys, caplog, damage
):
    out, cache = copy_of(built, tmp_path)
    manifest = out / MANIFEST
    text = manifest.read_text()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"not": "a manifest"')
    if damage == "truncated":
        manifest.write_text(text[: len(text) // 2])
    elif damage == "not_json":
        manifest.write_text("manifest: yes\n")
    elif damage == "binary":
        manifest.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "a_list":
        manifest.write_text("[1, 2, 3]")
    elif damage == "link_elsewhere":
        manifest.unlink()
        manifest.symlink_to(elsewhere)
    else:
        manifest.unlink()
        manifest.mkdir()
    for _ in range(2):  # the same line every time, until the user takes the way out
        assert main(build_args(small_world.splits, out, cache)) == 2
        line = error_line(capsys)
        assert "manifest.json" in line and "--fresh" in line, line
    assert main(build_args(small_world.splits, out, cache, "--fresh")) == 0
    assert "set aside as manifest.json.set-aside-" in caplog.text  # a warning line on stderr
    published = json.loads((out / MANIFEST).read_text())
    assert not (out / MANIFEST).is_symlink()
    assert published["accounting"] == json.loads((built / "shards" / MANIFEST).read_text())["accounting"]
    kept = [p for p in out.iterdir() if p.name.startswith(MANIFEST + ".set-aside-")]
    assert len(kept) == 1, "the damaged file is kept aside, not deleted"
    assert elsewhere.read_text() == '{"not": "a manifest"', "a link's target is never written"
    assert main(build_args(small_world.splits, out, cache)) == 0  # and later builds are ordinary again


# ------------------------------------------------------------------------------------------ symlinks
@pytest.mark.parametrize("where", ["_work", "split_folder", "failures.jsonl", "a_tar", "class_mapping.json"])
def test_a_symlink_inside_the_output_is_refused_and_nothing_is_written_through_it(
    built, small_world, tmp_path, capsys, where
):
    out, cache = copy_of(built, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    if where == "_work":
        shutil.rmtree(out / "_work", ignore_errors=True)
        (out / "_work").symlink_to(outside, target_is_directory=True)
    elif where == "split_folder":
        moved = outside / "train"
        shutil.move(out / "train", moved)
        (out / "train").symlink_to(moved, target_is_directory=True)
    elif where == "a_tar":
        tar = next((out / "train").rglob("*.tar"))
        shutil.move(tar, outside / tar.name)
        tar.symlink_to(outside / tar.name)
    else:
        shutil.move(out / where, outside / where)
        (out / where).symlink_to(outside / where)
    before = {p.relative_to(outside): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    (out / MANIFEST).unlink()  # a rebuild: it would write everything again
    assert main(build_args(small_world.splits, out, cache)) == 2
    line = error_line(capsys)
    assert "symbolic link" in line and str(outside) in line, line
    after = {p.relative_to(outside): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert after == before, "nothing written through the link"
    assert not (outside / "plan.json").exists()


def test_the_catalog_never_writes_through_a_link_left_as_a_temporary(small_world, tmp_path):
    """The catalog stages its files as ``<name>.tmp``: a link planted under that name is replaced, its
    target left alone."""
    out = tmp_path / "cat"
    out.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (out / "dataset_splits.jsonl.tmp").symlink_to(target)
    source = small_world.world.catalog_path
    assert main(["catalog", "--source", str(source), "--out", str(out), "progress=false"]) == 0
    assert target.read_text() == "keep me"
    assert not (out / "dataset_splits.jsonl").is_symlink()
    assert os.path.getsize(out / "dataset_splits.jsonl") > 0
