"""Where a run's config points: the folders and files a checkpoint's config names, stored absolute.

Owns ``LOCATIONS`` (the config entries that name a folder or a file), ``absolute_locations`` (a config
with its relative locations made absolute, as a checkpoint stores them, so every command that takes a
checkpoint works from any folder), ``located_beside`` (an older checkpoint's relative locations read
against its own folder where they exist there) and ``map_locations`` under both. URLs (``s3://``) and
switches (``data.index_cache: auto``) are left as they are.

Leaves out: the checkpoint file itself (checkpoint.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Config entries naming a folder or a file (``[]``: each item of a list); made absolute when written.
LOCATIONS = (
    "run.root", "data.shards", "data.cache_root", "data.index_cache", "model.init_from",
    "model.pretrained_path", "distill.teachers[].checkpoint", "distill.cache.dir",
)  # fmt: skip
#: ``data.index_cache`` values that are switches, not folders.
INDEX_CACHE_SWITCHES = ("auto", "off", "on", "true", "false", "")


def _is_local_location(value: Any) -> bool:
    return isinstance(value, str) and "://" not in value and value.lower() not in INDEX_CACHE_SWITCHES


def map_locations(config: dict, change: Callable[[str], str]) -> dict:
    """A copy of ``config`` with ``change`` applied to every local location of ``LOCATIONS`` (URLs such
    as ``s3://...``, switches and absent entries are left as they are)."""

    def visit(node: Any, keys: list[str]) -> Any:
        if not keys:
            return change(node) if _is_local_location(node) else node
        key, rest = keys[0], keys[1:]
        each = key.endswith("[]")
        key = key.removesuffix("[]")
        if not isinstance(node, dict) or key not in node:
            return node
        value = node[key]
        if each:
            value = [visit(item, rest) for item in value] if isinstance(value, list) else value
        else:
            value = visit(value, rest)
        return {**node, key: value}

    for location in LOCATIONS:
        config = visit(config, location.split("."))
    return config


def absolute_locations(config: dict, base: str | Path | None = None) -> dict:
    """``config`` with its relative locations made absolute against ``base`` (default: the working
    folder), as a checkpoint stores them."""
    base = Path.cwd() if base is None else Path(base)
    return map_locations(config, lambda value: os.path.abspath(os.path.join(base, os.path.expanduser(value))))


def located_beside(config: dict, folder: Path) -> dict:
    """An older checkpoint's relative locations read against its own ``folder`` where they exist there;
    the others as written (relative to the working folder, as before)."""

    def change(value: str) -> str:
        beside = folder / value
        return os.path.abspath(beside) if not Path(value).is_absolute() and beside.exists() else value

    return map_locations(config, change)
