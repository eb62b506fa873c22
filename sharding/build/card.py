"""The dataset card: what a published shard set holds and where its records went, beside its manifest.

Owns ``write_card`` (called by every build, incremental build, ``--retry-failed`` and ``--compact``
once the manifest is written, before an ``s3://`` output is published: the card's files are top-level
files of the set, uploaded with the logs) and the facts it gathers:

* ``dataset_card.json``: the facts, deterministic (no time, no absolute path): the catalog's sources
  (``sources.json``: format, name, bytes, sha256 and what the publisher states; "not recorded" for an
  older catalog), where the records went in the catalog (input = written + rejected + duplicates) and
  in the build (records in = sharded + failed + content duplicates), images and species per split and
  region, the long tail of train, the licence mix per split, the duplicates the build removed, the top
  failure reasons and the lineage (catalog fingerprint and chain, the shards' version and parent, the
  frozen splits' growth);
* ``dataset_card.md``: the same for reading, with the plots (card_plots.py) beside it.

Per-species counts come from what was sharded: each listed tar's ``cls`` members, read one sample at a
time by its ``.idx`` offsets (a shard's index in memory at most), less the manifest's tombstones; the
licence mix from the manifest's per-shard counts, less the tombstoned samples still in a tar.
``--compact`` has no catalog folder: the catalog's facts are taken from the card already there.
A missing or unreadable catalog report is "not recorded" on the card (logged), never a failed build.

Leaves out: the plots (card_plots.py), the manifest and logs (finalize.py), publication (remote.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from flora.errors import storage_error
from flora.sharding.build.card_plots import PLOTS, draw_plots
from flora.sharding.config import SPLIT_NAMES
from flora.sharding.format.reader import tar_samples
from flora.sharding.format.schema import CLASS_MAPPING, DUPLICATES, PERMISSIVE, Manifest, read_manifest
from flora.sharding.outputs import TMP_SUFFIX, OutputSet

log = logging.getLogger(__name__)

CARD_FORMAT = "flora-dataset-card/1"
CARD_MD = "dataset_card.md"
CARD_JSON = "dataset_card.json"
#: Every file of the card (the plots' names are card_plots.py's).
CARD_FILES = (CARD_MD, CARD_JSON, *PLOTS.values())
#: Failure reasons the card names; the others are counted together.
TOP_FAILURES = 5
#: Long-tail marks: species with exactly 1, fewer than 5 and fewer than 20 train images (20: the few-shot
#: bucket of training/metrics.py, after Liu et al. 2019, ImageNet-LT).
ONE, FEW, FEW_SHOT = 1, 5, 20
#: The head: the most frequent fifth of the species (the Pareto cut); its share of the train images.
HEAD_FRACTION = 0.2
NOT_RECORDED = "not recorded"
#: The catalog's reports the card reads from the splits folder.
CATALOG_FILES = ("sources.json", "export_stats.json", "catalog_version.json", "split_analysis.json")


class CardFiles(OutputSet):
    """The card's files, staged and renamed together (outputs.py), with text and binary files too."""

    def text(self, name: str, body: str) -> None:
        with self._open(name) as fh:
            fh.write(body)

    def binary(self, name: str):
        """A staged binary file (a PNG), created as ``_open`` creates text ones (never through a link)."""
        path = self.out_dir / (name + TMP_SUFFIX)
        if os.path.lexists(path):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        self._staged.append(path)
        return open(fd, "wb")


def write_card(out: Path, splits_dir: Path | None) -> dict:
    """Writes ``dataset_card.md``, ``dataset_card.json`` and the plots in ``out`` from its manifest, its
    tars and the catalog's reports in ``splits_dir`` (None, ``--compact``: the card already in ``out``);
    returns ``summary`` of the card."""
    card = card_facts(out, splits_dir)
    try:
        with CardFiles(out) as files:
            files.json(CARD_JSON, card)
            plots = draw_plots(files.binary, card)
            files.text(CARD_MD, render_card(card, plots))
        for name in set(PLOTS.values()) - set(plots.values()):  # no matplotlib: no stale plot beside the md
            (out / name).unlink(missing_ok=True)
    except OSError as exc:  # a full disk: the shards and manifest are written; a re-run writes the card
        raise storage_error(
            "build: dataset card", out / CARD_MD, exc, "run the build again to write it"
        ) from exc
    return summary(card, out / CARD_MD, len(plots))


