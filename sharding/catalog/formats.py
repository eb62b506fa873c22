"""Which reader a ``--source`` needs: format detection, ``--format``, and
reading several sources as one.

The formats' config sections (``DwcaConfig``, ``InatConfig``, ``TableConfig``) live in sharding/config.py
beside the catalog's.

Owns ``open_sources`` (each ``--source`` -> its reader; several are read one after the other as one
stream, positions prefixed with the source) and the detection rule (``detect_format``):

* ``mongodb://`` or ``mongodb+srv://`` -> ``mongodb``;
* a folder with ``meta.xml``, or a ``.zip`` -> ``dwca`` (a GBIF Darwin Core Archive, dwca.py);
* a folder with ``photos.csv(.gz)`` and ``observations.csv(.gz)`` -> ``inat`` (iNaturalist open data,
  inat.py);
* ``.csv(.gz)`` -> ``csv``, ``.tsv(.gz)`` / ``.tab(.gz)`` -> ``tsv``, ``.parquet`` / ``.pq`` -> ``parquet``
  (tables.py, with the config's ``columns`` mapping);
* anything else -> ``jsonl`` (sources.py; its ``diagnose`` names a file that is plainly something else).

``--format`` (the config's ``format``) forces one format for every source. Each reader yields
``(position, raw)`` pairs, ``raw`` a record in the JSONL shape (records.py's input fields, extras kept in
``meta``) or an ``Unparseable``; it has ``unit``, ``describe()``, ``diagnose()`` and ``version()`` (what
the dataset card lists: format, name, and what identifies this copy of the source).

Leaves out: reading any one format (sources.py, dwca.py, inat.py, tables.py), validation (records.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flora.sharding.catalog.sources import MONGO_PREFIXES, JsonlSource, MongoSource, SourceError

FORMATS = ("jsonl", "mongodb", "dwca", "inat", "csv", "tsv", "parquet")
#: Files that make a folder an iNaturalist open-data export (each ``.csv`` or ``.csv.gz``).
INAT_MARKERS = ("photos", "observations")
_TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(source: str) -> str:
    """The format of one ``--source`` by its name and, for a folder, its files (module docstring)."""
    if source.startswith(MONGO_PREFIXES):
        return "mongodb"
    path = Path(source)
    if path.is_dir():
        if (path / "meta.xml").is_file():
            return "dwca"
        if all(any((path / f"{m}{s}").is_file() for s in (".csv", ".csv.gz")) for m in INAT_MARKERS):
            return "inat"
        raise SourceError(
            f"source folder {path} is neither a Darwin Core Archive (no meta.xml) nor iNaturalist open "
            f"data (no photos.csv(.gz) and observations.csv(.gz)); name a file, or use --format"
        )
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".zip":
        return "dwca"
    return _TABLE_SUFFIXES.get(last, "jsonl")


def open_one(source: str, fmt: str, cfg: Any):
    """The reader of one source in format ``fmt`` (``cfg``: the CatalogConfig)."""
    if fmt == "mongodb":
        if not source.startswith(MONGO_PREFIXES):
            raise SourceError(f"--format mongodb needs a mongodb:// URI, got {source}")
        return MongoSource(source, cfg.mongo)
    if source.startswith(MONGO_PREFIXES):
        raise SourceError(f"{source.split('@')[-1]} is a MongoDB URI, but --format is {fmt}")
    if fmt == "jsonl":
        return JsonlSource(source)
    if fmt == "dwca":
        from flora.sharding.catalog.dwca import DwcaSource

        return DwcaSource(source, cfg.dwca)
    if fmt == "inat":
        from flora.sharding.catalog.inat import InatSource

        return InatSource(source, cfg.inat)
    from flora.sharding.catalog.tables import TableSource

    return TableSource(source, fmt, cfg.columns, cfg.table)


class MultiSource:
    """Several sources read one after the other as one stream; positions name the source."""

    def __init__(self, readers: list):
        self.readers = readers
        self.unit = readers[0].unit if len({r.unit for r in readers}) == 1 else "record"

    def describe(self) -> str:
        return " + ".join(r.describe() for r in self.readers)

    def diagnose(self) -> str | None:
        found = [(r.describe(), r.diagnose()) for r in self.readers]
        shown = [f"{name}: {why}" for name, why in found if why]
        return "; ".join(shown) or None

    def version(self) -> list[dict[str, Any]]:
        return [item for r in self.readers for item in source_versions(r)]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for reader in self.readers:
            name = reader.describe()
            for position, raw in reader:
                yield f"{name} {position}", raw


def source_versions(reader: Any) -> list[dict[str, Any]]:
    """What the dataset card lists for a reader (one dict per source)."""
    if isinstance(reader, MultiSource):
        return reader.version()
    return [reader.version()]


def open_sources(sources: str | list[str], cfg: Any):
    """The reader of one or several ``--source`` values (module docstring); SourceError if one cannot
    be opened or ``cfg.format`` is not a known format."""
    names = [sources] if isinstance(sources, str) else list(sources)
    if not names:
        raise SourceError("no --source given")
    if cfg.format is not None and cfg.format not in FORMATS:
        raise SourceError(f"unknown --format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    formats = [cfg.format or detect_format(name) for name in names]
    if cfg.columns and not {"csv", "tsv", "parquet"} & set(formats):
        raise SourceError(
            f"columns: maps the columns of CSV, TSV and Parquet tables, but no source is one "
            f"({', '.join(f'{n} is {f}' for n, f in zip(names, formats, strict=True))})"
        )
    readers = [open_one(name, fmt, cfg) for name, fmt in zip(names, formats, strict=True)]
    return readers[0] if len(readers) == 1 else MultiSource(readers)
