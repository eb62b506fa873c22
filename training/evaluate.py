"""``flora evaluate --checkpoint runs/x/best_model.pt --split test [--region EU_SW]``.

Also under ``torchrun``: each rank predicts its share, the per-sample records are merged on every
rank and checked (each sample of the split exactly once) before any metric is computed.

Owns the evaluation report: top-1, top-5, macro top-1 and top-5, NLL and ECE (15 bins) of the split,
per region; a temperature fitted on the calibration split (``val`` by default; LBFGS on NLL), stored
back into the checkpoint (``temperature``), with ECE and NLL before and after; the many / medium /
few-shot buckets by the checkpoint's training counts (``--buckets``; thresholds scaled for a small
training split, stated in ``buckets.rule``), each with top-1, top-5, macro top-1 and ECE before and
after, also per region when the split spans several; the most-confused species pairs;
``results.json``, ``reliability.png``, ``per_species.png`` (top-1 and calibration gap per species
against its training images) and ``confusion.png`` in the output folder
(``<checkpoint folder>/eval_<split>[_<region>]`` by default).

The training counts are the checkpoint's ``class_counts``; a checkpoint written before they were kept
has them counted in its data config's training split (``buckets.class_counts`` says which).

The data come from the checkpoint's own ``data`` config (shards, image size, mean/std, label space;
its locations absolute, so it runs from any folder: checkpoint.py), with ``--shards`` and
``data.key=value`` overrides; the class mapping of the evaluated shards must be
the checkpoint's (a refusal names the species only in one, only in the other, and at other indices).

Leaves out: the metric definitions (metrics.py) and the figures (plots.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from flora.config import ConfigError
from flora.errors import ArgumentParser, fail
from flora.io import refuse_overlap
from flora.loaders.config import load_data_config
from flora.loaders.factory import make_loader, resolve_device
from flora.loaders.index import LoaderError, build_index
from flora.training import plots
from flora.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, update_checkpoint
from flora.training.distributed import destroy_distributed, init_distributed
from flora.training.errors import TrainingError
from flora.training.metrics import (
    BUCKET_THRESHOLDS,
    BUCKETS,
    ECE_BINS,
    BucketRule,
    bucket_metrics,
    bucket_rule,
    calibration_bins,
    confused_pairs,
    expected_calibration_error,
    fit_temperature,
    per_species,
    summarize,
)
from flora.training.models import ModelError, model_from_checkpoint
from flora.training.precision import autocast_dtype
from flora.training.predict import gather_predictions

log = logging.getLogger(__name__)

#: Species named per kind of difference when the shards' class mapping is not the checkpoint's.
LISTED_SPECIES = 5


def data_config(checkpoint: Checkpoint, shards: str | None, region: str | None, overrides: list[str]):
    """The checkpoint's data section for evaluation: its shards (or ``shards``), one region on request."""
    data = dict(checkpoint.data)
    if shards:
        data["shards"] = shards
    if region:
        if data.get("label_space") == "region" and data.get("region_filter") not in (region, [region]):
            raise TrainingError(
                f"--region {region}: this checkpoint predicts the classes of region "
                f"{data.get('region_filter')!r} only"
            )
        data["region_filter"] = region
    return load_data_config({"data": data}, overrides)


def mapping_difference(
    checkpoint: dict[str, int], shards: dict[str, int], limit: int = LISTED_SPECIES
) -> str:
    """How two class mappings differ, bounded: species only in one, only in the other, and at other
    indices (``name checkpoint-index -> shard-index``), the first ``limit`` of each with its count."""

    def listed(what: str, items: list[str]) -> str | None:
        if not items:
            return None
        more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
        return f"{what} ({len(items)}): {', '.join(items[:limit])}{more}"

    only_checkpoint = sorted(set(checkpoint) - set(shards))
    only_shards = sorted(set(shards) - set(checkpoint))
    moved = sorted(
        (n for n in set(checkpoint) & set(shards) if checkpoint[n] != shards[n]), key=checkpoint.get
    )
    parts = [
        listed("only in the checkpoint", [repr(n) for n in only_checkpoint]),
        listed("only in the shards", [repr(n) for n in only_shards]),
        listed("at other indices", [f"{n!r} {checkpoint[n]} -> {shards[n]}" for n in moved]),
    ]
    return "; ".join(p for p in parts if p) or "the same species at the same indices"


