"""The sharding tests' shared worlds and builds, made once per session (tests/worlds.py has the
specs): ``faulty_world`` (every fault kind) and ``faulty_shards``, its build with the test settings
(test_build, test_s3_build); ``clean_world`` (test_ray_cluster); ``small_world`` (test_disk_faults,
test_download_deadlines). Tests compare against them and build elsewhere; one that damages a build
works on its own copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from flora.sharding.build.run import build
from tests.worlds import CLEAN, FAULTY, SMALL, ServedWorld

from .build_settings import config


@dataclass
class Built:
    """A finished build: its folder, its manifest and the image cache it filled (warm for rebuilds)."""

    out: Path
    manifest: dict
    cache: Path


@pytest.fixture(scope="session")
def faulty_world(sample_world) -> ServedWorld:
    return sample_world(FAULTY)


@pytest.fixture(scope="session")
def faulty_shards(faulty_world, tmp_path_factory) -> Built:
    tmp = tmp_path_factory.mktemp("faulty-shards")
    manifest = build(faulty_world.splits, tmp / "shards", config(tmp / "cache"))
    return Built(out=tmp / "shards", manifest=manifest, cache=tmp / "cache")


@pytest.fixture(scope="session")
def clean_world(sample_world) -> ServedWorld:
    return sample_world(CLEAN)


@pytest.fixture(scope="session")
def small_world(sample_world) -> ServedWorld:
    return sample_world(SMALL)
