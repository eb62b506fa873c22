"""Dedup by URL and the stratified, seeded, leakage-free train/val/test split.

Owns three decisions, each independent of the input order (so the same records and seed give the
same result however they arrive):

* **Which duplicate is kept.** Records whose normalised URL (records.normalize_url) is equal are one
  image. The kept one is the first by (permissive license before restrictive, then the canonical
  JSON of the record); permissive first so that ``production_only`` never loses an image that one
  of its copies licenses permissively. The others go to ``duplicates.jsonl`` naming the kept record.
* **One URL, several species** (``species_conflict``): ``drop`` (default) rejects every record of
  that URL (reason ``url_species_conflict``): the label is unknown, and label noise in a long-tailed
  set hurts exactly the rare species. ``majority`` keeps the species with most records, logs the
  rest as duplicates of it, and falls back to ``drop`` on a tie.
* **The split.** Per species, its groups (each URL, or each value of ``split.group_by`` such as an
  observation id, so all its photos share a split) are ordered by ``sha256(seed, group key)`` and cut
  by the fractions: every split with a non-zero fraction gets at least one group, the rest goes by
  largest remainder. Species with fewer than ``min_for_stratify`` groups go wholly to train (they
  cannot be evaluated honestly; they are listed in the analysis). A group spanning several species
  belongs to its most frequent species (ties: the first name) and moves as one.

No URL can be in two splits, since each URL is one record after dedup and groups move whole;
``leakage_report`` checks this again on the output rather than trusting the construction.

Leaves out: content-hash (near-)duplicates of different URLs: the sharder sees the bytes, and logs
those (issue 4); license filtering and regions (catalog.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .config import SPLIT_NAMES, SplitConfig
from .licenses import PERMISSIVE
from .records import Record


def canonical_json(obj: object) -> str:
    """Deterministic JSON text used for ordering and tie-breaking."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def _keep_order(record: Record) -> tuple[bool, str]:
    return (record.license_class != PERMISSIVE, canonical_json(record.to_dict()))


@dataclass
class DedupResult:
    kept: list[Record]
    #: (duplicate, kept record, reason)
    duplicates: list[tuple[Record, Record, str]]
    #: (record, reason, message)
    rejected: list[tuple[Record, str, str]]
    conflicting_urls: int


def dedup(records: Iterable[Record], species_conflict: str = "drop") -> DedupResult:
    """Keeps one record per normalised URL; see the module docstring for the rules."""
    by_url: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_url[record.image_url].append(record)
    kept, duplicates, rejected = [], [], []
    conflicting = 0
    for url, group in by_url.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        species = Counter(r.latin_name for r in group)
        if len(species) > 1:
            conflicting += 1
            ranked = species.most_common()
            tie = ranked[0][1] == ranked[1][1]
            if species_conflict == "drop" or tie:
                names = ", ".join(sorted(species))
                why = "tie between species" if species_conflict == "majority" else "policy drop"
                message = f"URL {url} carries {len(species)} species ({names}); {why}"
                rejected.extend((r, "url_species_conflict", message) for r in group)
                continue
            winner = ranked[0][0]
            group.sort(key=lambda r: (r.latin_name != winner, *_keep_order(r)))
        else:
            group.sort(key=_keep_order)
        keep = group[0]
        kept.append(keep)
        for other in group[1:]:
            reason = "same_url" if other.latin_name == keep.latin_name else "url_species_conflict"
            duplicates.append((other, keep, reason))
    return DedupResult(kept=kept, duplicates=duplicates, rejected=rejected, conflicting_urls=conflicting)


def group_key(record: Record, group_by: str | None) -> str:
    """The value that keeps records together in one split (the URL unless ``group_by`` names a field)."""
    if group_by:
        if group_by.startswith("meta."):
            value = record.meta.get(group_by[len("meta.") :])
        else:
            value = (
                getattr(record, group_by, None) if group_by in Record.__slots__ else record.meta.get(group_by)
            )
        if value is not None and value != "":
            return f"{group_by}={canonical_json(value)}"
    return f"url={record.image_url}"


def allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Splits ``n`` items by ``fractions``: each non-zero split at least 1 (when n allows), then
    largest remainder. Ties go to the earlier split in train/val/test order."""
    active = [s for s in SPLIT_NAMES if fractions[s] > 0]
    counts = {s: math.floor(n * fractions[s]) for s in SPLIT_NAMES}
    order = sorted(active, key=lambda s: (-(n * fractions[s] - counts[s]), SPLIT_NAMES.index(s)))
    for s in order[: n - sum(counts.values())]:
        counts[s] += 1
    if n >= len(active):
        for s in active:
            while counts[s] == 0:
                donor = max(active, key=lambda d: (counts[d], -SPLIT_NAMES.index(d)))
                counts[donor] -= 1
                counts[s] += 1
    return counts


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def assign_splits(records: list[Record], cfg: SplitConfig) -> list[str]:
    """Sets ``record.split`` on every record; returns the species that went wholly to train."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[group_key(record, cfg.group_by)].append(record)
    by_species: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        counts = Counter(r.latin_name for r in members)
        owner = min(counts, key=lambda name: (-counts[name], name))
        by_species[owner].append(key)
    train_only = []
    for species in sorted(by_species):
        keys = sorted(by_species[species], key=lambda k: _rank(cfg.seed, k))
        if len(keys) < cfg.min_for_stratify:
            counts = {"train": len(keys), "val": 0, "test": 0}
            train_only.append(species)
        else:
            counts = allocate(len(keys), cfg.fractions)
        names = [s for s in SPLIT_NAMES for _ in range(counts[s])]
        for key, split in zip(keys, names, strict=True):
            for record in groups[key]:
                record.split = split
    return train_only


def leakage_report(records: Iterable[Record], group_by: str | None = None) -> dict:
    """Counts URLs (and ``group_by`` groups) that appear in more than one split."""
    url_splits: dict[str, set[str]] = defaultdict(set)
    group_splits: dict[str, set[str]] = defaultdict(set)
    for record in records:
        url_splits[record.image_url].add(record.split)
        if group_by:
            group_splits[group_key(record, group_by)].add(record.split)
    leaked_urls = sorted(url for url, splits in url_splits.items() if len(splits) > 1)
    leaked_groups = sorted(g for g, splits in group_splits.items() if len(splits) > 1)
    return {
        "urls_checked": len(url_splits),
        "urls_in_multiple_splits": len(leaked_urls),
        "groups_in_multiple_splits": len(leaked_groups),
        "examples": (leaked_urls + leaked_groups)[:10],
        "ok": not leaked_urls and not leaked_groups,
    }
