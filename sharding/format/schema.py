"""The shard format: one owner for what the sharder publishes and every later stage reads.

Owns the contract between the sharder and its readers (the loaders, training, export):

* **Layout** of a shard root: ``{split}/{region}/{split}-{region}-NNNNNN.tar``, each with its DALI
  index beside it (``.idx``), ``manifest.json``, ``class_mapping.json`` and
  ``class_mapping_<region>.json``. ``shard_name`` builds a tar's path; ``Manifest`` reads the list.
* **Keys**: sample keys are hex digests of the record's identity (``safe_key``), so never contain
  ``/``, ``..``, dots or control characters (``check_key``).
* **A sample**: tar members ``<key>.cls`` (the label, ASCII), ``<key>.jpg`` and ``<key>.json`` (a
  ``SampleMeta``: the record's fields with its credits, the label, and the stored image's facts), in
  that order. New fields are only ever appended (incremental builds keep older tars; their jsons read
  the missing fields as None).
* **License classes**: ``permissive`` (production-safe) and ``restrictive``.
* **DALI index files** (the ``wds2idx`` format DALI's ``fn.readers.webdataset`` reads, version
  ``v1.2``: a header ``v1.2 <samples>``, then per sample ``<ext> <data offset> <size> <member name>``
  for each of its files): written (``write_index``, ``index_text``) and read (``read_index``).
* **Sample tables** (in an object store only, beside each tar: ``table_name``): every sample's key,
  label, jpg location, license class, species and jpg sha256, with the tar's size, sha256 and the
  store's ETag of the tar object, so a reader that finds that ETag still on the tar needs no scan of
  its bytes (``sample_rows``, ``table_bytes``, ``read_table``).
* **The manifest**: ``ShardEntry`` per tar (path, split, region, samples, bytes, sha256, classes,
  licenses, the ``version`` that wrote it, ``tombstones``: keys of samples an incremental build
  removed, which readers must skip), plus ``version``/``parent`` (the catalog versions of this build
  and of the one it grew from), totals, accounting and run facts the sharder keeps there.

Leaves out: writing tars (writer.py), reading a shard root, local or in a store (reader.py), deciding
what goes where (sharding/build/), reading samples in training order (loaders/index.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flora.errors import FloraError

MANIFEST = "manifest.json"
CLASS_MAPPING = "class_mapping.json"
FAILURES = "failures.jsonl"
DUPLICATES = "duplicates.jsonl"
#: The credits of every live sample, beside the manifest (sharding/build/attribution.py writes it).
ATTRIBUTION = "ATTRIBUTION.csv"
INDEX_VERSION = "v1.2"  # the version DALI's wds2idx writes and fn.readers.webdataset reads
KEY_HEX_CHARS = 24  # 96 bits of sha256: collisions are negligible far beyond 10^9 samples
_SAFE_KEY = re.compile(r"[0-9A-Za-z_-]{1,90}")  # + ".json" stays under tar's 100-byte name field

#: License classes (sharding/catalog/licenses.py maps raw license strings onto them).
PERMISSIVE = "permissive"
RESTRICTIVE = "restrictive"
LICENSE_CLASSES = (PERMISSIVE, RESTRICTIVE)

#: Member extensions of a sample, in the order they are written (webdataset's sorted order).
MEMBERS = ("cls", "jpg", "json")


class ShardFormatError(FloraError, ValueError):
    """A shard root, manifest, index or sample does not follow the format; says what and where."""


# ---------------------------------------------------------------------------------------- keys, paths
def safe_key(identity: str) -> str:
    """A path-safe, dot-free sample key derived from a record's identity (its URL key)."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def check_key(key: str) -> str:
    """Raises ValueError unless ``key`` is safe as a tar member stem (no ``/``, ``..``, dots, controls)."""
    if not _SAFE_KEY.fullmatch(key):
        raise ValueError(f"unsafe sample key {key!r}: only [0-9A-Za-z_-], 1-90 characters")
    return key


