"""The GBIF Darwin Core Archive source: archives in GBIF's layout (written by world/dwca.py, a zip and a
folder, plus hand-shaped rows and a quoted IPT-style archive) through the catalog, by run_catalog and by
the command line: accounting, the image's attribution over the occurrence's, fallbacks, non-image rows,
ranks, orphans and bad rows, the same world as JSONL and as DwC-A, one-line errors for broken
archives, the dataset card's version, and a read that holds no table whole."""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from flora.config import load_config
from flora.io import read_jsonl
from flora.sharding.__main__ import main
from flora.sharding.catalog.dwca import DwcaSource, latin_name
from flora.sharding.catalog.intake import NoUsableRecordError
from flora.sharding.catalog.run import run_catalog
from flora.sharding.catalog.sources import Unparseable
from flora.sharding.config import CatalogConfig, DwcaConfig
from world import WorldSpec, generate_catalog, write_jsonl
from world.dwca import write_dwca

REPO = Path(__file__).resolve().parents[2]
URL = "http://127.0.0.1:9/img/edge/{}.jpg"


def catalog(source, out, *overrides):
    cfg = load_config(CatalogConfig, None, ["progress=false", *overrides])
    return run_catalog(str(source), out, cfg)


def zip_folder(folder, path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(folder).as_posix())
    return path


WORLD = WorldSpec(n_records=1500, n_species=30, seed=3)


@pytest.fixture(scope="module")
def world_records():
    return generate_catalog(WORLD, base_url="http://127.0.0.1:9")


@pytest.fixture(scope="module")
def archives(world_records, tmp_path_factory):
    """The world as a zip and as a folder, each written from a one-pass iterator (the writer streams)."""
    root = tmp_path_factory.mktemp("dwca")
    for name, zipped in (("world.zip", True), ("world", False)):
        write_dwca(iter(world_records), root / name, zip=zipped)
    return root


def edge_records():
    """Hand-shaped records: name -> record (the writer's ``dwca`` key overrides derived columns)."""
    base = {
        "plant_id": 1,
        "latin_name": "Quercus ilex",
        "source": "iNaturalist",
        "country": "ES",
        "observer": "Ana",
    }
    no_name = {"species": "", "genericName": "", "specificEpithet": "", "acceptedScientificName": ""}
    return {
        "own": {**base, "image_url": URL.format("own"), "license": "CC BY 4.0", "observer": "Obs Person",
                "dwca": {"multimedia": {"creator": "Photo Person", "rightsHolder": "Photo Holder"}}},
        "fallback": {**base, "image_url": URL.format("fallback"), "license": None, "observer": "Obs Person",
                     "dwca": {"multimedia": {"creator": "", "rightsHolder": ""},
                              "occurrence": {"rightsHolder": "Occ Holder"}}},
        "sound": {**base, "image_url": URL.format("sound"), "media_type": "Sound"},
        "video": {**base, "image_url": URL.format("video"), "media_type": "MovingImage"},
        "genus": {**base, "image_url": URL.format("genus"),
                  "dwca": {"occurrence": {**no_name, "taxonRank": "GENUS", "scientificName": "Quercus L."}}},
        "author": {**base, "image_url": URL.format("author"),
                   "dwca": {"occurrence": {**no_name, "scientificName": "Abies alba Mill."}}},
        "subspecies": {**base, "image_url": URL.format("subspecies"),
                       "dwca": {"occurrence": {"taxonRank": "SUBSPECIES",
                                               "scientificName": "Quercus ilex subsp. ballota Samp."}}},
        "nameless": {**base, "image_url": URL.format("nameless"), "latin_name": None},
        "no_keys": {**base, "image_url": URL.format("no_keys"), "plant_id": None},
        "photo1": {**base, "image_url": URL.format("photo1"), "observation_id": 77},
        "photo2": {**base, "image_url": URL.format("photo2"), "observation_id": 77},
    }  # fmt: skip


