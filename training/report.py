"""``flora report --student S/best_model.pt [--student ...] --teacher T/best_model.pt [...]``

The distillation comparison: every teacher and every student on the same test split, as JSON and a
Markdown table. Owns the pairing rule (a regional model is compared on its region's test samples: a
regional teacher and a global student are both evaluated on the region's test split, so each row pair
sees the same images), model size (parameters, and MACs of one image at the checkpoint's input size,
counted with ``torch.utils.flop_counter``), training speed from each run's metrics.json (in the JSON
only: measured on whatever machine ran it, beside whatever else ran there, so not a benchmark; the
Markdown table leaves it out and says where it is), and the student/teacher top-1 ratio. Beside
top-1, top-5 and macro top-1 and top-5, each row has the many / medium / few-shot top-1 by the
model's own training counts (``--buckets``, scaled as evaluate scales them; the thresholds each row
used are in its ``bucket_thresholds``, and under the table).

Each evaluation is ``training.evaluate.evaluate`` (temperature fitted on ``val``), unchanged.

Leaves out: the metrics (metrics.py) and the evaluation itself (evaluate.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from flora.errors import ArgumentParser, fail
from flora.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from flora.training.evaluate import add_bucket_options, evaluate
from flora.training.metrics import BUCKET_THRESHOLDS, BUCKETS
from flora.training.models import model_from_checkpoint

#: Under the table: why it has no speed column, and where the runs' own speeds are.
SPEED_NOTE = (
    "Training speed is not compared here: each run's `train_steps_per_s` and `images_per_s` in "
    "comparison.json are what its machine gave it, shared or not, so they are not a benchmark "
    "(`make bench-training` measures it: docs/benchmarks.md)."
)


def model_size(checkpoint: Checkpoint) -> dict:
    """Parameters and multiply-accumulates of one image at the checkpoint's input size."""
    model = model_from_checkpoint(checkpoint).eval()
    size = checkpoint.preprocessing.image_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": counter.get_total_flops() // 2,
        "image_size": size,
    }


def _region(checkpoint: Checkpoint) -> str | None:
    data = checkpoint.data
    if data.get("label_space") == "region":
        region = data.get("region_filter")
        return region[0] if isinstance(region, list) else region
    return None


def _run_speed(path: Path) -> dict:
    metrics = path.parent / "metrics.json"
    if not metrics.is_file():
        return {}
    summary = json.loads(metrics.read_text()).get("summary", {})
    return {k: summary.get(k) for k in ("train_steps_per_s", "images_per_s", "data_wait_fraction")}


def _row(name: str, role: str, path: Path, split: str, region: str | None, out: Path, buckets: dict) -> dict:
    checkpoint = load_checkpoint(path)
    tag = f"{role}_{name}_{region or 'all'}".replace("/", "_")
    results = evaluate(path, split=split, region=region, out_dir=out / tag, **buckets)
    tail = results["buckets"]
    distill = checkpoint.config.get("distill") or {}
    return {
        "name": name,
        "role": role,
        "checkpoint": str(path),
        "model": checkpoint.model_name,
        "classes": len(checkpoint.class_mapping),
        "test_set": region or "all",
        "soft_labels": distill.get("soft_labels") if distill else None,
        **{k: results["metrics"][k] for k in ("samples", "top1", "top5", "macro_top1", "macro_top5", "ece")},
        **{f"{b}_top1": (tail["metrics"][b] or {}).get("top1") for b in BUCKETS},
        "bucket_thresholds": tail["thresholds"],
        "bucket_rule": tail["rule"],
        "ece_calibrated": results["calibrated"]["ece_after"],
        "temperature": results["temperature"],
        **model_size(checkpoint),
        **_run_speed(path),
    }


