"""Reading a source into records: each raw record validated, its licence and region resolved, or
rejected with its position; and the refusal of a run that ends with no usable record.

Owns ``Intake`` (the input count, the valid records, the rows of ``rejects.jsonl``), ``read_source``
(sources.py's stream through records.py's ``validate``, licenses.py and regions.py), and
``NoUsableRecordError``: a run whose records were all rejected (or a source that held none) is not a
catalog. It fails before any file is written, with one line naming the source, how many records were
read and why they were rejected, and the likely cause when the source shows it (sources.py's
``diagnose``: a JSON array instead of JSON Lines, a CSV file, an empty file or collection) or else the
first rejected record's position and message (every record rejected for one reason: the wrong file,
or a field named otherwise).

Leaves out: dedup, the licence and rare-species drops and the split (run.py orders them), writing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.errors import FloraError
from flora.sharding.catalog.licenses import LicenseTable
from flora.sharding.catalog.records import Record, RecordError, pack_meta, put_meta, validate
from flora.sharding.catalog.regions import RegionTable
from flora.sharding.catalog.sources import Unparseable

#: A reader of catalog/formats.py (any format, or several as one).
Source = Any

#: Fields of a rejected record shown in the no-usable-record line (enough to see a wrong schema).
FIELDS_SHOWN = 8


class NoUsableRecordError(FloraError, ValueError):
    """The source gave no record the catalog can keep; the message names the likely cause."""


@dataclass
class Intake:
    """The input records read so far, the valid ones, and the rows of ``rejects.jsonl``."""

    n_input: int = 0
    valid: list[Record] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, record: Record, reason: str, message: str) -> None:
        self.rejects.append(
            {"position": record.position, "reason": reason, "message": message, "record": record.to_dict()}
        )

    def reject_all(self, rejected: Iterable[tuple[Record, str, str]]) -> None:
        for record, reason, message in rejected:
            self.reject(record, reason, message)


class Interner:
    """One shared copy of each repeated short string: species, sources, countries, creators. A parsed record's
    strings are all new objects, and at 10^6 records these copies were most of the catalog's memory. At
    most ``limit`` distinct strings are remembered (then new ones are kept as they are), so a column of
    unique values costs a bounded table."""

    def __init__(self, limit: int = 1 << 18, longest: int = 64):
        self.limit, self.longest = limit, longest
        self._seen: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if type(value) is not str or len(value) > self.longest:
            return value
        shared = self._seen.get(value)
        if shared is None:
            if len(self._seen) >= self.limit:
                return value
            self._seen[value] = shared = value
        return shared


def build_record(
    raw: Any, licenses: LicenseTable, regions: RegionTable, intern: Interner | None = None
) -> Record:
    """One raw record -> a Record (licence and region resolved, raw spellings kept in ``meta``);
    RecordError with its reason if it is not valid. ``intern``: shares repeated strings (read_source)."""
    if isinstance(raw, Unparseable):
        raise RecordError(raw.reason, raw.message)
    fields, meta = validate(raw)
    license_id, license_class = licenses.classify(fields["license"])
    country, region = regions.resolve(fields["country"], fields["region"])
    if fields["license"] is not None:
        put_meta(meta, "license_raw", fields["license"])
    if fields["url_raw"] != fields["image_url"]:
        put_meta(meta, "image_url_raw", fields["url_raw"])
    if fields["country"] is not None and fields["country"] != country:
        put_meta(meta, "country_raw", fields["country"])
    share = intern or (lambda value: value)
    return Record(
        plant_id=fields["plant_id"],
        latin_name=share(fields["latin_name"]),
        image_url=fields["image_url"],
        license=license_id,
        license_class=license_class,
        source=share(fields["source"]),
        country=share(country),
        region=share(region),
        meta=pack_meta(dict(sorted(meta.items()))),
        creator=share(fields["creator"]),
        rights_holder=share(fields["rights_holder"]),
        license_url=share(fields["license_url"] or licenses.url(fields["license"], license_id)),
    )


def read_source(
    reader: Source, licenses: LicenseTable, regions: RegionTable, progress: bool | None
) -> Intake:
    """Reads and validates every record of the source; an invalid one is rejected with its position."""
    from tqdm import tqdm

    intake = Intake()
    intern = Interner()
    total = reader.count() if hasattr(reader, "count") else None
    hide = not os.isatty(2) if progress is None else not progress
    for position, raw in tqdm(reader, total=total, unit=" rec", desc="catalog", disable=hide):
        intake.n_input += 1
        try:
            record = build_record(raw, licenses, regions, intern)
        except RecordError as exc:
            shown = raw.text if isinstance(raw, Unparseable) else raw
            intake.rejects.append(
                {"position": position, "reason": exc.reason, "message": str(exc), "record": shown}
            )
            continue
        record.position = position
        intake.valid.append(record)
    return intake


def refuse_empty(kept: list[Record], reader: Source, intake: Intake, out_dir: str | Path) -> None:
    """Raises NoUsableRecordError (message in the module docstring) when no record was kept."""
    if kept:
        return
    where = f"no usable record in {reader.describe()}"
    nothing = f"nothing was written to {out_dir}"
    shape = reader.diagnose()
    if intake.n_input == 0:
        raise NoUsableRecordError(f"{where}: {shape or 'it holds no record'}; {nothing}")
    reasons = Counter(row["reason"] for row in intake.rejects)
    read = f"{intake.n_input:,} {reader.unit}{'s' if intake.n_input > 1 else ''} read, "
    if len(reasons) == 1:
        read += f"{'all ' if intake.n_input > 1 else ''}rejected as {next(iter(reasons))}"
    else:
        read += "all rejected (" + ", ".join(f"{r} {n:,}" for r, n in reasons.most_common()) + ")"
    raise NoUsableRecordError(
        f"{where}: {read}; {shape or _first_reject(intake, len(reasons) > 1)}; {nothing}"
    )


def _first_reject(intake: Intake, name_reason: bool) -> str:
    """The first rejected record, as the likely cause: its position, message and field names."""
    row = intake.rejects[0]
    text = f"{'the first, ' if intake.n_input > 1 else ''}{row['position']}"
    text += f" ({row['reason']}): {row['message']}" if name_reason else f": {row['message']}"
    record = row["record"]
    if row["reason"] == "missing_field" and isinstance(record, dict):
        names = list(record)
        more = f", ... {len(names) - FIELDS_SHOWN} more" if len(names) > FIELDS_SHOWN else ""
        text += f" (its fields: {', '.join(map(str, names[:FIELDS_SHOWN]))}{more})"
    return text
