"""A build that shards nothing (or less than ``min_sharded_share``) fails: ``flora build`` prints its
summary (failure reasons ranked), writes its manifest and ``failures.jsonl`` all the same, and exits 1
with one line naming the dominant failure reason and its remedy; ``--out`` naming a file is one line.
Over the shared ``small_world`` (its images and server; catalogs with other URLs are made here)."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from pathlib import Path

import pytest

from flora.sharding.__main__ import main
from flora.sharding.build.outcome import top_reasons
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig

from .build_settings import LOOPBACK, TEST_OVERRIDES

#: The test settings without the loopback exemption: the world's server is refused as a private address.
NO_EXEMPTION = [o for o in TEST_OVERRIDES if not o.startswith("download.allow_networks")]


def flora_build(splits: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    """``flora build`` in this process: exit status, standard output, standard error."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["build", "--splits", str(splits), "--out", str(out), "--cache", str(out.parent / "cache"), *extra]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


def catalog(rows: list[dict], root: Path) -> Path:
    """``rows`` catalogued into ``root/splits``."""
    from flora.config import load_config

    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_catalog(
        str(root / "records.jsonl"), root / "splits", load_config(CatalogConfig, None, ["progress=false"])
    )
    return root / "splits"


def written(out: Path) -> dict:
    """The manifest the failed build wrote, checked to sit beside its failures log."""
    assert (out / "failures.jsonl").is_file() and (out / "duplicates.jsonl").is_file()
    return json.loads((out / "manifest.json").read_text())


def test_loopback_without_allow_network_exits_1_naming_the_flag(small_world, tmp_path):
    status, stdout, stderr = flora_build(small_world.splits, tmp_path / "out", *NO_EXEMPTION)
    n = len(small_world.world.records)
    assert status == 1
    assert stderr.count("\n") == 1 and stderr.startswith("flora build: error: build sharded 0 of ")
    assert (
        "blocked_address" in stderr
        and "--allow-network CIDR" in stderr
        and "download.allow_networks" in stderr
    )
    assert f"written in {tmp_path / 'out'} for inspection" in stderr
    manifest = written(tmp_path / "out")
    assert manifest["accounting"]["sharded"] == 0 and manifest["failures_by_reason"] == {"blocked_address": n}
    assert f"  failures: blocked_address {n}" in stdout, "the summary is printed before the error line"
    # the remedy works: the same build with the flag shards every record and exits 0
    status, stdout, stderr = flora_build(
        small_world.splits, tmp_path / "out", *NO_EXEMPTION, "--allow-network", LOOPBACK
    )
    assert status == 0 and stderr == "" and written(tmp_path / "out")["accounting"]["sharded"] > 0


def test_an_image_host_that_is_down_exits_1_saying_check_the_host(small_world, tmp_path):
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        base = small_world.server.base_url
        rows = [
            {**r, "image_url": r["image_url"].replace(base, f"http://127.0.0.1:{port}")}
            for r in small_world.world.records
        ]
        assert all(f":{port}/" in r["image_url"] for r in rows)
        status, stdout, stderr = flora_build(catalog(rows, tmp_path), tmp_path / "out", *TEST_OVERRIDES)
    assert status == 1 and stderr.count("\n") == 1
    assert "connection_error" in stderr and "check that the image host is up" in stderr
    manifest = written(tmp_path / "out")
    assert manifest["accounting"]["sharded"] == 0 and set(manifest["failures_by_reason"]) == {
        "connection_error"
    }


def test_min_sharded_share_fails_a_build_that_shards_too_little(small_world, tmp_path):
    """A quarter of the URLs answer 404: a pass with the default (at least one record), a failure naming
    http_404 with ``min_sharded_share=0.9``; the summary ranks the reasons."""
    records = small_world.world.records
    rows = [{**r, "image_url": r["image_url"] + "-gone"} if i % 4 == 0 else r for i, r in enumerate(records)]
    splits = catalog(rows, tmp_path)
    status, stdout, stderr = flora_build(splits, tmp_path / "out", *TEST_OVERRIDES)
    first = written(tmp_path / "out")
    gone = first["accounting"]["failed"]
    assert status == 0 and stderr == "" and first["failures_by_reason"] == {"http_404": gone} and gone > 10
    assert f"  failures: http_404 {gone}" in stdout
    status, stdout, stderr = flora_build(splits, tmp_path / "out", *TEST_OVERRIDES, "min_sharded_share=0.9")
    assert status == 1 and stderr.count("\n") == 1
    assert (
        "fewer than min_sharded_share 0.9" in stderr
        and f"{gone} of its {gone} failures are http_404" in stderr
    )
    assert written(tmp_path / "out")["accounting"]["failed"] == gone


def test_a_bad_min_sharded_share_is_one_line(small_world, tmp_path):
    status, _stdout, stderr = flora_build(small_world.splits, tmp_path / "out", "min_sharded_share=1.5")
    assert (
        status == 2
        and stderr.count("\n") == 1
        and "min_sharded_share must be a share between 0 and 1" in stderr
    )


@pytest.mark.parametrize("compact", [False, True])
def test_out_naming_a_file_is_one_line(small_world, tmp_path, compact):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    extra = ["--compact"] if compact else []
    status, _stdout, stderr = flora_build(small_world.splits, out, *extra, *TEST_OVERRIDES)
    assert status == 2 and stderr.count("\n") == 1
    assert f"--out {out} is a regular file; expected a folder" in stderr and "s3://" in stderr
    assert out.read_text() == "mine\n", "the file is left alone"


def test_top_reasons_ranks_by_count_and_counts_the_rest():
    by_reason = {"http_404": 3, "blocked_address": 9, "timeout": 3, **{f"r{i}": 1 for i in range(4)}}
    assert (
        top_reasons(by_reason)
        == "blocked_address 9, http_404 3, timeout 3, r0 1, r1 1, + 2 more reasons (2 records)"
    )
