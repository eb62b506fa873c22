"""The sample world as a GBIF occurrence download: a Darwin Core Archive in GBIF's own layout.

Owns ``write_dwca``: sample-world records (the JSONL input shape, e.g. ``generate_catalog``'s) -> the
files of a GBIF "Darwin Core Archive" download, as GBIF writes them: ``occurrence.txt`` (the interpreted
core), ``multimedia.txt`` (the Multimedia extension, one row per image), ``verbatim.txt``, ``meta.xml``,
``metadata.xml`` (the download's EML: title, pubDate, DOI), ``citations.txt``, ``rights.txt`` and
``dataset/<datasetKey>.xml``; tab-separated, no quoting, UTF-8, one header line; zipped or as a folder.
The occurrence columns are a subset of GBIF's ~220, in GBIF's order (the reader takes columns by
meta.xml's ``index``, so the subset takes the same path); multimedia has GBIF's 15 columns.

How records become rows: images are grouped into occurrences by ``observation_id`` (top level or in
``meta``) when their occurrence-level fields agree, else each record is its own occurrence. Each source
is one dataset with its own licence (GBIF's enum, e.g. ``CC_BY_NC_4_0``): the record's own ``license``
spelling goes on its image, so an image without one falls back to the dataset's. The creator (the
world's ``observer`` / ``photographer``, else a name derived from the URL) is the image's ``creator``
and ``rightsHolder`` and the occurrence's ``recordedBy``. ``species`` holds the interpreted name, the raw
spelling goes to ``verbatimScientificName``; ``speciesKey``/``taxonKey`` are derived from the name (a
record without ``plant_id`` gets none, so a reader falls back to gbifID: the one invalidity the format
cannot carry). Invalid names and URLs are written as they are (tabs and line breaks become spaces, as
GBIF does). Tests shape rows through two optional record keys: ``media_type`` (``Sound``, ...) and
``dwca`` (``{"occurrence": {...}, "multimedia": {...}}``, column values that override the derived ones).

Streams: rows are written as records arrive; only the observation ids seen are held.

Leaves out: reading archives (sharding/catalog/dwca.py), GBIF's other download formats.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from world import tables

NS = {
    "dc": "http://purl.org/dc/terms/",
    "dwc": "http://rs.tdwg.org/dwc/terms/",
    "gbif": "http://rs.gbif.org/terms/1.0/",
}
#: occurrence.txt's columns: a subset of GBIF's, in GBIF's order (namespace:name).
OCCURRENCE_COLUMNS = """
gbif:gbifID dc:accessRights dc:bibliographicCitation dc:language dc:license dc:modified dc:publisher
dc:references dc:rightsHolder dc:type dwc:institutionCode dwc:collectionCode dwc:datasetName
dwc:basisOfRecord dwc:occurrenceID dwc:catalogNumber dwc:recordNumber dwc:recordedBy dwc:individualCount
dwc:occurrenceStatus dwc:occurrenceRemarks dwc:eventDate dwc:year dwc:month dwc:day dwc:verbatimEventDate
dwc:habitat dwc:continent dwc:countryCode dwc:stateProvince dwc:locality dwc:decimalLatitude
dwc:decimalLongitude dwc:coordinateUncertaintyInMeters dwc:identifiedBy dwc:dateIdentified dwc:taxonID
dwc:scientificName dwc:kingdom dwc:phylum dwc:class dwc:order dwc:family dwc:genus dwc:genericName
dwc:specificEpithet dwc:infraspecificEpithet dwc:taxonRank dwc:vernacularName dwc:taxonomicStatus
gbif:datasetKey gbif:publishingCountry gbif:lastInterpreted gbif:issue gbif:mediaType gbif:hasCoordinate
gbif:hasGeospatialIssues gbif:taxonKey gbif:acceptedTaxonKey gbif:kingdomKey gbif:genusKey
gbif:speciesKey gbif:species gbif:acceptedScientificName gbif:verbatimScientificName gbif:protocol
gbif:lastParsed gbif:lastCrawled gbif:repatriated
""".split()  # noqa: SIM905
#: multimedia.txt's columns, exactly GBIF's.
MULTIMEDIA_COLUMNS = """
gbif:gbifID dc:type dc:format dc:identifier dc:references dc:title dc:description dc:source dc:audience
dc:created dc:creator dc:contributor dc:publisher dc:license dc:rightsHolder
""".split()  # noqa: SIM905
VERBATIM_COLUMNS = """
gbif:gbifID dwc:occurrenceID dwc:scientificName dwc:country dwc:stateProvince dwc:recordedBy
""".split()  # noqa: SIM905
#: The datasets of the world's sources: key, title, publisher, licence (GBIF's enum), occurrence page.
DATASETS: dict[str, tuple[str, str, str, str, str]] = {
    "iNaturalist": ("50c9509d-22c7-4a22-a47d-8c48425ef4a7", "iNaturalist Research-grade Observations",
                    "iNaturalist.org", "CC_BY_NC_4_0", "https://www.inaturalist.org/observations/{}"),
    "Legacy": ("7e380070-f762-11e1-a439-00145eb45e9a", "Legacy herbarium photographs",
               "Flora Legacy Herbarium", "CC_BY_4_0", "https://legacy.example.org/specimen/{}"),
    "Perenual": ("b1047888-ae52-4179-9dd5-5448ea342a24", "Perenual plant images", "Perenual", "CC0_1_0", ""),
}  # fmt: skip
OTHER_DATASET = ("00000000-0000-4000-8000-000000000000", "Other images", "Unknown publisher", "CC_BY_4_0", "")
FIRST_GBIF_ID = 4_000_000_001
LAST_INTERPRETED = "2024-06-01T10:12:31.442Z"
DOWNLOAD_KEY = "0000001-240601123456789"


@dataclass
class DwcaWritten:
    """What ``write_dwca`` wrote."""

    path: Path
    occurrences: int = 0
    media_rows: int = 0
    datasets: dict[str, int] = field(default_factory=dict)


def _clean(value: Any) -> str:
    """A cell as GBIF writes it: no tab or line break (they become spaces), None as empty."""
    if value is None:
        return ""
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _row(columns: list[str], values: Mapping[str, Any]) -> str:
    return "\t".join(_clean(values.get(c.split(":", 1)[1])) for c in columns) + "\n"


def _species(name: Any) -> str:
    """The interpreted species of a raw name ("  quercus ILEX" -> "Quercus ilex"); "" if it has none."""
    words = name.split() if isinstance(name, str) else []
    if len(words) < 2:
        return ""
    return " ".join([words[0].capitalize(), *(w.lower() for w in words[1:])])


def _creator(record: Mapping[str, Any]) -> str:
    for key in ("observer", "photographer", "creator"):
        if record.get(key):
            return str(record[key])
    url = str(record.get("image_url", ""))
    return f"Perenual contributor {zlib.crc32(url.encode()) % 997}"


def _country(record: Mapping[str, Any]) -> str:
    """GBIF's interpreted countryCode: an ISO code from a code or a name; "" if none."""
    raw = str(record.get("country") or "").strip()
    if len(raw) == 2 and raw.isalpha():
        return raw.upper()
    return {name.lower(): iso for iso, name in tables.COUNTRY_NAMES.items()}.get(raw.lower(), "")