@pytest.fixture
def edge(tmp_path):
    """The edge records as a folder archive, plus an orphan row, a row with a missing column and one
    that is not UTF-8."""
    folder = tmp_path / "edge"
    write_dwca(edge_records().values(), folder, zip=False)
    with open(folder / "multimedia.txt", "a", encoding="utf-8") as fh:
        fh.write("\t".join(["999", "StillImage", "image/jpeg", URL.format("orphan")] + [""] * 11) + "\n")
        fh.write("\t".join(["4000000001", "StillImage", URL.format("short")]) + "\n")
    with open(folder / "multimedia.txt", "ab") as raw:
        raw.write(
            b"\t".join(
                [b"4000000001", b"StillImage", b"image/jpeg", b"http://127.0.0.1:9/\xff.jpg"] + [b""] * 11
            )
        )
    return folder


def test_world_archive_accounting_zip_and_folder_agree(archives, world_records, tmp_path):
    results = {}
    for name in ("world.zip", "world"):
        result = catalog(archives / name, tmp_path / name)
        stats = result.stats
        assert stats["input_records"] == len(world_records)
        assert stats["input_records"] == stats["written"] + stats["rejected"] + stats["duplicates"]
        assert stats["accounting_ok"] and stats["written"] > 0.6 * len(world_records)
        rows = read_jsonl(tmp_path / name / "dataset_splits.jsonl")
        assert {r["source"] for r in rows} == {"GBIF"} and all(r["meta"]["gbifID"] for r in rows)
        results[name] = (stats["rejects_by_reason"], (tmp_path / name / "dataset_splits.jsonl").read_bytes())
    assert results["world.zip"] == results["world"]


def test_same_world_as_jsonl_and_dwca_keeps_the_same_images(world_records, tmp_path):
    carried = [r for r in world_records if r.get("plant_id") is not None]  # no missing id in an archive
    write_jsonl(carried, tmp_path / "world.jsonl")
    write_dwca(carried, tmp_path / "world.zip")
    kept = {}
    for name in ("world.jsonl", "world.zip"):
        catalog(tmp_path / name, tmp_path / f"out-{name}")
        rows = read_jsonl(tmp_path / f"out-{name}" / "dataset_splits.jsonl")
        kept[name] = {(r["image_url"], r["latin_name"], r["split"]) for r in rows}
    assert kept["world.jsonl"] == kept["world.zip"] and len(kept["world.zip"]) > 900


def test_edge_rows_each_in_their_place(edge, tmp_path):
    result = catalog(edge, tmp_path / "o")
    stats = result.stats
    assert stats["input_records"] == len(edge_records()) + 3 and stats["accounting_ok"]
    assert stats["rejects_by_reason"] == {
        "bad_row": 2, "missing_field": 1, "not_a_still_image": 2, "not_species_rank": 1, "orphan_media": 1
    }  # fmt: skip
    rejects = {r["position"]: r for r in read_jsonl(tmp_path / "o" / "rejects.jsonl")}
    short, latin1 = (f"multimedia.txt line {len(edge_records()) + n}" for n in (3, 4))
    assert "3 columns, expected 15" in rejects[short]["message"] and rejects[short]["reason"] == "bad_row"
    assert "not valid UTF-8" in rejects[latin1]["message"] and "\ufffd.jpg" in rejects[latin1]["record"]
    rejects = {r["reason"]: r for r in rejects.values()}
    assert "999" in rejects["orphan_media"]["message"]
    assert "genus" in rejects["not_species_rank"]["message"]
    rows = {Path(r["image_url"]).stem: r for r in read_jsonl(tmp_path / "o" / "dataset_splits.jsonl")}
    assert set(rows) == {"own", "fallback", "author", "subspecies", "no_keys", "photo1", "photo2"}
    own, fallback = rows["own"], rows["fallback"]
    assert (own["license"], own["creator"], own["rights_holder"]) == ("cc-by", "Photo Person", "Photo Holder")
    assert own["meta"]["references"].startswith("https://www.inaturalist.org/photos/")
    assert (fallback["license"], fallback["creator"], fallback["rights_holder"]) == (
        "cc-by-nc",
        "Obs Person",
        "Occ Holder",
    )  # the occurrence's: dataset licence CC_BY_NC_4_0, recordedBy, rightsHolder
    assert rows["author"]["latin_name"] == "Abies alba" and rows["subspecies"]["latin_name"] == "Quercus ilex"
    assert rows["no_keys"]["plant_id"] == int(rows["no_keys"]["meta"]["gbifID"])  # no speciesKey/taxonKey
    assert rows["own"]["plant_id"] != rows["own"]["meta"]["gbifID"] and rows["own"]["country"] == "ES"
    assert rows["photo1"]["meta"]["gbifID"] == rows["photo2"]["meta"]["gbifID"]  # one occurrence, two images
    assert rows["photo1"]["meta"]["occurrenceID"] == "https://www.inaturalist.org/observations/77"