# ------------------------------------------------------------------------------------------------ facts
def card_facts(out: Path, splits_dir: Path | None) -> dict:
    """The card's facts (module docstring), a JSON-ready dict with sorted keys."""
    manifest = read_manifest(out)
    names = _species_names(out)
    counts = sharded_counts(out, manifest)
    catalog = catalog_facts(splits_dir) if splits_dir is not None else _earlier_catalog(out)
    per_species = _per_species(counts, names)
    raw = manifest.raw
    return {
        "format": CARD_FORMAT,
        "sources": catalog["sources"],
        "catalog": catalog["catalog"],
        "build": _build_facts(raw, manifest),
        "splits": _split_facts(counts, manifest),
        "regions": _region_facts(counts),
        "long_tail": {split: tail_facts(list(per_species[split].values())) for split in SPLIT_NAMES},
        "licenses": license_facts(out, manifest),
        "duplicates": _duplicate_facts(out, raw),
        "failures": _failure_facts(raw.get("failures_by_reason") or {}),
        "lineage": _lineage(raw, catalog),
        "images_per_species": per_species,
    }


def _per_species(counts: Counter, names: dict[int, str]) -> dict[str, dict[str, int]]:
    """Split -> species name -> images (regions merged), names sorted."""
    per: dict[str, Counter] = {split: Counter() for split in SPLIT_NAMES}
    for (split, _region, label), n in counts.items():
        per.setdefault(split, Counter())[names.get(label, f"label {label}")] += n
    return {split: dict(sorted(c.items())) for split, c in per.items()}


def sharded_counts(out: Path, manifest: Manifest) -> Counter:
    """``(split, region, label) -> samples`` of every listed tar, tombstones excluded, from the tars'
    ``cls`` members (one shard's index in memory at a time)."""
    counts: Counter = Counter()
    for entry in manifest.shards:
        dead = set(entry.tombstones)
        for sample in tar_samples(out / entry.path, ("cls",)):
            if sample.key not in dead:
                counts[(entry.split, entry.region, sample.label)] += 1
    return counts


def license_facts(out: Path, manifest: Manifest) -> dict:
    """Per split: samples per licence class and the permissive share (what a production-only set keeps)."""
    per_split: dict[str, Counter] = {split: Counter() for split in SPLIT_NAMES}
    for entry in manifest.shards:
        per_split.setdefault(entry.split, Counter()).update(entry.licenses)
        if entry.tombstones:  # still in the tar (--keep-tombstones): counted in the entry's licences
            for sample in tar_samples(out / entry.path, ("json",), keys=set(entry.tombstones)):
                per_split[entry.split][sample.meta.license_class if sample.meta else None] -= 1
    facts = {}
    for split, classes in per_split.items():
        total = sum(classes.values())
        facts[split] = {
            "classes": {str(k): v for k, v in sorted(classes.items(), key=lambda kv: str(kv[0])) if v},
            "samples": total,
            "permissive_share": round(classes[PERMISSIVE] / total, 4) if total else None,
        }
    return facts


