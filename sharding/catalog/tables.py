"""CSV, TSV and Parquet tables as a catalog source, read through the config's column mapping.

Owns ``TableSource`` (formats.py opens it for ``csv``, ``tsv`` and ``parquet``): each row of a table
becomes one raw record in the JSONL input shape (records.py). Each input field (``plant_id``,
``latin_name``, ``image_url``, ``license``, ``source``, ``country``, ``region``, ``creator``,
``rights_holder``, ``license_url``) is read from the column the config's ``columns`` names for it, else
from the column of its own name; every other column goes to ``meta`` (a column that carries a field's
name but is not that field's column goes to ``meta`` too, never into the field).

* CSV / TSV (``.csv``, ``.tsv``, ``.tab``, each optionally ``.gz``): read with the ``csv`` module, a
  header line first; RFC 4180 quoting (delimiters, doubled quotes and line breaks inside quotes), a
  UTF-8 byte order mark, ``\\r\\n`` line ends, ``table.delimiter`` (default ``,`` for csv, tab for tsv)
  and ``table.encoding`` (one whose line break is the byte 0x0A). CSV has no null: an empty value is
  a missing one. Values stay strings (a ``plant_id`` of digits is the string ``"40123"``). Memory:
  one row at a time, and a row is at most ``MAX_ROW_BYTES``; a longer one (a 5 MB line, or an
  unterminated quote swallowing the lines after it) is one ``bad_row`` and reading goes on at the next
  line. A row whose field count differs from the header's, or that breaks the quoting rules, is a
  ``bad_row`` at the line where it starts; when it spans lines (a quote left open, within
  ``REREAD_CHARS``), only its first line is, and the lines after it are read again as rows.
* Parquet (``.parquet``, ``.pq``): pyarrow, one batch of ``table.batch_rows`` rows in memory at a time.
  Values keep their types (nulls are missing values; dates and timestamps become ISO strings, decimals
  strings, bytes hex, so that every value fits in JSON). ``count`` is the footer's row count.

A table that cannot be read at all is a ``SourceError`` (one line): an empty file or one without a
header, a header that is JSON, does not split on the delimiter, or lacks a column the mapping needs
(naming the file and the columns found), a byte that is not ``table.encoding`` text (naming its line),
a corrupt gzip stream (naming the line after which it failed), a file that is not Parquet, one pyarrow
cannot read. A name in ``columns`` that is no input field is a ``ConfigError``.

Leaves out: validation and normalisation of the values (records.py), type guessing of CSV text,
Excel files, multi-file Parquet datasets (name each file as a ``--source``).
"""

from __future__ import annotations

import codecs
import csv
import datetime
import decimal
import gzip
import math
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flora.config import ConfigError
from flora.sharding.catalog.records import INPUT_FIELDS, REQUIRED_FIELDS
from flora.sharding.catalog.sources import SourceError, Unparseable
from flora.sharding.config import TableConfig

#: Longest CSV row, in bytes (a field is at most a row): far above any real record (a few hundred
#: bytes), small enough that a runaway quote or a binary blob costs a bounded amount of memory.
#: The longest run of lines a quote left open may hold and still be read again line by line.
REREAD_CHARS = 1 << 16
MAX_ROW_BYTES = 1 << 20
#: Parquet: bytes read at a time from a column chunk (pyarrow's buffered stream; its default reads a
#: row group's column chunks whole, 33 MB for 50,000 of the sample world's rows, 7 MB this way).
STREAM_BUFFER = 64 * 1024
#: Bytes read at a time while skipping the rest of an oversized row's line.
SKIP_BYTES = 64 * 1024
#: Characters of a bad row kept in ``rejects.jsonl``.
SHOWN_CHARS = 200
#: Columns named in a one-line message before "... N more".
COLUMNS_SHOWN = 20
_DEFAULT_DELIMITER = {"csv": ",", "tsv": "\t"}
#: Separators a header that does not split on the configured delimiter is tried with (``diagnose``).
_OTHER_DELIMITERS = (",", "\t", ";", "|")
_READ_ERRORS = (OSError, EOFError, zlib.error)
_PARQUET_MAGIC = b"PAR1"