def training_counts(
    checkpoint: Checkpoint, shards: str | None, overrides: list[str]
) -> tuple[np.ndarray, str]:
    """Training images per class index and where they come from: the checkpoint's ``class_counts``, or
    for a checkpoint written before it kept them, the training split of its data config (``shards``
    and ``overrides`` applied, not a region filter: the counts the run trained on)."""
    classes = len(checkpoint.class_mapping)
    if checkpoint.class_counts is not None:
        counts, source = np.asarray(checkpoint.class_counts, dtype=np.int64), "the checkpoint's class_counts"
    else:
        cfg = data_config(checkpoint, shards, None, overrides)
        index = build_index(cfg, cfg.train_split)
        if index.class_mapping != checkpoint.class_mapping:
            raise TrainingError(
                f"the checkpoint has no class_counts and its {cfg.train_split!r} shards' class mapping "
                f"is not its own: {mapping_difference(checkpoint.class_mapping, index.class_mapping)}"
            )
        counts = np.bincount(index.labels, minlength=classes).astype(np.int64)
        source = (
            f"counted in the {cfg.train_split!r} split of {cfg.shards} (the checkpoint predates class_counts)"
        )
    if len(counts) != classes:
        raise TrainingError(f"the checkpoint's class_counts has {len(counts)} entries, expected {classes}")
    return counts, source


def tail_section(
    records: dict,
    regions: np.ndarray,
    counts: np.ndarray,
    source: str,
    rule: BucketRule,
    calibrated_confidence: np.ndarray | None,
) -> dict:
    """results.json's ``buckets``: the rule, species and samples per bucket, the bucket metrics (all
    test samples, and per region when they span several; a bucket without test samples is None)."""
    class_bucket = rule.assign(counts)
    sample_bucket = class_bucket[records["label"]]
    present = counts[counts > 0]

    def per_bucket(values) -> dict[str, int]:
        return {name: int(values[i]) for i, name in enumerate(BUCKETS)}

    section = {
        "thresholds": list(rule.thresholds),
        "requested": list(rule.requested),
        "scaled": rule.scaled,
        "rule": rule.rule,
        "class_counts": source,
        "class_count_range": [int(present.min()), int(present.max())] if len(present) else None,
        "species": per_bucket(np.bincount(class_bucket, minlength=len(BUCKETS))),
        "training_samples": per_bucket(np.bincount(class_bucket, weights=counts, minlength=len(BUCKETS))),
        "test_samples": per_bucket(np.bincount(sample_bucket, minlength=len(BUCKETS))),
        "metrics": bucket_metrics(records, class_bucket, calibrated_confidence),
        "per_region": {},
    }
    names = sorted(set(regions.tolist()))
    if len(names) > 1:
        for name in names:
            sel = regions == name
            part = {k: v[sel] for k, v in records.items() if k != "logits"}
            calibrated = None if calibrated_confidence is None else calibrated_confidence[sel]
            section["per_region"][str(name)] = bucket_metrics(part, class_bucket, calibrated)
    return section


def tail_line(results: dict) -> str:
    """``many/medium/few top-1: 0.912 / 0.741 / 0.420, macro top-5 0.950 (thresholds 20/100 scaled to 13/27:
    the largest class has 86 training images; 3 / 4 / 5 species)``."""
    b = results["buckets"]
    figures = " / ".join(f"{m['top1']:.3f}" if m else "-" for m in b["metrics"].values())
    asked, used = "/".join(map(str, b["requested"])), "/".join(map(str, b["thresholds"]))
    if b["scaled"]:
        why = f"{asked} scaled to {used}: the largest class has {b['class_count_range'][1]} training images"
    else:
        why = f"{used} training images"
    species = " / ".join(str(n) for n in b["species"].values())
    line = (
        f"many/medium/few top-1: {figures}, macro top-5 {results['metrics']['macro_top5']:.3f} "
        f"(thresholds {why}; {species} species)"
    )
    if b["class_counts"] != "the checkpoint's class_counts":
        line += f"; training counts {b['class_counts']}"
    return line


def _scaled(records: dict, logits: torch.Tensor, temperature: float) -> dict:
    """Confidence and NLL of ``softmax(logits / T)`` (the top-k ranking does not change with T)."""
    scaled = logits.float() / temperature
    labels = torch.from_numpy(records["label"])
    out = dict(records)
    out["confidence"] = scaled.softmax(dim=1).max(dim=1).values.numpy()
    out["nll"] = torch.nn.functional.cross_entropy(scaled, labels, reduction="none").numpy()
    return out


