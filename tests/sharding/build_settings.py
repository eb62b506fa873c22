"""The sharding tests' build settings: small shards and short timeouts and backoff, so that the
sample worlds' faults cost little time, as ``key=value`` overrides for ``load_config`` and as a
``flora build`` command line; and the byte-for-byte view of a build's shards that tests compare.

Leaves out: the worlds (tests/worlds.py) and the shared builds (tests/sharding/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from flora.config import load_config
from flora.sharding.build.run import BuildConfig

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1/32"
#: Small, fast settings. The read timeout is half of tests/worlds.py's SLOW_FAULT_DELAY_S (a slow
#: URL is a timeout with room to spare) and far above a loopback read of a healthy image; backoff
#: and Retry-After waits are capped at hundredths of a second.
TEST_OVERRIDES = [
    "progress=false",
    "shards.max_samples=40",
    "download.threads=8",
    "download.retries=2",
    "download.backoff_base_s=0.01",
    "download.backoff_max_s=0.05",
    "download.read_timeout_s=0.5",
    "download.retry_after_max_s=0.05",
    "download.max_bytes=2097152",
    "images.resize_shorter_side=128",
    f"download.allow_networks=[{LOOPBACK}]",
]


def cli(splits: Path, out: Path | str, *extra: str) -> list[str]:
    """``flora build ...`` with the test settings."""
    return [
        sys.executable,
        "-m",
        "flora.sharding",
        "build",
        "--splits",
        str(splits),
        "--out",
        str(out),
        *TEST_OVERRIDES,
        *extra,
    ]


def config(cache: Path | None, *extra: str) -> BuildConfig:
    """The test settings in one process, with the image cache at ``cache`` (None: no cache)."""
    overrides = [*TEST_OVERRIDES, "processes=1", *extra]
    if cache is not None:
        overrides.append(f"cache.path={cache}")
    return load_config(BuildConfig, None, overrides)


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every tar of a build by its path under ``out``."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*/*.tar"))}
