"""Dedup by URL and the stratified, seeded, leakage-free train/val/test split.

Owns three decisions, each independent of the input order (so the same records and seed give the
same result however they arrive):

* **Which duplicate is kept.** Records whose URL key (records.url_key: the normalised URL without
  scheme, percent-encoding normalised) is equal are one image. The kept one is the first by
  (permissive license before restrictive, https before http, then the canonical JSON of the
  record); permissive first so that ``production_only`` never loses an image that one of its
  copies licenses permissively. The others go to ``duplicates.jsonl`` naming the kept record.
* **One URL, several species** (``species_conflict``): ``drop`` (default) rejects every record of
  that URL (reason ``url_species_conflict``): the label is unknown, and label noise in a long-tailed
  set hurts exactly the rare species. ``majority`` keeps the species with most records, logs the
  rest as duplicates of it, and falls back to ``drop`` on a tie.
* **The split.** Per species, its groups (each URL, or each value of ``split.group_by`` such as an
  observation id, so all its photos share a split) are ordered by ``sha256(seed, group key)`` and cut
  by the fractions: every split with a non-zero fraction gets at least one group, the rest goes by
  largest remainder. Species with fewer than ``min_for_stratify`` groups go wholly to train (they
  cannot be evaluated honestly; they are listed in the analysis). A group spanning several species
  belongs to its most frequent species (ties: the first name) and moves as one; if that leaves
  another species of the group without any train image, one of that species' groups moves to
  train (moving to train can never take train images from anyone).

No URL can be in two splits, since each URL is one record after dedup and groups move whole;
``leakage_report`` checks this again on the output rather than trusting the construction.

**Frozen splits** (``assign_splits(..., frozen=...)``, the catalog's ``--previous``; lineage.py reads
the previous version into ``FrozenSplits``: 16-byte digests of URL keys and ``group_by`` keys -> split):

* A group holding a URL, or carrying a ``group_by`` key, that the previous version assigned keeps that
  split. New groups of a species fill, in rank order, the splits furthest below the species' target
  (today's cut, ``allocate``, applied to all its groups, old and new): one group at a time to the split
  with the largest remaining deficit (ties: train, val, test), so the fractions move toward the target
  as far as the new groups allow and never away from it. Without old groups this is exactly the
  fresh split. A species that reaches ``min_for_stratify`` for the first time therefore gets its val and
  test groups from its new groups only (its old groups were all train).
* A group whose previous records lie in several splits (a new record joins two old groups, or an old
  URL now carries another group's key) cannot keep them all: it goes to **train** if any of them was
  in train, else to the split holding most of them (ties: val). Moving to train is the one direction
  that never puts an image a previous model trained on into a later evaluation set. Such a group is
  counted (``SplitResult.moved``, reason ``group_spans_splits``) and its changed records are listed.
* The train-image rule above takes only new groups: an old group is never moved for it. A species
  whose train images were all removed and that has no new group keeps its val/test images and is
  listed (the analysis's ``species_without_train``); its next new group goes to train, the largest
  deficit.

Leaves out: content-hash (near-)duplicates of different URLs: the sharder sees the bytes, and logs
those (issue 4); license filtering and regions (catalog.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flora.config import ConfigError
from flora.sharding.catalog.licenses import PERMISSIVE
from flora.sharding.catalog.records import Record
from flora.sharding.config import SPLIT_NAMES, SplitConfig


def canonical_json(obj: object) -> str:
    """Deterministic JSON text used for ordering and tie-breaking."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def _keep_order(record: Record) -> tuple[bool, bool, str]:
    return (
        record.license_class != PERMISSIVE,
        not record.image_url.startswith("https:"),
        canonical_json(record.to_dict()),
    )


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
    # a record per URL key digest, a list once it has a second (half of 10^6 URLs have none)
    by_url: dict[bytes, Record | list[Record]] = {}
    for record in records:
        key = key_digest(record.url_key or record.image_url)
        first = by_url.setdefault(key, record)
        if first is not record:
            if isinstance(first, list):
                first.append(record)
            else:
                by_url[key] = [first, record]
    kept, duplicates, rejected = [], [], []
    conflicting = 0
    for group in by_url.values():
        if not isinstance(group, list):
            kept.append(group)
            continue
        url = group[0].url_key or group[0].image_url
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