def _skipped(loader, ddp) -> dict[str, int]:
    """Samples left out, by reason: the scan's (the same on every rank) plus each rank's runtime skips
    (bit rot found while decoding), summed over the ranks."""
    scan = Counter(loader.index.skipped)
    total = Counter(scan)
    for rank_counts in ddp.gather(dict(loader.skipped)):
        total.update(Counter(rank_counts) - scan)
    return dict(sorted(total.items()))


def evaluate(
    checkpoint_path: str | Path,
    split: str = "test",
    region: str | None = None,
    shards: str | None = None,
    calibration_split: str | None = "val",
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    confusion_classes: int = 20,
    top_confusions: int = 20,
    buckets: tuple[int, int] = BUCKET_THRESHOLDS,
    scale_buckets: bool = True,
) -> dict:
    """Evaluates a checkpoint on ``split``; every rank returns the results, rank 0 writes the files.

    ``buckets``: the few- and many-shot thresholds in training images, scaled to a small training split
    unless ``scale_buckets`` is False (``metrics.bucket_rule``)."""
    out = output_folder(checkpoint_path, split, region, out_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    cfg = data_config(checkpoint, shards, region, overrides or [])
    counts, counts_source = training_counts(checkpoint, shards, overrides or [])
    rule = bucket_rule(counts, tuple(buckets), scale_buckets)
    ddp = init_distributed(cfg.device)
    rank, world_size = ddp.rank, ddp.world_size
    device = resolve_device(cfg, ddp.local_rank)
    amp = autocast_dtype("auto", device)
    model = model_from_checkpoint(checkpoint).to(device).eval()
    names = [None] * len(checkpoint.class_mapping)
    for name, idx in checkpoint.class_mapping.items():
        names[idx] = name

    def loader_for(split_name: str):
        loader = make_loader(cfg, split_name, False, rank, world_size, device)
        if loader.index.class_mapping != checkpoint.class_mapping:
            loader.close()
            differences = mapping_difference(checkpoint.class_mapping, loader.index.class_mapping)
            raise TrainingError(
                f"the {split_name!r} shards' class mapping ({loader.index.num_classes} classes) is not the "
                f"checkpoint's ({len(names)}): {differences}; evaluate on the shards (and label space) it "
                "was trained on"
            )
        return loader

    test_loader = loader_for(split)
    refuse_overlap("evaluate", out, {"the shards it evaluates on": test_loader.index.root})
    temperature = None
    if calibration_split:
        calib_loader = loader_for(calibration_split)
        calib = gather_predictions(model, calib_loader, device, amp, ddp, keep_logits=True)
        temperature = fit_temperature(calib["logits"], torch.from_numpy(calib["label"]))
        calib_loader.close()
    records = gather_predictions(model, test_loader, device, amp, ddp, keep_logits=temperature is not None)
    top1 = records["topk"][:, 0] == records["label"]
    results: dict = {
        "checkpoint": str(checkpoint_path),
        "split": split,
        "region": region,
        "samples": int(len(records["label"])),
        "world_size": world_size,
        "metrics": summarize(records),
        "skipped_samples": _skipped(test_loader, ddp),
        "temperature": temperature,
        "calibration_split": calibration_split,
        "ece_bins": ECE_BINS,
    }
    bins_before = calibration_bins(records["confidence"], top1)
    bins_after = calibrated_confidence = None
    if temperature is not None:
        scaled = _scaled(records, records["logits"], temperature)
        calibrated_confidence = scaled["confidence"]
        bins_after = calibration_bins(scaled["confidence"], top1)
        results["calibrated"] = {
            "ece_before": results["metrics"]["ece"],
            "ece_after": expected_calibration_error(scaled["confidence"], top1),
            "nll_before": results["metrics"]["nll"],
            "nll_after": float(scaled["nll"].mean()),
        }
    regions = np.array(
        [test_loader.index.shards[test_loader.index.shard_of(int(i))].region for i in records["index"]]
    )
    results["per_region"] = {
        str(r): summarize({k: v[regions == r] for k, v in records.items() if k != "logits"})
        for r in sorted(set(regions.tolist()))
    }
    results["buckets"] = tail_section(records, regions, counts, counts_source, rule, calibrated_confidence)
    results["confused_pairs"] = confused_pairs(records, names, top_confusions)
    results["reliability_bins"] = {"before": bins_before, "after": bins_after}
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        title = f"{Path(checkpoint_path).parent.name}: {split}{' / ' + region if region else ''}"
        plots.reliability_diagram(bins_before, bins_after, out / "reliability.png", title)
        species = per_species(records, calibrated_confidence)
        plots.per_species_accuracy(
            counts[species["classes"]], species, rule.thresholds, out / "per_species.png", title,
            {name: (m or {}).get("top1") for name, m in results["buckets"]["metrics"].items()},
        )  # fmt: skip
        plots.confusion_matrix(records["label"], records["topk"][:, 0], names, out / "confusion.png",
                               confusion_classes)  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2))
        results["out_dir"] = str(out)
        if temperature is not None and region is None and shards is None:  # the checkpoint's own data
            update_checkpoint(checkpoint_path, temperature=temperature, temperature_split=calibration_split)
    test_loader.close()
    ddp.barrier()
    return results


