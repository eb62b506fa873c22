"""Benchmark results carry no machine paths: paths inside the repository are written relative to it."""

import json

from benchmarks.results import REPO, RESULTS_DIR, write_result


def test_paths_in_results_are_repo_relative(tmp_path):
    path = write_result(
        "x",
        {"shards": str(REPO / "benchmarks" / "out" / "s"), "rows": [{"ckpt": str(REPO / "a.pt")}], "n": 1},
        tmp_path,
    )
    data = json.loads(path.read_text())
    assert data["shards"] == "benchmarks/out/s" and data["rows"][0]["ckpt"] == "a.pt" and data["n"] == 1


def test_committed_results_hold_no_absolute_paths():
    for path in RESULTS_DIR.glob("*.json"):
        assert '"/' not in path.read_text(), path.name
