"""The sample world as iNaturalist open data: its records written as the bucket's four tables.

Owns ``write_inat`` (sample-world records -> ``photos``, ``observations``, ``taxa``, ``observers``, each
``.csv.gz`` or ``.csv``: tab-separated, a header line, no quoting, as the ``inaturalist-open-data``
bucket publishes them) and ``write_table`` (one such table from rows, for tests that write edge cases
by hand). Column order follows the bucket's ``structure.sql``.

What becomes of a record: one photo row. Its ``photo_id`` comes from the world's image URL
(``/img/<source>/<n>.<ext>``: the same image in every spelling gets the same id, so the world's
duplicate URLs stay duplicates), its licence is the iNaturalist code of the world's licence family
(the bucket holds only open licences: all-rights-reserved and unknown become CC-BY-NC). A record whose
URL is not http(s) gives a malformed photo row (``photo_id`` ``N/A``). Photos join observations: a
record opens an observation of its species or joins the one still open (up to ``MAX_PHOTOS`` photos),
which takes the record's quality grade, date and observer (or draws them), and a point in the
record's country (``COUNTRY_BOXES``; no coordinates without a usable country; ``SEA_RATE`` of them at
sea, far from any town). Taxa: Life > Plantae > a family per genus > genus > species; ``GENUS_RATE`` of
observations are identified to genus only and ``INFRA_RATE`` to an infraspecific taxon of their species
(a subspecies, or a variety); an observation whose record has no Latin name has no taxon. Observers:
the login, and a name for most.

Streams: photos and observations are written as the records arrive; only per-species, per-genus and
per-observer tables (small) are held. Everything is a pure function of the records and ``seed``.
Leaves out: image URLs (the bucket's URL is built from photo_id, size and extension; the world's
server cannot serve it), photo width/height beyond a plausible constant, anomaly_score.
"""

from __future__ import annotations

import gc
import gzip
import io
import random
import re
import uuid
import zlib
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import IO

from world import tables

PHOTO_COLUMNS = ("photo_uuid", "photo_id", "observation_uuid", "observer_id", "extension", "license",
                 "width", "height", "position")  # fmt: skip
OBSERVATION_COLUMNS = ("observation_uuid", "observer_id", "latitude", "longitude", "positional_accuracy",
                       "taxon_id", "quality_grade", "observed_on", "anomaly_score")  # fmt: skip
TAXON_COLUMNS = ("taxon_id", "ancestry", "rank_level", "rank", "name", "active")
OBSERVER_COLUMNS = ("observer_id", "login", "name")
LIFE, PLANTAE = 48460, 47126
#: iNaturalist licence code per world licence family (config/licenses.yaml ids).
INAT_LICENSES = {"cc-by": "CC-BY", "cc-by-nc": "CC-BY-NC", "cc-by-sa": "CC-BY-SA", "cc-by-nd": "CC-BY-ND",
                 "cc-by-nc-sa": "CC-BY-NC-SA", "cc-by-nc-nd": "CC-BY-NC-ND", "cc0": "CC0",
                 "pdm": "CC0"}  # fmt: skip
OPEN_FALLBACK = "CC-BY-NC"
#: Photo ids: source number * this + the image's number in the world.
SOURCE_IDS = {"iNaturalist": 1, "Legacy": 2, "Perenual": 3}
ID_STRIDE = 10_000_000
MAX_PHOTOS = 4
#: Shares of observations identified to genus only, to an infraspecific taxon, placed at sea.
GENUS_RATE, INFRA_RATE, SEA_RATE = 0.03, 0.04, 0.01
FAMILIES = ("Fagaceae", "Rosaceae", "Asteraceae", "Lamiaceae", "Fabaceae", "Pinaceae", "Cistaceae",
            "Ericaceae", "Sapindaceae", "Myrtaceae", "Caryophyllaceae", "Plantaginaceae")  # fmt: skip