class _Oversize(Exception):
    """A CSV row grew past ``MAX_ROW_BYTES`` (raised through csv.reader, which starts afresh after it)."""


def _shown(names: list[str]) -> str:
    more = f", ... {len(names) - COLUMNS_SHOWN} more" if len(names) > COLUMNS_SHOWN else ""
    return ", ".join(names[:COLUMNS_SHOWN]) + more


def resolve_columns(columns: dict[str, str], found: list[str], where: str) -> dict[str, str]:
    """Each input field -> the table column it is read from (module docstring); ConfigError for a
    name in ``columns`` that is no input field, SourceError for a column the mapping needs that
    ``found`` lacks."""
    unknown = [name for name in columns if name not in INPUT_FIELDS]
    if unknown:
        raise ConfigError(
            f"columns: {', '.join(map(repr, unknown))} is not an input field; expected some of "
            f"{', '.join(INPUT_FIELDS)} (columns: {{field: table column}})"
        )
    mapping, present = {}, set(found)
    for name in INPUT_FIELDS:
        column = columns.get(name, name)
        if column in present:
            mapping[name] = column
        elif name in columns:
            raise SourceError(
                f"columns.{name} names column {column!r}, which {where} lacks (its columns: {_shown(found)})"
            )
    missing = [name for name in REQUIRED_FIELDS if name not in mapping]
    if missing:
        hint = ", ".join(f"{name}: <column>" for name in missing)
        raise SourceError(
            f"{where} has no column for {', '.join(missing)} (its columns: {_shown(found)}); map them "
            f"with the config's columns: {{{hint}}} (or columns.{missing[0]}=<column> on the command line)"
        )
    return mapping


def _jsonable(value: Any) -> Any:
    """A Parquet value as JSON can hold it (module docstring); None for a null or a NaN."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class TableSource:
    """A CSV, TSV or Parquet table (module docstring); ``TableSource(...)`` gives the reader of ``fmt``."""

    unit = "row"

    def __new__(cls, path: str | Path, fmt: str, columns: dict[str, str], cfg: TableConfig):
        if cls is TableSource:
            cls = ParquetTable if fmt == "parquet" else CsvTable
        return super().__new__(cls)

    def __init__(self, path: str | Path, fmt: str, columns: dict[str, str], cfg: TableConfig):
        self.path, self.fmt, self.cfg = Path(path), fmt, cfg
        if not self.path.is_file():
            raise SourceError(f"source file not found: {self.path}")
        #: The table's columns, and for each: the raw record's key and whether it goes under ``meta``.
        self.found: list[str] = []
        self._keys: list[tuple[str, bool]] = []
        #: Rows the last read yielded, and how many of them were bad rows (for ``diagnose``).
        self.rows_read = 0
        self.bad_rows = 0
        self._open(columns)

    def _open(self, columns: dict[str, str]) -> None:
        raise NotImplementedError

    def _map(self, columns: dict[str, str], found: list[str]) -> None:
        """Sets ``found`` and each column's key in the raw record (a field, or a ``meta`` key)."""
        mapping = resolve_columns(columns, found, f"{self.fmt} file {self.path}")
        field_of = {column: name for name, column in mapping.items()}
        self.found = found
        self._keys = []
        for column in found:
            if column in field_of:
                self._keys.append((field_of[column], False))
            else:  # an extra column: top-level (records.py moves it to meta) unless it looks like a field
                self._keys.append((column, column in INPUT_FIELDS or column == "meta"))

    def _record(self, values: list[Any] | tuple[Any, ...], empty_is_missing: bool) -> dict[str, Any]:
        """One row's values (in column order) -> the raw record; nulls (and, for CSV, empty strings)
        are missing values, left out."""
        raw: dict[str, Any] = {}
        for (key, nested), value in zip(self._keys, values, strict=True):
            if value is None or (empty_is_missing and value == ""):
                continue
            if nested:
                raw.setdefault("meta", {})[key] = value
            else:
                raw[key] = value
        return raw

    def describe(self) -> str:
        return f"{self.fmt}:{self.path.name}"

    def version(self) -> dict[str, Any]:
        """What the dataset card lists: format, file name, size and sha256 (Parquet: rows, writer)."""
        from flora.sharding.catalog.sources import file_digest

        return {
            "format": self.fmt,
            "name": self.path.name,
            "bytes": self.path.stat().st_size,
            "sha256": file_digest(self.path),
        }

    def diagnose(self) -> str | None:
        """Why a read gave no usable record, when the table shows it; None otherwise."""
        if not self.rows_read:
            what = "no row" if self.fmt == "parquet" else "a header and no row"
            return f"it holds {what} (columns: {_shown(self.found)})"
        if self.bad_rows == self.rows_read and self.fmt != "parquet":
            shown = "tab" if self.delimiter == "\t" else repr(self.delimiter)
            return (
                f"no row has the header's {len(self.found)} fields split by {shown} (columns: "
                f"{_shown(self.found)}); check table.delimiter and the quoting"
            )
        return None


