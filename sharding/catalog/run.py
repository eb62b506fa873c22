"""The catalog stage: a source of raw records -> validated, deduplicated, split JSONL + reports.

Owns the order of operations and every file the stage writes into ``--out``:

1. read (sources.py) and validate (records.py) each record, licences (licenses.py) and regions
   (regions.py) resolved (intake.py); a bad record goes to ``rejects.jsonl`` with its position;
2. dedup by normalised URL (urls.py), with the species-conflict policy (split.py) -> ``duplicates.jsonl``;
3. ``production_only`` rejects restrictive records (reason ``restrictive_license``), then species
   under ``split.min_images_per_species`` (reason ``rare_species``); if no record is left, the run
   stops here (intake.py's ``NoUsableRecordError``, one line naming the likely cause): a catalog
   without a record is never written;
4. the split (split.py), labels from ``class_mapping.json`` (species sorted by name -> 0..K-1);
5. ``dataset_{train,val,test}.jsonl``, ``dataset_splits.jsonl``, ``split_analysis.json``,
   ``export_stats.json``, ``catalog_version.json`` (fingerprint, split settings, lineage),
   ``split_species.jsonl`` (per species: groups per split against the target), ``split_changes.jsonl``
   (empty without ``--previous``), ``sources.json`` (each source's format, name and identity: a file's
   size and sha256), and per requested region ``dataset_<region>_{split}.jsonl``,
   ``class_mapping_<region>.json``, ``analysis_<region>.json``.

With a previous version (``previous=``, the CLI's ``--previous``; lineage.py reads and checks it before
the source is read, so a bad folder costs nothing): every URL or group it assigned keeps its split
(split.py's frozen rules), class indices of its mappings (global and regional) are kept and new species
appended, ``split_analysis.json`` gets ``growth`` (kept, new, removed, moved and their reasons) and
``split_changes.jsonl`` lists each removed, moved or relabelled record of the previous version.

Accounting: input records = written + rejected + duplicates, checked and stored in export_stats.
Determinism: output files are sorted and carry no timings or absolute paths, so the same input (in
any order) and seed give byte-identical files; only the ``position`` of a reject depends on order.
A regional subset keeps each record's global split (no leakage between a regional and the global
set); its ``label`` indexes the regional mapping and ``global_label`` the global one.
All files are staged under temporary names and renamed into place together once the run has
succeeded (outputs.py), so a crash or a bad input leaves the previous run's files, never a mix. A
write that fails (a full disk) removes the staged files and is one ``StorageError`` line naming the
stage and the file (``catalog: writing the catalog files: cannot write .../dataset_splits.jsonl.tmp:
No space left on device [Errno 28]; ...``).

Leaves out: downloading (the sharder, issue 4), and anything about image content.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.config import bundled_config_dir, find_config, to_dict
from flora.errors import StorageError, storage_error
from flora.sharding.catalog.formats import open_sources, source_versions
from flora.sharding.catalog.intake import Intake, read_source, refuse_empty
from flora.sharding.catalog.licenses import PERMISSIVE, LicenseTable
from flora.sharding.catalog.lineage import (
    PreviousCatalog,
    compare,
    fingerprint,
    fraction_report,
    load_previous,
    stable_mapping,
    version_record,
)
from flora.sharding.catalog.records import Record
from flora.sharding.catalog.regions import RegionTable
from flora.sharding.catalog.sources import redact
from flora.sharding.catalog.split import (
    DedupResult,
    SplitResult,
    assign_splits,
    canonical_json,
    dedup,
    leakage_report,
)
from flora.sharding.config import SPLIT_NAMES, CatalogConfig
from flora.sharding.outputs import TMP_SUFFIX, OutputSet

BUNDLED_CONFIG_DIR = bundled_config_dir()
#: The stage named by a failed write (as the sharder names ``build: writing shard parts``).
WRITING = "catalog: writing the catalog files"


class _StagedFiles(OutputSet):
    """outputs.OutputSet that remembers the file it is writing, so that a failed write can name it
    (an ``OSError`` from ``write`` carries no file name)."""

    def __init__(self, out_dir: str | Path):
        self.writing = Path(out_dir)
        super().__init__(out_dir)

    def jsonl(self, name: str, rows: Iterable[Any]) -> int:
        self.writing = self.out_dir / f"{name}{TMP_SUFFIX}"
        return super().jsonl(name, rows)

    def json(self, name: str, obj: Any) -> None:
        self.writing = self.out_dir / f"{name}{TMP_SUFFIX}"
        super().json(name, obj)


def resolve_table(name: str, config_dir: Path | None) -> Path:
    """A table file by name (flora.config.find_config: as given, ./config/, beside the config file,
    the bundled configs)."""
    return find_config(name, config_dir) or Path(name)


def _digest(record: Record) -> bytes:
    return hashlib.sha256(canonical_json(record.to_dict()).encode()).digest()


@dataclass
class CatalogResult:
    """What a run produced (also written as export_stats.json)."""

    out_dir: Path
    stats: dict[str, Any]
    class_mapping: dict[str, int]
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)


def _summary(records: list[Record]) -> dict[str, Any]:
    per_class = Counter(r.latin_name for r in records)
    licenses = Counter(r.license for r in records)
    classes = Counter(r.license_class for r in records)
    sizes = sorted(per_class.values())
    return {
        "records": len(records),
        "classes": len(per_class),
        "images_per_class": {
            "min": sizes[0] if sizes else 0,
            "median": statistics.median(sizes) if sizes else 0,
            "max": sizes[-1] if sizes else 0,
        },
        "license_class": dict(sorted(classes.items())),
        "permissive_fraction": round(classes.get(PERMISSIVE, 0) / len(records), 4) if records else None,
        "licenses": dict(sorted(licenses.items())),
        "regions": dict(sorted(Counter(r.region for r in records).items())),
        "sources": dict(sorted(Counter(r.source for r in records).items())),
    }


def analyse(records: list[Record], group_by: str | None) -> dict[str, Any]:
    """Per split counts, classes, license and region mix, coverage of species, and the leakage check."""
    splits = {s: [r for r in records if r.split == s] for s in SPLIT_NAMES}
    species = {s: {r.latin_name for r in rs} for s, rs in splits.items()}
    return {
        "total": _summary(records),
        "splits": {s: _summary(rs) for s, rs in splits.items()},
        # species that cannot be evaluated (only in train) or not learned (absent from train)
        "train_only_species": sorted(species["train"] - species["val"] - species["test"]),
        "species_without_train": sorted((species["val"] | species["test"]) - species["train"]),
        "classes_missing_from": {s: len(species["train"] - species[s]) for s in ("val", "test")},
        "leakage": leakage_report(records, group_by),
    }


def _stage_dataset(
    outputs: OutputSet, prefix: str, records: list[Record], extra: dict[int, dict] | None = None
) -> None:
    def rows(selected: Iterable[Record]):
        for r in selected:
            row = r.to_dict()
            if extra is not None:
                row.update(extra[id(r)])
            yield row

    for split in SPLIT_NAMES:
        outputs.jsonl(f"{prefix}_{split}.jsonl", rows(r for r in records if r.split == split))
    if extra is None:
        outputs.jsonl(f"{prefix}_splits.jsonl", rows(records))


def refuse_file_as_out(out_dir: str | Path) -> None:
    """StorageError, one line, when ``out_dir`` (or a folder above it) is an existing file."""
    out = Path(out_dir)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise StorageError(f"output folder {out}: {existing} is a file, expected a folder (--out)")


def run_catalog(
    source: str | list[str],
    out_dir: str | Path,
    cfg: CatalogConfig,
    config_dir: Path | None = None,
    previous: str | Path | None = None,
) -> CatalogResult:
    """Runs the whole catalog stage (see module docstring) and returns its statistics; ``source``: one
    or several sources, in any format (catalog/formats.py); ``previous``:
    the output folder of an earlier version whose splits are kept (lineage.LineageError if unusable)."""
    refuse_file_as_out(out_dir)  # before reading the source: a file there fails now, not after the read
    prev = load_previous(previous, cfg.split) if previous is not None else None
    licenses = LicenseTable.load(resolve_table(cfg.licenses_file, config_dir))
    regions = RegionTable.load(resolve_table(cfg.regions_file, config_dir))
    subset_names = sorted(set(regions.check_names(cfg.regions)))
    reader = open_sources(source, cfg)
    intake = read_source(reader, licenses, regions, cfg.progress)
    result = dedup(intake.valid, cfg.species_conflict)  # one record per URL (split.py)
    intake.reject_all(result.rejected)
    kept = _drop_restrictive(result.kept, intake) if cfg.production_only else result.kept
    kept = _drop_rare(kept, cfg.split.min_images_per_species, intake)
    refuse_empty(kept, reader, intake, out_dir)  # no usable record: not a catalog; nothing written
    split = assign_splits(kept, cfg.split, prev.frozen if prev else None)
    mapping = _label(kept, prev)
    _sort_for_output(kept, intake.rejects, result.duplicates)
    outputs: _StagedFiles | None = None
    try:
        with (outputs := _StagedFiles(out_dir)):
            _stage_dataset(outputs, "dataset", kept)
            outputs.json("class_mapping.json", mapping)
            analysis = _stage_analysis(outputs, kept, mapping, split, intake.rejects, cfg, prev)
            version = _stage_version(outputs, kept, mapping, cfg, prev)
            subsets = {name: _stage_subset(outputs, name, kept, cfg, prev) for name in subset_names}
            n_duplicates = _stage_logs(outputs, intake.rejects, result.duplicates)
            stats = {
                **_stats(reader.describe(), intake, kept, n_duplicates, result, analysis, subsets),
                **_provenance(licenses, regions, cfg, version, analysis, prev),
            }
            if not stats["accounting_ok"]:  # a bug, not bad input: never let it pass silently
                raise AssertionError(f"catalog accounting broken: {stats}")
            outputs.json("export_stats.json", stats)
            # what each source was (format, name, size and sha256 of a file): the dataset card's sources
            outputs.json("sources.json", {"sources": source_versions(reader)})
    except OSError as exc:  # a full or failing disk: one line naming the file; this run kept nothing
        if outputs is None:  # --out cannot be created: a file there, no permission, a full disk
            raise storage_error(WRITING, out_dir, exc, "check --out") from exc
        resume = f"run it again (this run kept no file; those already in {out_dir} are unchanged)"
        raise storage_error(WRITING, outputs.writing, exc, resume) from exc
    return CatalogResult(out_dir=Path(out_dir), stats=stats, class_mapping=mapping, subsets=subsets)


def _drop_restrictive(records: list[Record], intake: Intake) -> list[Record]:
    """``production_only``: records whose licence is not permissive are rejected."""
    for r in records:
        if r.license_class != PERMISSIVE:
            intake.reject(
                r, "restrictive_license", f"license {r.license} is {r.license_class}; production_only"
            )
    return [r for r in records if r.license_class == PERMISSIVE]


def _drop_rare(records: list[Record], minimum: int, intake: Intake) -> list[Record]:
    """Records of species with fewer than ``minimum`` images are rejected."""
    per_species = Counter(r.latin_name for r in records)
    for r in records:
        if per_species[r.latin_name] < minimum:
            intake.reject(
                r, "rare_species", f"{r.latin_name} has {per_species[r.latin_name]} images (< {minimum})"
            )
    return [r for r in records if per_species[r.latin_name] >= minimum]


def _label(records: list[Record], prev: PreviousCatalog | None) -> dict[str, int]:
    """Sets each record's label from the class mapping (a previous version's indices kept); returns it."""
    mapping = stable_mapping(prev.mapping if prev else None, (r.latin_name for r in records))
    for r in records:
        r.label = mapping[r.latin_name]
    return mapping


def _sort_for_output(kept: list[Record], rejects: list[dict[str, Any]], duplicates: list) -> None:
    """Sorts, in place, what the stage writes, so that its files do not depend on the input's order."""
    kept.sort(key=lambda r: (r.label, r.image_url))
    rejects.sort(key=lambda row: (row["reason"], canonical_json(row["record"]), row["position"]))
    # Sorted by URL then a digest of the content (not the content itself: 150k JSON strings would
    # double the stage's peak memory), and streamed out row by row.
    duplicates.sort(key=lambda d: (d[0].image_url, _digest(d[0]), d[2]))


