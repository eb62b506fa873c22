"""A GBIF occurrence download (a Darwin Core Archive, ``.zip`` or unpacked folder) as catalog records.

Owns ``DwcaSource``: one raw record per row of the archive's Multimedia extension
(rowType ``http://rs.gbif.org/terms/1.0/Multimedia``, GBIF's ``multimedia.txt``), joined to its core
occurrence row (``occurrence.txt``) through the extension's ``coreid`` column. ``meta.xml`` is read
with python-dwca-reader's descriptors (fieldsTerminatedBy, linesTerminatedBy, fieldsEnclosedBy,
encoding, ignoreHeaderLines, each field's ``index`` and ``default``, the core ``id`` and extension
``coreid`` columns); the data files are read here, as streams (a zip member through ``zipfile.open``,
never extracted): the library's extension access holds a dict of every core id in memory, and its
``DwCAReader`` unpacks a whole zip. The join streams the core once into a temporary sqlite3 index
(the core id and the dozen columns used, in a temporary folder removed afterwards, also on error), then
streams the multimedia rows, one lookup each.

Each multimedia row ends in one place (``position``: ``multimedia.txt line N``, the file's own line):

* a row with the wrong number of columns, or not in the declared encoding -> ``bad_row``;
* ``type`` (dc:type; an empty type is taken from a ``format`` of ``image/*``) not in
  ``dwca.media_types`` (sound, video) -> ``not_a_still_image``;
* a ``coreid`` with no occurrence row -> ``orphan_media``; an occurrence row that was malformed ->
  ``bad_occurrence_row``;
* an occurrence not identified to species -> ``not_species_rank`` (below);
* else a record: ``image_url`` = dc:identifier; ``latin_name`` = the interpreted ``species`` (GBIF's
  accepted species, also for subspecies and varieties), else ``genericName`` + ``specificEpithet``, else
  the first two words of ``acceptedScientificName`` / ``scientificName`` when the second is a lower-case
  epithet (an author citation starts upper case or with a parenthesis). An occurrence with an empty
  ``species`` whose ``taxonRank`` is above species (GENUS, FAMILY...), or whose name is one word, is
  ``not_species_rank``; one with no name at all is passed on without ``latin_name`` (``missing_field``).
  ``plant_id`` = ``speciesKey``, else ``taxonKey``, else the core id (gbifID); ``country`` = countryCode;
  ``license``, ``creator``, ``rights_holder``: the image's own (dc:license, dc:creator, dc:rightsHolder),
  else the occurrence's (license, recordedBy, rightsHolder); ``source`` = ``dwca.source_name``;
  ``meta``: gbifID, occurrenceID, datasetKey, the image's publisher, ``references`` (the image's page,
  else the occurrence's: the attribution link) and eventDate. ``split.group_by=meta.gbifID`` keeps the
  photos of one occurrence in one split.

An archive that cannot be read is one ``SourceError`` line: not a zip, no or unreadable ``meta.xml``,
no core, a data file named in meta.xml but missing, no Multimedia extension (a GBIF "simple CSV"
download: ask for "Darwin Core Archive"), no identifier or name column, a zip member that is corrupt.
Core ids are unique in GBIF downloads; if one repeats, its first row is used.

Leaves out: verbatim.txt and the other extensions, geocoding coordinates without a countryCode,
validation (records.py), metadata beyond ``version()`` (EML title, pubDate, the download DOI).
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flora.sharding.catalog.delimited import split_rows, text_lines
from flora.sharding.catalog.sources import SourceError, Unparseable, file_digest
from flora.sharding.config import DwcaConfig

MULTIMEDIA = "http://rs.gbif.org/terms/1.0/Multimedia"
_NAMESPACES = {"dc": "http://purl.org/dc/terms/", "dwc": "http://rs.tdwg.org/dwc/terms/",
               "gbif": "http://rs.gbif.org/terms/1.0/"}  # fmt: skip


def _terms(spec: str) -> dict[str, tuple[str, ...]]:
    """``"species=gbif,dwc ..."`` -> ``{"species": (gbif:species, dwc:species)}``: each column used and
    the terms that may carry it, the first present wins."""
    pairs = (item.split("=") for item in spec.split())
    return {col: tuple(_NAMESPACES[ns] + col for ns in spaces.split(",")) for col, spaces in pairs}


#: GBIF puts ``species``, the keys and ``acceptedScientificName`` in its own namespace (older archives
#: ``genericName`` too).
CORE_TERMS = _terms(
    "species=gbif,dwc genericName=dwc,gbif specificEpithet=dwc acceptedScientificName=gbif "
    "scientificName=dwc taxonRank=dwc speciesKey=gbif taxonKey=gbif countryCode=dwc license=dc "
    "recordedBy=dwc rightsHolder=dc references=dc occurrenceID=dwc datasetKey=gbif eventDate=dwc"
)
MEDIA_TERMS = _terms(
    "identifier=dc type=dc format=dc references=dc creator=dc publisher=dc license=dc rightsHolder=dc"
)
NAME_COLUMNS = ("species", "genericName", "acceptedScientificName", "scientificName")
#: Ranks at or below species (GBIF's Rank enum names); an empty ``species`` with any other rank is
#: not a species-level identification.
SPECIES_RANKS = frozenset(
    "SPECIES SUBSPECIES VARIETY SUBVARIETY FORM SUBFORM INFRASPECIFIC_NAME INFRASUBSPECIFIC_NAME "  # noqa: SIM905
    "CULTIVAR CULTIVAR_GROUP GREX STRAIN PATHOVAR BIOVAR CHEMOVAR MORPHOVAR PHAGOVAR SEROVAR CHEMOFORM "
    "FORMA_SPECIALIS NATIO PROLES CONVARIETY ABERRATION".split()
)
#: meta.xml is a few kilobytes (GBIF's, with ~250 fields, is 30 KB); a bigger one is not a descriptor.
MAX_META_BYTES = 4 << 20
#: How much of metadata.xml (EML) ``version`` reads for its title, date and DOI (they come first).
MAX_EML_BYTES = 1 << 20
SHOWN_CHARS = 300  # of a rejected row, in rejects.jsonl
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_DOI = re.compile(r"(10\.\d{4,9}/[^\s<\"]+)")


def _open_archive(path: Path) -> tuple[Path | zipfile.Path, zipfile.ZipFile | None]:
    """The archive's root (a folder, or the zip's folder holding meta.xml) and the open zip, if one."""
    if path.is_dir():
        return path, None
    if not path.is_file():
        raise SourceError(f"source not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{path} is not a ZIP archive (bad zip: {exc})") from None
    metas = sorted((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "meta.xml"), key=len)
    # an archive zipped with its folder has its files beside meta.xml
    return zipfile.Path(zf, metas[0][: -len("meta.xml")] if metas else ""), zf


class _Table:
    """One data file as meta.xml describes it: the getter of the wanted columns and its layout."""

    def __init__(
        self, root: Path | zipfile.Path, descriptor: Any, terms: dict[str, tuple[str, ...]], key: str
    ):
        self.name = descriptor.file_location.strip()
        self.descriptor = descriptor
        present = descriptor.terms
        self.columns = {col: next((t for t in ts if t in present), None) for col, ts in terms.items()}
        self.used = [col for col, term in self.columns.items() if term]
        self.getter = descriptor.field_plan.term_getter([key] + [self.columns[c] for c in self.used])
        key_index = descriptor.id_index if key == "id" else descriptor.coreid_index
        self.required = max(descriptor.field_plan.required_columns, key_index + 1)
        enc = descriptor.file_encoding or "UTF-8"
        try:
            ascii_safe = "\t\n\r,;|\"'".encode(enc) == b"\t\n\r,;|\"'"
        except LookupError:
            raise SourceError(f"meta.xml declares an unknown encoding {enc!r} for {self.name}") from None
        if not ascii_safe:
            raise SourceError(f"{self.name} is declared {enc}: convert it to UTF-8 (or another 8-bit code)")
        self.encoding = enc
        quote, sep = descriptor.fields_enclosed_by, descriptor.fields_terminated_by
        if quote and (len(quote) != 1 or len(sep) != 1):
            raise SourceError(f"{self.name}: quoting needs 1-character separators, got {sep!r}, {quote!r}")
        if not (root / self.name).is_file():
            raise SourceError(f"{self.name}, named in meta.xml, is missing from the archive")

    def rows(self, root: Path | zipfile.Path) -> Iterator[tuple[int, list[str] | None, str, str | None]]:
        """``(line number, fields or None, row text, problem)`` for each data row; a row with a problem
        (wrong column count, not in the encoding, too long) has fields None."""
        d = self.descriptor
        skip, expected = d.lines_to_ignore, None
        with (root / self.name).open("rb") as raw:
            lines = text_lines(raw, d.lines_terminated_by.encode(self.encoding), self.encoding)
            parsed = split_rows(lines, d.fields_terminated_by, d.fields_enclosed_by)
            for lineno, fields, text, problem in parsed:
                if lineno <= skip:
                    if lineno == 1 and fields:
                        expected = len(fields)
                    continue
                if problem is None and fields is not None:
                    if not text.strip(" \r\n"):
                        continue  # a blank line is no row
                    if _UNDECODABLE.search(text):
                        problem = f"not valid {self.encoding}"
                    elif (expected and len(fields) != expected) or len(fields) < self.required:
                        problem = f"{len(fields)} columns, expected {expected or self.required}"
                if problem is not None:
                    yield lineno, None, text, problem
                else:
                    yield lineno, fields, text, None

    def values(self, fields: list[str]) -> tuple[str, dict[str, str]]:
        """The key column and the used columns (stripped, empty ones left out) of a row."""
        got = self.getter(fields)
        return got[0].strip(), {
            c: v.strip() for c, v in zip(self.used, got[1:], strict=True) if v and v.strip()
        }


class _CoreIndex:
    """The core's used columns by id, in a temporary sqlite3 file (module docstring)."""

    def __init__(self, root: Path | zipfile.Path, core: _Table):
        self.dir = tempfile.mkdtemp(prefix="flora-dwca-")
        self.columns = core.used
        try:
            self.db = sqlite3.connect(Path(self.dir) / "core.sqlite")
            self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-8000;")
            cols = "".join(f", c{i} TEXT" for i in range(len(self.columns)))
            self.db.execute(f"CREATE TABLE occ (id TEXT, line INTEGER, problem TEXT{cols})")
            marks = ", ?" * len(self.columns)
            self.db.executemany(f"INSERT INTO occ VALUES (?, ?, ?{marks})", self._rows(root, core))
            self.db.execute("CREATE INDEX occ_id ON occ (id)")
            self.db.commit()
            self.rows = self.db.execute("SELECT COUNT(*) FROM occ").fetchone()[0]
        except BaseException:
            self.close()
            raise
        names = "".join(f", c{i}" for i in range(len(self.columns)))
        self.query = f"SELECT line, problem{names} FROM occ WHERE id = ? ORDER BY rowid LIMIT 1"

    def _rows(self, root: Path | zipfile.Path, core: _Table) -> Iterator[tuple]:
        id_index = core.descriptor.id_index
        for lineno, fields, text, problem in core.rows(root):
            if problem is not None:  # keep its id, if readable, so its media say why they are rejected
                cells = text.split(core.descriptor.fields_terminated_by)
                key = cells[id_index].strip() if id_index is not None and id_index < len(cells) else ""
                if key and not _UNDECODABLE.search(key):
                    yield (key, lineno, problem, *([None] * len(self.columns)))
                continue
            key, values = core.values(fields)
            yield (key, lineno, None, *(values.get(c) for c in self.columns))

    def get(self, key: str) -> tuple[int, str | None, dict[str, str]] | None:
        row = self.db.execute(self.query, (key,)).fetchone()
        if row is None:
            return None
        return row[0], row[1], {c: v for c, v in zip(self.columns, row[2:], strict=True) if v is not None}

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