def output_folder(
    checkpoint_path: str | Path, split: str, region: str | None, out_dir: str | Path | None
) -> Path:
    """``out_dir``, else ``<checkpoint folder>/eval_<split>[_<region>]``; TrainingError when it (or a
    folder above it) is an existing file."""
    out = (
        Path(out_dir)
        if out_dir
        else Path(checkpoint_path).parent / f"eval_{split}{'_' + region if region else ''}"
    )
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise TrainingError(f"output folder {out}: {existing} is a file, expected a folder")
    return out


def bucket_thresholds(text: str) -> tuple[int, int]:
    """``--buckets 20,100`` -> ``(20, 100)`` (argparse type: a bad value is one error line)."""
    try:
        few, many = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FEW,MANY (two counts, e.g. 20,100), got {text!r}"
        ) from None
    if not 0 < few < many:
        raise argparse.ArgumentTypeError(f"expected 0 < FEW < MANY, got {text!r}")
    return few, many


def add_bucket_options(parser: argparse.ArgumentParser) -> None:
    """``--buckets FEW,MANY`` and ``--no-bucket-scaling`` (``flora evaluate`` and ``flora report``)."""
    parser.add_argument(
        "--buckets",
        type=bucket_thresholds,
        default=BUCKET_THRESHOLDS,
        metavar="FEW,MANY",
        help="few-shot below FEW, many-shot above MANY training images (default: 20,100)",
    )
    parser.add_argument(
        "--no-bucket-scaling",
        action="store_true",
        help="use --buckets as given, also when the largest training class has fewer than 1,000 images",
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a Flora checkpoint (best_model.pt)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--region", help="evaluate on this region's samples only (e.g. EU_SW)")
    parser.add_argument("--shards", help="shard root (default: the one the checkpoint was trained on)")
    parser.add_argument("--calibration-split", default="val", help="split the temperature is fitted on")
    parser.add_argument("--no-calibration", action="store_true", help="skip temperature scaling")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/eval_<split>[_<region>])")
    parser.add_argument("--confusion-classes", type=int, default=20, help="classes in confusion.png")
    add_bucket_options(parser)
    parser.add_argument("overrides", nargs="*", help="data.key=value (e.g. data.backend=torch)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    try:
        results = evaluate(
            args.checkpoint,
            split=args.split,
            region=args.region,
            shards=args.shards,
            calibration_split=None if args.no_calibration else args.calibration_split,
            out_dir=args.out,
            overrides=args.overrides,
            confusion_classes=args.confusion_classes,
            buckets=args.buckets,
            scale_buckets=not args.no_bucket_scaling,
        )
    except (CheckpointError, ConfigError, LoaderError, ModelError, TrainingError, ValueError) as exc:
        return fail("evaluate", exc)
    finally:
        destroy_distributed()
    if rank == 0:
        m = results["metrics"]
        line = (
            f"{results['split']}{' / ' + results['region'] if results['region'] else ''}: "
            f"{m['samples']} samples, "
            f"top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f}, macro top-1 {m['macro_top1']:.4f}, "
            f"NLL {m['nll']:.4f}, ECE {m['ece']:.4f}"
        )
        if results.get("calibrated"):
            c = results["calibrated"]
            line += f"; T={results['temperature']:.3f}: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}"
        print(line)
        print(tail_line(results))
        print(f"results: {results['out_dir']}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
