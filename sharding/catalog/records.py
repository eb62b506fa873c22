"""The record schema: what an input record must hold, how it is validated and normalised.

Owns ``Record`` (the catalog's output row, the contract every later stage reads), the validation of
one raw input record (``validate``), and the two normalisations that identity depends on:

* ``normalize_url``: the URL as a browser reads it, in one spelling (urls.py: WHATWG parsing,
  percent-encoding, IDNA hosts, default port and fragment dropped, query parameters sorted). Two
  records with the same normalised URL are the same download.
* ``url_key``: the normalised URL without scheme and with RFC 3986 percent-encoding
  normalisation; equal keys are the same image (dedup, leakage checks).
* ``normalize_latin_name``: whitespace collapsed, genus capitalised, the rest lower case (specific
  epithets are lower case by the botanical code; author citations are rare in exports and would be
  lower-cased too). The species (the class) is this normalised name, not ``plant_id``, because the
  same species carries different ids in different sources.

Input fields: ``plant_id``, ``latin_name``, ``image_url`` (required), ``license``, ``source``,
``country``, ``region``, ``creator``, ``rights_holder``, ``license_url`` (optional). Every other field
is kept in ``meta``, never dropped; an input ``meta`` mapping is merged into it. A bad record raises
``RecordError`` with a reason code.

Leaves out: licenses and regions (licenses.py, regions.py, applied by the catalog), splitting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from flora.sharding.catalog import urls
from flora.sharding.catalog.urls import url_key as url_key  # served here to the rest of Flora

INPUT_FIELDS = (
    "plant_id", "latin_name", "image_url", "license", "source", "country", "region",
    "creator", "rights_holder", "license_url",
)  # fmt: skip
REQUIRED_FIELDS = ("plant_id", "latin_name", "image_url")
OUTPUT_FIELDS = (
    "plant_id", "latin_name", "image_url", "license", "license_class", "source",
    "country", "region", "split", "label", "meta", "creator", "rights_holder", "license_url",
)  # fmt: skip
#: The attribution fields, optional in a previous version's rows (catalogs written before they existed).
ATTRIBUTION_FIELDS = ("creator", "rights_holder", "license_url")
#: Longest accepted Latin name; a longer value is a corrupt export, not a species.
MAX_NAME_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HAS_LETTER = re.compile(r"[^\W\d_]")


class RecordError(ValueError):
    """A record failed validation; ``reason`` is a stable code for counting, the message explains."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Record:
    """One image record after the catalog stage (see OUTPUT_FIELDS for the written order)."""

    plant_id: int | str
    latin_name: str
    image_url: str
    license: str
    license_class: str
    source: str
    country: str | None
    region: str
    split: str | None = None
    label: int | None = None
    #: The extras; held packed (``pack_meta``: JSON text) by records the catalog reads, a mapping
    #: otherwise; ``meta_dict()`` reads either.
    meta: dict[str, Any] | bytes = field(default_factory=dict)
    #: Who made the image and who holds its rights (as the source names them), and the licence's URL:
    #: the raw licence when it is a URL, else the one licenses.yaml gives its canonical id (and version).
    creator: str | None = None
    rights_holder: str | None = None
    license_url: str | None = None
    #: Where the record came from ("line 17", "document 3 (_id ...)"), for rejects; not written.
    position: str = ""
    #: The image's identity when it is not ``url_key(image_url)`` (a previous version's URL spelled
    #: otherwise, lineage.py); None derives it, so 10^6 records do not hold a second URL each.
    key_override: str | None = None

    @property
    def url_key(self) -> str:
        """The image's identity for dedup and leakage checks (see ``url_key``); not written."""
        return self.key_override if self.key_override is not None else url_key(self.image_url)

    @url_key.setter
    def url_key(self, value: str) -> None:
        self.key_override = None if value == url_key(self.image_url) else value

    def meta_dict(self) -> dict[str, Any]:
        return json.loads(self.meta) if isinstance(self.meta, bytes) else self.meta

    def to_dict(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in OUTPUT_FIELDS}
        row["meta"] = self.meta_dict()
        return row


