"""The sample world: a generated plant-image catalog, its images, and a loopback image server.

Owns: the public API the demo, the tests and the benchmarks use to create a realistic raw input
(``generate_catalog``, ``build_world``, ``render_image``, ``write_images``) and to serve it over HTTP
with injected faults (``ImageServer``).

Leaves out: anything a consumer of the catalog does (normalisation, deduplication, downloading,
sharding); that lives in the rest of ``sharding``.
"""

from world.generate import (
    DEFAULT_BASE_URL,
    INVALID_KINDS,
    World,
    WorldSpec,
    assign_faults,
    build_world,
    generate_catalog,
    read_jsonl,
    species_names,
    write_jsonl,
)
from world.images import (
    canonical_name,
    image_owners,
    image_relpath,
    plan_image,
    render_image,
    species_look,
    write_images,
)
from world.server import FAULT_KINDS, ImageServer, load_faults
from world.tables import LICENSE_SPELLINGS, LICENSE_WEIGHTS, SPECIES

__all__ = [
    "DEFAULT_BASE_URL",
    "FAULT_KINDS",
    "INVALID_KINDS",
    "LICENSE_SPELLINGS",
    "LICENSE_WEIGHTS",
    "SPECIES",
    "ImageServer",
    "World",
    "WorldSpec",
    "assign_faults",
    "build_world",
    "canonical_name",
    "generate_catalog",
    "image_owners",
    "image_relpath",
    "load_faults",
    "plan_image",
    "read_jsonl",
    "render_image",
    "species_look",
    "species_names",
    "write_images",
    "write_jsonl",
]