class CsvTable(TableSource):
    """A CSV or TSV file (optionally gzip-compressed), one row in memory at a time."""

    def _open(self, columns: dict[str, str]) -> None:
        self.delimiter = self.cfg.delimiter or _DEFAULT_DELIMITER[self.fmt]
        encoding = self.cfg.encoding
        try:
            decoder = codecs.getincrementaldecoder(encoding)
        except LookupError:
            raise ConfigError(f"table.encoding: unknown encoding {encoding!r}") from None
        if not _reads_lines(decoder):
            raise ConfigError(
                f"table.encoding {encoding!r} is not read line by line (its line break is not the byte "
                f"0x0A); convert the file to UTF-8"
            )
        # utf-8-sig: a byte order mark at the start is dropped, as Excel writes one
        self.encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
        with self._reader() as (lines, reader):
            header = self._header(lines, reader)
        self._map(columns, header)

    def _reader(self):
        return _CsvReader(self.path, self.encoding, self.delimiter)

    def _header(self, lines: _Lines, reader) -> list[str]:
        """The first non-blank row, checked (module docstring); SourceError when there is none."""
        where = f"{self.fmt} file {self.path}"
        row: list[str] = []
        try:
            while not row:
                lines.start_row()
                row = next(reader)
        except StopIteration:
            raise SourceError(
                f"{where} is empty: a table needs a header line first (e.g. plant_id,latin_name,image_url)"
            ) from None
        except (_Oversize, csv.Error) as exc:
            why = f"over {MAX_ROW_BYTES:,} bytes" if isinstance(exc, _Oversize) else str(exc)
            raise SourceError(f"{where}: cannot read its header line ({why}): {lines.head[:80]!r}") from None
        names = [name.strip() or f"column_{i}" for i, name in enumerate(row, start=1)]
        first = names[0]
        if first.startswith(("{", "[")):
            raise SourceError(
                f"{where} holds JSON (its first line starts {lines.head[:60]!r}), not a table; name it "
                f".jsonl or use --format jsonl"
            )
        if len(names) == 1:
            for other in _OTHER_DELIMITERS:
                if other != self.delimiter and other in first:
                    hint = "--format tsv" if other == "\t" else f"table.delimiter={other!r}"
                    raise SourceError(
                        f"{where}: its header {first[:80]!r} does not split on the delimiter "
                        f"{self.delimiter!r} but on {other!r}; use {hint}"
                    )
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise SourceError(f"{where}: column(s) {', '.join(map(repr, twice))} appear twice in the header")
        return names

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        self.rows_read = self.bad_rows = 0
        width = len(self.found)
        with self._reader() as (lines, reader):
            self._header(lines, reader)
            while True:
                lines.start_row()
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except _Oversize:
                    last = f"-{lines.lineno}" if lines.lineno > lines.row_start else ""
                    span = f"lines {lines.row_start}{last}"
                    yield self._bad(
                        lines, f"row over {MAX_ROW_BYTES:,} bytes ({span}; an unterminated quote?)"
                    )
                    continue
                except csv.Error as exc:
                    if len(lines.taken) > 1:
                        lines.read_again()
                        reader = csv.reader(lines, delimiter=self.delimiter, strict=True)
                    yield self._bad(lines, f"malformed row: {exc}", first_line=len(lines.taken) > 1)
                    continue
                if not row:  # a blank line
                    continue
                if len(row) != width and len(lines.taken) > 1:  # a quote left open: lines read again
                    lines.read_again()
                    reader = csv.reader(lines, delimiter=self.delimiter, strict=True)
                    yield self._bad(lines, f"{len(row)} fields across lines, the header has {width}", True)
                    continue
                self.rows_read += 1
                if len(row) != width:
                    self.bad_rows += 1
                    text = self.delimiter.join(row)[:SHOWN_CHARS]
                    message = f"{len(row)} fields, the header has {width}"
                    yield f"line {lines.row_start}", Unparseable(text, message, reason="bad_row")
                    continue
                yield f"line {lines.row_start}", self._record(row, empty_is_missing=True)

    def _bad(self, lines: _Lines, message: str, first_line: bool = False) -> tuple[str, Unparseable]:
        """A bad row; ``first_line``: only its first line is rejected (the others are read again)."""
        self.rows_read += 1
        self.bad_rows += 1
        shown = lines.taken[0][1] if first_line else lines.head
        if first_line:
            message += "; a quote left open? the lines after it are read again"
        return f"line {lines.row_start}", Unparseable(shown[:SHOWN_CHARS], message, reason="bad_row")


