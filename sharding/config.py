"""The sharding stage's configs: the catalog's (how records are split, how MongoDB is read, licenses
and regions) and the sharder's (``BuildConfig``: shards, cache, downloads, images, workers).

Leaves out: the generic YAML/dataclass machinery (flora.config); the cache's, downloader's and image
rules' own sections live beside their code (cache.py, download.py, images.py, neardup.py).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from flora.config import ConfigError
from flora.sharding.cache.config import CacheConfig
from flora.sharding.download.fetch import DownloadConfig
from flora.sharding.images.convert import ImageConfig
from flora.sharding.images.neardup import NearDupConfig

#: The seed's split: 80/10/10.
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLIT_NAMES = ("train", "val", "test")
#: Record fields a split may be grouped by (besides ``meta.<field>``): input fields, known before the split.
GROUPABLE_FIELDS = ("plant_id", "latin_name", "source", "country", "region", "license")
_FRACTION_TOLERANCE = 1e-6


@dataclass
class SplitConfig:
    """How records are split. See split.py for the algorithm and the rare-species policy."""

    seed: int = 42
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    #: Species with fewer than this many groups go entirely to train (they cannot be stratified).
    min_for_stratify: int = 3
    #: Species with fewer than this many records (after dedup and filters) are rejected as ``rare_species``.
    min_images_per_species: int = 1
    #: Optional record field (or ``meta.<name>``) whose equal values must stay in one split, e.g.
    #: ``meta.observation_id`` so that photos of one observation never straddle train and test.
    group_by: str | None = None

    def __post_init__(self) -> None:
        if self.group_by is not None and not (
            self.group_by in GROUPABLE_FIELDS
            or (self.group_by.startswith("meta.") and len(self.group_by) > 5)
        ):
            allowed = [*GROUPABLE_FIELDS, "meta.<field>"]
            raise ConfigError(f"split.group_by must be one of {allowed}, got {self.group_by!r}")
        if set(self.fractions) != set(SPLIT_NAMES):
            raise ConfigError(
                f"split.fractions must name exactly {list(SPLIT_NAMES)}, got {sorted(self.fractions)}"
            )
        if any(v < 0 for v in self.fractions.values()):
            raise ConfigError(f"split.fractions must be non-negative, got {self.fractions}")
        total = sum(self.fractions.values())
        if abs(total - 1.0) > _FRACTION_TOLERANCE:
            raise ConfigError(f"split.fractions must sum to 1.0, got {self.fractions} (sum {total})")
        if self.fractions["train"] <= 0:
            raise ConfigError(f"split.fractions.train must be > 0, got {self.fractions['train']}")
        if self.min_for_stratify < 1:
            raise ConfigError(f"split.min_for_stratify must be >= 1, got {self.min_for_stratify}")
        if self.min_images_per_species < 1:
            raise ConfigError(f"split.min_images_per_species must be >= 1, got {self.min_images_per_species}")


@dataclass
class MongoConfig:
    """How the MongoDB source is read."""

    batch_size: int = 2000
    #: Seconds to wait for the server before failing with one clear line.
    timeout_s: float = 10.0
    #: Query filter applied server-side (a MongoDB filter document).
    filter: dict[str, Any] = field(default_factory=dict)
    #: Fields to read (inclusion projection). Empty: every field, so extra fields reach ``meta``.
    fields: list[str] = field(default_factory=list)
    #: Keep MongoDB's ``_id`` (as ``meta._id``, a string). Off by default: it is storage, not data,
    #: and leaving it out makes a MongoDB catalog byte-identical to the same records from JSONL.
    keep_id: bool = False
    #: Environment variable holding the password when the URI names a user but no password.
    password_env: str = "FLORA_MONGO_PASSWORD"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"mongo.batch_size must be >= 1, got {self.batch_size}")
        if self.timeout_s <= 0:
            raise ConfigError(f"mongo.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class DwcaConfig:
    """How a Darwin Core Archive (GBIF occurrence download) is read."""

    #: Multimedia ``type`` values that are still images (GBIF writes ``StillImage``); other rows
    #: (sound, video) are rejected as ``not_a_still_image``.
    media_types: list[str] = field(default_factory=lambda: ["StillImage"])
    #: The records' ``source`` (the publisher's dataset keys stay in ``meta``).
    source_name: str = "GBIF"


@dataclass
class InatConfig:
    """How iNaturalist's open-data tables are read."""

    #: Observation quality grades kept; photos of other observations are rejected as ``quality_grade``.
    quality_grades: list[str] = field(default_factory=lambda: ["research"])
    #: The photo size downloaded (the open-data bucket's names).
    photo_size: Literal["thumb", "square", "small", "medium", "large", "original"] = "medium"
    #: Infraspecific taxa (subspecies, variety, form, ...): ``species`` maps them up to their species,
    #: ``keep`` makes each its own class (its trinomial).
    infraspecific: Literal["species", "keep"] = "species"
    #: Only taxa under this taxon id (e.g. 47126, Plantae); None keeps every taxon.
    within_taxon: int | None = None
    #: The photo URL, from the photo's id, the size and its file extension.
    photo_url: str = "https://inaturalist-open-data.s3.amazonaws.com/photos/{photo_id}/{size}.{extension}"
    #: The records' ``source``.
    source_name: str = "iNaturalist"

    def __post_init__(self) -> None:
        if not isinstance(self.quality_grades, list) or not self.quality_grades:
            raise ConfigError(f"inat.quality_grades must be a non-empty list, got {self.quality_grades!r}")
        for name in ("{photo_id}", "{size}", "{extension}"):
            if name not in self.photo_url:
                raise ConfigError(f"inat.photo_url must contain {name}, got {self.photo_url!r}")


