"""iNaturalist open data (the ``inaturalist-open-data`` bucket's metadata) read as catalog records.

Owns ``InatSource``: a folder holding the bucket's four tables, each ``NAME.csv.gz`` (as published) or
``NAME.csv`` (unpacked): tab-separated despite the name, one header line, no quoting.

* ``photos``: photo_uuid, photo_id, observation_uuid, observer_id, extension, license, width, height,
  position;
* ``observations``: observation_uuid, observer_id, latitude, longitude, positional_accuracy, taxon_id,
  quality_grade (``research``, ``needs_id``, ``casual``), observed_on (newer dumps add anomaly_score);
* ``taxa``: taxon_id, ancestry (the ancestors' ids root first, ``/``-separated, the taxon itself not
  included), rank_level, rank, name, active (``true``/``false``);
* ``observers``: observer_id, login, name.

Columns are found by their header names (extra columns are fine; a missing one is a ``SourceError``
naming the file, the column and the columns found). One record per photo row: the photo joined to its
observation (quality grade, taxon, coordinates, date), the taxon and the photo's observer (``creator``
and ``rights_holder``: the observer's name, else the login). ``image_url`` is ``inat.photo_url`` with
``inat.photo_size``; ``license`` the photo's code (CC-BY, CC-BY-NC, CC0, ...; licenses.yaml classifies
them); ``plant_id`` the species' taxon id; ``country`` from the observation's coordinates (geocode.py;
None at sea or without coordinates). ``meta``: photo_id, observation_uuid, observed_on, quality_grade,
``references`` (the photo's page, https://www.inaturalist.org/photos/{photo_id}; the observation's page
is https://www.inaturalist.org/observations/{observation_uuid}), and ``taxon_id`` / ``taxon_rank`` of
the observation's own taxon when it was mapped up to its species. ``split.group_by=meta.observation_uuid``
keeps the photos of one observation (the same plant, often the same minute) in one split.

Every photo row ends in one place; a row that gives no usable record is yielded as an ``Unparseable``
whose reason the catalog counts: ``bad_row`` (a malformed photo row, or a malformed row of the
observation, taxon or observer it needs), ``orphan_photo`` (no observation row), ``quality_grade`` (not
in ``inat.quality_grades``), ``no_taxon`` (an observation not identified), ``unknown_taxon`` (a taxon id
not in taxa, or an infraspecific taxon without a species ancestor there), ``inactive_taxon`` (iNaturalist
keeps retired taxa, inactive, when the taxonomy changes: their names are outdated synonyms that would
split a species into two classes), ``not_species_rank`` (identified above species: genus, complex,
family...) and ``outside_taxon`` (not under ``inat.within_taxon``).

Ranks by ``rank_level``: 10 is a species-level class (species, and named hybrids, rank ``hybrid``, kept
as their own class); below 10 (subspecies, variety, form, infrahybrid) is infraspecific: with
``inat.infraspecific: species`` mapped to its nearest species-level ancestor (its name and id), with
``keep`` a class of its own (its trinomial as iNaturalist writes it, without "subsp."/"var.").

Memory: nothing is held per table. Taxa, observers and observations are streamed into a temporary
SQLite database (a temporary folder, removed when the read ends, fails or is abandoned); photos are
then streamed and joined in batches. Countries are geocoded per observation (kept grades only), in
batches, while observations are loaded. A corrupt gzip stream is a ``SourceError`` naming the file and
the line it reached; so are a missing table, a header without a needed column and a photo size the
bucket does not have.

Leaves out: downloading the tables, positional_accuracy, anomaly_score, photo width/height, common names.
"""

from __future__ import annotations

import gzip
import shutil
import sqlite3
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flora.sharding.catalog.geocode import CountryGeocoder
from flora.sharding.catalog.sources import SourceError, Unparseable, file_digest
from flora.sharding.config import InatConfig

