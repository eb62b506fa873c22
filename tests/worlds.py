"""Sample worlds served over loopback, as the tests use them: the generated catalog and its images
(world/), an ``ImageServer`` on 127.0.0.1 (a free port) answering the world's faults, and the
catalog's splits made by the real ``flora catalog`` step.

Owns: ``ServedWorld`` and ``serve_world`` (one world under a folder, its server running until the
context ends), ``WorldCache`` (one ``ServedWorld`` per spec and catalog config for a whole session:
the ``sample_world`` fixture in tests/conftest.py), and the world specs that several test files share.

Leaves out: building shards from the splits (each test file states its own build settings; the
shared builds are session fixtures in tests/sharding/conftest.py), and anything the world itself
does (world/).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flora.config import load_config
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from world import ImageServer, World, WorldSpec, build_world

#: The wait of a world's ``slow`` faults in the tests (the demo's is 2 s): twice the tests' read
#: timeout (tests/sharding/build_settings.py), so a slow URL is a ``timeout`` with room to spare
#: and costs a build (retries + 1) x 0.5 s instead of (retries + 1) x 1 s.
SLOW_FAULT_DELAY_S = 1.0

#: 500 records with every fault kind: the sharder's end-to-end world (test_build, test_s3_build).
FAULTY = WorldSpec(
    n_records=500, n_species=12, seed=2, fault_rate=0.05, slow_fault_delay_s=SLOW_FAULT_DELAY_S
)
#: 300 records, no faults: builds compared across distributors and nodes (test_ray_cluster).
CLEAN = WorldSpec(n_records=300, n_species=8, seed=11, fault_rate=0.0)
#: 80 records, no faults, no duplicate or invalid record: every record is one sample
#: (test_download_deadlines, test_disk_faults).
SMALL = WorldSpec(n_records=80, n_species=4, seed=5, fault_rate=0.0, duplicate_rate=0.0, invalid_rate=0.0)
#: 520 records, no faults, catalogued with config/catalog_smoke.yaml: the loaders' and training's shards.
LOADERS = WorldSpec(n_records=520, n_species=12, seed=5, fault_rate=0.0)


@dataclass
class ServedWorld:
    """A sample world behind a running loopback server, and its splits."""

    root: Path
    world: World
    server: ImageServer
    splits: Path


@contextmanager
def serve_world(root: Path, spec: WorldSpec, catalog_config: Path | None = None) -> Iterator[ServedWorld]:
    """Writes the world ``spec`` under ``root``, serves its images (faults included) on 127.0.0.1 and
    runs the catalog step into ``root/splits`` (``catalog_config``: a catalog YAML, else the defaults).

    Yields:
        The ``ServedWorld``; the server stops when the context ends.
    """
    (root / "images").mkdir(parents=True)
    server = ImageServer(root / "images")  # bound now: the catalog's URLs name its port
    world = build_world(root, spec, base_url=server.base_url)
    for path, fault in world.faults.items():
        server.set_fault(path, fault)
    cfg = load_config(CatalogConfig, catalog_config, ["progress=false"])
    run_catalog(str(world.catalog_path), root / "splits", cfg)
    with server:
        yield ServedWorld(root=root, world=world, server=server, splits=root / "splits")


class WorldCache:
    """One ``ServedWorld`` per (spec, catalog config), made on first use and served until ``close``.

    Tests that share a world must leave it as they found it: faults they set are cleared, files under
    ``root`` are not changed (copy what you damage).
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._stack = ExitStack()
        self._worlds: dict[str, ServedWorld] = {}

    def __call__(self, spec: WorldSpec, catalog_config: Path | None = None) -> ServedWorld:
        key = repr((spec, catalog_config))  # WorldSpec is not hashable; its repr names every field
        if key not in self._worlds:
            root = self._tmp.mktemp(f"world-{spec.n_records}-{spec.seed}")
            self._worlds[key] = self._stack.enter_context(serve_world(root, spec, catalog_config))
        return self._worlds[key]

    def close(self) -> None:
        self._stack.close()