@dataclass
class TableConfig:
    """How a CSV, TSV or Parquet table is read (the column mapping is the catalog's ``columns``)."""

    #: The field separator; None: ``,`` for csv and ``\\t`` for tsv.
    delimiter: str | None = None
    encoding: str = "utf-8"
    #: Rows per Parquet batch (memory: one batch at a time).
    batch_rows: int = 10_000

    def __post_init__(self) -> None:
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ConfigError(f"table.delimiter must be one character, got {self.delimiter!r}")
        if self.batch_rows < 1:
            raise ConfigError(f"table.batch_rows must be >= 1, got {self.batch_rows}")


@dataclass
class CatalogConfig:
    """The catalog stage: sources -> validated, deduplicated, split records."""

    split: SplitConfig = field(default_factory=SplitConfig)
    mongo: MongoConfig = field(default_factory=MongoConfig)
    #: Keep only records whose license is permissive (restrictive ones are rejected, reason
    #: ``restrictive_license``).
    production_only: bool = False
    #: Regional subsets to write besides the global splits (names from regions.yaml).
    regions: list[str] = field(default_factory=list)
    #: What to do when one URL carries different species: ``drop`` rejects every record of that URL
    #: (reason ``url_species_conflict``); ``majority`` keeps the species with the most records (ties:
    #: none kept, as ``drop``) and logs the others as duplicates.
    species_conflict: typing.Literal["drop", "majority"] = "drop"
    #: License table and region table; a relative name is looked up in the working directory, then
    #: beside the config file, then in the project's bundled config/.
    licenses_file: str = "licenses.yaml"
    regions_file: str = "regions.yaml"
    #: Show a progress bar (tqdm) while reading; ``None`` shows it only on a terminal.
    progress: bool | None = None
    #: The sources' format (``--format``); None detects it from each source (catalog/formats.py).
    format: str | None = None
    #: CSV/TSV/Parquet: Flora's input field -> the table's column (``{image_url: url, latin_name:
    #: scientific_name}``); a field not named here is read from the column of its own name.
    columns: dict[str, str] = field(default_factory=dict)
    dwca: DwcaConfig = field(default_factory=DwcaConfig)
    inat: InatConfig = field(default_factory=InatConfig)
    table: TableConfig = field(default_factory=TableConfig)


# ---------------------------------------------------------------------------------------------- sharder
@dataclass
class ShardConfig:
    max_samples: int = 1000
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ConfigError(f"shards.max_samples must be >= 1, got {self.max_samples}")
        if self.max_bytes < 1:
            raise ConfigError(f"shards.max_bytes must be >= 1, got {self.max_bytes}")


@dataclass
class BuildConfig:
    """The sharder's config (config/sharding.yaml)."""

    seed: int = 0
    shards: ShardConfig = field(default_factory=ShardConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    #: Near-duplicate photographs across splits, found at finalize (neardup.py).
    near_duplicates: NearDupConfig = field(default_factory=NearDupConfig)
    #: Worker processes for the local distributor (0: one per CPU).
    processes: int = 0
    #: Decoding memory each worker process may have in flight, in MiB (sharding/images/budget.py): an
    #: image's estimated peak is reserved before its pixels are decoded; one above the whole budget runs
    #: alone. None: half the machine's memory (or its cgroup limit) over the worker processes, >= 128 MiB.
    decode_budget_mib: int | None = None
    distributor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    #: Without ``ray_address``, the local Ray instance listens on 127.0.0.1 only (distribute.py); false:
    #: Ray's default, the machine's interface address.
    ray_loopback: bool = True
    progress: bool | None = None
    #: Count unreadable lines of the splits file as ``bad_record`` failures instead of refusing the file.
    allow_damaged_splits: bool = False
    #: Seconds to wait when another build holds the output folder (lock.py): 0 refuses at once, ``.inf``
    #: waits without limit (``--wait-lock [SECONDS]``).
    wait_lock_s: float = 0.0
    #: ``flora build`` exits 1 (its outputs written) when it shards fewer than this share of the records it
    #: could shard (records in less content duplicates); 0: fails only when it shards none (outcome.py).
    min_sharded_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_sharded_share <= 1:  # also refuses NaN
            raise ConfigError(
                f"min_sharded_share must be a share between 0 and 1 (0: at least one record), "
                f"got {self.min_sharded_share}"
            )
        if self.processes < 0:
            raise ConfigError(f"processes must be >= 0, got {self.processes}")
        if self.decode_budget_mib is not None and self.decode_budget_mib < 1:
            raise ConfigError(
                f"decode_budget_mib must be >= 1 (MiB) or null (derived from memory and processes), "
                f"got {self.decode_budget_mib}"
            )
        if not self.wait_lock_s >= 0:  # also refuses NaN
            raise ConfigError(f"wait_lock_s must be >= 0 seconds (.inf: no limit), got {self.wait_lock_s}")
