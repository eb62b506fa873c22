"""``make demo``'s driver end to end on a small world: every stage runs through its command line."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "world.demo",
        "--out",
        str(tmp_path),
        "--records",
        "400",
        "--species",
        "10",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "accounting ok" in proc.stdout
    assert "train:" in proc.stdout and "images/s (all ranks)" in proc.stdout  # the loaders' epoch
    assert (tmp_path / "shards" / "manifest.json").is_file()
