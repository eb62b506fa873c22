"""Benchmark results: no machine paths (paths inside the repository are written relative to it); publish
writes the JSON and the chart and names them; the command names the module and its arguments."""

import json

from benchmarks.results import REPO, RESULTS_DIR, command_line, publish, write_result


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


def test_publish_writes_the_json_and_the_chart_and_says_so(tmp_path, capsys):
    drawn = []
    path = publish("x", {"n": 1}, drawn.append, results_dir=tmp_path, note=" in 3 s")
    assert path == tmp_path / "x.json" and json.loads(path.read_text())["n"] == 1
    assert drawn == [tmp_path / "x.png"]
    assert capsys.readouterr().out == f"wrote {path} and {tmp_path / 'x.png'} in 3 s\n"
    publish("y", {"n": 2}, results_dir=tmp_path)  # no chart
    assert capsys.readouterr().out == f"wrote {tmp_path / 'y.json'}\n"


def test_the_command_names_the_module_and_the_arguments_given():
    assert command_line("benchmarks.loader", ["--name", "x"]) == "python -m benchmarks.loader --name x"
    assert command_line("benchmarks.loader", []) == "python -m benchmarks.loader"