class _Lines:
    """A binary file's physical lines, decoded one at a time, for csv.reader: knows the line number
    where the current row starts and raises ``_Oversize`` once the row passes ``MAX_ROW_BYTES`` (the
    rest of that line skipped, so that the next row starts at a line start)."""

    def __init__(self, fh, encoding: str, path: Path):
        self.fh, self.path, self.encoding = fh, path, encoding
        self.decoder = codecs.getincrementaldecoder(encoding)()
        self.lineno = self.read = 0
        self.row_start = 1
        self.row_bytes = 0
        #: The start of the current row, for messages and ``rejects.jsonl``.
        self.head = ""
        #: The current row's lines, and lines to read again (``read_again``).
        self.taken: list[tuple[int, str]] = []
        self.again: deque[tuple[int, str]] = deque()
        self.kept = 0  # characters in ``taken``: at most ``REREAD_CHARS``, then no line is kept

    def start_row(self) -> None:
        self.row_start = self.again[0][0] if self.again else self.lineno + 1
        self.row_bytes, self.head, self.taken, self.kept = 0, "", [], 0

    def read_again(self) -> None:
        """The current row's lines after its first are read again as rows of their own: a quote left
        open made one row of them (csv's strict quoting stops at the first quote it cannot close)."""
        self.again.extendleft(reversed(self.taken[1:]))

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.again:
            self.lineno, text = self.again.popleft()
            self._take(text)
            self.head += text[:SHOWN_CHARS] if len(self.head) < SHOWN_CHARS else ""
            return text
        raw = self.fh.readline(MAX_ROW_BYTES + 1 - self.row_bytes)
        if not raw:
            raise StopIteration
        self.lineno = self.read = self.read + 1
        self.row_bytes += len(raw)
        if self.row_bytes > MAX_ROW_BYTES:
            if len(self.head) < SHOWN_CHARS:
                self.head += raw[:SHOWN_CHARS].decode(self.encoding, "replace")
            while not raw.endswith(b"\n") and (raw := self.fh.readline(SKIP_BYTES)):
                pass
            self.decoder.reset()
            raise _Oversize
        try:
            text = self.decoder.decode(raw)
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"{self.path}: line {self.lineno} is not {self.encoding} text ({exc.reason} at byte "
                f"{exc.start}: {raw[max(0, exc.start - 10) : exc.start + 10]!r}); set table.encoding "
                f"(e.g. table.encoding=latin-1) or convert the file"
            ) from None
        if len(self.head) < SHOWN_CHARS:
            self.head += text[:SHOWN_CHARS]
        self._take(text)
        return text

    def _take(self, text: str) -> None:
        self.kept += len(text)
        if self.kept <= REREAD_CHARS:
            self.taken.append((self.lineno, text))
        else:
            self.taken = []  # too long a row to read again: rejected whole, as an oversized one


