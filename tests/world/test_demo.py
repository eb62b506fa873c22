"""``make demo``'s driver end to end on a small world: every stage runs through its command line, and a
second run on the same machine prints the same shard count and metrics, with every image from the
cache (issue 16, item 8)."""

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from world.demo import SPEED_NOTE

#: Where the kernel draws the ports it hands out for port 0 (Linux; the default range if unreadable).
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The lowest port the demo's port is drawn from: above the registered services people run locally.
LOWEST_PORT = 20000


def free_port() -> int:
    """A free port below the kernel's ephemeral range: the demo binds it twice, minutes apart, and no
    server of another test (each binds port 0, maybe in a parallel pytest-xdist worker) is handed it
    in between."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = ephemeral_low if ephemeral_low > LOWEST_PORT else 65536  # no room below it: any port
    rng = random.Random()
    while True:
        port = rng.randrange(LOWEST_PORT, high)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: another
            return port


def run_demo(out, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "world.demo", "--out", str(out), "--records", "400", "--species", "10"]
    proc = subprocess.run([*cmd, "--port", str(port)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def results(stdout: str) -> list[str]:
    """The lines that must not change between runs: the sharder's accounting and shard count, and every
    evaluation's metrics (timings, paths and speeds aside)."""
    keep = []
    for line in stdout.splitlines():
        if line.startswith(("build: ", "test: ", "  incremental over ")):
            keep.append(line)
        elif " shards; this run:" in line or "frozen splits (--previous)" in line:
            keep.append(line.split(";")[0])
    return keep


@pytest.mark.slow
def test_demo_runs_every_stage_and_a_second_run_is_identical_from_cache(tmp_path):
    port = free_port()
    first = run_demo(tmp_path, port)
    assert "accounting ok" in first.stdout
    assert "train:" in first.stdout and "images/s (all ranks)" in first.stdout  # the loaders' epoch
    assert (tmp_path / "shards" / "manifest.json").is_file()
    # the catalog grows once: frozen splits, then an incremental build over version 1's shards
    assert "frozen splits (--previous): kept " in first.stdout and ", moved 0" in first.stdout
    assert "incremental over " in first.stdout and " 0 rebuilt" in first.stdout
    # version 2 brings a GBIF download (a Darwin Core Archive) beside version 1's JSON Lines
    assert "as a GBIF download (gbif_download.zip" in first.stdout
    assert "sources: jsonl catalog_v1.jsonl + dwca gbif_download.zip" in first.stdout
    sharded = json.loads((tmp_path / "shards" / "manifest.json").read_text())["accounting"]["sharded"]
    assert f"credits: shards/ATTRIBUTION.csv ({sharded} images)" in first.stdout
    assert (tmp_path / "shards" / "dataset_card.md").is_file()
    # the summary's many/medium/few-shot line for each of the two teachers and the two students
    assert first.stdout.count("many/medium/few-shot top-1:") == 4
    # the summary compares accuracy and size; a shared machine's training speeds are no benchmark
    summary = first.stdout.split("== demo summary", 1)[1]
    assert "steps/s" not in summary and SPEED_NOTE in summary
    second = run_demo(tmp_path, port)  # the same machine, the same folder: the cache is warm
    assert results(first.stdout) and results(second.stdout) == results(first.stdout)
    assert sum("test: " in line for line in results(first.stdout)) >= 2
    run = json.loads((tmp_path / "shards" / "manifest.json").read_text())["last_run"]
    assert run["from_network"] == 0 and run["from_cache"] > 0  # every image from the cache


def test_demo_refuses_a_taken_port_in_one_line(tmp_path):
    """The demo serves on a fixed port (URLs carry it, and URLs seed splits, chunks and cache keys)."""
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
