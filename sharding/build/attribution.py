"""``ATTRIBUTION.csv``: the credits of every image a build publishes, one row per live sample.

Owns ``write_attribution``: the file's rows (``COLUMNS``: the sample key, its split and region, the
species, who made the photo and holds its rights, its licence and the licence's deed, the image's
page at its source and the image URL), RFC 4180 CSV (the csv module: CRLF line ends, fields quoted
where needed, a header line), sorted by split, region and key, so that the same published set
always gives the same bytes; and its facts for the manifest (``rows``, ``without_creator``,
``without_record``).

Which samples: the live ones of the published set (every tar the manifest lists, the shards an
incremental build kept included, tombstones excluded), read from the tars' DALI indexes (``.idx``:
one line per sample, no image bytes read). Their credits come from the catalog's
``dataset_splits.jsonl`` of this build, not from the samples' ``json`` members, so a shard written
before the credit fields existed (kept by an incremental build; its jsons lack them) is credited
all the same. A live sample with no catalog row (never expected: the build's records come from
that file) still gets its row, with the credit fields empty, and is counted as ``without_record``.

Memory stays flat at any size: the live keys and the matching catalog rows go into a SQLite file in
the work area (removed afterwards), which also sorts; the catalog file is streamed.

Leaves out: committing the file with the other logs (finalize.py's ``OutputSet``), publishing it to
an object store (remote.py uploads every top-level file of the staging folder), and the credit
fields themselves (the catalog: sharding/catalog/records.py).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from flora.sharding.catalog.records import url_key
from flora.sharding.format.schema import read_index, safe_key, source_link

#: The columns, in order.
COLUMNS = ("key", "split", "region", "latin_name", "creator", "rights_holder", "license", "license_url",
           "source_link", "image_url")  # fmt: skip
#: The catalog fields stored per live sample (``COLUMNS`` less key, split and region).
_CREDITS = COLUMNS[3:]
#: The SQLite file of live keys and their credits, in the work area (removed when done).
INDEX_FILE = "attribution.sqlite"
#: Catalog rows looked up per statement.
BATCH = 2000
#: SQLite's page cache for the index (KiB): its B-trees of ~1M keys mostly in memory, memory still bounded.
CACHE_KIB = 64 * 1024


def write_attribution(fh: TextIO, out: Path, shards: list[dict], splits_path: Path, work: Path) -> dict:
    """Writes the CSV of the live samples of ``shards`` (manifest entries under ``out``) to ``fh``,
    credits from the catalog at ``splits_path``; returns ``{rows, without_creator, without_record}``."""
    path = work / INDEX_FILE
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{CACHE_KIB}"):
            db.execute(f"PRAGMA {pragma}")  # a scratch file: nothing to recover after a crash
        db.execute("CREATE TABLE live (key TEXT PRIMARY KEY, split TEXT, region TEXT) WITHOUT ROWID")
        columns = ", ".join(f"{c} TEXT" for c in _CREDITS)
        db.execute(f"CREATE TABLE credit (key TEXT PRIMARY KEY, {columns}) WITHOUT ROWID")
        for shard in shards:
            db.executemany("INSERT OR IGNORE INTO live VALUES (?, ?, ?)", _live(out, shard))
        slots = ", ".join("?" * (len(_CREDITS) + 1))
        insert = (
            f"INSERT OR IGNORE INTO credit SELECT {slots} WHERE EXISTS (SELECT 1 FROM live WHERE key = ?)"
        )
        batch = []
        for row in _catalog(splits_path):
            batch.append((*row, row[0]))
            if len(batch) >= BATCH:
                db.executemany(insert, batch)
                batch.clear()
        db.executemany(insert, batch)
        return _write(fh, db)
    finally:
        db.close()
        path.unlink(missing_ok=True)


def _live(out: Path, shard: dict) -> Iterator[tuple[str, str, str]]:
    """(key, split, region) of each sample of a listed tar that is not a tombstone."""
    tombstones = set(shard.get("tombstones", ()))
    for sample in read_index(out / shard["path"]):
        name = next(iter(sample.values()))[2]
        key = name.rsplit("/", 1)[-1].split(".", 1)[0]
        if key not in tombstones:
            yield key, shard["split"], shard["region"]


def _catalog(splits_path: Path) -> Iterator[tuple]:
    """(key, *credits) of each readable row of the catalog's splits file, streamed."""
    with open(splits_path, "rb") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                key = safe_key(url_key(row["image_url"]))
            except (ValueError, KeyError, TypeError):
                continue  # the plan refuses or counts damaged lines; such a record is never sharded
            credits = {**row, "source_link": source_link(row)}
            yield key, *(_text(credits.get(c)) for c in _CREDITS)


def _text(value) -> str | None:
    return None if value is None else str(value)


def _write(fh: TextIO, db: sqlite3.Connection) -> dict:
    writer = csv.writer(fh, lineterminator="\r\n")  # RFC 4180
    writer.writerow(COLUMNS)
    rows = without_creator = without_record = 0
    query = (
        f"SELECT live.key, split, region, {', '.join(_CREDITS)}, credit.key IS NULL "
        "FROM live LEFT JOIN credit USING (key) ORDER BY split, region, live.key"
    )
    for *row, missing in db.execute(query):
        writer.writerow(["" if v is None else v for v in row])
        rows += 1
        without_record += missing
        without_creator += not row[COLUMNS.index("creator")]
    return {"rows": rows, "without_creator": without_creator, "without_record": without_record}
