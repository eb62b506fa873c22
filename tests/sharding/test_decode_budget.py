"""The decode budget (sharding/images/budget.py): reservations in arrival order, an image above the whole
budget alone, the images whose pixels are alive at once bounded on the real decode path (Pillow's
``load`` and ``close`` counted), pixels freed before a reservation is given back (on failure too), a
process's peak RSS near its budget, the config key and its default, and a build with a tiny budget."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from flora.config import ConfigError, load_config
from flora.sharding.__main__ import main
from flora.sharding.build.job import WorkerState
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.images import budget as budget_module
from flora.sharding.images.budget import (
    MIB,
    MIN_DEFAULT_BYTES,
    DecodeBudget,
    budget_bytes,
    decode_cost,
    machine_memory_bytes,
)
from flora.sharding.images.convert import ImageConfig, ImageError, _plan, process_image

from .build_settings import REPO, config, shard_bytes

GIB = 2**30
#: How long a test waits for another thread to reach a state before it fails (never reached when fine).
STATE_WAIT_S = 10.0


def rgba_png(side: int, seed: int) -> bytes:
    """A distinct ``side`` x ``side`` RGBA PNG of flat bands (compresses small, decodes to 4 B a pixel)."""
    band = (np.arange(side) // (7 + seed)).astype(np.uint8)
    base = band[None, :] + band[:, None]
    pixels = np.stack([base, base * np.uint8(3), 255 - base, base | 1], -1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def cost_of(data: bytes, cfg: ImageConfig) -> int:
    return decode_cost(_plan(Image.open(io.BytesIO(data)), data, cfg).memory)


def until(condition, what: str) -> None:
    """Waits for another thread to reach ``condition`` (checked every millisecond)."""
    deadline = time.monotonic() + STATE_WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.001)


class AliveImages:
    """Counts, on Pillow's real decode path, the decoded images whose pixels are alive: from the first
    ``ImageFile.load`` of an image (the decode) to its ``close``; records who was alive at each decode."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.alive: dict[int, tuple[int, int]] = {}
        self.at_decode: list[list[tuple[int, int]]] = []
        load, close = ImageFile.ImageFile.load, Image.Image.close

        def counted_load(img):
            with self.lock:
                if id(img) not in self.alive:
                    self.alive[id(img)] = img.size
                    self.at_decode.append(sorted(self.alive.values()))
            return load(img)

        def counted_close(img):
            close(img)
            with self.lock:
                self.alive.pop(id(img), None)

        monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
        monkeypatch.setattr(Image.Image, "close", counted_close)

    @property
    def most_at_once(self) -> int:
        return max(len(seen) for seen in self.at_decode)


def live_pillow_blocks() -> int:
    """Pillow's image memory blocks allocated and not yet freed (its own counters; no block cache)."""
    stats = Image.core.get_stats()
    return stats["allocated_blocks"] - stats["freed_blocks"]


# ------------------------------------------------------------------------------------------- DecodeBudget
def test_an_oversized_reservation_waits_for_an_empty_budget_runs_alone_and_is_not_overtaken():
    budget = DecodeBudget(100)
    order, held = [], {}
    big_may_finish = threading.Event()

    def take(name: str, cost: int) -> None:
        with budget.reserve(cost):
            order.append(name)
            held[name] = budget.stats()["held"]
            if name == "big":
                assert big_may_finish.wait(STATE_WAIT_S)

    with budget.reserve(60):
        big = threading.Thread(target=take, args=("big", 500))
        big.start()
        until(lambda: budget.stats()["waiting"] == 1, "the big reservation waiting")
        small = threading.Thread(target=take, args=("small", 10))
        small.start()
        until(lambda: budget.stats()["waiting"] == 2, "the small one queued behind it")
        assert order == [] and budget.stats()["held"] == 60  # 10 would fit beside 60: it waits its turn
    until(lambda: order == ["big"], "the big reservation running once the budget is empty")
    assert budget.stats()["held"] == 100 and budget.stats()["waiting"] == 1  # the whole budget: alone
    big_may_finish.set()
    big.join()
    small.join()
    assert order == ["big", "small"]
    assert held == {"big": 100, "small": 10}
    stats = budget.stats()
    assert (stats["held"], stats["alone"], stats["reservations"], stats["waited"]) == (0, 1, 3, 2)