def write_meta(folder: Path, attrs: str, core_fields: str, media_fields: str) -> None:
    """A meta.xml for ``occ.csv`` (id in column 0) and ``media.csv`` (images by default type)."""
    (folder / "meta.xml").write_text(
        f'<archive xmlns="http://rs.tdwg.org/dwc/text/"><core {attrs} rowType="http://rs.tdwg.org/dwc/terms/Occurrence">'
        f'<files><location>occ.csv</location></files><id index="0"/>{core_fields}</core>'
        f'<extension {attrs} rowType="http://rs.gbif.org/terms/1.0/Multimedia">'
        f'<files><location>media.csv</location></files>{media_fields}'
        '<field term="http://purl.org/dc/terms/type" default="StillImage"/></extension></archive>',
        encoding="utf-8",
    )  # fmt: skip


def test_quoted_archive_honours_meta_xml(tmp_path):
    """An IPT-style archive: comma-separated, quoted, CRLF, Latin-1, coreid not first, a default type,
    columns in another order than the header."""
    folder = tmp_path / "ipt"
    folder.mkdir()
    occ = 'id,scientificName,countryCode\r\n"o1","Olea europaea L.","PT"\r\n"o2","Olea europaea L.",\r\n'
    media = (
        'title,coreid,url,creator\r\n"a, b",o1,http://127.0.0.1:9/x/1.jpg,"Jos\xe9"\r\n'
        '"two\r\nlines",o2,http://127.0.0.1:9/x/2.jpg,Ana\r\n'
    )
    (folder / "occ.csv").write_bytes(occ.encode("latin-1"))
    (folder / "media.csv").write_bytes(media.encode("latin-1"))
    attrs = 'encoding="ISO-8859-1" fieldsTerminatedBy="," linesTerminatedBy="\\r\\n" fieldsEnclosedBy="&quot;" ignoreHeaderLines="1"'  # noqa: E501
    write_meta(
        folder, attrs,
        '<field index="1" term="http://rs.tdwg.org/dwc/terms/scientificName"/>'
        '<field index="2" term="http://rs.tdwg.org/dwc/terms/countryCode" default="ES"/>',
        '<coreid index="1"/><field index="3" term="http://purl.org/dc/terms/creator"/>'
        '<field index="2" term="http://purl.org/dc/terms/identifier"/>',
    )  # fmt: skip
    got = list(DwcaSource(folder, DwcaConfig()))
    assert [position for position, _ in got] == ["media.csv line 2", "media.csv line 3"]
    first, second = (raw for _, raw in got)
    assert (first["latin_name"], first["creator"], first["country"]) == ("Olea europaea", "José", "PT")
    assert (second["image_url"], second["creator"], second["country"]) == (
        "http://127.0.0.1:9/x/2.jpg",
        "Ana",
        "ES",
    )


def test_a_quote_left_open_loses_no_other_row(tmp_path):
    """A quoted archive whose row 4 opens a quote it never closes: that row is a bad_row, and each line
    after it is read as its own row (none swallowed into the open field, none lost)."""
    folder = tmp_path / "open"
    folder.mkdir()
    (folder / "occ.csv").write_text('id,scientificName\n"o1","Olea europaea"\n', encoding="utf-8")
    rows = [f'o1,http://127.0.0.1:9/q/{i}.jpg,"Creator {i}"' for i in range(40)]
    rows[2] = 'o1,http://127.0.0.1:9/q/2.jpg,"Bob'
    (folder / "media.csv").write_text(
        "coreid,identifier,creator\n" + "\n".join(rows) + "\n", encoding="utf-8"
    )
    attrs = 'fieldsTerminatedBy="," linesTerminatedBy="\\n" fieldsEnclosedBy="&quot;" ignoreHeaderLines="1"'
    write_meta(
        folder, attrs,
        '<field index="1" term="http://rs.tdwg.org/dwc/terms/scientificName"/>',
        '<coreid index="0"/><field index="1" term="http://purl.org/dc/terms/identifier"/>'
        '<field index="2" term="http://purl.org/dc/terms/creator"/>',
    )  # fmt: skip
    got = list(DwcaSource(folder, DwcaConfig()))
    assert [position for position, _ in got] == [f"media.csv line {n}" for n in range(2, 42)]
    bad = [raw for _, raw in got if isinstance(raw, Unparseable)]
    assert len(bad) == 1 and bad[0].reason == "bad_row" and "a quote left open" in bad[0].message
    creators = [raw["creator"] for _, raw in got if not isinstance(raw, Unparseable)]
    assert creators == [f"Creator {i}" for i in range(40) if i != 2]