def pack_meta(meta: dict[str, Any]) -> dict[str, Any] | bytes:
    """``meta`` as compact JSON (UTF-8): a record's extras are read only to be written and, for
    ``split.group_by``, one field; at 10^6 records a dict per record was a fifth of the catalog's
    memory. Values JSON cannot hold as they are (a MongoDB datetime, NaN, a lone surrogate) keep the
    mapping, so what is written never changes."""
    try:
        return json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return meta


def normalize_url(url: str) -> str:
    """The one spelling of an http(s) URL (urls.normalize_url); raises RecordError (``bad_url``,
    ``bad_scheme``) if it cannot be kept."""
    try:
        return urls.normalize_url(url)
    except urls.UrlError as exc:
        raise RecordError(exc.reason, str(exc)) from None


def normalize_latin_name(name: str) -> str:
    """``"  quercus   ILEX "`` -> ``"Quercus ilex"``; raises RecordError if not a plausible name."""
    words = name.split()
    if not words:
        raise RecordError("empty_latin_name", "latin_name is empty")
    text = " ".join(words)
    if len(text) > MAX_NAME_CHARS or _CONTROL.search(text) or not _HAS_LETTER.search(text):
        raise RecordError("bad_latin_name", f"latin_name is not a plausible species name: {text[:80]!r}")
    genus = words[0]
    return " ".join([genus[:1].upper() + genus[1:].lower(), *(w.lower() for w in words[1:])])


def _check_plant_id(value: Any) -> int | str:
    if isinstance(value, float) and value.is_integer():  # mongosh and JS drivers store numbers as doubles
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RecordError(
            "bad_plant_id", f"plant_id must be an integer or a string, got {type(value).__name__}"
        )
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise RecordError("bad_plant_id", "plant_id is an empty string")
    return value


def _optional_str(raw: dict, name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError("bad_type", f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value.strip() or None


def validate(raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks one input record.

    Returns:
        ``(fields, meta)``: the normalised schema fields (``plant_id``, ``latin_name``,
        ``image_url``, ``url_raw``, ``license``, ``source``, ``country``, ``region``, ``creator``,
        ``rights_holder``, ``license_url``) and the extras.

    Raises:
        RecordError: with a reason code (``not_an_object``, ``missing_field``, ``bad_type``, ``bad_url``,
            ``bad_scheme``, ``empty_latin_name``, ``bad_latin_name``, ``bad_plant_id``).
    """
    if not isinstance(raw, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(raw).__name__}")
    missing = [name for name in REQUIRED_FIELDS if raw.get(name) is None]
    if missing:
        raise RecordError("missing_field", f"missing required field(s): {', '.join(missing)}")
    for name in ("latin_name", "image_url"):
        if not isinstance(raw[name], str):
            raise RecordError("bad_type", f"{name} must be a string, got {type(raw[name]).__name__}")
    fields = {
        "plant_id": _check_plant_id(raw["plant_id"]),
        "latin_name": normalize_latin_name(raw["latin_name"]),
        "image_url": normalize_url(raw["image_url"]),
        "url_raw": raw["image_url"],
        "license": raw.get("license"),
        "source": _optional_str(raw, "source") or "unknown",
        "country": _optional_str(raw, "country"),
        "region": _optional_str(raw, "region"),
        "creator": _optional_str(raw, "creator"),
        "rights_holder": _optional_str(raw, "rights_holder"),
        "license_url": _optional_str(raw, "license_url"),
    }
    meta: dict[str, Any] = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
    for key, value in raw.items():
        if key not in INPUT_FIELDS and not (key == "meta" and isinstance(value, dict)):
            put_meta(meta, key, value)
    return fields, meta


def put_meta(meta: dict[str, Any], key: str, value: Any) -> None:
    """Adds ``key: value`` to ``meta`` without ever overwriting a different value: on a clash the new
    value goes under ``key#2`` (``#3``, ...)."""
    name, n = key, 1
    while name in meta and meta[name] != value:
        n += 1
        name = f"{key}#{n}"
    meta[name] = value
