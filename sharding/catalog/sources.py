"""Record sources: a JSONL export file or a MongoDB collection, read as a stream of raw records.

Owns reading a JSONL file or a MongoDB collection (formats.py picks the reader) and yielding
``(position, raw)`` pairs, where ``raw`` is the decoded JSON object (any JSON value: validation is
records.py's job) or an ``Unparseable`` for a line that is not JSON. Nothing is held beyond one line /
one cursor batch.

Each source also says what it is when that explains a run without a usable record (``diagnose``):
a JSONL path that holds nothing, a JSON array or pretty-printed JSON instead of one object per line,
CSV or TSV, UTF-16 text, a gzip file not named ``.gz``, a ZIP archive or a Parquet file; a MongoDB
collection that is empty, or whose documents the filter all leaves out.

MongoDB: ``mongodb://[user[:password]@]host[:port]/DATABASE.COLLECTION[?options]`` (the connection
string's ``database.collection`` form; ``mongodb+srv://`` works too). Read with one batch cursor
(``mongo.batch_size``), the server-side ``mongo.filter`` and a projection (``mongo.fields``; ``_id`` is
always fetched so rejects can name the document, and kept in ``meta`` only with ``mongo.keep_id``).
A user without a password in the URI takes it from the environment variable ``mongo.password_env``.
Passwords are never printed: every message goes through ``redact``. An unreachable server, failed
authentication or a missing collection is a ``SourceError`` (one line; the CLI exits non-zero).

Leaves out: writing to MongoDB (tests load data with world.mongo), change streams, sharded
cluster tuning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from flora.errors import FloraError
from flora.sharding.config import MongoConfig

_URI_PASSWORD = re.compile(r"(mongodb(?:\+srv)?://[^:/@\s]+:)([^@\s]*)(@)")
_URI_USER_ONLY = re.compile(r"(mongodb(?:\+srv)?://[^:/@\s]+)@")
MONGO_PREFIXES = ("mongodb://", "mongodb+srv://")
#: How much of a JSONL source ``diagnose`` looks at: more than a CSV header or the start of an array.
SNIFF_BYTES = 64 * 1024
#: Leading bytes of files that are not JSON Lines text: (magic, what the file is).
_MAGIC = (
    (b"\x1f\x8b", "it is gzip-compressed but not named .gz; rename it to {name}.gz"),
    (b"PK\x03\x04", "it is a ZIP archive, not JSON Lines; unpack the JSON Lines file inside it"),
    (b"PAR1", "it is a Parquet file, not JSON Lines (one JSON object per line)"),
    (b"\xff\xfe", "it is UTF-16 text; save it as UTF-8 JSON Lines"),
    (b"\xfe\xff", "it is UTF-16 text; save it as UTF-8 JSON Lines"),
)


class SourceError(FloraError, RuntimeError):
    """The source cannot be read at all (missing file, unreachable server, missing collection)."""


@dataclass(frozen=True, slots=True)
class Unparseable:
    """A line of a JSONL file that is not valid JSON (or not UTF-8)."""

    text: str
    message: str
    #: The reject reason: ``invalid_json`` for a JSONL line; table readers name their own (``bad_row``).
    reason: str = "invalid_json"


def redact(text: str) -> str:
    """Replaces the password in any MongoDB URI inside ``text`` with ``***``."""
    return _URI_PASSWORD.sub(r"\1***\3", text)


def _parse(line: bytes) -> Any:
    """One JSONL line -> its JSON value, or an ``Unparseable`` saying why not."""
    try:
        return json.loads(line)
    except UnicodeDecodeError as exc:
        return Unparseable(line[:200].decode("utf-8", "replace"), f"not UTF-8: {exc}")
    except json.JSONDecodeError as exc:
        return Unparseable(line[:200].decode("utf-8", "replace").rstrip(), f"invalid JSON: {exc}")
    except (ValueError, RecursionError) as exc:  # e.g. integers over 4300 digits, nesting too deep
        return Unparseable(line[:200].decode("utf-8", "replace").rstrip(), f"unreadable JSON value: {exc}")


class JsonlSource:
    """A JSONL (optionally ``.gz``) file: one JSON object per line; blank lines are skipped."""

    #: What one raw record of this source is, in messages ("5 lines read").
    unit = "line"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"source file not found: {self.path}")

    def describe(self) -> str:
        return f"jsonl:{self.path.name}"

    def version(self) -> dict[str, Any]:
        """What the dataset card lists for this source: the file's name, size and sha256."""
        return {
            "format": "jsonl",
            "name": self.path.name,
            "bytes": self.path.stat().st_size,
            "sha256": file_digest(self.path),
        }

    def diagnose(self) -> str | None:
        """What the file is, if it is plainly not JSON Lines (see module docstring); None otherwise."""
        try:
            with (gzip.open if self._gzipped else open)(self.path, "rb") as fh:
                head = fh.read(SNIFF_BYTES)
        except (OSError, EOFError):
            return None  # reading it already failed with its own message
        return _shape(head, self.path)

    @property
    def _gzipped(self) -> bool:
        return self.path.suffix == ".gz"

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        opener = gzip.open if self._gzipped else open
        lineno = 0
        try:
            with opener(self.path, "rb") as fh:
                for lineno, line in enumerate(fh, start=1):  # noqa: B007 - lineno is reported on failure
                    if line.strip():
                        yield f"line {lineno}", _parse(line)
        except (OSError, EOFError) as exc:  # truncated or corrupt .gz, unreadable file
            raise SourceError(f"cannot read {self.path} after line {lineno}: {exc}") from None