def group_value(record: Record, group_by: str) -> Any:
    """The record's value of ``group_by`` (a record field or ``meta.<name>``), None when absent."""
    if group_by.startswith("meta."):
        value = record.meta_dict().get(group_by[5:])
    else:
        value = getattr(record, group_by)
    return None if value == "" else value


def group_key(record: Record, group_by: str | None) -> str:
    """The value that keeps records together in one split: the URL key, or the ``group_by`` value
    when the record has one (a record without it is a group of its own)."""
    if group_by:
        value = group_value(record, group_by)
        if value is not None:
            return f"{group_by}={canonical_json(value)}"
    return f"url={record.url_key or record.image_url}"


def allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Splits ``n`` items by ``fractions``: each non-zero split at least 1 (when n allows), then
    largest remainder. Ties go to the earlier split in train/val/test order."""
    total = sum(fractions.values())
    fractions = {s: fractions[s] / total for s in SPLIT_NAMES}  # exact sum, whatever the rounding
    active = [s for s in SPLIT_NAMES if fractions[s] > 0]
    counts = {s: min(n, math.floor(n * fractions[s])) for s in SPLIT_NAMES}
    while sum(counts.values()) > n:  # float error on huge n: take the excess from the largest
        counts[max(active, key=lambda s: counts[s])] -= 1
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


def seeded_rank(seed: int, key: str) -> bytes:
    """The seeded shuffle order of a key (split groups here, shard order in the sharder)."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


#: Bytes of a key digest in a previous version's index: 128 bits, collisions negligible far beyond 10^9 keys.
DIGEST_BYTES = 16


def key_digest(key: str) -> bytes:
    """The compact identity of a URL key or group key in ``FrozenSplits`` (blake2b, 16 bytes)."""
    return hashlib.blake2b(key.encode(), digest_size=DIGEST_BYTES).digest()


@dataclass
class FrozenSplits:
    """A previous version's assignment, as split indices into ``SPLIT_NAMES``."""

    #: ``key_digest(url_key)`` -> split index, for every record the previous version wrote.
    urls: dict[bytes, int]
    #: ``key_digest(group_key)`` -> split index, for its ``group_by`` groups (empty without group_by).
    groups: dict[bytes, int]


@dataclass
class SplitResult:
    #: Species with too few groups to stratify, put wholly in train.
    train_only: list[str]
    #: Records without a ``group_by`` value (each then a group of its own).
    group_by_missing: int
    #: Groups moved to train so that a species sharing them keeps a train image.
    groups_moved_to_train: int
    #: Per species (the owner of its groups): ``groups`` (split -> groups), ``new`` (groups the
    #: previous version did not assign), ``target`` (the fresh cut of all its groups).
    species: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Group key -> reason, for each previously assigned group whose split could not be kept.
    moved: dict[str, str] = field(default_factory=dict)


def assign_splits(records: list[Record], cfg: SplitConfig, frozen: FrozenSplits | None = None) -> SplitResult:
    """Sets ``record.split`` on every record (rules in the module docstring); ``frozen``: the previous
    version's splits, kept for every group it assigned.

    Raises:
        ConfigError: ``split.group_by`` names a field that no record has.
    """
    groups: dict[str, list[Record]] = defaultdict(list)
    missing = 0
    for record in records:
        key = group_key(record, cfg.group_by)
        missing += cfg.group_by is not None and key.startswith("url=")
        groups[key].append(record)
    if cfg.group_by and records and missing == len(records):
        raise ConfigError(f"split.group_by: no record has a value for {cfg.group_by!r} (misspelled?)")
    by_species: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        counts = Counter(r.latin_name for r in members)
        owner = min(counts, key=lambda name: (-counts[name], name))
        by_species[owner].append(key)
    held, moved = _held_splits(groups, frozen) if frozen is not None else ({}, {})
    train_only, species_info = [], {}
    for species in sorted(by_species):
        keys = sorted(by_species[species], key=lambda k: seeded_rank(cfg.seed, k))
        if len(keys) < cfg.min_for_stratify:
            target = {"train": len(keys), "val": 0, "test": 0}
            train_only.append(species)
        else:
            target = allocate(len(keys), cfg.fractions)
        new = [k for k in keys if k not in held]
        counts = _fill(target, Counter(held[k] for k in keys if k in held), len(new))
        names = [s for s in SPLIT_NAMES for _ in range(counts[s])]
        for key, split in zip(new, names, strict=True):
            for record in groups[key]:
                record.split = split
        for key in keys:
            if key in held:
                for record in groups[key]:
                    record.split = held[key]
        species_info[species] = {"keys": keys, "new": len(new), "target": target}
    n_moved = _keep_a_train_image(groups, cfg.seed, held)
    for info in species_info.values():
        info["groups"] = Counter(groups[k][0].split for k in info.pop("keys"))
    return SplitResult(
        train_only=train_only,
        group_by_missing=missing,
        groups_moved_to_train=n_moved,
        species=species_info,
        moved=moved,
    )