def shard_name(split: str, region: str, index: int) -> str:
    """The tar's path under the shard root: ``{split}/{region}/{split}-{region}-NNNNNN.tar``."""
    return f"{split}/{region}/{split}-{region}-{index:06d}.tar"


def class_mapping_name(region: str | None = None) -> str:
    return CLASS_MAPPING if region is None else f"class_mapping_{region.lower()}.json"


# ------------------------------------------------------------------------------------------ a sample
@dataclass
class SampleMeta:
    """The ``json`` member of a sample: the catalog record's fields, the label, the image's facts."""

    plant_id: Any = None
    latin_name: str | None = None
    image_url: str | None = None
    license: str | None = None
    license_class: str | None = None
    source: str | None = None
    country: str | None = None
    region: str | None = None
    split: str | None = None
    label: int | None = None
    #: The stored JPEG: its size, its sha256 (what the loaders verify), and the downloaded original.
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_format: str | None = None
    #: The stored JPEG's 64-bit perceptual hash, 16 hex digits (sharding/images/neardup.py).
    phash: str | None = None
    #: The perceptual hashes of its 95% crops (neardup.perceptual_hashes); None in older shards.
    phash_crops: list[str] | None = None
    #: Credits (the catalog's attribution fields; None in shards written before them, and where the
    #: source names none): who took the photo, who holds its rights, the licence's deed URL, and the
    #: image's web page at its source (the record's ``meta.references``, as GBIF and iNaturalist give it).
    creator: str | None = None
    rights_holder: str | None = None
    license_url: str | None = None
    source_link: str | None = None

    #: The catalog record's fields copied into every sample.
    RECORD_FIELDS = ("plant_id", "latin_name", "image_url", "license", "license_class", "source", "country",
                     "region", "split", "creator", "rights_holder", "license_url")  # fmt: skip

    @classmethod
    def from_record(cls, record: dict, label: int, image: dict) -> SampleMeta:
        """From a catalog record, its label and the stored image's facts (``images.StoredImage``)."""
        known = _meta_fields()
        return cls(**{k: record.get(k) for k in cls.RECORD_FIELDS}, label=label,
                   source_link=source_link(record),
                   **{k: v for k, v in image.items() if k in known})  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes | str | dict) -> SampleMeta:
        """Parses a ``json`` member (unknown keys of older or newer writers are ignored)."""
        raw = json.loads(data) if isinstance(data, bytes | str) else data
        if not isinstance(raw, dict):
            raise ShardFormatError(f"a sample's json member must be an object, got {type(raw).__name__}")
        known = _meta_fields()
        return cls(**{k: v for k, v in raw.items() if k in known})

    def as_json(self) -> dict:
        """The fields in order (``asdict``'s keys and values, without its deep copy: once per sample)."""
        return {name: getattr(self, name) for name in _meta_fields()}


def source_link(record: dict) -> str | None:
    """The image's web page at its source: the record's ``meta.references`` when it is a non-empty
    string (Darwin Core's ``references``), else None."""
    meta = record.get("meta")
    link = meta.get("references") if isinstance(meta, dict) else None
    return link.strip() if isinstance(link, str) and link.strip() else None


@functools.cache
def _meta_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SampleMeta))


# ------------------------------------------------------------------------------------ DALI index files
IndexEntry = dict[str, tuple[int, int, str]]  # ext -> (data offset, size, member name), one per sample


def index_line(members: list[tuple[str, int, int]]) -> str:
    """One sample's wds2idx line from its ``(member name, data offset, size)`` list."""
    return " ".join(f"{name.split('.', 1)[1]} {offset} {size} {name}" for name, offset, size in members)