def _shape(head: bytes, path: Path) -> str | None:
    """The first ``SNIFF_BYTES`` of a JSONL source -> what they show it is, if not JSON Lines."""
    if not head.strip():
        return "the file is empty" if not head else "the file holds only blank lines"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what.format(name=path.name)
    text = head.removeprefix(b"\xef\xbb\xbf").strip()  # a UTF-8 byte order mark, whitespace
    first_line = text.split(b"\n", 1)[0].strip()
    first_is_json = not isinstance(_parse(first_line), Unparseable)
    # an array on one line (the only line in the head), or spread over lines (its first is no JSON)
    if first_line.startswith(b"[") and (b"\n" not in text or not first_is_json):
        return (
            f"it holds a JSON array, not JSON Lines (one JSON object per line); convert it with "
            f"jq -c '.[]' {path.name} > {path.stem}.jsonl"
        )
    if first_line == b"{" or (
        first_line.startswith(b"{") and first_line.endswith(b",") and not first_is_json
    ):
        return (
            "it holds pretty-printed JSON (objects spread over several lines), not JSON Lines (one "
            f"JSON object per line); convert it with jq -c . {path.name} > {path.stem}.jsonl"
        )
    if not first_line.startswith((b"{", b"[")) and not first_is_json:
        for separator, kind in ((b"\t", "TSV"), (b",", "CSV"), (b";", "CSV")):
            if separator in first_line:
                shown = first_line[:80].decode("utf-8", "replace")
                return (
                    f"it looks like {kind} (first line {shown!r}), not JSON Lines (one JSON object per line)"
                )
    return None