def tail_facts(sizes: list[int]) -> dict:
    """The long tail of one split's images per species (``sizes``: one count per species)."""
    ranked = sorted(sizes, reverse=True)
    total = sum(ranked)
    head = ranked[: max(1, round(len(ranked) * HEAD_FRACTION))] if ranked else []
    tail = [n for n in ranked if n < FEW_SHOT]
    return {
        "species": len(ranked),
        "images": total,
        "with_1": sum(1 for n in ranked if n == ONE),
        "under_5": sum(1 for n in ranked if n < FEW),
        "under_20": len(tail),
        "max": ranked[0] if ranked else 0,
        "median": ranked[len(ranked) // 2] if ranked else 0,
        "min": ranked[-1] if ranked else 0,
        "head_species": len(head),
        "head_share": round(sum(head) / total, 4) if total else None,
        "tail_share": round(sum(tail) / total, 4) if total else None,
    }


def _build_facts(raw: dict, manifest: Manifest) -> dict:
    return {
        "accounting": raw.get("accounting"),
        "shards": len(manifest.shards),
        "tombstones": sum(len(s.tombstones) for s in manifest.shards),
    }


def _split_facts(counts: Counter, manifest: Manifest) -> dict:
    shards = Counter((s.split, s.region) for s in manifest.shards)
    facts: dict = {}
    for split in SPLIT_NAMES:
        regions: dict = defaultdict(lambda: {"images": 0, "species": 0, "shards": 0})
        species = set()
        for (s, region, label), n in counts.items():
            if s == split:
                regions[region]["images"] += n
                regions[region]["species"] += 1
                species.add(label)
        for (s, region), n in shards.items():
            if s == split:
                regions[region]["shards"] = n
        facts[split] = {
            "images": sum(r["images"] for r in regions.values()),
            "species": len(species),
            "shards": sum(r["shards"] for r in regions.values()),
            "regions": dict(sorted(regions.items())),
        }
    return facts


def _region_facts(counts: Counter) -> dict:
    images: Counter = Counter()
    species: dict[str, set] = defaultdict(set)
    for (_split, region, label), n in counts.items():
        images[region] += n
        species[region].add(label)
    return {r: {"images": images[r], "species": len(species[r])} for r in sorted(images)}


def _duplicate_facts(out: Path, raw: dict) -> dict:
    """The manifest's duplicates by reason, and by split from ``duplicates.jsonl`` (streamed)."""
    by_split: dict[str, Counter] | None = None
    path = out / DUPLICATES
    if path.is_file():
        by_split = {split: Counter() for split in SPLIT_NAMES}
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    by_split.setdefault(str(row.get("split")), Counter())[str(row.get("reason"))] += 1
                except (ValueError, AttributeError):
                    continue
    return {
        "by_reason": dict(sorted((raw.get("duplicates_by_reason") or {}).items())),
        "by_split": None if by_split is None else {s: dict(sorted(c.items())) for s, c in by_split.items()},
    }


def _failure_facts(by_reason: dict[str, int]) -> dict:
    ranked = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    rest = ranked[TOP_FAILURES:]
    return {
        "total": sum(by_reason.values()),
        "top": [[reason, n] for reason, n in ranked[:TOP_FAILURES]],
        "other_reasons": len(rest),
        "other_records": sum(n for _, n in rest),
    }


def _lineage(raw: dict, catalog: dict) -> dict:
    version = catalog.get("version") or {}
    return {
        "catalog_fingerprint": version.get("fingerprint"),
        "catalog_lineage": version.get("lineage"),
        "catalog_previous": (version.get("previous") or {}).get("fingerprint"),
        "growth": catalog.get("growth"),
        "shards_version": raw.get("version") or raw.get("splits_sha256"),
        "shards_parent": raw.get("parent"),
    }


def _species_names(out: Path) -> dict[int, str]:
    path = out / CLASS_MAPPING
    mapping = _read_json(path)
    return {v: k for k, v in mapping.items()} if isinstance(mapping, dict) else {}


# ------------------------------------------------------------------------------------------- catalog
def catalog_facts(splits_dir: Path) -> dict:
    """The catalog's sources, accounting, version and growth from its reports in ``splits_dir``."""
    sources, stats, version, analysis = (_read_json(splits_dir / name) for name in CATALOG_FILES)
    listed = sources.get("sources") if isinstance(sources, dict) else None
    accounting = None
    if isinstance(stats, dict):
        keys = ("input_records", "written", "rejected", "duplicates", "accounting_ok", "rejects_by_reason",
                "duplicates_by_reason")  # fmt: skip
        accounting = {k: stats.get(k) for k in keys}
    growth = analysis.get("growth") if isinstance(analysis, dict) else None
    return {
        "sources": listed if isinstance(listed, list) else None,
        "catalog": accounting,
        "version": version if isinstance(version, dict) else None,
        "growth": {k: growth.get(k) for k in ("kept", "new", "removed", "moved")} if growth else None,
    }


def _earlier_catalog(out: Path) -> dict:
    """``--compact``: the catalog's facts of the card already in ``out`` (none: not recorded)."""
    card = _read_json(out / CARD_JSON)
    card = card if isinstance(card, dict) else {}
    lineage = card.get("lineage") or {}
    version = {"fingerprint": lineage.get("catalog_fingerprint"), "lineage": lineage.get("catalog_lineage"),
               "previous": {"fingerprint": lineage.get("catalog_previous")}}  # fmt: skip
    return {"sources": card.get("sources"), "catalog": card.get("catalog"),
            "version": version if lineage else None, "growth": lineage.get("growth")}  # fmt: skip


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; None when it is missing or unreadable (logged: the card says not recorded)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("dataset card: %s is unreadable (%s); the card says not recorded", path, exc)
        return None


# -------------------------------------------------------------------------------------------- summary
def summary(card: dict, md: Path, plots: int) -> dict:
    """What ``flora build`` prints: a few figures and the card's path."""
    tail = card["long_tail"]["train"]
    lic = card["licenses"]
    permissive = sum(v["classes"].get(PERMISSIVE, 0) for v in lic.values())
    samples = sum(v["samples"] for v in lic.values())
    return {
        "path": str(md),
        "plots": plots,
        "species": len(set().union(*(card["images_per_species"][s] for s in SPLIT_NAMES))),
        "splits": {s: {k: card["splits"][s][k] for k in ("images", "species")} for s in SPLIT_NAMES},
        "train_tail": {k: tail[k] for k in ("with_1", "under_5", "under_20")},
        "permissive_share": round(permissive / samples, 4) if samples else None,
        "duplicates": card["duplicates"]["by_reason"],
        "sources": None if card["sources"] is None else len(card["sources"]),
    }


# ------------------------------------------------------------------------------------------- markdown
def render_card(card: dict, plots: dict[str, str]) -> str:
    """The card as Markdown: the same facts as the JSON, for reading (``plots``: plot -> file name)."""
    lines = ["# Dataset card", ""]
    lineage = card["lineage"]
    lines += [f"Shards of catalog version `{_short(lineage['shards_version'])}`, written by `flora build`; "
              "every build, `--retry-failed` and `--compact` regenerates this card from the published set "
              f"(the figures are in `{CARD_JSON}`).", ""]  # fmt: skip
    lines += _sources_md(card["sources"])
    lines += _records_md(card["catalog"], card["build"])
    lines += _splits_md(card["splits"], card["regions"])
    lines += _tail_md(card["long_tail"]["train"], plots)
    lines += _licenses_md(card["licenses"], plots)
    lines += _duplicates_md(card["duplicates"])
    lines += _failures_md(card["failures"])
    lines += _lineage_md(lineage)
    return "\n".join(lines).rstrip("\n") + "\n"


def _short(value: Any, n: int = 12) -> str:
    text = NOT_RECORDED if value is None else str(value)
    return text.removeprefix("sha256:")[:n]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows), ""]  # fmt: skip


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _sources_md(sources: list[dict] | None) -> list[str]:
    lines = ["## Sources", ""]
    if sources is None:
        return [*lines, f"Sources: {NOT_RECORDED} (the catalog predates `sources.json`).", ""]
    rows = []
    for src in sources:
        facts = "; ".join(f"{k}: {v}" for k, v in sorted(src.items())
                          if k not in ("format", "name", "bytes", "sha256"))  # fmt: skip
        rows.append((src.get("format", "?"), src.get("name", "?"), src.get("bytes", "-"),
                     _short(src.get("sha256"), 16) if src.get("sha256") else "-", facts or "-"))  # fmt: skip
    return ["## Sources", "", *_table(("format", "name", "bytes", "sha256", "version"), rows)]