class _CsvReader:
    """``with _CsvReader(...) as (lines, reader)``: the file opened (gunzipped for ``.gz``) and a
    csv.reader over its ``_Lines``; a read failure (a corrupt gzip stream, a disk error) becomes a
    SourceError naming the line after which it failed."""

    def __init__(self, path: Path, encoding: str, delimiter: str):
        self.path, self.encoding, self.delimiter = path, encoding, delimiter

    def __enter__(self):
        gzipped = self.path.suffix.lower() == ".gz"
        self.fh = gzip.open(self.path, "rb") if gzipped else open(self.path, "rb")  # noqa: SIM115
        self.previous_limit = csv.field_size_limit(MAX_ROW_BYTES)  # a field is at most a row
        self.lines = _Lines(self.fh, self.encoding, self.path)
        reader = csv.reader(self.lines, delimiter=self.delimiter, strict=True)
        return self.lines, reader

    def __exit__(self, kind, exc, tb) -> None:
        csv.field_size_limit(self.previous_limit)
        self.fh.close()
        if exc is not None and isinstance(exc, _READ_ERRORS):
            raise SourceError(
                f"cannot read {self.path} after line {self.lines.lineno}: {exc}".splitlines()[0]
            ) from None


class ParquetTable(TableSource):
    """A Parquet file read in batches of ``table.batch_rows`` rows (module docstring)."""

    def _open(self, columns: dict[str, str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._check_magic()
        try:
            with pq.ParquetFile(self.path) as pf:
                meta, schema = pf.metadata, pf.schema_arrow
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowException, OSError, ValueError
            raise SourceError(f"cannot read Parquet file {self.path}: {_first_line(exc)}") from None
        self.num_rows, self.created_by = meta.num_rows, meta.created_by
        self._map(columns, list(schema.names))
        plain = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean)
        #: Per column: whether its Python values need ``_jsonable`` (all but text, integers, booleans).
        self._convert = [not any(is_type(f.type) for is_type in plain) for f in schema]

    def _check_magic(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(0, size - 4))
            tail = fh.read(4)
        if head != _PARQUET_MAGIC:
            raise SourceError(
                f"{self.path} is not a Parquet file (it starts with {head!r}, not {_PARQUET_MAGIC!r}); "
                f"name the format with --format if it is a CSV or JSONL file"
            )
        if tail != _PARQUET_MAGIC or size < 12:
            raise SourceError(f"{self.path} is a truncated Parquet file (no {_PARQUET_MAGIC!r} footer)")

    def count(self) -> int:
        """Rows in the file (its footer), for the progress bar."""
        return self.num_rows

    def version(self) -> dict[str, Any]:
        return {**super().version(), "rows": self.num_rows, "created_by": self.created_by}

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rows_read = 0
        try:
            # column chunks read page by page through a small buffer, not a whole row group at once
            with pq.ParquetFile(self.path, pre_buffer=False, buffer_size=STREAM_BUFFER) as pf:
                for batch in pf.iter_batches(batch_size=self.cfg.batch_rows, columns=self.found):
                    values = [
                        [_jsonable(v) for v in column.to_pylist()] if convert else column.to_pylist()
                        for column, convert in zip(batch.columns, self._convert, strict=True)
                    ]
                    for row in zip(*values, strict=True):
                        self.rows_read += 1
                        yield f"row {self.rows_read}", self._record(row, empty_is_missing=False)
        except (pa.ArrowException, OSError) as exc:  # a corrupt page, a disk error
            raise SourceError(
                f"cannot read Parquet file {self.path} after row {self.rows_read}: {_first_line(exc)}"
            ) from None


def _reads_lines(decoder: Any) -> bool:
    """Whether an encoding's line break is the byte 0x0A (so a file can be read line by line)."""
    try:
        return decoder().decode(b"\n", final=True) == "\n"
    except UnicodeDecodeError:  # UTF-16, UTF-32: 0x0A alone is half a character
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