#: The columns read from each table (others are ignored).
COLUMNS = {
    "photos": ("photo_id", "observation_uuid", "observer_id", "extension", "license"),
    "observations": ("observation_uuid", "latitude", "longitude", "taxon_id", "quality_grade", "observed_on"),
    "taxa": ("taxon_id", "ancestry", "rank_level", "rank", "name", "active"),
    "observers": ("observer_id", "login", "name"),
}
#: The sizes the bucket holds for each photo (its README: original 2048 px ... square 75x75).
BUCKET_SIZES = ("original", "large", "medium", "small", "thumb", "square")
PHOTO_PAGE = "https://www.inaturalist.org/photos/{photo_id}"
#: iNaturalist's rank_level of species (and named hybrids); lower levels are infraspecific.
SPECIES_LEVEL = 10.0
#: rank_level by rank, for a taxon row whose rank_level is empty (iNaturalist's Taxon::RANK_LEVELS).
RANK_LEVELS = {"species": 10.0, "hybrid": 10.0, "subspecies": 5.0, "variety": 5.0, "form": 5.0,
               "infrahybrid": 5.0, "genus": 20.0, "genushybrid": 20.0}  # fmt: skip
#: Rows loaded (and coordinates geocoded) per batch; photos joined per batch (SQLite's variable limit).
LOAD_BATCH = 2_000
JOIN_BATCH = 500
#: Taxa, observers and repeated strings of a read are cached up to this many entries (then it restarts).
CACHE_ENTRIES = 100_000
_TRUE, _FALSE = {"true", "t", "1"}, {"false", "f", "0"}
_SCHEMA = (
    "CREATE TABLE taxa (id TEXT PRIMARY KEY, ancestry TEXT, level REAL, rank TEXT, name TEXT, "
    "active INTEGER, problem TEXT) WITHOUT ROWID",
    "CREATE TABLE observers (id TEXT PRIMARY KEY, creator TEXT, problem TEXT) WITHOUT ROWID",
    "CREATE TABLE observations (uuid TEXT PRIMARY KEY, grade TEXT, taxon TEXT, country TEXT, "
    "observed_on TEXT, problem TEXT) WITHOUT ROWID",
)