#: Qualifiers in the epithet's place that name no species ("Quercus sp.", "Carex cf. nigra").
UNSURE = frozenset({"sp", "spp", "cf", "aff", "indet", "x"})


def latin_name(occ: dict[str, str]) -> tuple[str | None, str | None]:
    """``(name, None)``, ``(None, why it is not a species)``, or ``(None, None)`` when there is no name
    (module docstring)."""
    if occ.get("species"):
        return occ["species"], None
    rank = occ.get("taxonRank", "").upper()
    if rank and rank not in SPECIES_RANKS:
        return None, f"identified to {rank.lower()}, not to species"
    if occ.get("genericName") and occ.get("specificEpithet"):
        return f"{occ['genericName']} {occ['specificEpithet']}", None
    name = occ.get("acceptedScientificName") or occ.get("scientificName")
    if not name:
        return None, None
    words = name.split()
    if words[1:2] == ["×"] and len(words) > 2:  # a hybrid: "Mentha × piperita"
        words = [words[0], "×" + words[2]]
    epithet = words[1].removeprefix("×") if len(words) >= 2 else ""
    if epithet[:1].islower() and not epithet.endswith(".") and epithet not in UNSURE:
        return f"{words[0]} {words[1]}", None
    return None, f"{name!r} names no species (no specific epithet)"


