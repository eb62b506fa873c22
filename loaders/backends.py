"""The loader backends: name -> the ``EpochLoader`` class that reads the shards that way.

``data.backend`` is validated against ``backend_names()`` when a config loads, before any backend
is imported (DALI is heavy and optional); ``loader_class(name)`` imports the chosen one. A backend
of one's own is added with ``register_backend("name", MyLoader)`` or a ``"module:Class"`` path.

Leaves out: what a backend does (base.py's contract; dali.py, reference.py).
"""

from __future__ import annotations

import importlib

#: Built-in backends, by import path: imported only when chosen.
BACKENDS: dict[str, str | type] = {
    "dali": "flora.loaders.dali:DaliLoader",
    "torch": "flora.loaders.reference:ReferenceLoader",
}


def register_backend(name: str, target: str | type) -> None:
    """Adds (or replaces) backend ``name``: an ``EpochLoader`` subclass or its ``"module:Class"`` path."""
    BACKENDS[name] = target


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def loader_class(name: str) -> type:
    """The loader class of backend ``name`` (importing its module on first use)."""
    if name not in BACKENDS:
        raise ValueError(f"data.backend: expected one of {backend_names()}, got {name!r}")
    target = BACKENDS[name]
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
        BACKENDS[name] = target
    return target