class _Table:
    """One of the four tables: its file, its header (checked on open) and its rows, streamed."""

    def __init__(self, folder: Path, stem: str):
        found = [folder / f"{stem}{suffix}" for suffix in (".csv.gz", ".csv")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise SourceError(f"iNaturalist open data {folder}: no {stem}.csv.gz or {stem}.csv")
        if len(found) > 1:
            raise SourceError(f"iNaturalist open data {folder}: both {stem}.csv.gz and {stem}.csv; keep one")
        self.path, self.stem = found[0], stem
        self.name = self.path.name
        lines = self._lines()
        header = next(lines, None)
        lines.close()
        columns = [] if header is None else header[1].decode("utf-8", "replace").lstrip("\ufeff").split("\t")
        missing = [c for c in COLUMNS[stem] if c not in columns]
        if missing:
            shown = ", ".join(columns) if any(columns) else "none, the file is empty"
            raise SourceError(
                f"{self.path}: no column {', '.join(missing)} in its header (columns found: {shown}); "
                f"expected iNaturalist's tab-separated {stem} table"
            )
        self.width = len(columns)
        self.index = [columns.index(c) for c in COLUMNS[stem]]

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        lineno = 0
        try:
            with (gzip.open if self.name.endswith(".gz") else open)(self.path, "rb") as fh:
                for lineno, line in enumerate(fh, start=1):  # noqa: B007 - reported on failure
                    yield lineno, line.rstrip(b"\r\n")
        except (OSError, EOFError, zlib.error) as exc:
            raise SourceError(f"cannot read {self.path} after line {lineno}: {exc}") from None

    def rows(self) -> Iterator[tuple[int, str, list[str] | None, str | None]]:
        """``(line number, text, the needed fields or None, problem or None)`` per data row."""
        lines = self._lines()
        next(lines, None)  # the header, checked on open
        for lineno, line in lines:
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"{self.name} line {lineno}: not UTF-8: {exc}"
                yield lineno, line[:200].decode("utf-8", "replace"), None, problem
                continue
            fields = text.split("\t")
            if len(fields) != self.width:
                problem = f"{self.name} line {lineno}: {len(fields)} fields, expected {self.width}"
                yield lineno, text, None, problem
                continue
            yield lineno, text, [fields[i].strip() for i in self.index], None

    def key_of(self, text: str) -> str:
        """The key column of a row that could not be read whole (where the header puts it), or ""."""
        fields = text.split("\t")
        return fields[self.index[0]].strip() if len(fields) > self.index[0] else ""


def _number(text: str, what: str) -> float | None:
    """An optional decimal field; ValueError naming it when it is not a number."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None


class InatSource:
    """iNaturalist open-data tables in a folder, read as one record per photo (module docstring)."""

    unit = "photo row"

    def __init__(self, folder: str | Path, cfg: InatConfig):
        self.folder, self.cfg = Path(folder), cfg
        if not self.folder.is_dir():
            raise SourceError(f"iNaturalist open data: {self.folder} is not a folder")
        if cfg.photo_size not in BUCKET_SIZES:
            raise SourceError(
                f"inat.photo_size {cfg.photo_size!r} is not a size the bucket holds "
                f"(expected one of {', '.join(BUCKET_SIZES)})"
            )
        self.tables = {stem: _Table(self.folder, stem) for stem in COLUMNS}
        self.grades = set(cfg.quality_grades)
        self.photos_read = self.orphans = 0
        self.newest_observed_on: str | None = None

    def describe(self) -> str:
        return f"inat:{self.folder.name}"

    def diagnose(self) -> str | None:
        """Why a read gave no usable record, when the tables show it; None otherwise."""
        photos = self.tables["photos"].name
        if self.photos_read == 0:
            return f"{photos} holds no photo row (only its header)"
        if self.orphans == self.photos_read:
            return (
                f"no photo of {photos} has its observation in {self.tables['observations'].name} "
                "(are the tables from one dump?)"
            )
        return None

    def version(self) -> dict[str, Any]:
        """Format, folder name, each table's size and sha256, and (after a read) the newest observed_on."""
        out: dict[str, Any] = {
            "format": "inat",
            "name": self.folder.name,
            "files": {
                t.name: {"bytes": t.path.stat().st_size, "sha256": file_digest(t.path)}
                for t in self.tables.values()
            },
        }
        if self.newest_observed_on:
            out["newest_observed_on"] = self.newest_observed_on
        return out

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        self.photos_read = self.orphans = 0
        tmp = tempfile.mkdtemp(prefix="flora-inat-")
        db = sqlite3.connect(Path(tmp) / "join.sqlite", isolation_level=None)
        try:
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-8192", "temp_store=FILE"):
                db.execute(f"PRAGMA {pragma}")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("BEGIN")
            self._load_taxa(db)
            self._load_observers(db)
            self._load_observations(db)
            db.execute("COMMIT")
            yield from _PhotoJoin(self, db).records()
        except sqlite3.Error as exc:  # the temporary index: a full or unwritable temporary folder
            raise SourceError(
                f"iNaturalist open data: the temporary join index in {tmp} failed: {exc}"
            ) from None
        finally:
            db.close()
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------ loading
    def _load(self, db: sqlite3.Connection, stem: str, rows) -> None:
        batch: list[tuple] = []
        marks = ",".join("?" * {"taxa": 7, "observers": 3, "observations": 6}[stem])  # _SCHEMA's columns
        insert = f"INSERT OR IGNORE INTO {stem} VALUES ({marks})"
        for row in rows:
            batch.append(row)
            if len(batch) >= LOAD_BATCH:
                db.executemany(insert, self._finish(stem, batch))
                batch = []
        db.executemany(insert, self._finish(stem, batch))

    def _finish(self, stem: str, batch: list[tuple]) -> list[tuple]:
        """Observations: their countries, geocoded for the whole batch (kept grades only)."""
        if stem != "observations":
            return batch
        wanted = [i for i, row in enumerate(batch) if row[-1] is not None]
        codes = CountryGeocoder.shared().countries([batch[i][-1] for i in wanted]) if wanted else []
        countries: list[str | None] = [None] * len(batch)
        for i, code in zip(wanted, codes, strict=True):
            countries[i] = code
        return [(u, g, t, c, o, p) for (u, g, t, _, o, p, _), c in zip(batch, countries, strict=True)]

    def _load_taxa(self, db: sqlite3.Connection) -> None:
        def rows():
            for lineno, text, fields, problem in self.tables["taxa"].rows():
                if fields is None:
                    yield self.tables["taxa"].key_of(text), None, None, None, None, None, problem
                    continue
                taxon_id, ancestry, level, rank, name, active = fields
                try:
                    if not (taxon_id.isascii() and taxon_id.isdigit()):
                        raise ValueError(f"taxon_id {taxon_id!r} is not an integer")
                    value = _number(level, "rank_level")
                    value = RANK_LEVELS.get(rank.lower()) if value is None else value
                    if value is None:
                        raise ValueError(f"no rank_level, and rank {rank!r} is not one Flora knows")
                    if active.lower() not in _TRUE | _FALSE:
                        raise ValueError(f"active {active!r} is neither true nor false")
                except ValueError as exc:
                    yield (
                        taxon_id,
                        None,
                        None,
                        None,
                        None,
                        None,
                        f"{self.tables['taxa'].name} line {lineno}: {exc}",
                    )
                    continue
                yield taxon_id, ancestry, value, rank, name, active.lower() in _TRUE, None

        self._load(db, "taxa", rows())

    def _load_observers(self, db: sqlite3.Connection) -> None:
        def rows():
            for _, text, fields, problem in self.tables["observers"].rows():
                if fields is None:
                    yield self.tables["observers"].key_of(text), None, problem
                else:
                    observer_id, login, name = fields
                    yield observer_id, name or login or None, None

        self._load(db, "observers", rows())

    def _load_observations(self, db: sqlite3.Connection) -> None:
        table = self.tables["observations"]

        def rows():
            newest = ""
            for lineno, text, fields, problem in table.rows():
                if fields is None:
                    yield table.key_of(text), None, None, None, None, problem, None
                    continue
                uuid, lat, lon, taxon_id, grade, observed_on = fields
                try:
                    if taxon_id and not (taxon_id.isascii() and taxon_id.isdigit()):
                        raise ValueError(f"taxon_id {taxon_id!r} is not an integer")
                    point = (_number(lat, "latitude"), _number(lon, "longitude"))
                except ValueError as exc:
                    yield uuid, None, None, None, None, f"{table.name} line {lineno}: {exc}", None
                    continue
                newest = max(newest, observed_on)
                where = point if grade in self.grades and None not in point else None
                yield uuid, grade, taxon_id, None, observed_on or None, None, where
            self.newest_observed_on = newest or None

        self._load(db, "observations", rows())


class _PhotoJoin:
    """The photos streamed and joined, batch by batch, to the temporary tables (one read)."""

    def __init__(self, source: InatSource, db: sqlite3.Connection):
        self.source, self.cfg, self.db = source, source.cfg, db
        self.table = source.tables["photos"]
        self.taxa: dict[str, tuple] = {}
        self.observers: dict[str, tuple[str | None, str | None]] = {}
        self.strings: dict[str, str] = {}
        self.within = None if self.cfg.within_taxon is None else str(self.cfg.within_taxon)

    def records(self) -> Iterator[tuple[str, Any]]:
        batch: list[tuple[int, str, list[str] | None, str | None]] = []
        for row in self.table.rows():
            batch.append(row)
            if len(batch) >= JOIN_BATCH:
                yield from self._batch(batch)
                batch = []
        yield from self._batch(batch)

    def _batch(self, batch: list) -> Iterator[tuple[str, Any]]:
        uuids = list({fields[1] for _, _, fields, _ in batch if fields is not None})
        found = {}
        if uuids:
            query = f"SELECT * FROM observations WHERE uuid IN ({','.join('?' * len(uuids))})"
            found = {row[0]: row for row in self.db.execute(query, uuids)}
        for lineno, text, fields, problem in batch:
            self.source.photos_read += 1
            position = f"{self.table.name} line {lineno}"
            if fields is None:
                yield position, Unparseable(text[:200], problem or "", "bad_row")
                continue
            yield position, self._record(text, fields, found.get(fields[1]))

    def _record(self, text: str, fields: list[str], observation: tuple | None) -> Any:
        photo_id, uuid, observer_id, extension, license_ = fields
        if not (photo_id.isascii() and photo_id.isdigit()) or not extension:
            why = (
                "no extension"
                if photo_id.isascii() and photo_id.isdigit()
                else f"photo_id {photo_id!r} is not an integer"
            )
            return Unparseable(text[:200], f"{self.table.name}: {why}", "bad_row")
        if observation is None:
            self.source.orphans += 1
            return Unparseable(
                text[:200], f"observation {uuid} is not in the observations table", "orphan_photo"
            )
        _, grade, taxon_id, country, observed_on, problem = observation
        if problem:
            return Unparseable(text[:200], problem, "bad_row")
        if grade not in self.source.grades:
            kept = ", ".join(self.cfg.quality_grades)
            # one message object for the many photos it rejects (rejects are kept until written)
            why = self._shared(f"quality grade {grade!r} is not in inat.quality_grades ({kept})")
            return Unparseable(text[:200], why, "quality_grade")
        if not taxon_id:
            return Unparseable(text[:200], f"observation {uuid} has no taxon", "no_taxon")
        taxon = self._taxon(taxon_id)
        if taxon[0] is not None:
            return Unparseable(text[:200], taxon[1], taxon[0])
        _, _, species_id, name, rank = taxon
        creator, problem = self._observer(observer_id)
        if problem:
            return Unparseable(text[:200], problem, "bad_row")
        raw = {
            "plant_id": int(species_id),
            "latin_name": name,
            "image_url": self.cfg.photo_url.format(
                photo_id=photo_id, size=self.cfg.photo_size, extension=extension
            ),
            "license": license_ or None,
            "source": self.cfg.source_name,
            "country": country,
            "creator": creator,
            "rights_holder": creator,
            "photo_id": int(photo_id),
            "observation_uuid": uuid,
            "quality_grade": grade,
            "references": PHOTO_PAGE.format(photo_id=photo_id),
        }
        if observed_on:
            raw["observed_on"] = observed_on
        if species_id != taxon_id:
            raw["taxon_id"], raw["taxon_rank"] = int(taxon_id), rank
        return raw

    def _shared(self, text: str | None) -> str | None:
        """One string object per repeated value (the catalog shares a record's strings; this, messages)."""
        if text is None:
            return None
        if len(self.strings) >= CACHE_ENTRIES:
            self.strings.clear()
        return self.strings.setdefault(text, text)

    def _observer(self, observer_id: str) -> tuple[str | None, str | None]:
        if observer_id not in self.observers:
            if len(self.observers) >= CACHE_ENTRIES:
                self.observers.clear()
            row = self.db.execute(
                "SELECT creator, problem FROM observers WHERE id = ?", (observer_id,)
            ).fetchone()
            self.observers[observer_id] = row or (None, None)
        return self.observers[observer_id]

    def _taxon(self, taxon_id: str) -> tuple:
        """``(reason, message, species id, species name, own rank)``; reason None when usable."""
        if taxon_id not in self.taxa:
            if len(self.taxa) >= CACHE_ENTRIES:
                self.taxa.clear()
            self.taxa[taxon_id] = self._resolve(taxon_id)
        return self.taxa[taxon_id]

    def _lookup(self, taxon_id: str) -> tuple | None:
        return self.db.execute(
            "SELECT id, ancestry, level, rank, name, active, problem FROM taxa WHERE id = ?", (taxon_id,)
        ).fetchone()

    def _resolve(self, taxon_id: str) -> tuple:
        row = self._lookup(taxon_id)
        if row is None:
            return "unknown_taxon", f"taxon {taxon_id} is not in the taxa table", None, None, None
        _, ancestry, level, rank, name, active, problem = row
        if problem:
            return "bad_row", problem, None, None, None
        if not active:
            return (
                "inactive_taxon",
                f"taxon {taxon_id} ({name}) is inactive in iNaturalist's taxonomy",
                None,
                None,
                None,
            )
        if level > SPECIES_LEVEL:
            return (
                "not_species_rank",
                f"taxon {taxon_id} ({name}) is a {rank}, above species",
                None,
                None,
                None,
            )
        ancestors = (ancestry or "").split("/")
        if self.within is not None and self.within != taxon_id and self.within not in ancestors:
            return (
                "outside_taxon",
                f"taxon {taxon_id} ({name}) is not under taxon {self.within}",
                None,
                None,
                None,
            )
        if level == SPECIES_LEVEL or self.cfg.infraspecific == "keep":
            return None, None, taxon_id, name, rank
        for ancestor in reversed(ancestors):
            found = self._lookup(ancestor) if ancestor else None
            if found is not None and found[2] is not None and found[2] >= SPECIES_LEVEL:
                if found[2] > SPECIES_LEVEL or found[6]:
                    break
                if not found[5]:
                    return (
                        "inactive_taxon",
                        f"taxon {taxon_id} ({name})'s species {found[4]} is inactive",
                        None,
                        None,
                        None,
                    )
                return None, None, found[0], found[4], rank
        return (
            "unknown_taxon",
            f"taxon {taxon_id} ({name}), a {rank}, has no species ancestor in the taxa table",
            None,
            None,
            None,
        )
