"""Full disks, for real (tmpfs mounts, so these need root): a full shard disk while parts are written
and during the finalize of a rebuild, and a full cache disk. Each ends as the issue states: one line
naming the stage and the file, nothing half-written left behind, readers never see a torn set, a
re-run after freeing space completes; a full cache is a warning and a count, never the build's end."""

import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from flora.sharding.__main__ import main
from flora.sharding.build import finalize
from flora.sharding.format.schema import ShardFormatError, read_manifest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

ARGS = ["progress=false", "download.allow_networks=[127.0.0.1/32]", "processes=1", "download.threads=4"]
FULL = f"No space left on device [Errno {errno.ENOSPC}]"


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Writes ``disk/filler`` until the filesystem is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # the last partial block may still fit a small file: fill byte by byte chunks until nothing fits
    with open(filler, "ab", buffering=0) as fh:
        for size in (4096, 512, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def leftovers(root: Path) -> list[str]:
    """Temporaries, and empty shards, indexes or JSON files, under ``root`` (an empty log is valid)."""
    out = []
    for p in root.rglob("*"):
        if not p.is_file() or p.name == "filler":
            continue
        temporary = ".tmp" in p.name or ".rewrite" in p.name
        if temporary or (p.stat().st_size == 0 and p.suffix in {".tar", ".idx", ".json"}):
            out.append(str(p.relative_to(root)))
    return sorted(out)


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*/*.[ti][ad][rx]"))}


def build(world, out: Path, *extra: str) -> int:
    """``flora build`` of ``world``'s splits (the session's small world, tests/sharding/conftest.py)."""
    return main(["build", "--splits", str(world.splits), "--out", str(out), *ARGS, *extra])


def test_full_disk_while_writing_parts_is_one_line_and_leaves_no_tmp(small_world, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "shards"
        assert build(small_world, out, "shards.max_samples=10") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("flora build: error: build: writing ") and FULL in err
        assert str(out) in err and "free space on that filesystem" in err
        assert leftovers(disk) == []
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert build(small_world, out, "shards.max_samples=10") == 0  # finishes once there is space
        reference = tmp_path / "reference"
        assert build(small_world, reference, "shards.max_samples=10") == 0
        assert shard_files(out) == shard_files(reference)


def test_full_disk_in_the_finalize_of_a_rebuild_never_shows_readers_a_torn_set(
    small_world, tmp_path, capsys, monkeypatch
):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "shards"
        assert build(small_world, out, "shards.max_samples=40") == 0
        old = read_manifest(out)
        capsys.readouterr()

        real = finalize.write_index
        calls = []

        def write_index_on_a_filling_disk(tar, lines=None):
            calls.append(tar)
            if len(calls) == 3:  # two new shards are in place, the third tar renamed: now the disk fills
                fill(disk)
            return real(tar, lines)

        monkeypatch.setattr(finalize, "write_index", write_index_on_a_filling_disk)
        assert build(small_world, out, "shards.max_samples=7") == 2  # a changed plan over the existing build
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(
            f"flora build: error: build: finalize: cannot write {calls[2].with_suffix('.idx')}"
        )
        assert FULL in err
        # readers: the old manifest is gone (it no longer describes the tars), so they refuse to start
        with pytest.raises(ShardFormatError, match="run it again to finish"):
            read_manifest(out)
        assert leftovers(disk) == []
        assert not calls[2].with_suffix(".idx").exists()  # the old plan's index never sits beside a new tar
        assert len(old.shards) > 0

        monkeypatch.setattr(finalize, "write_index", real)
        (disk / "filler").unlink()
        assert build(small_world, out, "shards.max_samples=7") == 0
        new = read_manifest(out)
        for entry in new.shards:
            path = new.path(entry)
            assert path.stat().st_size == entry.bytes
        reference = tmp_path / "reference"
        assert build(small_world, reference, "shards.max_samples=7") == 0
        assert shard_files(out) == shard_files(reference)
        ref = json.loads((reference / "manifest.json").read_text())
        assert json.loads((out / "manifest.json").read_text())["shards"] == ref["shards"]


def test_a_full_cache_disk_is_a_warning_and_a_count_and_the_build_finishes(small_world, tmp_path):
    with tmpfs(tmp_path / "cachedisk", "256k") as disk:
        out = tmp_path / "shards"
        argv = ["build", "--splits", str(small_world.splits), "--out", str(out), *ARGS]
        argv += [f"cache.path={disk / 'cache'}", "cache.max_bytes=1073741824"]
        proc = subprocess.run([sys.executable, "-m", "flora.sharding", *argv], capture_output=True, text=True)
        err = proc.stderr
        assert proc.returncode == 0, err
        lines = err.splitlines()
        cap = [line for line in lines if "cache.max_bytes is 1.0 GiB but its filesystem has" in line]
        assert len(cap) == 1 and str(disk / "cache") in cap[0]
        failed = [line for line in lines if "a write failed" in line]
        assert len(failed) == 1 and str(disk / "cache") in failed[0]
        assert "Traceback" not in err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["accounting"]["ok"] and manifest["accounting"]["failed"] == 0
        assert manifest["last_run"]["cache"]["write_failures"] > 0
    reference = tmp_path / "reference"
    assert build(small_world, reference) == 0
    assert shard_files(out) == shard_files(reference)
