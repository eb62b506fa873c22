"""Where derived caches live: under a cache root, never inside the shard store.

Later stages derive things from the shards (the loaders' per-shard scan results, the teachers' soft
labels). The shard store may be read-only or shared (a bucket, a team folder), so those go under a
cache root: ``data.cache_root`` when set, else ``$FLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/flora``,
else ``~/.cache/flora``. Inside it, each kind of cache has a folder per shard store, named by the
store's last path component and a hash of its resolved location, so two stores (or two users
sharing one cache root) never collide; entries inside are keyed by what they were derived from and
written atomically, so concurrent writers are safe.

Leaves out: what is cached and its validity keys (loaders/index.py, training/soft_labels.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENV_VAR = "FLORA_CACHE_DIR"
#: Hex characters of the store hash in a folder name (64 bits: no collisions among a user's stores).
STORE_KEY_CHARS = 16


def cache_root(setting: str | Path | None = None) -> Path:
    """The cache root: ``setting``, else ``$FLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/flora``, else
    ``~/.cache/flora``."""
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flora"


def store_key(shards: str | Path) -> str:
    """``<last name>-<hash of the resolved location>`` of a shard store (a folder or an s3:// URL)."""
    text = str(shards)
    location = text.rstrip("/") if "://" in text else str(Path(text).resolve())
    name = location.rstrip("/").rsplit("/", 1)[-1] or "root"
    return f"{name}-{hashlib.sha256(location.encode()).hexdigest()[:STORE_KEY_CHARS]}"


def derived_dir(kind: str, shards: str | Path, setting: str | Path | None = None) -> Path:
    """The folder of one kind of derived cache (``loader_index``, ``soft_labels``) for one store."""
    return cache_root(setting) / kind / store_key(shards)
