"""The iNaturalist open-data source: the bucket's four tables (written by world/inat.py, or by hand for
the edge cases) through the catalog, by run_catalog and by the command line: accounting, quality grades,
ranks and the infraspecific mapping, within_taxon, photo size, creators, countries from coordinates,
one-line errors for bad tables, observations kept in one split, and a read that holds no table whole."""

import json
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import pytest

from flora.config import load_config
from flora.sharding.__main__ import main
from flora.sharding.catalog.geocode import CountryGeocoder
from flora.sharding.catalog.inat import InatSource
from flora.sharding.catalog.run import run_catalog
from flora.sharding.catalog.sources import SourceError
from flora.sharding.config import CatalogConfig, InatConfig
from world import WorldSpec, generate_catalog
from world.inat import (
    OBSERVATION_COLUMNS,
    OBSERVER_COLUMNS,
    PHOTO_COLUMNS,
    TAXON_COLUMNS,
    write_inat,
    write_table,
)

REPO = Path(__file__).resolve().parents[2]
QUERCUS = "48460/47126/47851/47850"
TAXA = [
    (48460, "", 100, "stateofmatter", "Life", "true"),
    (47126, "48460", 70, "kingdom", "Plantae", "true"),
    (1, "48460", 70, "kingdom", "Animalia", "true"),
    (47851, "48460/47126", 30, "family", "Fagaceae", "true"),
    (47850, "48460/47126/47851", 20, "genus", "Quercus", "true"),
    (54779, QUERCUS, 10, "species", "Quercus ilex", "true"),
    (54780, f"{QUERCUS}/54779", 5, "subspecies", "Quercus ilex ballota", "true"),
    (61000, QUERCUS, 10, "hybrid", "Quercus × hispanica", "true"),
    (61001, QUERCUS, 10, "species", "Quercus oldname", "false"),
    (47219, "48460/1/47120", 10, "species", "Apis mellifera", "true"),
]
OBSERVERS = [(1, "ana_g", "Ana García"), (2, "pedro_l", "")]
# name -> (observer, latitude, longitude, taxon, grade)
OBSERVATIONS = {
    "madrid": (1, 40.42, -3.70, 54779, "research"),
    "lisbon": (2, 38.72, -9.14, 54780, "research"),
    "kyoto": (1, 35.01, 135.77, 61000, "research"),
    "sea": (1, -40.0, -120.0, 54779, "research"),
    "nowhere": (2, "", "", 54779, "research"),
    "genus": (1, 40.0, -3.0, 47850, "research"),
    "inactive": (1, 40.0, -3.0, 61001, "research"),
    "bee": (1, 40.0, -3.0, 47219, "research"),
    "unknown": (1, 40.0, -3.0, 99999, "research"),
    "untaxed": (1, 40.0, -3.0, "", "research"),
    "casual": (1, 40.0, -3.0, 54779, "casual"),
    "needs": (1, 40.0, -3.0, 54779, "needs_id"),
    "badlat": (1, "abc", -3.0, 54779, "research"),
}
# photo_id -> observation name; photo 2 is Madrid's second photo, 90 an orphan
PHOTOS = {
    1: "madrid",
    2: "madrid",
    **{10 + i: name for i, name in enumerate(list(OBSERVATIONS)[1:])},
    90: "ghost",
}
EXPECTED_REJECTS = {
    14: "not_species_rank", 15: "inactive_taxon", 17: "unknown_taxon", 18: "no_taxon", 19: "quality_grade",
    20: "quality_grade", 21: "bad_row", 90: "orphan_photo", 91: "bad_row", 92: "bad_row",
}  # fmt: skip


def uuid_of(name: str) -> str:
    return f"00000000-0000-4000-8000-{zlib.crc32(name.encode()):012d}"