def compare(
    students: list[Path],
    teachers: list[Path],
    split: str,
    out: Path,
    buckets: tuple[int, int] = BUCKET_THRESHOLDS,
    scale_buckets: bool = True,
) -> dict:
    """Rows for every (teacher, student) pair on the teacher's test set, plus the ratios; ``buckets``
    and ``scale_buckets`` as in ``evaluate``."""
    tail = {"buckets": tuple(buckets), "scale_buckets": scale_buckets}
    rows, pairs = [], []
    student_regions = {s: _region(load_checkpoint(s)) for s in students}  # read once, not per teacher
    for teacher in teachers:
        t_ckpt = load_checkpoint(teacher)
        region = _region(t_ckpt)
        t_row = _row(teacher.parent.name, "teacher", teacher, split, region, out, tail)
        rows.append(t_row)
        for student in students:
            s_region = student_regions[student]
            if s_region and region and s_region != region:
                continue  # two different regions: no common test set
            s_row = _row(student.parent.name, "student", student, split, region or s_region, out, tail)
            rows.append(s_row)
            pairs.append(
                {
                    "teacher": t_row["name"],
                    "student": s_row["name"],
                    "test_set": s_row["test_set"],
                    "top1_ratio": s_row["top1"] / t_row["top1"] if t_row["top1"] else None,
                    "params_ratio": s_row["params"] / t_row["params"],
                    "macs_ratio": s_row["macs"] / t_row["macs"],
                }
            )
    return {
        "split": split,
        "buckets": list(buckets),
        "bucket_scaling": scale_buckets,
        "rows": rows,
        "pairs": pairs,
    }


def _bucket_note(rows: list[dict]) -> str:
    """Which thresholds the many / medium / few columns used: once when every row used the same."""
    used = {tuple(r["bucket_thresholds"]) for r in rows if r.get("bucket_thresholds")}
    if not used:
        return ""
    if len(used) == 1:
        few, many = used.pop()
        return f" Many / medium / few: > {many} / {few}-{many} / < {few} training images per species."
    per_row = ", ".join(f"{r['name']} {'/'.join(map(str, r['bucket_thresholds']))}" for r in rows)
    return f" Many / medium / few thresholds (few/many training images) per model: {per_row}."


def markdown(report: dict) -> str:
    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"Split: `{report['split']}`. ECE: 15 bins; 'calibrated' after temperature scaling fitted on val."
        + _bucket_note(report["rows"]),
        "",
        "| model | role | test set | samples | top-1 | top-5 | macro top-1 | macro top-5 | many top-1 "
        "| medium top-1 | few top-1 | ECE | ECE calibrated | params | MACs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        mode = f" ({r['soft_labels']})" if r.get("soft_labels") else ""
        tail = " | ".join(figure(r.get(k)) for k in ("macro_top5", "many_top1", "medium_top1", "few_top1"))
        lines.append(
            f"| {r['name']} `{r['model']}` | {r['role']}{mode} | {r['test_set']} | {r['samples']} "
            f"| {r['top1']:.3f} | {r['top5']:.3f} | {r['macro_top1']:.3f} | {tail} | {r['ece']:.3f} "
            f"| {r['ece_calibrated']:.3f} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M |"
        )
    lines += [
        "",
        SPEED_NOTE,
        "",
        "| student | teacher | test set | student/teacher top-1 | params ratio | MACs ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for p in report["pairs"]:
        ratio = f"{p['top1_ratio']:.2f}" if p["top1_ratio"] is not None else "-"
        lines.append(
            f"| {p['student']} | {p['teacher']} | {p['test_set']} | {ratio} | {p['params_ratio']:.3f} "
            f"| {p['macs_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora report", description="Teachers vs students, one table")
    parser.add_argument("--student", type=Path, action="append", required=True, help="a student checkpoint")
    parser.add_argument("--teacher", type=Path, action="append", required=True, help="a teacher checkpoint")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, help="folder (default: the first student's run folder / report)")
    add_bucket_options(parser)
    args = parser.parse_args(argv)
    out = args.out or args.student[0].parent / "report"
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():  # before any evaluation, not after them all
        return fail("report", f"output folder {out}: {existing} is a file, expected a folder (--out)")
    try:
        report = compare(
            args.student,
            args.teacher,
            args.split,
            out,
            args.buckets,
            scale_buckets=not args.no_bucket_scaling,
        )
    except (CheckpointError, FileNotFoundError, RuntimeError, ValueError) as exc:
        return fail("report", exc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "comparison.md").write_text(table)
    print(table)
    print(f"report: {out}/comparison.json, {out}/comparison.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
