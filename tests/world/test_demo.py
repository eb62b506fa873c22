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


def test_demo_refuses_a_taken_port_in_one_line(tmp_path):
    """The demo serves on a fixed port (URLs carry it, and URLs seed splits, chunks and cache keys)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "world.demo", "--out", str(tmp_path), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"demo: cannot serve the sample world on 127.0.0.1:{port}")
    assert "\n" not in proc.stderr.strip()