def index_text(lines: list[str]) -> str:
    """The whole ``.idx`` file of ``lines`` (one per sample)."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n"


def index_lines(tar_path: Path) -> list[str]:
    """The wds2idx lines of a tar read from its headers: one per sample (consecutive members
    sharing a stem)."""
    bundles: list[list[tuple[str, int, int]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            slash = member.name.rfind("/")
            dot = member.name.find(".", slash + 1)
            stem = member.name[:dot]
            if not stem or stem.endswith("/"):
                continue
            entry = (member.name, member.offset_data, member.size)
            if stem != last:
                bundles.append([entry])
                last = stem
            else:
                bundles[-1].append(entry)
    return [index_line(b) for b in bundles]


def write_index(tar_path: Path, lines: list[str] | None = None) -> Path:
    """Writes the DALI index beside ``tar_path`` (``x.tar`` -> ``x.idx``), atomically, from
    ``lines`` recorded while writing, or read from the tar's headers when not given."""
    idx_path = tar_path.with_suffix(".idx")
    lines = index_lines(tar_path) if lines is None else lines
    if not lines:
        raise ValueError(f"{tar_path} holds no samples; DALI cannot index an empty shard")
    tmp = idx_path.with_name(idx_path.name + ".tmp")
    try:
        tmp.write_text(index_text(lines), encoding="utf-8")
        os.replace(tmp, idx_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial index behind
        raise
    return idx_path


def read_index(tar_path: Path) -> list[IndexEntry]:
    """The samples of a tar, ``ext -> (offset, size, member)`` each, from its ``.idx`` file or,
    without one, from the tar's headers."""
    idx_path = tar_path.with_suffix(".idx")
    if idx_path.is_file():
        lines = idx_path.read_text(encoding="ascii").splitlines()
        header = lines[0].split() if lines else []
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ShardFormatError(
                f"{idx_path}: expected a '{INDEX_VERSION} <samples>' header, got {lines[:1]}"
            )
        lines = lines[1:]
    else:
        lines = index_lines(tar_path)
    samples = []
    for n, line in enumerate(lines):
        parts = line.split()
        if len(parts) % 4:
            raise ShardFormatError(f"{idx_path}:{n + 2}: expected groups of '<ext> <offset> <size> <name>'")
        samples.append(
            {parts[j]: (int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]) for j in range(0, len(parts), 4)}
        )
    return samples


# ------------------------------------------------------------------------------------- sample tables
#: A sample table's ``format`` field.
TABLE_FORMAT = "flora-sample-table/1"
#: The fields of each of its rows, in order.
TABLE_FIELDS = ("key", "label", "jpg_offset", "jpg_size", "license_class", "latin_name", "sha256")


def table_name(tar_rel: str) -> str:
    """Where a tar's sample table lives in a store: beside the tar, ``<stem>.samples.json``."""
    return tar_rel[: -len(".tar")] + ".samples.json"