# fmt: off
#: An inland point per country and a half-width in degrees: every point of the box is nearer a town
#: of that country than of any other (geocoded by the catalog's nearest-town rule).
COUNTRY_BOXES: dict[str, tuple[float, float, float]] = {
    "ES": (40.4, -3.7, 0.5), "IT": (42.8, 12.5, 0.3), "FR": (46.8, 2.4, 0.5), "PT": (39.6, -8.0, 0.3),
    "GR": (39.5, 22.0, 0.3), "MA": (32.0, -6.5, 0.4), "TR": (39.0, 34.0, 0.5), "HR": (45.6, 16.2, 0.15),
    "TN": (35.5, 9.5, 0.3), "IL": (31.25, 34.8, 0.1), "CY": (35.0, 33.2, 0.1), "DE": (51.0, 10.5, 0.5),
    "GB": (52.5, -1.5, 0.4), "NL": (52.2, 5.6, 0.15), "PL": (52.0, 19.5, 0.5), "SE": (60.0, 15.0, 0.5),
    "BE": (50.6, 4.6, 0.1), "CH": (46.8, 8.2, 0.1), "AT": (47.6, 14.5, 0.2), "DK": (55.8, 9.3, 0.15),
    "IE": (53.2, -7.8, 0.3), "CZ": (49.8, 15.5, 0.3), "US": (39.0, -98.0, 1.5), "CA": (50.7, -98.0, 0.4),
    "MX": (23.0, -102.5, 0.8), "BR": (-12.0, -47.0, 1.5), "AR": (-34.0, -63.0, 1.0), "JP": (36.2, 138.3, 0.4),
    "CN": (32.0, 112.0, 1.5), "KR": (36.5, 127.8, 0.3), "TW": (23.8, 121.0, 0.15), "AU": (-32.0, 147.0, 1.5),
    "NZ": (-43.5, 171.5, 0.3), "ZA": (-29.0, 25.0, 1.0), "IN": (22.0, 78.0, 1.5), "CL": (-35.5, -71.5, 0.15),
}
#: Points of open sea, more than 1,000 km from any populated place.
SEA_POINTS = ((-40.0, -120.0), (35.0, -40.0), (-45.0, 80.0))
# fmt: on
_WORLD_URL = re.compile(r"^https?://[^/]+/img/([A-Za-z]+)/(\d+)\.([A-Za-z0-9]+)", re.IGNORECASE)
_LICENSE_FAMILY = {s: family for family, spellings in tables.LICENSE_SPELLINGS.items() for s in spellings}


def write_table(path: str | Path, columns: Iterable[str], rows: Iterable[Iterable[object]]) -> Path:
    """One table as the bucket writes it (tab-separated, header, no quoting; None as empty);
    gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    with _open(path) as fh:
        fh.write("\t".join(columns) + "\n")
        for row in rows:
            fh.write(_line(row))
    return path


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":  # mtime 0: the same rows give the same bytes
        return io.TextIOWrapper(
            gzip.GzipFile(path, "wb", compresslevel=6, mtime=0), encoding="utf-8", newline=""
        )
    return open(path, "w", encoding="utf-8", newline="")


def _line(row: Iterable[object]) -> str:
    return "\t".join("" if v is None else str(v) for v in row) + "\n"


class _Taxonomy:
    """Taxon ids handed out as names are first met; written at the end (species-sized tables)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple] = {}  # name -> (id, ancestry, rank_level, rank)
        self.next_id = 100_000

    def _taxon(self, name: str, ancestry: str, level: int, rank: str) -> tuple:
        if name not in self.rows:
            self.next_id += 1
            self.rows[name] = (self.next_id, ancestry, level, rank)
        return self.rows[name]

    def species(self, name: str) -> tuple[int, str]:
        """(species id, its ancestry including itself) of a binomial, its genus and family made too."""
        genus = name.split()[0]
        family = FAMILIES[zlib.crc32(genus.encode()) % len(FAMILIES)]
        family_id = self._taxon(family, f"{LIFE}/{PLANTAE}", 30, "family")[0]
        genus_id = self._taxon(genus, f"{LIFE}/{PLANTAE}/{family_id}", 20, "genus")[0]
        species = self._taxon(name, f"{LIFE}/{PLANTAE}/{family_id}/{genus_id}", 10, "species")
        return species[0], f"{species[1]}/{species[0]}"

    def genus(self, name: str) -> int:
        self.species(name)
        return self.rows[name.split()[0]][0]

    def infraspecific(self, name: str) -> int:
        species_id, path = self.species(name)
        epithet = name.split()[-1]
        rank = "variety" if species_id % 2 else "subspecies"
        return self._taxon(f"{name} {epithet}", path, 5, rank)[0]

    def table(self) -> Iterable[tuple]:
        yield LIFE, "", 100, "stateofmatter", "Life", "true"
        yield PLANTAE, str(LIFE), 70, "kingdom", "Plantae", "true"
        for name, (taxon_id, ancestry, level, rank) in self.rows.items():
            yield taxon_id, ancestry, level, rank, name, "true"


def _country_code(record: Mapping) -> str | None:
    country = record.get("country")
    if not isinstance(country, str) or not country.strip():
        return None
    text = country.strip()
    if len(text) == 2:
        return text.upper()
    return next((code for code, name in tables.COUNTRY_NAMES.items() if name == text), None)


def _observed_on(record: Mapping, rng: random.Random) -> str:
    if isinstance(record.get("observed_on"), str):
        return record["observed_on"]
    if isinstance(record.get("date"), str):
        return datetime.strptime(record["date"], "%d/%m/%Y").date().isoformat()
    return date.fromordinal(
        rng.randint(date(2008, 1, 1).toordinal(), date(2024, 12, 31).toordinal())
    ).isoformat()


