"""Catalog versions: what a catalog output records about itself, and reading one back for
``--previous`` (frozen splits; the rule itself is split.py's).

Owns:

* ``catalog_version.json``: the version's ``fingerprint`` (``sha256:`` of its ``dataset_splits.jsonl``
  bytes), the split settings that decide assignments (seed, fractions, group_by, min_for_stratify),
  its counts, the ``previous`` version's fingerprint and the ``lineage`` (fingerprints, oldest first,
  this version last). No paths or times: the file is as deterministic as the rest of the output.
* ``load_previous``: checks that a folder is a catalog output built with the same split seed,
  fractions and group key (anything else: ``LineageError``, one line, exit 2), verifies its recorded
  fingerprint against its ``dataset_splits.jsonl`` (an edited file is refused), and reads that file
  once into ``FrozenSplits`` (16-byte digests -> split index: ~100 bytes per record). A URL's key is
  taken from the URL as this version normalises it, so a version that kept ``http://bücher.example/é``
  raw still matches the ``http://xn--bcher-kva.example/%C3%A9`` this version writes. A catalog built
  before ``catalog_version.json`` existed is accepted: every catalog run has stored its config in
  ``export_stats.json``, so the settings are read there and the fingerprint is computed from the file
  by the same definition; its lineage starts with it. ``min_for_stratify`` may differ between versions
  (it only decides where new groups of small species go) and is recorded.
* ``stable_mapping``: class indices of a previous mapping kept; species no longer present keep their
  index (retired, so indices stay 0..K-1 without gaps and a previous checkpoint's head still lines up);
  new species are appended in name order.
* ``compare``: the new version against the previous one, record by record (URL identity): rows for
  ``split_changes.jsonl`` (``removed`` with the reason: ``not_in_source`` or the reject reason the
  URL now gets, e.g. ``url_species_conflict``; ``moved`` with split.py's reason; ``species_changed``:
  same URL and split, another species) and the counts kept / new / removed / moved.
* ``fraction_report``: per species its groups per split against the target (``split_species.jsonl``)
  and a summary for ``split_analysis.json``. Deviations are counted in groups (= images without
  ``split.group_by``), the unit the split assigns; ``fresh`` is what a split from scratch (``allocate``)
  would give the same groups, so the rounding floor of small species is visible beside it.

Leaves out: assigning splits (split.py), writing the files (catalog.py through outputs.py).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.errors import FloraError
from flora.sharding.catalog.records import (
    ATTRIBUTION_FIELDS,
    OUTPUT_FIELDS,
    Record,
    RecordError,
    normalize_url,
    url_key,
)
from flora.sharding.catalog.split import FrozenSplits, SplitResult, allocate, group_key, key_digest
from flora.sharding.config import SPLIT_NAMES, SplitConfig

VERSION_FILE = "catalog_version.json"
SPLITS_FILE = "dataset_splits.jsonl"
STATS_FILE = "export_stats.json"
MAPPING_FILE = "class_mapping.json"
#: Version of catalog_version.json's layout.
VERSION_FORMAT = 1
#: Fractions recorded in JSON round-trip exactly; this only absorbs a YAML spelling like 0.80000000001.
_SAME_FRACTION = 1e-9
#: Species sizes (in groups) the deviation summary is broken down by: small species cannot be cut
#: finely (3 groups: 1/1/1), so their rounding floor would hide everything else in one maximum.
SIZE_BANDS = ((3, 9), (10, 99), (100, None))
#: Species listed as the worst in split_analysis.json (all of them are in split_species.jsonl).
WORST_SHOWN = 10


class LineageError(FloraError, ValueError):
    """``--previous`` is not a usable catalog output; the message says what was found and expected."""


@dataclass
class PreviousCatalog:
    """A previous catalog version, as much of it as a new version needs."""

    path: Path
    fingerprint: str
    #: Fingerprints oldest first, ending with this version's.
    lineage: list[str]
    records: int
    mapping: dict[str, int]
    frozen: FrozenSplits

    def region_mapping(self, slug: str) -> dict[str, int] | None:
        """The previous ``class_mapping_<slug>.json``, or None when that version had no such subset."""
        path = self.path / f"class_mapping_{slug}.json"
        return _read_json(path, self.path) if path.is_file() else None


def split_settings(cfg: SplitConfig) -> dict[str, Any]:
    """The settings that decide assignments, as recorded in catalog_version.json."""
    return {
        "seed": cfg.seed,
        "fractions": {s: cfg.fractions[s] for s in SPLIT_NAMES},
        "group_by": cfg.group_by,
        "min_for_stratify": cfg.min_for_stratify,
    }


def _read_json(path: Path, root: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LineageError(f"--previous {root}: {path.name} is not valid JSON ({exc})") from exc


def _differences(recorded: Any, cfg: SplitConfig) -> list[str]:
    if not isinstance(recorded, dict):
        return ["split settings (none recorded)"]
    found = []
    if recorded.get("seed") != cfg.seed:
        found.append(f"split.seed {recorded.get('seed')!r} (this run: {cfg.seed})")
    fractions = recorded.get("fractions")
    if not isinstance(fractions, dict) or any(
        not isinstance(fractions.get(s), int | float) or abs(fractions[s] - cfg.fractions[s]) > _SAME_FRACTION
        for s in SPLIT_NAMES
    ):
        found.append(f"split.fractions {fractions!r} (this run: {split_settings(cfg)['fractions']})")
    if recorded.get("group_by") != cfg.group_by:
        found.append(f"split.group_by {recorded.get('group_by')!r} (this run: {cfg.group_by!r})")
    return found


def load_previous(path: str | Path, cfg: SplitConfig) -> PreviousCatalog:
    """Reads the catalog output at ``path`` for frozen splits (checks in the module docstring).

    Raises:
        LineageError: not a catalog output, built with another seed, fractions or group key, or its
            dataset_splits.jsonl no longer matches the recorded fingerprint.
    """
    root = Path(path)
    if not root.is_dir():
        raise LineageError(f"--previous {root}: no such folder (expected the --out folder of a catalog run)")
    version_path, stats_path = root / VERSION_FILE, root / STATS_FILE
    missing = [name for name in (SPLITS_FILE, MAPPING_FILE) if not (root / name).is_file()]
    if not version_path.is_file() and not stats_path.is_file():
        missing.append(f"{VERSION_FILE} or {STATS_FILE}")
    if missing:
        raise LineageError(
            f"--previous {root} is not a catalog output: no {', '.join(missing)} "
            "(expected the --out folder of a catalog run)"
        )
    if version_path.is_file():
        version = _read_json(version_path, root)
        if not isinstance(version, dict) or not isinstance(version.get("lineage"), list):
            raise LineageError(
                f"--previous {root}: {VERSION_FILE} has no lineage (expected format {VERSION_FORMAT})"
            )
        recorded, lineage, settings = version.get("fingerprint"), version["lineage"], version.get("split")
    else:  # written before catalog_version.json existed: export_stats.json has always held the config
        stats = _read_json(stats_path, root)
        config = stats.get("config") if isinstance(stats, dict) else None
        recorded, lineage = None, []
        settings = config.get("split") if isinstance(config, dict) else None
    differences = _differences(settings, cfg)
    if differences:
        raise LineageError(
            f"--previous {root} was built with {'; '.join(differences)}: frozen splits need the same seed, "
            "fractions and group key (to change them, build without --previous)"
        )
    frozen, fingerprint, records = _read_splits(root, cfg.group_by)
    if recorded is not None and recorded != fingerprint:
        raise LineageError(
            f"--previous {root}: {SPLITS_FILE} has fingerprint {fingerprint}, but {VERSION_FILE} records "
            f"{recorded} (the file was changed after the catalog wrote it)"
        )
    mapping = _read_json(root / MAPPING_FILE, root)
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        raise LineageError(f"--previous {root}: {MAPPING_FILE} is not a species -> 0..K-1 mapping")
    lineage = [*lineage, fingerprint] if not lineage or lineage[-1] != fingerprint else lineage
    return PreviousCatalog(root, fingerprint, [str(f) for f in lineage], records, mapping, frozen)


def _identity(image_url: str) -> str:
    """The url_key of a previous version's URL as this version spells that URL: a version written
    before URLs were percent-encoded and hosts IDNA-encoded holds ``http://bücher.example/é``, which
    this version writes as ``http://xn--bcher-kva.example/%C3%A9``; both must be the same image. An
    already normal URL is its own normal form, so its key is the one it always had. A URL this
    version refuses keeps its old key (it matches no record now, and is reported removed)."""
    try:
        return url_key(normalize_url(image_url))
    except RecordError:
        return url_key(image_url)


def _row_record(row: Any, where: str) -> Record:
    """A row of dataset_splits.jsonl as a Record (its url_key as this version computes it, see
    ``_identity``); LineageError if it is not one."""
    try:
        record = Record(
            **{name: row[name] if name not in ATTRIBUTION_FIELDS else row.get(name) for name in OUTPUT_FIELDS}
        )
        record.url_key = _identity(record.image_url)
    except (KeyError, TypeError, AttributeError) as exc:
        raise LineageError(f"{where}: not a catalog row (expected the fields {list(OUTPUT_FIELDS)})") from exc
    if record.split not in SPLIT_NAMES:
        raise LineageError(f"{where}: split {record.split!r}, expected one of {list(SPLIT_NAMES)}")
    return record


def _previous_rows(root: Path, digest: Any = None) -> Iterable[Record]:
    """The records of ``root``'s dataset_splits.jsonl; ``digest`` (a hashlib object) sees its bytes."""
    with open(root / SPLITS_FILE, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if digest is not None:
                digest.update(line)
            where = f"--previous {root}: {SPLITS_FILE} line {number}"
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise LineageError(f"{where}: not JSON ({exc})") from exc
            yield _row_record(row, where)


def _read_splits(root: Path, group_by: str | None) -> tuple[FrozenSplits, str, int]:
    digest = hashlib.sha256()
    urls: dict[bytes, int] = {}
    groups: dict[bytes, int] = {}
    records = 0
    for record in _previous_rows(root, digest):
        index = SPLIT_NAMES.index(record.split)
        urls[key_digest(record.url_key)] = index
        if group_by:
            key = group_key(record, group_by)
            if not key.startswith("url="):
                groups[key_digest(key)] = index
        records += 1
    return FrozenSplits(urls=urls, groups=groups), f"sha256:{digest.hexdigest()}", records


def fingerprint(path: str | Path) -> str:
    """A version's fingerprint: ``sha256:`` of its dataset_splits.jsonl bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def version_record(
    fingerprint_: str, cfg: SplitConfig, records: int, classes: int, previous: PreviousCatalog | None
) -> dict[str, Any]:
    """The content of catalog_version.json."""
    return {
        "format": VERSION_FORMAT,
        "fingerprint": fingerprint_,
        "split": split_settings(cfg),
        "records": records,
        "classes": classes,
        "previous": None
        if previous is None
        else {"fingerprint": previous.fingerprint, "records": previous.records},
        "lineage": [*(previous.lineage if previous else []), fingerprint_],
    }


def stable_mapping(previous: dict[str, int] | None, names: Iterable[str]) -> dict[str, int]:
    """Species -> label: ``previous`` kept as it is, new names appended in name order (rules above)."""
    mapping = dict(previous or {})
    for name in sorted(set(names) - set(mapping)):
        mapping[name] = len(mapping)
    return mapping


def _reject_reasons(rejects: Iterable[dict[str, Any]]) -> dict[bytes, str]:
    """URL digest -> the (first by name) reason this run rejected a record with that URL."""
    reasons: dict[bytes, str] = {}
    for row in rejects:
        raw = row["record"]
        url = raw.get("image_url") if isinstance(raw, dict) else None
        if not isinstance(url, str):
            continue
        try:
            d = key_digest(url_key(normalize_url(url)))
        except RecordError:
            continue
        if d not in reasons or row["reason"] < reasons[d]:
            reasons[d] = row["reason"]
    return reasons


def compare(
    previous: PreviousCatalog,
    kept: list[Record],
    rejects: Iterable[dict[str, Any]],
    split: SplitResult,
    group_by: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of split_changes.jsonl (sorted) and the growth counts (see module docstring)."""
    current = {key_digest(r.url_key or r.image_url): r for r in kept}
    reasons = _reject_reasons(rejects)
    rows: list[dict[str, Any]] = []
    matched = unchanged = 0
    for old in _previous_rows(previous.path):
        d = key_digest(old.url_key)
        now = current.get(d)
        base = {"image_url": old.image_url, "latin_name": old.latin_name, "previous_split": old.split}
        if now is None:
            rows.append(
                {"change": "removed", "reason": reasons.get(d, "not_in_source"), **base, "split": None}
            )
            continue
        matched += 1
        if now.split != old.split:
            reason = split.moved.get(group_key(now, group_by), "unexplained")
            rows.append({"change": "moved", "reason": reason, **base, "split": now.split})
        else:
            unchanged += 1
        if now.latin_name != old.latin_name:
            rows.append(
                {"change": "species_changed", "reason": "source_relabelled", **base, "split": now.split,
                 "latin_name_now": now.latin_name}
            )  # fmt: skip
    rows.sort(key=lambda r: (r["change"], r["reason"], r["image_url"]))
    counts = Counter((r["change"], r["reason"]) for r in rows)
    growth = {
        "previous": previous.fingerprint,
        "previous_records": previous.records,
        "kept": unchanged,
        "new": len(kept) - matched,
        "removed": sum(n for (change, _), n in counts.items() if change == "removed"),
        "moved": matched - unchanged,
        "removed_by_reason": {
            reason: n for (change, reason), n in sorted(counts.items()) if change == "removed"
        },
        "moved_by_reason": {reason: n for (change, reason), n in sorted(counts.items()) if change == "moved"},
        "species_changed": counts[("species_changed", "source_relabelled")],
        "groups_not_kept": len(split.moved),
    }
    return rows, growth


def _band(n: int) -> str | None:
    for low, high in SIZE_BANDS:
        if n >= low and (high is None or n <= high):
            return f"{low}+" if high is None else f"{low}-{high}"
    return None


def fraction_report(split: SplitResult, cfg: SplitConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of split_species.jsonl (by species name) and the summary for split_analysis.json."""
    target = {s: cfg.fractions[s] for s in SPLIT_NAMES}
    rows, bands = [], {}
    for species in sorted(split.species):
        info = split.species[species]
        groups = {s: info["groups"].get(s, 0) for s in SPLIT_NAMES}
        n = sum(groups.values())
        stratified = species not in split.train_only
        fresh = allocate(n, target) if stratified else info["target"]
        deviation = max(abs(groups[s] / n - target[s]) for s in SPLIT_NAMES)
        fresh_deviation = max(abs(fresh[s] / n - target[s]) for s in SPLIT_NAMES)
        off = sum(abs(groups[s] - fresh[s]) for s in SPLIT_NAMES) // 2
        rows.append(
            {"species": species, "groups": groups, "new_groups": info["new"], "stratified": stratified,
             "fresh": fresh, "groups_off_fresh": off, "deviation": round(deviation, 4),
             "fresh_deviation": round(fresh_deviation, 4)}
        )  # fmt: skip
        band = _band(n) if stratified else None
        if band:
            b = bands.setdefault(band, {"species": 0, "max_deviation": 0.0, "max_fresh_deviation": 0.0})
            b["species"] += 1
            b["max_deviation"] = max(b["max_deviation"], round(deviation, 4))
            b["max_fresh_deviation"] = max(b["max_fresh_deviation"], round(fresh_deviation, 4))
    stratified_rows = [r for r in rows if r["stratified"]]
    worst = sorted(stratified_rows, key=lambda r: (-r["groups_off_fresh"], -r["deviation"], r["species"]))
    summary = {
        "target": target,
        "unit": "groups" if cfg.group_by else "images",
        "stratified_species": len(stratified_rows),
        "max_deviation": max((r["deviation"] for r in stratified_rows), default=0.0),
        "max_fresh_deviation": max((r["fresh_deviation"] for r in stratified_rows), default=0.0),
        "species_off_fresh": sum(1 for r in stratified_rows if r["groups_off_fresh"]),
        "groups_off_fresh": sum(r["groups_off_fresh"] for r in stratified_rows),
        "by_size": bands,  # keyed "3-9", "10-99", "100+" (groups per species)
        "worst": [
            {k: r[k] for k in ("species", "groups", "fresh", "deviation")}
            for r in worst[:WORST_SHOWN]
            if r["groups_off_fresh"]
        ],
    }
    return rows, summary