def sample_rows(tar_path: Path, sha256: str) -> list[list] | None:
    """The ``TABLE_FIELDS`` of every sample of a local tar (label from ``cls``, else the json's); None
    unless the tar hashes to ``sha256`` and every sample has its three members, a parseable json and
    label, and a jpg whose sha256 is the json's (then a reader's scan of these bytes would find nothing
    to skip)."""
    entries = read_index(tar_path)
    h = hashlib.sha256()
    with open(tar_path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if h.hexdigest() != sha256:
            return None
        rows = []
        for comps in entries:
            if set(comps) != set(MEMBERS):
                return None
            got = {}
            for member, (offset, size, _) in comps.items():
                f.seek(offset)
                got[member] = f.read(size)
            try:
                meta = SampleMeta.from_json(got["json"])
                label = int(got["cls"].decode("ascii").strip())
            except (ValueError, TypeError):
                return None
            if not meta.sha256 or hashlib.sha256(got["jpg"]).hexdigest() != meta.sha256:
                return None
            offset, size, name = comps["jpg"]
            rows.append([name.split(".", 1)[0], label, offset, size, meta.license_class or "",
                         meta.latin_name or "", meta.sha256])  # fmt: skip
    return rows


def table_bytes(rows: list[list], tar_bytes: int, tar_sha256: str, tar_etag: str) -> bytes:
    """A sample table: ``rows`` of one tar, with the tar's size, sha256 and the store's ETag of it."""
    table = {"format": TABLE_FORMAT, "fields": list(TABLE_FIELDS), "tar_bytes": tar_bytes,
             "tar_sha256": tar_sha256, "tar_etag": tar_etag.strip('"'), "rows": rows}  # fmt: skip
    return json.dumps(table, separators=(",", ":")).encode()


def read_table(data: bytes) -> dict:
    """Parses a sample table (``table_bytes``); ShardFormatError for anything else."""
    try:
        table = json.loads(data)
        ok = isinstance(table, dict) and table.get("format") == TABLE_FORMAT
        ok = ok and table.get("fields") == list(TABLE_FIELDS) and isinstance(table.get("rows"), list)
        ok = ok and all(isinstance(r, list) and len(r) == len(TABLE_FIELDS) for r in table["rows"])
    except ValueError:
        ok = False
    if not ok:
        raise ShardFormatError(f"not a {TABLE_FORMAT} sample table")
    return table


# -------------------------------------------------------------------------------------------- manifest
@dataclass
class ShardEntry:
    """One published tar, as the manifest lists it."""

    path: str  # relative to the shard root (``shard_name``)
    split: str
    region: str
    samples: int
    bytes: int = 0
    sha256: str = ""
    classes: list[int] = field(default_factory=list)
    licenses: dict[str, int] = field(default_factory=dict)
    chunk: str | None = None
    version: str | None = None  # the catalog version (splits sha256) whose build wrote this tar
    #: Keys of samples in the tar that are no longer in the catalog (incremental builds): never served.
    tombstones: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """``manifest.json``: the published shards and what the sharder reports beside them."""

    root: Path
    shards: list[ShardEntry]
    raw: dict  # the whole file (totals, accounting, failures_by_reason, run facts)

    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    def regions(self) -> list[str]:
        return sorted({s.region for s in self.shards})

    def select(self, split: str, regions: list[str] | None = None) -> list[ShardEntry]:
        """The shards of ``split`` (of ``regions`` when given), by path; errors name what exists."""
        if split not in self.splits():
            raise ShardFormatError(
                f"split {split!r} has no shards in {self.root} (splits with shards: {self.splits()})"
            )
        for region in regions or []:
            if region not in self.regions():
                raise ShardFormatError(
                    f"region_filter: unknown region {region!r} (regions in these shards: {self.regions()})"
                )
        wanted = set(regions) if regions else None
        chosen = [s for s in sorted(self.shards, key=lambda s: s.path)
                  if s.split == split and (wanted is None or s.region in wanted)]  # fmt: skip
        if not chosen:
            raise ShardFormatError(f"no {split} shards in {self.root} for regions {regions}")
        return chosen

    def path(self, entry: ShardEntry) -> Path:
        """The tar's absolute path; a listed tar that is missing is an error."""
        path = (self.root / entry.path).resolve()
        if not path.is_file():
            raise ShardFormatError(f"shard listed in the manifest is missing: {path}")
        return path


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of a shard root; a missing or broken one is a ``ShardFormatError``."""
    root = Path(root).resolve()
    path = root / MANIFEST
    if not path.is_file():
        raise ShardFormatError(
            f"no {MANIFEST} in {root}: build shards first (flora build), or, if a build was interrupted"
            " while publishing, run it again to finish"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(ShardEntry)}
        shards = [ShardEntry(**{k: v for k, v in s.items() if k in known}) for s in raw.get("shards", [])]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ShardFormatError(f"{path}: not a shard manifest ({exc})") from exc
    return Manifest(root=root, shards=shards, raw=raw)


def read_class_mapping(root: str | Path, region: str | None = None) -> dict[str, int]:
    """``class_mapping.json`` (or a region's own) of a shard root: species -> 0..K-1, no gaps."""
    path = Path(root) / class_mapping_name(region)
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing: the class mapping travels with the shards")
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ShardFormatError(f"{path}: class indices must be 0..{len(mapping) - 1} without gaps")
    return mapping