def _stage_analysis(
    outputs: OutputSet,
    kept: list[Record],
    mapping: dict[str, int],
    split: SplitResult,
    rejects: list[dict[str, Any]],
    cfg: CatalogConfig,
    prev: PreviousCatalog | None,
) -> dict[str, Any]:
    """``split_analysis.json``, with ``split_species.jsonl`` and ``split_changes.jsonl`` beside it."""
    analysis = analyse(kept, cfg.split.group_by)
    analysis["split_policy"] = {
        "group_by": cfg.split.group_by,
        "group_by_missing": split.group_by_missing,
        "groups_moved_to_train": split.groups_moved_to_train,
        "too_few_to_stratify": split.train_only,
    }
    species_rows, analysis["fractions"] = fraction_report(split, cfg.split)
    outputs.jsonl("split_species.jsonl", species_rows)
    changes, analysis["growth"] = (
        compare(prev, kept, rejects, split, cfg.split.group_by) if prev else ([], None)
    )
    analysis["retired_classes"] = sorted(set(mapping) - {r.latin_name for r in kept})
    outputs.jsonl("split_changes.jsonl", changes)
    outputs.json("split_analysis.json", analysis)
    return analysis


def _stage_version(
    outputs: OutputSet,
    kept: list[Record],
    mapping: dict[str, int],
    cfg: CatalogConfig,
    prev: PreviousCatalog | None,
) -> dict[str, Any]:
    """``catalog_version.json``: the fingerprint of the staged splits file, split settings, lineage."""
    splits_file = outputs.out_dir / f"dataset_splits.jsonl{TMP_SUFFIX}"
    version = version_record(fingerprint(splits_file), cfg.split, len(kept), len(mapping), prev)
    outputs.json("catalog_version.json", version)
    return version