def write_edge(folder: Path, gz: bool = False) -> Path:
    """The hand-written tables: one observation per case, photos 91 and 92 malformed."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".csv.gz" if gz else ".csv"
    write_table(folder / f"taxa{ext}", TAXON_COLUMNS, TAXA)
    write_table(folder / f"observers{ext}", OBSERVER_COLUMNS, OBSERVERS)
    obs = [
        (uuid_of(n), o, lat, lon, 10, t, g, "2024-05-01", 1.0)
        for n, (o, lat, lon, t, g) in OBSERVATIONS.items()
    ]
    write_table(folder / f"observations{ext}", OBSERVATION_COLUMNS, obs)
    photos = [
        (f"p-{pid}", pid, uuid_of(n), OBSERVATIONS.get(n, (2,))[0], "jpg", "CC-BY", 800, 600, 1)
        for pid, n in PHOTOS.items()
    ]
    photos += [("p-91", 91, "too", "few"), ("p-92", "x92", uuid_of("madrid"), 1, "jpg", "CC0", 1, 1, 1)]
    write_table(folder / f"photos{ext}", PHOTO_COLUMNS, photos)
    return folder


def catalog(source: Path, out: Path, *overrides: str):
    cfg = load_config(CatalogConfig, None, ["progress=false", *overrides])
    result = run_catalog(str(source), out, cfg)
    return result, read_jsonl(out / "dataset_splits.jsonl"), read_jsonl(out / "rejects.jsonl")


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rejected_photo_ids(rejects: list) -> dict:
    return {int(r["record"].split("\t")[1].lstrip("x")): r["reason"] for r in rejects}


@pytest.fixture(scope="module")
def world_records():
    return generate_catalog(WorldSpec(n_records=1500, n_species=25, seed=5), base_url="http://127.0.0.1:9")


@pytest.fixture(scope="module")
def world_tables(world_records, tmp_path_factory):
    root = tmp_path_factory.mktemp("inat")
    write_inat(world_records, root / "gz")
    write_inat(world_records, root / "plain", gz=False)
    return root


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    return write_edge(tmp_path_factory.mktemp("inat-edge") / "edge")


def test_edge_tables_every_photo_in_its_place(edge, tmp_path):
    result, written, rejects = catalog(edge, tmp_path / "o")
    assert result.stats["accounting_ok"] and result.stats["input_records"] == len(PHOTOS) + 2
    assert rejected_photo_ids(rejects) == EXPECTED_REJECTS
    by_photo = {r["meta"]["photo_id"]: r for r in written}
    assert sorted(by_photo) == [1, 2, 10, 11, 12, 13, 16]
    madrid, lisbon, kyoto, sea, nowhere, bee = (by_photo[i] for i in (1, 10, 11, 12, 13, 16))
    assert (madrid["latin_name"], madrid["plant_id"], madrid["country"], madrid["region"]) == (
        "Quercus ilex", 54779, "ES", "EU_SW",
    )  # fmt: skip
    assert madrid["creator"] == madrid["rights_holder"] == "Ana García"
    assert lisbon["creator"] == "pedro_l", "no name: the login"
    # the subspecies maps up to its species; its own taxon stays in meta
    assert (lisbon["latin_name"], lisbon["plant_id"], lisbon["country"]) == ("Quercus ilex", 54779, "PT")
    assert (lisbon["meta"]["taxon_id"], lisbon["meta"]["taxon_rank"]) == (54780, "subspecies")
    assert (kyoto["latin_name"], kyoto["country"]) == ("Quercus × hispanica", "JP"), (
        "a named hybrid is a class"
    )
    assert (sea["country"], sea["region"]) == (None, "UNKNOWN"), "open sea: no country"
    assert nowhere["country"] is None and bee["latin_name"] == "Apis mellifera"
    assert madrid["image_url"] == "https://inaturalist-open-data.s3.amazonaws.com/photos/1/medium.jpg"
    assert madrid["meta"]["references"] == "https://www.inaturalist.org/photos/1"
    assert madrid["meta"]["observation_uuid"] == uuid_of("madrid")
    assert (madrid["license"], madrid["meta"]["quality_grade"], madrid["meta"]["observed_on"]) == (
        "cc-by", "research", "2024-05-01",
    )  # fmt: skip
    sources = json.loads((tmp_path / "o" / "sources.json").read_text())["sources"]
    assert sources[0]["format"] == "inat" and sources[0]["newest_observed_on"] == "2024-05-01"
    assert set(sources[0]["files"]) == {"photos.csv", "observations.csv", "taxa.csv", "observers.csv"}


def test_infraspecific_keep_and_within_taxon(edge, tmp_path):
    _, written, rejects = catalog(edge, tmp_path / "o", "inat.infraspecific=keep", "inat.within_taxon=47126")
    by_photo = {r["meta"]["photo_id"]: r for r in written}
    assert (by_photo[10]["latin_name"], by_photo[10]["plant_id"]) == ("Quercus ilex ballota", 54780)
    assert "taxon_id" not in by_photo[10]["meta"]
    assert rejected_photo_ids(rejects)[16] == "outside_taxon", "the bee is not a plant"
    _, written, rejects = catalog(edge, tmp_path / "o2", "inat.within_taxon=54779")
    assert {r["latin_name"] for r in written} == {"Quercus ilex"}, "the species and its subspecies only"
    assert rejected_photo_ids(rejects)[11] == "outside_taxon"


def test_quality_grade_override_and_photo_size(edge, tmp_path):
    _, written, rejects = catalog(
        edge, tmp_path / "o", "inat.quality_grades=[research,needs_id]", "inat.photo_size=small"
    )
    assert rejected_photo_ids(rejects)[19] == "quality_grade" and 20 not in rejected_photo_ids(rejects)
    assert all(r["image_url"].endswith(f"/photos/{r['meta']['photo_id']}/small.jpg") for r in written)
    with pytest.raises(SourceError, match="photo_size 'huge' is not a size the bucket holds"):
        InatSource(str(edge), InatConfig(photo_size="huge"))


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_world_tables_through_the_catalog(world_tables, world_records, tmp_path, gz):
    folder = world_tables / ("gz" if gz else "plain")
    result, written, rejects = catalog(folder, tmp_path / "o")
    stats = result.stats
    assert stats["input_records"] == len(world_records)
    assert stats["input_records"] == stats["written"] + stats["rejected"] + stats["duplicates"]
    assert stats["duplicates"] > 0.15 * len(world_records), "the world's reused URLs are reused photo ids"
    grades = observation_grades(world_tables / "plain")
    photos = world_photos(world_tables)
    not_research = sum(1 for p in photos if p[1].isdigit() and grades[p[2]] != "research")
    assert stats["rejects_by_reason"]["quality_grade"] == not_research
    assert stats["rejects_by_reason"]["bad_row"] == sum(1 for p in photos if p[1] == "N/A")
    assert {"not_species_rank", "no_taxon"} <= set(stats["rejects_by_reason"])
    assert {r["source"] for r in written} == {"iNaturalist"} and all(r["meta"]["photo_id"] for r in written)
    if not gz:  # the same tables compressed or not give the same catalog
        assert (tmp_path / "o" / "dataset_splits.jsonl").read_bytes() == gz_splits(world_tables, tmp_path)


def world_photos(world_tables: Path) -> list[list[str]]:
    lines = (world_tables / "plain" / "photos.csv").read_text().splitlines()[1:]
    return [line.split("\t") for line in lines]


def observation_grades(folder: Path) -> dict:
    lines = (folder / "observations.csv").read_text().splitlines()[1:]
    return {f[0]: f[6] for f in (line.split("\t") for line in lines)}


def gz_splits(world_tables: Path, tmp_path: Path) -> bytes:
    catalog(world_tables / "gz", tmp_path / "gz-out")
    return (tmp_path / "gz-out" / "dataset_splits.jsonl").read_bytes()


def test_command_line_detects_inat_and_takes_overrides(world_tables, tmp_path):
    grades = observation_grades(world_tables / "plain")
    casual = sum(1 for p in world_photos(world_tables) if p[1].isdigit() and grades[p[2]] == "casual")
    proc = subprocess.run(
        [sys.executable, "-m", "flora.sharding", "catalog", "--source", str(world_tables / "gz"),
         "--out", str(tmp_path / "o"), "inat.quality_grades=[research,needs_id]", "progress=false"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "catalog inat:gz:" in proc.stdout
    stats = json.loads((tmp_path / "o" / "export_stats.json").read_text())
    assert stats["accounting_ok"] and stats["config"]["inat"]["quality_grades"] == ["research", "needs_id"]
    assert stats["rejects_by_reason"]["quality_grade"] == casual > 0, "only casual observations' photos"
    kept = {r["meta"]["quality_grade"] for r in read_jsonl(tmp_path / "o" / "dataset_splits.jsonl")}
    assert kept == {"research", "needs_id"}


def test_group_by_observation_keeps_its_photos_in_one_split(world_tables, tmp_path):
    result, written, _ = catalog(world_tables / "gz", tmp_path / "o", "split.group_by=meta.observation_uuid")
    splits: dict[str, set] = {}
    for r in written:
        splits.setdefault(r["meta"]["observation_uuid"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert sum(1 for r in written) - len(splits) > 50, "many observations have several photos"
    assert result.stats["leakage_ok"]


def test_geocoder_known_points():
    points = [
        (40.42, -3.70),
        (48.86, 2.35),
        (-33.87, 151.21),
        (-17.8, 178.0),
        (0.0, -30.0),
        (95.0, 0.0),
        None,
    ]
    assert CountryGeocoder.shared().countries(points) == ["ES", "FR", "AU", "FJ", None, None, None]


def _damage(folder: Path, case: str) -> None:
    if case == "missing":
        (folder / "taxa.csv").unlink()
    elif case == "header":
        text = (folder / "photos.csv").read_text().replace("\textension\t", "\text\t", 1)
        (folder / "photos.csv").write_text(text)
    elif case == "both":
        shutil.copy(folder / "photos.csv", folder / "photos.csv.gz")
    elif case == "empty":
        (folder / "observers.csv").write_text("")
    elif case == "not_gzip":
        (folder / "photos.csv").rename(folder / "photos.csv.gz")


ERRORS = {
    "missing": "no taxa.csv.gz or taxa.csv",
    "header": "photos.csv: no column extension in its header (columns found: photo_uuid, photo_id,",
    "both": "both photos.csv.gz and photos.csv; keep one",
    "empty": "observers.csv: no column observer_id, login, name in its header (columns found: none",
    "not_gzip": "photos.csv.gz after line 0: Not a gzipped file",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_tables_are_one_line_and_write_nothing(case, tmp_path, capsys):
    folder = write_edge(tmp_path / "edge")
    _damage(folder, case)
    assert main(["catalog", "--source", str(folder), "--out", str(tmp_path / "o"), "--format", "inat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora catalog: error: ") and "\n" not in err and ERRORS[case] in err, err
    assert not (tmp_path / "o").exists()


def test_corrupt_gzip_names_the_file_and_line(world_tables, tmp_path, capsys):
    folder = tmp_path / "cut"
    shutil.copytree(world_tables / "gz", folder)
    data = (folder / "photos.csv.gz").read_bytes()
    (folder / "photos.csv.gz").write_bytes(data[: len(data) * 2 // 3])
    assert main(["catalog", "--source", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot read {folder / 'photos.csv.gz'} after line " in err and "\n" not in err
    line = int(err.split("after line ")[1].split(":")[0])
    assert 500 < line < 1500 and not (tmp_path / "o").exists()


def test_reading_holds_no_table_whole(tmp_path):
    records = generate_catalog(
        WorldSpec(n_records=50_000, n_species=400, seed=2), base_url="http://127.0.0.1:9"
    )
    write_inat(records, tmp_path / "big", gz=False)
    del records
    data = sum(p.stat().st_size for p in (tmp_path / "big").iterdir())
    CountryGeocoder.shared()  # loaded once per process, whatever the data's size
    source = InatSource(str(tmp_path / "big"), InatConfig())
    temporary = set(Path(tempfile.gettempdir()).glob("flora-inat-*"))
    tracemalloc.start()
    try:
        n = sum(1 for _ in source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 50_000 and source.photos_read == n
    print(f"peak {peak:,} bytes of Python objects for {data:,} bytes of tables")
    assert peak < data / 4, f"peak {peak:,} bytes of Python objects for {data:,} bytes of tables"
    assert set(Path(tempfile.gettempdir()).glob("flora-inat-*")) == temporary, "the join's folder is removed"


def test_a_row_that_cannot_be_read_is_keyed_by_its_key_column_wherever_the_header_puts_it(tmp_path):
    """A malformed observation row in a table whose header puts observation_uuid second still names
    that observation (its photos are rejected for the row, not as photos of no observation)."""
    from flora.sharding.catalog.inat import _Table

    header = "observer_id\tobservation_uuid\tlatitude\tlongitude\ttaxon_id\tquality_grade\tobserved_on\n"
    (tmp_path / "observations.csv").write_text(header + "7\tuuid-1\t40.1\n", encoding="utf-8")
    table = _Table(tmp_path, "observations")
    ((lineno, text, fields, problem),) = list(table.rows())
    assert lineno == 2 and fields is None and "3 fields, expected 7" in problem
    assert table.key_of(text) == "uuid-1"
    assert table.key_of("7") == ""
