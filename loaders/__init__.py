"""Shards -> batches: DALI (GPU or CPU) and a torch reference loader with the same semantics.

``from loaders import create_dataloaders``; see factory.py for the API and base.py for epochs,
the remainder policy across ranks and mid-epoch resume.
"""

from flora.loaders.config import AugmentConfig, DataConfig, load_data_config
from flora.loaders.factory import LoaderInfo, create_dataloaders
from flora.loaders.index import LoaderError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "LoaderError",
    "LoaderInfo",
    "create_dataloaders",
    "load_data_config",
]