class _Writer:
    """One ``write_inat`` run: the open tables and the small per-species / per-observer state."""

    def __init__(self, folder: Path, gz: bool, seed: int):
        self.folder, self.suffix = folder, ".csv.gz" if gz else ".csv"
        self.rng = random.Random(seed)
        self.grades = tables.QUALITY_GRADES
        self.taxa = _Taxonomy()
        self.observers: dict[str, int] = {}
        self.open: dict[str, list] = {}  # species -> [observation uuid, observer id, photos left, position]
        self.counts = {"photos": 0, "observations": 0}

    def path(self, stem: str) -> Path:
        return self.folder / f"{stem}{self.suffix}"

    def observer(self, record: Mapping) -> int:
        login = record.get("observer") or str(record.get("photographer") or "").replace(" ", "_").lower()
        login = login or f"{self.rng.choice(tables.OBSERVER_FIRST)}_{self.rng.choice(tables.OBSERVER_LAST)}"
        return self.observers.setdefault(login, len(self.observers) + 1)

    def observation(self, record: Mapping, obs: IO[str]) -> list:
        name = " ".join(str(record.get("latin_name") or "").split()).capitalize()
        current = self.open.get(name)
        if current is not None and current[2] > 0:
            current[2] -= 1
            current[3] += 1
            return current
        rng = self.rng
        grade = (
            record.get("quality_grade")
            or rng.choices([g for g, _ in self.grades], [w for _, w in self.grades])[0]
        )
        taxon: int | str = ""
        if name:
            draw = rng.random()
            if draw < GENUS_RATE:
                taxon = self.taxa.genus(name)
            elif draw < GENUS_RATE + INFRA_RATE:
                taxon = self.taxa.infraspecific(name)
            else:
                taxon = self.taxa.species(name)[0]
        lat = lon = accuracy = None
        code = _country_code(record)
        if rng.random() < SEA_RATE:
            lat, lon = rng.choice(SEA_POINTS)
        elif code in COUNTRY_BOXES:
            clat, clon, half = COUNTRY_BOXES[code]
            lat, lon = round(clat + rng.uniform(-half, half), 6), round(clon + rng.uniform(-half, half), 6)
            accuracy = rng.choice((5, 10, 30, 100, 1000))
        observation_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        observer_id = self.observer(record)
        obs.write(_line((observation_uuid, observer_id, lat, lon, accuracy, taxon, grade,
                         _observed_on(record, rng), round(rng.uniform(0.2, 3.0), 4))))  # fmt: skip
        self.counts["observations"] += 1
        current = [observation_uuid, observer_id, rng.randint(0, MAX_PHOTOS - 1), 1]
        if name:
            self.open[name] = current
        return current

    def photo(self, record: Mapping, observation: list) -> str:
        url = record.get("image_url")
        match = _WORLD_URL.match(url) if isinstance(url, str) else None
        photo_id: int | str = "N/A"
        extension = "jpeg"
        if match and match.group(1) in SOURCE_IDS:
            photo_id = SOURCE_IDS[match.group(1)] * ID_STRIDE + int(match.group(2))
            extension = match.group(3).lower()
        family = _LICENSE_FAMILY.get(record.get("license"), "unknown")
        license_ = INAT_LICENSES.get(family, OPEN_FALLBACK)
        photo_uuid = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        return _line((photo_uuid, photo_id, observation[0], observation[1], extension, license_, 2048, 1536,
                      observation[3]))  # fmt: skip


def write_inat(
    records: Iterable[Mapping], folder: str | Path, gz: bool = True, seed: int = 0
) -> dict[str, int]:
    """Writes sample-world records (``world.generate_catalog``'s dicts) as iNaturalist open-data tables.

    Args:
        records: The records, in any number (streamed: one photo row each).
        folder: Where ``photos``, ``observations``, ``taxa`` and ``observers`` are written (made if needed).
        gz: ``.csv.gz`` as the bucket publishes them, else plain ``.csv``.
        seed: Seed of the choices the records do not fix (observations, coordinates, identifications).

    Returns:
        Rows written per table.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = _Writer(folder, gz, seed)
    # no reference cycles are made here; the cyclic collector would rescan the caller's records (900k
    # dicts in the benchmark) again and again, tripling the time
    collecting = gc.isenabled()
    gc.disable()
    try:
        with _open(writer.path("photos")) as photos, _open(writer.path("observations")) as obs:
            photos.write("\t".join(PHOTO_COLUMNS) + "\n")
            obs.write("\t".join(OBSERVATION_COLUMNS) + "\n")
            for record in records:
                photos.write(writer.photo(record, writer.observation(record, obs)))
                writer.counts["photos"] += 1
    finally:
        if collecting:
            gc.enable()
    write_table(writer.path("taxa"), TAXON_COLUMNS, writer.taxa.table())
    rng = random.Random(seed + 1)
    observer_rows = (
        (oid, login, login.replace("_", " ").title() if rng.random() < 0.7 else None)
        for login, oid in writer.observers.items()
    )
    write_table(writer.path("observers"), OBSERVER_COLUMNS, observer_rows)
    return {**writer.counts, "taxa": len(writer.taxa.rows) + 2, "observers": len(writer.observers)}