def _event_date(record: Mapping[str, Any]) -> str:
    if record.get("observed_on"):
        return str(record["observed_on"])
    day = str(record.get("date") or "")
    parts = day.split("/")
    return f"{parts[2]}-{parts[1]}-{parts[0]}" if len(parts) == 3 else day


def _observation(record: Mapping[str, Any]) -> Any:
    meta = record.get("meta")
    return record.get("observation_id") or (meta.get("observation_id") if isinstance(meta, Mapping) else None)


def _occurrence(record: Mapping[str, Any], gbif_id: int, dataset: tuple, creator: str) -> dict[str, Any]:
    """The occurrence.txt values of a record's occurrence."""
    key, title, publisher, license_, page = dataset
    species = _species(record.get("latin_name"))
    obs = _observation(record)
    genus, _, epithet = species.partition(" ")
    species_key = 2_000_000 + zlib.crc32(species.encode()) % 8_000_000 if species else ""
    has_id = record.get("plant_id") is not None
    date = _event_date(record)
    return {
        "gbifID": gbif_id, "license": license_, "publisher": publisher,
        "references": page.format(obs) if page and obs else "", "rightsHolder": creator,
        "institutionCode": record.get("source") or "", "collectionCode": record.get("collection") or "",
        "datasetName": title,
        "basisOfRecord": "PRESERVED_SPECIMEN" if record.get("collection") else "HUMAN_OBSERVATION",
        "occurrenceID": page.format(obs) if page and obs else f"urn:flora:{record.get('source')}:{gbif_id}",
        "catalogNumber": obs or gbif_id, "recordedBy": creator, "occurrenceStatus": "PRESENT",
        "eventDate": date, "year": date[:4] if date[:4].isdigit() else "",
        "month": date[5:7].lstrip("0") if len(date) >= 7 else "",
        "day": date[8:10].lstrip("0") if len(date) >= 10 else "",
        "countryCode": _country(record), "stateProvince": record.get("region") or "", "identifiedBy": creator,
        "taxonID": record.get("plant_id"),
        "scientificName": f"{species} L." if species else "", "kingdom": "Plantae" if species else "",
        "genus": genus, "genericName": genus, "specificEpithet": epithet,
        "taxonRank": "SPECIES" if species else "", "vernacularName": record.get("common_name") or "",
        "taxonomicStatus": "ACCEPTED" if species else "", "datasetKey": key, "publishingCountry": "",
        "lastInterpreted": LAST_INTERPRETED, "issue": "" if _country(record) else "COUNTRY_INVALID",
        "mediaType": "StillImage", "hasCoordinate": "false", "hasGeospatialIssues": "false",
        "taxonKey": species_key if has_id else "", "acceptedTaxonKey": species_key if has_id else "",
        "kingdomKey": 6 if species else "", "speciesKey": species_key if has_id else "",
        "species": species, "acceptedScientificName": f"{species} L." if species else "",
        "verbatimScientificName": record.get("latin_name") or "", "protocol": "DWC_ARCHIVE",
        "lastParsed": LAST_INTERPRETED, "lastCrawled": LAST_INTERPRETED, "repatriated": "false",
    }  # fmt: skip