def _held_splits(
    groups: dict[str, list[Record]], frozen: FrozenSplits
) -> tuple[dict[str, str], dict[str, str]]:
    """The previous split of each group the previous version assigned, and the groups whose previous
    records lie in several splits (resolved by the rule in the module docstring)."""
    held: dict[str, str] = {}
    moved: dict[str, str] = {}
    for key, members in groups.items():
        found: Counter[int] = Counter()
        for record in members:
            index = frozen.urls.get(key_digest(record.url_key or record.image_url))
            if index is not None:
                found[index] += 1
        if not key.startswith("url="):
            index = frozen.groups.get(key_digest(key))
            if index is not None:
                found[index] += 1
        if not found:
            continue
        if len(found) > 1:
            moved[key] = "group_spans_splits"
        train = SPLIT_NAMES.index("train")
        best = train if train in found else min(found, key=lambda i: (-found[i], i))
        held[key] = SPLIT_NAMES[best]
    return held, moved


def _fill(target: dict[str, int], held: Counter[str], n_new: int) -> dict[str, int]:
    """How many of ``n_new`` new groups go to each split: the largest remaining deficit below
    ``target`` first (ties in train/val/test order). Without held groups: ``target`` itself."""
    deficit = {s: max(0, target[s] - held[s]) for s in SPLIT_NAMES}
    if sum(deficit.values()) == n_new:  # always so without held groups, and when none is over target
        return deficit
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    for _ in range(n_new):  # sum(deficit) >= n_new always: the held groups are part of the target's n
        split = max(SPLIT_NAMES, key=lambda s: (deficit[s] - counts[s], -SPLIT_NAMES.index(s)))
        counts[split] += 1
    return counts


def _keep_a_train_image(groups: dict[str, list[Record]], seed: int, held: dict[str, str]) -> int:
    """Moves, per species without a train record, its first group by rank that is not ``held`` (a
    previous version's split is kept) to train."""
    in_train = {r.latin_name for members in groups.values() for r in members if r.split == "train"}
    species_groups: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        for name in {r.latin_name for r in members} - in_train:
            species_groups[name].append(key)
    n_moved = 0
    for name in sorted(species_groups):
        if name in in_train:
            continue  # an earlier move already gave it a train image
        candidates = [k for k in species_groups[name] if k not in held]
        if not candidates:
            continue  # only previously assigned groups: their splits are kept (module docstring)
        key = min(candidates, key=lambda k: seeded_rank(seed, k))
        for record in groups[key]:
            record.split = "train"
        in_train.update(r.latin_name for r in groups[key])
        n_moved += 1
    return n_moved


def leakage_report(records: Iterable[Record], group_by: str | None = None) -> dict:
    """Counts URLs (and ``group_by`` groups) that appear in more than one split."""
    # the first split of each key's digest (16 bytes, not the key, not a set: 10^6 records), and the
    # keys seen in another split
    url_split: dict[bytes, str | None] = {}
    group_split: dict[bytes, str | None] = {}
    leaked_urls: set[str] = set()
    leaked_groups: set[str] = set()
    for record in records:
        url = record.url_key or record.image_url
        if url_split.setdefault(key_digest(url), record.split) != record.split:
            leaked_urls.add(url)
        if group_by:
            group = group_key(record, group_by)
            if group_split.setdefault(key_digest(group), record.split) != record.split:
                leaked_groups.add(group)
    leaked_urls, leaked_groups = sorted(leaked_urls), sorted(leaked_groups)
    return {
        "urls_checked": len(url_split),
        "urls_in_multiple_splits": len(leaked_urls),
        "groups_in_multiple_splits": len(leaked_groups),
        "examples": (leaked_urls + leaked_groups)[:10],
        "ok": not leaked_urls and not leaked_groups,
    }