def _stage_logs(outputs: OutputSet, rejects: list[dict[str, Any]], duplicates: list) -> int:
    """``rejects.jsonl`` and ``duplicates.jsonl``; returns the number of duplicates."""
    outputs.jsonl("rejects.jsonl", rejects)
    return outputs.jsonl(
        "duplicates.jsonl",
        (
            {"reason": reason, "record": dup.to_dict(), "duplicate_of": keep.to_dict()}
            for dup, keep, reason in duplicates
        ),
    )


def _stats(
    source: str,
    intake: Intake,
    kept: list[Record],
    n_duplicates: int,
    result: DedupResult,
    analysis: dict[str, Any],
    subsets: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """``export_stats.json``'s counts: where the input records went, and what was written."""
    n_input, valid, rejects = intake.n_input, intake.valid, intake.rejects
    valid_classes = Counter(r.license_class for r in valid)
    return {
        "source": redact(source),
        "input_records": n_input,
        "written": len(kept),
        "rejected": len(rejects),
        "duplicates": n_duplicates,
        "accounting_ok": n_input == len(kept) + len(rejects) + n_duplicates,
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "duplicates_by_reason": dict(sorted(Counter(reason for _, _, reason in result.duplicates).items())),
        "conflicting_urls": result.conflicting_urls,
        "species": analysis["total"]["classes"],
        "splits": {s: analysis["splits"][s]["records"] for s in SPLIT_NAMES},
        "leakage_ok": analysis["leakage"]["ok"],
        "permissive_fraction": {
            "valid_input": round(valid_classes[PERMISSIVE] / len(valid), 4) if valid else None,
            "written": analysis["total"]["permissive_fraction"],
            "train": analysis["splits"]["train"]["permissive_fraction"],
        },
        "regions_written": analysis["total"]["regions"],
        "subsets": {
            name: {"records": s["total"]["records"], "classes": s["total"]["classes"]}
            for name, s in subsets.items()
        },
    }


def _provenance(
    licenses: LicenseTable,
    regions: RegionTable,
    cfg: CatalogConfig,
    version: dict[str, Any],
    analysis: dict[str, Any],
    prev: PreviousCatalog | None,
) -> dict[str, Any]:
    """``export_stats.json``'s context: unknown licences and countries, the config, the version, growth."""
    return {
        "licenses_unknown_raw": dict(sorted(licenses.unknown_raw.items())),
        "regions_unknown_countries": dict(sorted(regions.unknown_countries.items())),
        "region_conflicts": regions.conflicts,
        "config": to_dict(cfg),
        "version": version["fingerprint"],
        "growth": None
        if prev is None
        else {k: analysis["growth"][k] for k in ("kept", "new", "removed", "moved")},
    }


def _stage_subset(
    outputs: OutputSet,
    region: str,
    records: list[Record],
    cfg: CatalogConfig,
    prev: PreviousCatalog | None,
) -> dict[str, Any]:
    subset = [r for r in records if r.region == region]
    slug = region.lower()
    mapping = stable_mapping(prev.region_mapping(slug) if prev else None, (r.latin_name for r in subset))
    extra = {id(r): {"label": mapping[r.latin_name], "global_label": r.label} for r in subset}
    _stage_dataset(outputs, f"dataset_{slug}", subset, extra)
    outputs.json(f"class_mapping_{slug}.json", mapping)
    analysis = analyse(subset, cfg.split.group_by)
    analysis["region"] = region
    outputs.json(f"analysis_{slug}.json", analysis)
    return analysis