def _media(record: Mapping[str, Any], gbif_id: int, n: int, dataset: tuple, creator: str) -> dict[str, Any]:
    """The multimedia.txt values of a record's image."""
    kind = record.get("media_type") or "StillImage"
    url = str(record.get("image_url") or "")
    ext = url.rsplit("?", 1)[0].rsplit(".", 1)[-1].lower()
    fmt = {"Sound": "audio/mpeg", "MovingImage": "video/mp4"}.get(
        kind, "image/png" if ext == "png" else "image/jpeg"
    )
    return {
        "gbifID": gbif_id, "type": kind, "format": fmt, "identifier": record.get("image_url"),
        "references": f"https://www.inaturalist.org/photos/{n}" if dataset is DATASETS["iNaturalist"] else "",
        "created": _event_date(record), "creator": creator, "publisher": dataset[2],
        "license": record.get("license"), "rightsHolder": creator,
    }  # fmt: skip


def _meta_xml(files: list[tuple[str, str, str, list[str]]]) -> str:
    """meta.xml for ``(tag, rowType, file, columns)`` sections, as GBIF writes it."""
    out = ['<?xml version="1.0" encoding="utf-8"?>\n']
    out.append('<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="metadata.xml">\n')
    for tag, row_type, name, columns in files:
        key = "id" if tag == "core" else "coreid"
        out.append(
            f'  <{tag} encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy="" '
            f'ignoreHeaderLines="1" rowType="{row_type}">\n    <files>\n      <location>{name}</location>\n'
            f'    </files>\n    <{key} index="0" />\n'
        )
        for i, column in enumerate(columns):
            ns, term = column.split(":", 1)
            out.append(f'    <field index="{i}" term="{NS[ns]}{term}"/>\n')
        out.append(f"  </{tag}>\n")
    return "".join(out) + "</archive>\n"


def _eml(title: str, pub_date: str, doi: str, abstract: str) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<eml:eml xmlns:eml="https://eml.ecoinformatics.org/eml-2.2.0" '
        'xmlns:dc="http://purl.org/dc/terms/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="https://eml.ecoinformatics.org/eml-2.2.0 https://rs.gbif.org/schema/eml-gbif-profile'
        f'/1.2/eml.xsd" packageId="{escape(doi)}" system="http://gbif.org" scope="system" xml:lang="en">\n'
        f"  <dataset>\n    <alternateIdentifier>{escape(doi)}</alternateIdentifier>\n"
        f"    <title>{escape(title)}</title>\n    <creator>\n      <organizationName>GBIF Download Service"
        f"</organizationName>\n    </creator>\n    <pubDate>{escape(pub_date)}</pubDate>\n"
        f"    <language>ENGLISH</language>\n"
        f"    <abstract>\n      <para>{escape(abstract)}</para>\n    </abstract>\n"
        "  </dataset>\n</eml:eml>\n"
    )


def _headers(columns: list[str]) -> str:
    return "\t".join(c.split(":", 1)[1] for c in columns) + "\n"