class MongoSource:
    """A MongoDB collection read through one batch cursor (see module docstring)."""

    unit = "document"

    def __init__(self, uri: str, cfg: MongoConfig):
        try:
            import pymongo
            from pymongo import errors, uri_parser
        except ImportError as exc:  # pragma: no cover - pymongo is a declared dependency
            raise SourceError("reading from MongoDB needs pymongo: pip install 'flora[mongo]'") from exc
        self.cfg = cfg
        self.shown_uri = redact(uri)
        #: Documents the last read yielded, and (when it yielded none under a filter) how many the
        #: collection holds: counted while the connection is open, for ``diagnose``.
        self.documents_read = 0
        self._unfiltered: int | None = None
        user_only = _URI_USER_ONLY.match(uri)
        if user_only:
            password = os.environ.get(cfg.password_env)
            if password is None:
                raise SourceError(
                    f"MongoDB URI names a user but no password, and ${cfg.password_env} is not set"
                )
            uri = f"{user_only.group(1)}:{quote_plus(password)}@{uri[user_only.end() :]}"
        try:
            parsed = uri_parser.parse_uri(uri)
        except (errors.InvalidURI, errors.ConfigurationError, ValueError) as exc:
            raise SourceError(f"invalid MongoDB URI {self.shown_uri}: {redact(str(exc))}") from None
        self.database, self.collection = parsed.get("database"), parsed.get("collection")
        if not self.database or not self.collection:
            raise SourceError(
                f"MongoDB URI must name database and collection (mongodb://host:port/DATABASE.COLLECTION), "
                f"got {self.shown_uri}"
            )
        timeout_ms = int(cfg.timeout_s * 1000)
        self._client = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, appname="flora-catalog"
        )
        try:
            self._client.admin.command("ping")
            names = self._client[self.database].list_collection_names()
        except errors.OperationFailure as exc:
            self.close()
            raise SourceError(
                f"MongoDB refused {self.shown_uri}: {redact(str(exc)).splitlines()[0]}"
            ) from None
        except errors.PyMongoError as exc:
            self.close()
            first = redact(str(exc)).splitlines()[0][:300]
            raise SourceError(f"cannot reach MongoDB at {self.shown_uri}: {first}") from None
        if self.collection not in names:
            self.close()
            raise SourceError(
                f"collection {self.database}.{self.collection} not found at {self.shown_uri} "
                f"(collections there: {', '.join(sorted(names)) or 'none'})"
            )

    def describe(self) -> str:
        return f"mongodb:{self.database}.{self.collection}"

    def version(self) -> dict[str, Any]:
        """What the dataset card lists: the collection, the filter and the documents read."""
        return {
            "format": "mongodb",
            "name": f"{self.database}.{self.collection}",
            "filter": json.loads(json.dumps(self.cfg.filter, default=str)),
            "documents": self.documents_read,
        }

    def diagnose(self) -> str | None:
        """Why a read gave no document (an empty collection, a filter that leaves every document
        out); None if it gave some."""
        if self.documents_read:
            return None
        if not self.cfg.filter or self._unfiltered == 0:
            return "the collection is empty"
        return (
            f"no document matches mongo.filter {json.dumps(self.cfg.filter, default=str)} "
            f"(the collection holds {self._unfiltered})"
        )

    def count(self) -> int:
        """Documents matching the filter (for the progress bar)."""
        from pymongo import errors

        try:
            return self._client[self.database][self.collection].count_documents(self.cfg.filter)
        except errors.PyMongoError as exc:
            self.close()
            raise SourceError(
                f"counting {self.describe()} failed: {redact(str(exc)).splitlines()[0]}"
            ) from None

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        from pymongo import errors

        projection = {name: 1 for name in self.cfg.fields} if self.cfg.fields else None
        coll = self._client[self.database][self.collection]
        try:
            cursor = coll.find(self.cfg.filter, projection=projection, batch_size=self.cfg.batch_size)
            self.documents_read = 0
            for index, doc in enumerate(cursor):
                doc_id = doc.pop("_id", None)
                if self.cfg.keep_id and doc_id is not None:
                    doc["_id"] = str(doc_id)
                self.documents_read += 1
                yield f"document {index} (_id {doc_id})", doc
            if not self.documents_read and self.cfg.filter:
                self._unfiltered = coll.count_documents({})
        except errors.PyMongoError as exc:
            raise SourceError(
                f"reading {self.describe()} failed: {redact(str(exc)).splitlines()[0]}"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        self._client.close()


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (what identifies a copy of a file source on the dataset card)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
