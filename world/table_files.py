"""The sample world's records written as tables: CSV, TSV (optionally ``.gz``) or Parquet.

Owns ``write_table``: records (dicts as ``generate_catalog`` makes them) -> one table file, a column per
field (``WORLD_FIELDS``: the input fields the world fills and the extras of its sources; a record's
``meta`` mapping is flattened into columns too), optionally renamed (``columns``: input field -> column,
as the catalog config's ``columns``), so that tests read the same world through the column mapping.
It streams: records are taken from any iterable, CSV rows written one by one, Parquet in row groups of
``row_group`` rows (``pyarrow.parquet.ParquetWriter``), so a benchmark can write 900,000 rows.

Types: CSV holds text (a missing value is an empty field). Parquet keeps the world's types where a
column has one (``observation_id`` and ``perenual_image_id`` int64, ``observed_on`` a date);
``plant_id`` is a string column, since the world mixes integer and ``perenual-N`` ids.

Leaves out: reading tables (sharding/catalog/tables.py), generating records (generate.py).
"""

from __future__ import annotations

import csv
import datetime
import gzip
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: The world's columns and their Parquet types ("string", "int64" or "date"), in file order.
WORLD_FIELDS: tuple[tuple[str, str], ...] = (
    ("plant_id", "string"), ("latin_name", "string"), ("image_url", "string"), ("license", "string"),
    ("source", "string"), ("country", "string"), ("region", "string"), ("creator", "string"),
    ("rights_holder", "string"), ("license_url", "string"),
    ("observation_id", "int64"), ("observed_on", "date"), ("observer", "string"),
    ("quality_grade", "string"), ("collection", "string"), ("photographer", "string"), ("date", "string"),
    ("common_name", "string"), ("perenual_image_id", "int64"), ("cycle", "string"),
)  # fmt: skip
TABLE_FORMATS = ("csv", "tsv", "parquet")
#: Parquet rows per row group: a few MB of the world's rows, as writers of real exports use.
ROW_GROUP = 50_000


def _flat(record: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """A record with its ``meta`` mapping flattened; ValueError for a key outside ``known``."""
    flat = {k: v for k, v in record.items() if k != "meta"}
    if isinstance(record.get("meta"), Mapping):
        flat.update(record["meta"])
    extra = sorted(set(flat) - known)
    if extra:
        raise ValueError(f"record keys {extra} are not table columns (fields=): {sorted(known)}")
    return flat


def write_table(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    fmt: str,
    columns: Mapping[str, str] | None = None,
    fields: tuple[tuple[str, str], ...] = WORLD_FIELDS,
    row_group: int = ROW_GROUP,
) -> int:
    """Writes ``records`` as one table.

    Args:
        records: The world's records (any iterable; consumed once).
        path: The file; a ``.gz`` suffix gzips a CSV or TSV.
        fmt: ``csv``, ``tsv`` or ``parquet``.
        columns: Input field -> the column name written for it (others keep their names).
        fields: The columns and their Parquet types (``WORLD_FIELDS``).
        row_group: Parquet rows per row group.

    Returns:
        The number of rows written.
    """
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"fmt must be one of {TABLE_FORMATS}, got {fmt!r}")
    renamed = {name: (columns or {}).get(name, name) for name, _ in fields}
    if len(set(renamed.values())) != len(renamed):
        raise ValueError(f"columns gives two fields one name: {dict(columns or {})}")
    rows = (_flat(record, set(renamed)) for record in records)
    if fmt == "parquet":
        return _write_parquet(rows, Path(path), renamed, dict(fields), row_group)
    return _write_text(rows, Path(path), renamed, "," if fmt == "csv" else "\t")


def _write_text(rows: Iterable[dict], path: Path, renamed: dict[str, str], delimiter: str) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)  # RFC 4180: quotes where needed, \r\n line ends
        writer.writerow(renamed.values())
        for row in rows:
            writer.writerow("" if row.get(name) is None else row[name] for name in renamed)
            count += 1
    return count


def _parquet_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "date":
        return value if isinstance(value, datetime.date) else datetime.date.fromisoformat(value)
    return str(value) if kind == "string" else value


def _write_parquet(
    rows: Iterable[dict], path: Path, renamed: dict[str, str], kinds: dict[str, str], row_group: int
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "int64": pa.int64(), "date": pa.date32()}
    schema = pa.schema([(renamed[name], types[kinds[name]]) for name in renamed])
    count = 0
    buffer: dict[str, list] = {name: [] for name in renamed}

    def flush(writer) -> None:
        data = {renamed[name]: values for name, values in buffer.items()}
        writer.write_table(pa.Table.from_pydict(data, schema=schema), row_group_size=row_group)
        for values in buffer.values():
            values.clear()

    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            for name, values in buffer.items():
                values.append(_parquet_value(row.get(name), kinds[name]))
            count += 1
            if count % row_group == 0:
                flush(writer)
        if count % row_group or not count:
            flush(writer)
    return count