class DwcaSource:
    """A GBIF occurrence download read through its ``meta.xml`` (module docstring)."""

    unit = "image row"

    def __init__(self, path: str | Path, cfg: DwcaConfig):
        self.path = Path(path)
        self.cfg = cfg
        self.types = {t.lower(): t for t in cfg.media_types}
        self.counts: Counter[str] = Counter()  # rows read, per type and per reject reason: for diagnose
        self.root, self.zip = _open_archive(self.path)
        try:
            self._open()
        except BaseException:
            if self.zip is not None:
                self.zip.close()
            raise

    def _open(self) -> None:
        from dwca.descriptors import ArchiveDescriptor

        if not (self.root / "meta.xml").is_file():
            raise SourceError(f"{self.path} has no meta.xml: not a Darwin Core Archive")
        with (self.root / "meta.xml").open("rb") as fh:
            text = fh.read(MAX_META_BYTES + 1)
        if len(text) > MAX_META_BYTES:
            raise SourceError(f"{self.path}: meta.xml is over {MAX_META_BYTES >> 20} MB: not a descriptor")
        root = _meta_root(text, self.path)
        try:
            descriptor = ArchiveDescriptor(ET.tostring(root, encoding="unicode"))
        except Exception as exc:  # the library's InvalidArchive, ValueError (an index that is no number)...
            raise SourceError(f"{self.path}: meta.xml is not a valid archive descriptor: {exc}") from None
        media = [e for e in descriptor.extensions if e.type == MULTIMEDIA]
        if not media:
            raise SourceError(
                f"{self.path} has no Multimedia extension ({MULTIMEDIA}), so no images: download GBIF "
                f'occurrences in "Darwin Core Archive" format, not "simple CSV"'
            )
        self.core = _Table(self.root, descriptor.core, CORE_TERMS, "id")
        self.media = _Table(self.root, media[0], MEDIA_TERMS, "coreid")
        if not self.media.columns["identifier"]:
            raise SourceError(f"{self.path}: {self.media.name} has no identifier column (dc:identifier)")
        if not any(self.core.columns[c] for c in NAME_COLUMNS):
            raise SourceError(f"{self.path}: {self.core.name} has no species or scientificName column")
        self.metadata = root.get("metadata") or "metadata.xml"

    def describe(self) -> str:
        return f"dwca:{self.path.name}"

    def diagnose(self) -> str | None:
        """Why a read gave no image record: no multimedia rows, none a still image, none joined."""
        c = self.counts
        if not c["rows"]:
            return f"the archive's {self.media.name} has no rows (its occurrences have no media)"
        if c["not_a_still_image"] == c["rows"]:
            types = ", ".join(f"{t[5:] or 'empty'} {n:,}" for t, n in c.items() if t.startswith("type:"))
            return f"none of its {c['rows']:,} multimedia rows is a {'/'.join(self.types.values())} ({types})"
        if c["orphan_media"] == c["rows"] - c["not_a_still_image"]:
            return f"no multimedia row's coreid is an id of {self.core.name}"
        return None

    def version(self) -> dict[str, Any]:
        """Format, name, size and sha256 (of the zip, or of meta.xml and the data files of a folder), and
        from the EML metadata the title, pubDate and download DOI when it has them."""
        out: dict[str, Any] = {"format": "dwca", "name": self.path.name}
        if self.zip is not None:
            out.update(bytes=self.path.stat().st_size, sha256=file_digest(self.path))
        else:
            names = ["meta.xml", self.core.name, self.media.name]
            digest = hashlib.sha256()
            for name in names:
                digest.update(f"{file_digest(self.path / name)}  {name}\n".encode())
            out.update(bytes=sum((self.path / n).stat().st_size for n in names), sha256=digest.hexdigest())
        out.update(_eml(self.root / self.metadata))
        return out

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        self.counts.clear()
        try:
            index = _CoreIndex(self.root, self.core)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise SourceError(f"cannot read {self.core.name} in {self.path}: {exc}") from None
        except sqlite3.Error as exc:  # the temporary index: a full or unwritable temporary folder
            raise SourceError(
                f"cannot index {self.core.name} of {self.path} in {tempfile.gettempdir()}: {exc}"
            ) from None
        lineno = 0
        try:
            for lineno, fields, text, problem in self.media.rows(self.root):  # noqa: B007 - reported
                self.counts["rows"] += 1
                yield f"{self.media.name} line {lineno}", self._record(index, fields, text, problem)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, sqlite3.Error) as exc:
            raise SourceError(
                f"cannot read {self.media.name} in {self.path} after line {lineno}: {exc}"
            ) from None
        finally:
            index.close()

    def _reject(self, text: str, message: str, reason: str) -> Unparseable:
        self.counts[reason] += 1
        return Unparseable(_UNDECODABLE.sub("\ufffd", text[:SHOWN_CHARS]), message, reason)

    def _record(self, index: _CoreIndex, fields: list[str] | None, text: str, problem: str | None) -> Any:
        if fields is None:
            return self._reject(text, f"malformed {self.media.name} row: {problem}", "bad_row")
        coreid, img = self.media.values(fields)
        kind = img.get("type") or ("StillImage" if img.get("format", "").startswith("image/") else "")
        self.counts[f"type:{kind}"] += 1
        typed = self.media.columns["type"] or self.media.columns["format"]
        if typed and kind.rsplit("/", 1)[-1].lower() not in self.types:
            return self._reject(text, f"type {kind or 'empty'!r} is not a still image", "not_a_still_image")
        found = index.get(coreid)
        if found is None:
            return self._reject(text, f"its occurrence {coreid!r} is not in {self.core.name}", "orphan_media")
        line, bad, occ = found
        if bad is not None:
            bad = f"its occurrence ({self.core.name} line {line}) is malformed: {bad}"
            return self._reject(text, bad, "bad_occurrence_row")
        name, why = latin_name(occ)
        if why is not None:
            return self._reject(text, f"occurrence {coreid}: {why}", "not_species_rank")
        plant_id: int | str = occ.get("speciesKey") or occ.get("taxonKey") or coreid
        raw: dict[str, Any] = {
            "plant_id": int(plant_id) if plant_id.isascii() and plant_id.isdigit() else plant_id,
            "image_url": img.get("identifier"),
            "latin_name": name,
            "license": img.get("license") or occ.get("license"),
            "creator": img.get("creator") or occ.get("recordedBy"),
            "rights_holder": img.get("rightsHolder") or occ.get("rightsHolder"),
            "country": occ.get("countryCode"),
            "source": self.cfg.source_name,
            "gbifID": int(coreid) if coreid.isascii() and coreid.isdigit() else coreid,
            "occurrenceID": occ.get("occurrenceID"),
            "datasetKey": occ.get("datasetKey"),
            "publisher": img.get("publisher"),
            "references": img.get("references") or occ.get("references"),
            "eventDate": occ.get("eventDate"),
        }
        # repeated values are shared by the catalog (intake.Interner), and meta is held packed there
        return {k: v for k, v in raw.items() if v is not None}


