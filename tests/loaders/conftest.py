"""Helpers of the loader tests (the shard fixtures are shared: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path


def data_cfg(shards: Path, **over) -> dict:
    """A small, fast data config as a mapping (``create_dataloaders`` accepts one)."""
    data = {
        "shards": str(shards),
        "image_size": 64,
        "batch_size": 16,
        "threads": 2,
        "device": "cpu",
        "shuffle_buffer": 64,
        "index_cache": "off",
    }
    data.update(over)
    return {"data": data}