def test_command_line_on_an_archive(archives, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flora.sharding", "catalog", "--source", str(archives / "world.zip"),
         "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "records in =" in proc.stdout and "(ok)" in proc.stdout
    card = json.loads((tmp_path / "o" / "sources.json").read_text())["sources"][0]
    data = (archives / "world.zip").read_bytes()
    assert card["format"] == "dwca" and card["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["bytes"] == len(data) and card["pubDate"] == "2024-06-01"
    assert (
        card["doi"] == "10.15468/dl.fl0ra1" and card["title"] == "GBIF Occurrence Download 10.15468/dl.fl0ra1"
    )


def _meta(folder, old, new):
    meta = folder / "meta.xml"
    text = meta.read_text(encoding="utf-8")
    assert old in text
    meta.write_text(text.replace(old, new), encoding="utf-8")


_NAMED = "named in meta.xml, is missing"
_MEDIA_TYPE = 'rowType="http://rs.gbif.org/terms/1.0/Multimedia"'
#: How each broken archive is made (on a copy of a small written one) and what its error line says.
BROKEN = {
    "not_a_zip": (lambda f: None, "is not a ZIP archive (bad zip:"),
    "no_meta": (lambda f: (f / "meta.xml").unlink(), "has no meta.xml"),
    "meta_not_xml": (lambda f: (f / "meta.xml").write_text("core, but not <xml"), "meta.xml is not XML"),
    "no_core": (lambda f: _meta(f, "<core ", "<kern ") or _meta(f, "</core>", "</kern>"), "has no <core>"),
    "core_missing": (lambda f: (f / "occurrence.txt").unlink(), f"occurrence.txt, {_NAMED}"),
    "media_missing": (lambda f: (f / "multimedia.txt").unlink(), f"multimedia.txt, {_NAMED}"),
    "no_multimedia": (lambda f: _meta(f, _MEDIA_TYPE, 'rowType="http://example.org/Other"'), '"simple CSV"'),
    "no_identifier": (lambda f: _meta(f, "dc/terms/identifier", "dc/terms/notes"), "no identifier column"),
    "no_names": (
        lambda f: _meta(f, '/species"', '/x"') or _meta(f, "cientificName", "x") or _meta(f, "ricName", "x"),
        "no species or scientificName column",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_archives_are_one_line_and_write_nothing(case, world_records, tmp_path, capsys):
    folder = tmp_path / "a"
    write_dwca(world_records[:20], folder, zip=False)
    damage, expected = BROKEN[case]
    damage(folder)
    source = zip_folder(folder, tmp_path / "a.zip")
    if case == "not_a_zip":
        source.write_text("gbifID\tspecies\n1\tQuercus ilex\n")
    assert main(["catalog", "--source", str(source), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora catalog: error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "o").exists()


def test_corrupt_member_names_the_file(world_records, tmp_path, capsys):
    path = write_dwca(world_records, tmp_path / "a.zip").path
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("multimedia.txt")
    data = bytearray(path.read_bytes())
    middle = info.header_offset + 100 + info.compress_size // 2
    data[middle : middle + 64] = bytes(64)  # zeroed inside multimedia.txt's compressed bytes
    path.write_bytes(bytes(data))
    assert main(["catalog", "--source", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot read multimedia.txt in {path}" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_no_usable_record_says_what_the_archive_holds(tmp_path):
    base = {"plant_id": 1, "latin_name": "Quercus ilex", "source": "iNaturalist"}
    write_dwca([], tmp_path / "empty", zip=False)
    with pytest.raises(NoUsableRecordError, match="multimedia.txt has no rows"):
        catalog(tmp_path / "empty", tmp_path / "o")
    sounds = [{**base, "image_url": URL.format(i), "media_type": "Sound"} for i in range(2)]
    write_dwca(sounds, tmp_path / "sounds.zip")
    with pytest.raises(NoUsableRecordError, match="none of its 2 multimedia rows is a StillImage"):
        catalog(tmp_path / "sounds.zip", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def traced_peak(consume):
    """``consume()``'s result and the peak bytes of Python objects allocated while it ran."""
    tracemalloc.start()
    try:
        return consume(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_holds_no_table_whole(tmp_path, monkeypatch):
    records = generate_catalog(
        WorldSpec(n_records=20_000, n_species=300, seed=2), base_url="http://127.0.0.1:9"
    )
    write_dwca(records, tmp_path / "big.zip")
    del records
    with zipfile.ZipFile(tmp_path / "big.zip") as zf:
        data = sum(i.file_size for i in zf.infolist() if i.filename.endswith(".txt"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    source = DwcaSource(tmp_path / "big.zip", DwcaConfig())
    n, peak = traced_peak(lambda: sum(1 for _ in source))
    assert n == 20_000
    print(f"peak {peak:,} bytes of Python objects for {data:,} bytes of tables")
    # the tables held as Python strings would take several times their bytes; a stream holds a few rows
    assert peak < data / 3, f"peak {peak:,} bytes of Python objects for {data:,} bytes of tables"
    assert not list((tmp_path / "tmp").iterdir()), "the join's folder is removed"
    stopped = iter(source)
    next(stopped)
    assert list((tmp_path / "tmp").iterdir()), "the index exists while the rows are read"
    stopped.close()  # a reader stopped early (an error downstream) removes it too
    assert not list((tmp_path / "tmp").iterdir())
    shutil.rmtree(tmp_path / "tmp")


@pytest.mark.parametrize(
    ("occurrence", "expected"),
    [
        ({"species": "Quercus ilex"}, ("Quercus ilex", None)),
        ({"genericName": "Olea", "specificEpithet": "europaea"}, ("Olea europaea", None)),
        ({"scientificName": "Quercus ilex subsp. ballota (Desf.) Samp."}, ("Quercus ilex", None)),
        ({"scientificName": "Mentha × piperita L."}, ("Mentha ×piperita", None)),
        ({"scientificName": "Mentha ×piperita L."}, ("Mentha ×piperita", None)),
        ({"scientificName": "Quercus sp."}, (None, "names no species")),
        ({"scientificName": "Carex cf. nigra"}, (None, "names no species")),
        ({"scientificName": "Quercus L.", "taxonRank": "GENUS"}, (None, "identified to genus")),
        ({}, (None, None)),
    ],
)
def test_the_species_of_an_occurrence_without_an_interpreted_species(occurrence, expected):
    name, why = latin_name(occurrence)
    assert name == expected[0]
    assert (why is None) if expected[1] is None else (expected[1] in why)


@pytest.mark.parametrize("declared", ["\\n", "\\r\\n"])
@pytest.mark.parametrize("written", ["\n", "\r\n"])
def test_lines_end_as_the_file_ends_them_whatever_meta_xml_declares(tmp_path, declared, written):
    folder = tmp_path / "ends"
    folder.mkdir()
    occ = written.join(["id\tscientificName", "o1\tOlea europaea", ""])
    media = written.join(["coreid\tidentifier", *(f"o1\thttp://127.0.0.1:9/e/{i}.jpg" for i in range(3)), ""])
    (folder / "occ.csv").write_text(occ, encoding="utf-8", newline="")
    (folder / "media.csv").write_text(media, encoding="utf-8", newline="")
    attrs = (
        f'fieldsTerminatedBy="\\t" linesTerminatedBy="{declared}" fieldsEnclosedBy="" ignoreHeaderLines="1"'
    )
    write_meta(
        folder, attrs,
        '<field index="1" term="http://rs.tdwg.org/dwc/terms/scientificName"/>',
        '<coreid index="0"/><field index="1" term="http://purl.org/dc/terms/identifier"/>',
    )  # fmt: skip
    got = [raw for _, raw in DwcaSource(folder, DwcaConfig())]
    assert [raw["image_url"] for raw in got] == [f"http://127.0.0.1:9/e/{i}.jpg" for i in range(3)]