def test_a_reservation_is_given_back_when_its_holder_fails():
    budget = DecodeBudget(100)
    with pytest.raises(RuntimeError, match="decoder broke"), budget.reserve(80):
        raise RuntimeError("decoder broke")
    with budget.reserve(100) as got:  # the whole budget is free again
        assert got == 100
    assert budget.stats()["held"] == 0


# ------------------------------------------------------------------------------- the real decode path
def test_the_budget_bounds_the_images_whose_pixels_are_alive_at_once(monkeypatch):
    cfg = ImageConfig()
    blobs = [rgba_png(600, seed) for seed in range(12)]
    cost = max(cost_of(b, cfg) for b in blobs)
    budget = DecodeBudget(2 * cost + cost // 2)  # room for two
    alive = AliveImages(monkeypatch)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: process_image(b, cfg, budget=budget), blobs))
    assert len({r.sha256 for r in results}) == 12 and all(r.width == 600 for r in results)
    assert len(alive.at_decode) == 12 and not alive.alive  # every image decoded once and closed
    assert alive.most_at_once <= 2
    stats = budget.stats()
    assert stats["peak"] <= budget.total and stats["held"] == 0 and stats["alone"] == 0


def test_an_image_above_the_whole_budget_is_stored_and_decoded_alone(monkeypatch):
    cfg = ImageConfig()
    small = [rgba_png(300, seed) for seed in range(8)]
    big = rgba_png(1200, 99)
    budget = DecodeBudget(3 * cost_of(small[0], cfg))
    assert cost_of(big, cfg) > budget.total
    alive = AliveImages(monkeypatch)
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda b: process_image(b, cfg, budget=budget), [*small[:4], big, *small[4:]])
        )
    assert [r.width for r in results] == [300] * 4 + [1200] + [300] * 4  # stored, not refused
    with_big = [seen for seen in alive.at_decode if (1200, 1200) in seen]
    assert with_big == [[(1200, 1200)]]  # nothing decoded beside it, and it beside nothing
    assert alive.most_at_once <= 3
    assert budget.stats()["alone"] == 1 and budget.stats()["held"] == 0


class ReleaseProbe(DecodeBudget):
    """A budget that notes Pillow's live blocks at the moment each reservation is given back."""

    at_release: list[int]

    @contextmanager
    def reserve(self, cost: int):
        with super().reserve(cost) as held:
            try:
                yield held
            finally:
                self.at_release.append(live_pillow_blocks())


