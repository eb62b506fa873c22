"""Shards -> batches: DALI (GPU or CPU) and a torch reference loader with the same semantics.

``from flora.loaders import create_dataloaders``; see factory.py for the API and base.py for epochs,
the remainder policy across ranks and mid-epoch resume.

The names below are imported on first use (PEP 562), so that ``import flora.loaders`` or reading a
data config (``flora.loaders.config``) does not import torch; ``create_dataloaders`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flora.loaders.config import AugmentConfig, DataConfig, load_data_config
    from flora.loaders.factory import LoaderInfo, create_dataloaders
    from flora.loaders.index import LoaderError

#: Each public name -> the module that defines it.
_EXPORTS = {
    "AugmentConfig": "flora.loaders.config",
    "DataConfig": "flora.loaders.config",
    "load_data_config": "flora.loaders.config",
    "LoaderInfo": "flora.loaders.factory",
    "create_dataloaders": "flora.loaders.factory",
    "LoaderError": "flora.loaders.index",
}

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "LoaderError",
    "LoaderInfo",
    "create_dataloaders",
    "load_data_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