def _meta_root(text: bytes, path: Path) -> ET.Element:
    """meta.xml parsed, namespaces dropped, checked for what the descriptor needs (one-line errors)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise SourceError(f"{path}: meta.xml is not XML ({exc})") from None
    for el in root.iter():
        el.tag = el.tag.rsplit("}", 1)[-1]
    core = root.find("core")
    if core is None:
        raise SourceError(f"{path}: meta.xml has no <core> (expected the occurrence table)")
    for section, key in [(core, "id"), *((e, "coreid") for e in root.findall("extension"))]:
        if section.find("files/location") is None or not (section.findtext("files/location") or "").strip():
            raise SourceError(f"{path}: meta.xml's <{section.tag}> names no file (<files><location>)")
        if section.find(key) is None or not (section.find(key).get("index") or "").strip().isdigit():
            raise SourceError(f'{path}: meta.xml\'s <{section.tag}> has no <{key} index="N"/>')
        section.set("encoding", section.get("encoding") or "UTF-8")
        location = section.findtext("files/location").strip()
        if location.startswith(("/", "\\")) or ".." in Path(location).parts:
            raise SourceError(f"{path}: meta.xml's <{section.tag}> names a file outside it: {location!r}")
        section.find("files/location").text = location
    return root


def _eml(file: Path | zipfile.Path) -> dict[str, str]:
    """Title, pubDate and DOI from the first ``MAX_EML_BYTES`` of the EML metadata; {} if unreadable."""
    found: dict[str, str] = {}
    if not file.is_file():
        return found
    try:
        with file.open("rb") as fh:
            head = io.BytesIO(fh.read(MAX_EML_BYTES))
        for event, el in ET.iterparse(head, events=("start", "end")):
            tag = el.tag.rsplit("}", 1)[-1]
            if event == "start" and tag == "eml" and _DOI.search(el.get("packageId", "")):
                found.setdefault("doi", _DOI.search(el.get("packageId", "")).group(1))
            elif event == "end" and tag in ("title", "pubDate") and (el.text or "").strip():
                found.setdefault(tag, " ".join(el.text.split()))
            elif event == "end" and tag == "alternateIdentifier" and _DOI.match((el.text or "").strip()):
                found.setdefault("doi", el.text.strip())
            if len(found) == 3:
                break
    except (ET.ParseError, OSError, zipfile.BadZipFile, zlib.error, EOFError):
        pass  # an unreadable or truncated EML costs the card its title, not the run
    return found