@pytest.mark.parametrize("damaged", [False, True], ids=["stored", "truncated"])
def test_pixels_are_freed_before_the_reservation_is_given_back(damaged):
    data = rgba_png(1500, 1)
    if damaged:  # decodes two thirds of the rows, then fails: the pixels were allocated
        data = data[: len(data) * 2 // 3]
    budget = ReleaseProbe(64 * MIB)
    budget.at_release = []
    before = live_pillow_blocks()
    if damaged:
        with pytest.raises(ImageError) as failed:
            process_image(data, ImageConfig(), budget=budget)
        assert failed.value.reason == "corrupt"
        assert live_pillow_blocks() == before  # while the caller still holds the exception
    else:
        assert process_image(data, ImageConfig(), budget=budget).width == 1500
    assert budget.at_release == [before]


#: Decodes the PNGs given on 16 threads through ``process_image``, with a budget of argv[1] MiB or none
#: (``off``); prints the peak RSS above the baseline in MiB and the largest estimate.
RSS_CHILD = """
import io, json, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from PIL import Image
from flora.sharding.images.budget import DecodeBudget, decode_cost
from flora.sharding.images.convert import ImageConfig, _plan, process_image

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) * 1024

mib, paths = sys.argv[1], sys.argv[2:]
cfg = ImageConfig()
budget = None if mib == "off" else DecodeBudget(int(mib) * 2**20)
blobs = [Path(p).read_bytes() for p in paths]
largest = max(decode_cost(_plan(Image.open(io.BytesIO(b)), b, cfg).memory) for b in blobs)
process_image(blobs[0], cfg)  # first-call allocations before the baseline
baseline = status("VmRSS")
with ThreadPoolExecutor(16) as pool:
    list(pool.map(lambda b: process_image(b, cfg, budget=budget), blobs))
print(json.dumps({"peak": (status("VmHWM") - baseline) / 2**20, "largest": largest / 2**20}))
"""
#: Allowance over max(budget, largest image) for what a budget does not count: the threads' stacks and
#: small buffers, allocator slack (measured: 51 MiB peak against a 64 MiB budget, 500 MiB without).
RSS_MARGIN_MIB = 48


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak RSS from /proc (Linux)")
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_peak_rss_of_sixteen_threads_stays_within_the_budget_and_a_margin(tmp_path):
    paths = []
    for seed in range(10):  # 15 MiB of pixels each, ~52 MiB estimated: one at a time under 64 MiB
        paths.append(tmp_path / f"{seed}.png")
        paths[-1].write_bytes(rgba_png(2000, seed))

    def peak(mib: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        argv = [sys.executable, "-c", RSS_CHILD, mib, *map(str, paths)]
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    budget_mib = 64
    bounded = peak(str(budget_mib))
    bound = max(budget_mib, bounded["largest"]) + RSS_MARGIN_MIB
    assert bounded["peak"] <= bound, bounded
    assert peak("off")["peak"] > bound  # the set is big enough to tell a bounded run from an unbounded one


# ---------------------------------------------------------------------------------- config and default
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "decode_budget_mib must be >= 1 (MiB) or null"),
        ("-512", "decode_budget_mib must be >= 1 (MiB) or null"),
        ("abc", "decode_budget_mib: expected an integer, got str 'abc'"),
        ("1.5", "decode_budget_mib: expected an integer, got float 1.5"),
    ],
)
def test_decode_budget_mib_is_refused_in_one_line(tmp_path, capsys, value, message):
    argv = ["build", "--splits", str(tmp_path), "--out", str(tmp_path / "o"), f"decode_budget_mib={value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(BuildConfig, None, [f"decode_budget_mib={value}"])


def test_the_bundled_configs_derive_the_budget_and_an_override_sets_it():
    assert load_config(BuildConfig, REPO / "config/sharding.yaml").decode_budget_mib is None
    assert load_config(BuildConfig, REPO / "config/sharding_smoke.yaml").decode_budget_mib == 256
    assert load_config(BuildConfig, None, ["decode_budget_mib=768"]).decode_budget_mib == 768
    assert budget_bytes(768, 16) == 768 * MIB  # a configured budget ignores memory and processes


def test_the_default_is_half_the_memory_over_the_processes_with_a_floor(monkeypatch):
    monkeypatch.setattr(budget_module, "machine_memory_bytes", lambda: 32 * GIB)
    assert budget_bytes(None, 1) == 16 * GIB
    assert budget_bytes(None, 16) == 1 * GIB
    assert budget_bytes(None, 0) == 16 * GIB  # as one process, never a division by zero
    assert budget_bytes(None, 1000) == MIN_DEFAULT_BYTES


def test_machine_memory_is_the_lower_of_ram_and_the_cgroup_limit(tmp_path, monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    unlimited, limited = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    unlimited.write_text("max\n")
    limited.write_text(f"{GIB}\n")
    monkeypatch.setattr(budget_module, "_cgroup_limit_files", lambda: [unlimited, tmp_path / "absent"])
    assert machine_memory_bytes() == ram
    monkeypatch.setattr(budget_module, "_cgroup_limit_files", lambda: [unlimited, limited])
    assert machine_memory_bytes() == min(ram, GIB)
    assert budget_bytes(None, 2) == max(MIN_DEFAULT_BYTES, min(ram, GIB) // 4)


def test_the_default_on_this_machine_is_sane():
    memory, processes = machine_memory_bytes(), os.cpu_count() or 1
    default = budget_bytes(None, processes)
    assert default >= MIN_DEFAULT_BYTES
    assert default * processes <= memory // 2 or default == MIN_DEFAULT_BYTES


# --------------------------------------------------------------------------------------------- a build
def test_a_build_with_a_tiny_budget_decodes_one_image_at_a_time_and_writes_the_same_shards(
    small_world, tmp_path
):
    tiny = build(small_world.splits, tmp_path / "tiny", config(None, "decode_budget_mib=1"))
    stats = WorkerState._current.budget.stats()  # processes=1: the jobs ran in this process
    assert stats["total"] == MIB and stats["reservations"] > 0
    assert stats["peak"] <= MIB and stats["held"] == 0
    default = build(small_world.splits, tmp_path / "default", config(None))
    assert tiny["accounting"] == default["accounting"] and tiny["accounting"]["ok"]
    assert shard_bytes(tmp_path / "tiny") == shard_bytes(tmp_path / "default")