def write_dwca(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    zip: bool = True,  # noqa: A002 - the brief's name: a .zip or an unpacked folder
    pub_date: str = "2024-06-01",
    doi: str = "10.15468/dl.fl0ra1",
) -> DwcaWritten:
    """Writes ``records`` as a GBIF Darwin Core Archive download (module docstring).

    Args:
        records: Records in the JSONL input shape, any iterable (read once, as a stream).
        path: The ``.zip`` to write (``zip=True``) or the folder (created; its archive files replaced).
        zip: Whether to write a zip (deflated) or an unpacked folder.
        pub_date: The EML ``pubDate``.
        doi: The download's DOI (EML ``packageId`` and ``alternateIdentifier``, the title).

    Returns:
        The path and the counts of occurrences, multimedia rows and rows per dataset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="dwca-", dir=path.parent)) if zip else path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = _write_files(records, folder, pub_date, doi)
        if zip:
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for file in sorted(folder.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(folder).as_posix())
    finally:
        if zip:
            shutil.rmtree(folder, ignore_errors=True)
    written.path = path
    return written


def _write_files(records: Iterable[Mapping[str, Any]], folder: Path, pub_date: str, doi: str) -> DwcaWritten:
    written = DwcaWritten(folder)
    seen: dict[Any, tuple[int, int]] = {}  # observation id -> (gbifID, hash of its occurrence fields)
    names = ("occurrence", "multimedia", "verbatim")
    files = {n: open(folder / f"{n}.txt", "w", encoding="utf-8", newline="\n") for n in names}  # noqa: SIM115
    try:
        files["occurrence"].write(_headers(OCCURRENCE_COLUMNS))
        files["multimedia"].write(_headers(MULTIMEDIA_COLUMNS))
        files["verbatim"].write(_headers(VERBATIM_COLUMNS))
        for record in records:
            source = str(record.get("source") or "")
            dataset = DATASETS.get(source, OTHER_DATASET)
            creator = _creator(record)
            overrides = record.get("dwca") or {}
            obs = _observation(record)
            fields = [record.get(k) for k in ("plant_id", "latin_name", "country", "region")]
            signature = hash(repr((fields, creator, source)))
            if obs is not None and obs in seen and seen[obs][1] == signature:
                gbif_id = seen[obs][0]
            else:
                gbif_id = FIRST_GBIF_ID + written.occurrences
                written.occurrences += 1
                written.datasets[dataset[0]] = written.datasets.get(dataset[0], 0) + 1
                if obs is not None:
                    seen[obs] = (gbif_id, signature)
                occ = {**_occurrence(record, gbif_id, dataset, creator), **overrides.get("occurrence", {})}
                files["occurrence"].write(_row(OCCURRENCE_COLUMNS, occ))
                verbatim = {
                    **occ,
                    "scientificName": record.get("latin_name"),
                    "country": record.get("country"),
                }
                files["verbatim"].write(_row(VERBATIM_COLUMNS, verbatim))
            written.media_rows += 1
            media = {
                **_media(record, gbif_id, written.media_rows, dataset, creator),
                **overrides.get("multimedia", {}),
            }
            files["multimedia"].write(_row(MULTIMEDIA_COLUMNS, media))
    finally:
        for fh in files.values():
            fh.close()
    _write_descriptors(folder, written, pub_date, doi)
    return written


def _write_descriptors(folder: Path, written: DwcaWritten, pub_date: str, doi: str) -> None:
    """meta.xml, metadata.xml, citations.txt, rights.txt and dataset/*.xml."""
    core_type, media_type = (
        "http://rs.tdwg.org/dwc/terms/Occurrence",
        "http://rs.gbif.org/terms/1.0/Multimedia",
    )
    sections = [
        ("core", core_type, "occurrence.txt", OCCURRENCE_COLUMNS),
        ("extension", media_type, "multimedia.txt", MULTIMEDIA_COLUMNS),
        ("extension", core_type, "verbatim.txt", VERBATIM_COLUMNS),
    ]
    (folder / "meta.xml").write_text(_meta_xml(sections), encoding="utf-8")
    used = [d for d in (*DATASETS.values(), OTHER_DATASET) if d[0] in written.datasets]
    abstract = (
        f"A dataset containing all occurrences available in GBIF matching the query: MediaType StillImage. "
        f"The dataset includes {written.occurrences} records from {len(used)} constituent datasets."
    )
    title = f"GBIF Occurrence Download {doi}"
    (folder / "metadata.xml").write_text(_eml(title, pub_date, doi, abstract), encoding="utf-8")
    citation = f"GBIF.org ({pub_date}) GBIF Occurrence Download https://doi.org/{doi}"
    lines = [
        "When using this dataset please use the following citation and pay attention to the rights "
        f"documented in rights.txt:\n{citation}\n\nData from some individual datasets included in this "
        "download may be licensed under less restrictive terms; review the details below.\n\n"
    ]
    lines += [
        f"{d[2]} ({pub_date}). {d[1]}. Occurrence dataset https://doi.org/10.15468/{d[0][:6]}\n" for d in used
    ]
    (folder / "citations.txt").write_text("".join(lines), encoding="utf-8")
    rights = [f"Dataset: {d[1]}\nRights as supplied: {d[3]}\n\n" for d in used]
    (folder / "rights.txt").write_text("".join(rights), encoding="utf-8")
    (folder / "dataset").mkdir(exist_ok=True)
    for key, dataset_title, publisher, _license, _page in used:
        text = _eml(dataset_title, pub_date, f"10.15468/{key[:6]}", f"Occurrences published by {publisher}.")
        (folder / "dataset" / f"{key}.xml").write_text(text, encoding="utf-8")