def _records_md(catalog: dict | None, build: dict) -> list[str]:
    lines = ["## Where the records went", ""]
    if catalog is None:
        lines += [f"Catalog: {NOT_RECORDED}.", ""]
    else:
        c, ok = catalog, "ok" if catalog["accounting_ok"] else "MISMATCH"
        lines += [f"Catalog: {c['input_records']} records in = {c['written']} written + {c['rejected']} "
                  f"rejected + {c['duplicates']} duplicates ({ok}).", ""]  # fmt: skip
        rejects = sorted((catalog.get("rejects_by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        if rejects:
            lines += _table(("rejected by the catalog", "records"), rejects)
    a = build["accounting"] or {}
    ok = "ok" if a.get("ok") else "MISMATCH"
    lines += [f"Build: {a.get('records_in')} records in = {a.get('sharded')} sharded + {a.get('failed')} "
              f"failed + {a.get('content_duplicates')} content duplicates ({ok}); {build['shards']} shards"
              + (f", {build['tombstones']} tombstoned samples still in them" if build["tombstones"] else "")
              + ".", ""]  # fmt: skip
    return lines


def _splits_md(splits: dict, regions: dict) -> list[str]:
    lines = ["## Splits and regions", ""]
    lines += _table(("split", "images", "species", "shards"),
                    [(s, f["images"], f["species"], f["shards"]) for s, f in splits.items()])  # fmt: skip
    rows = [(s, r, f["images"], f["species"], f["shards"])
            for s, facts in splits.items() for r, f in facts["regions"].items()]  # fmt: skip
    if rows:
        lines += _table(("split", "region", "images", "species", "shards"), rows)
    if regions:
        lines += _table(
            ("region", "images", "species"), [(r, f["images"], f["species"]) for r, f in regions.items()]
        )
    return lines


def _tail_md(tail: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## Long tail (train)", ""]
    if "long_tail" in plots:
        lines += [f"![Images per species against species rank, log scale]({plots['long_tail']})", ""]
    lines += [
        f"- {tail['species']} species, {tail['images']} images; per species: max {tail['max']}, "
        f"median {tail['median']}, min {tail['min']}",
        f"- species with 1 image: {tail['with_1']}; with fewer than {FEW}: {tail['under_5']}; "
        f"with fewer than {FEW_SHOT} (few-shot): {tail['under_20']}",
        f"- head (the {tail['head_species']} most frequent species, {HEAD_FRACTION:.0%}): "
        f"{_share(tail['head_share'])} of the images; tail (species under {FEW_SHOT} images): "
        f"{_share(tail['tail_share'])}",
        "",
    ]
    return lines


def _licenses_md(licenses: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## Licences", ""]
    classes = sorted({c for f in licenses.values() for c in f["classes"]} | {PERMISSIVE, "restrictive"})
    rows = [(s, *(f["classes"].get(c, 0) for c in classes), _share(f["permissive_share"]))
            for s, f in licenses.items()]  # fmt: skip
    lines += _table(("split", *classes, "permissive share (production-only)"), rows)
    if "licenses" in plots:
        lines += [f"![Licence mix per split]({plots['licenses']})", ""]
    return lines


def _duplicates_md(duplicates: dict) -> list[str]:
    lines = ["## Duplicates removed by the build", ""]
    by_split, by_reason = duplicates["by_split"], duplicates["by_reason"]
    reasons = sorted({"same_content", "near_duplicate", *by_reason})
    if by_split is not None:
        rows = [(s, *(c.get(r, 0) for r in reasons)) for s, c in by_split.items()]
        lines += _table(("split", *reasons), [*rows, ("all", *(by_reason.get(r, 0) for r in reasons))])
    else:
        lines += _table(tuple(reasons), [tuple(by_reason.get(r, 0) for r in reasons)])
    return lines


def _failures_md(failures: dict) -> list[str]:
    lines = ["## Top failure reasons", ""]
    if not failures["total"]:
        return [*lines, "No record failed.", ""]
    lines += _table(("reason", "records"), [tuple(row) for row in failures["top"]])
    if failures["other_reasons"]:
        lines += [f"and {failures['other_reasons']} more reasons ({failures['other_records']} records); "
                  f"{failures['total']} failures in all.", ""]  # fmt: skip
    return lines


def _lineage_md(lineage: dict) -> list[str]:
    chain = lineage["catalog_lineage"]
    lines = [
        "## Lineage",
        "",
        f"- catalog fingerprint: `{lineage['catalog_fingerprint'] or NOT_RECORDED}`",
        "- catalog lineage: " + (" -> ".join(f"`{_short(f)}`" for f in chain) if chain else NOT_RECORDED),
        f"- shards version: `{_short(lineage['shards_version'])}`; parent: "
        + (f"`{_short(lineage['shards_parent'])}`" if lineage["shards_parent"] else "none (a full build)"),
    ]
    growth = lineage["growth"]
    if growth:
        lines.append(
            "- frozen splits: " + ", ".join(f"{k} {growth[k]}" for k in ("kept", "new", "removed", "moved"))
        )
    return [*lines, ""]
