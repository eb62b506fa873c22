"""``make demo``: every stage that exists, end to end, on the bundled sample world; offline, CPU only.

Owns the order of the demo and the loopback image server's lifetime; each stage runs through its
real command line (``python -m ...``) in a child process, exactly as a user would type it, so the
demo exercises the entry points and not a shortcut. Prints each stage's own summary, then a short
one of its own.

Leaves out: the stages themselves. New stages add one step here as they land.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from world.server import ImageServer, load_faults

REPO = Path(__file__).resolve().parents[1]
#: The demo serves the sample world on a fixed loopback port: the port is part of every image URL, and
#: URLs seed the split order, the shard chunks and the cache keys. A port chosen per run made every
#: demo differ (45/46/47 shards) and its LMDB cache useless on the second run.
DEMO_PORT = 8765
#: The summary compares the models by accuracy and size, not speed: a demo's steps/s are whatever this
#: machine, shared with the demo's other processes and anything else, gave each run (0.4 vs 9.5
#: steps/s in one run, 4.9 vs 8.1 in the next), so they are no benchmark.
SPEED_NOTE = (
    "training speed: not compared here (this machine, shared: each run's own figures are in its "
    "metrics.json; measured speed: make bench-training, docs/benchmarks.md)"
)
#: Version 1 of the demo's catalog leaves out every 10th record; version 2 adds them back.
V1_LEAVES_OUT = 10


def _run(step: str, argv: list[str]) -> None:
    print(f"\n== {step}: {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"demo: step '{step}' failed with exit status {proc.returncode}")
    print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)


def _split_world(world: Path) -> Path:
    """The world's catalog as version 1 (``catalog_v1.jsonl``: all but every ``V1_LEAVES_OUT``-th record,
    and every line that is no JSON object) and the rest as a GBIF-style Darwin Core Archive
    (``gbif_download.zip``), the public format version 2 brings; returns the archive's path."""
    from world.dwca import write_dwca

    kept, added = [], []
    for i, line in enumerate((world / "catalog.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)):
        try:
            record = json.loads(line) if i % V1_LEAVES_OUT == 0 else None
        except ValueError:
            record = None
        if isinstance(record, dict):
            added.append(record)
        else:
            kept.append(line)
    (world / "catalog_v1.jsonl").write_text("".join(kept), encoding="utf-8")
    archive = world / "gbif_download.zip"
    written = write_dwca(added, archive)
    print(
        f"   version 2 adds {written.media_rows} images of {written.occurrences} occurrences as a GBIF "
        f"download ({archive.name}: occurrence.txt, multimedia.txt, meta.xml)",
        flush=True,
    )
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m world.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--species", type=int, default=40)
    parser.add_argument("--port", type=int, default=DEMO_PORT, help="the images' loopback port")
    args = parser.parse_args(argv)
    out = args.out
    for stale in ("world", "splits_v1", "splits", "shards", "runs", "exports"):
        shutil.rmtree(out / stale, ignore_errors=True)  # the cache is kept: a second demo is warm
    (out / "world" / "images").mkdir(parents=True)
    try:
        server = ImageServer(out / "world" / "images", port=args.port)
    except OSError as exc:
        raise SystemExit(
            f"demo: cannot serve the sample world on 127.0.0.1:{args.port} ({exc.strerror or exc}); "
            "stop what holds it or pass --port N"
        ) from None
    with server:
        _run(
            "world",
            [
                "-m",
                "world",
                "generate",
                "--out",
                str(out / "world"),
                "--records",
                str(args.records),
                "--species",
                str(args.species),
                "--seed",
                "0",
                "--base-url",
                server.base_url,
            ],
        )
        for path, fault in load_faults(out / "world" / "faults.json").items():
            server.set_fault(path, fault)
        # The catalog grows once: version 1 is most of the world's records (JSON Lines); version 2 adds
        # the rest, as a GBIF occurrence download (a Darwin Core Archive), split with --previous (frozen
        # splits) and sharded incrementally over version 1's shards.
        archive = _split_world(out / "world")
        versions = (
            ("v1", ["catalog_v1.jsonl"], "splits_v1", []),
            ("v2 (+ a GBIF download)", ["catalog_v1.jsonl", archive.name], "splits", ["--previous"]),
        )
        for name, sources, splits, previous in versions:
            argv = ["-m", "flora.sharding", "catalog", "--out", str(out / splits)]
            for source in sources:
                argv += ["--source", str(out / "world" / source)]
            argv += [*previous, str(out / "splits_v1")] if previous else []
            _run(f"catalog {name}", [*argv, "--config", "config/catalog_smoke.yaml"])
            _run(
                f"shards {name}" + (" (incremental)" if previous else ""),
                [
                    "-m",
                    "flora.sharding",
                    "build",
                    "--splits",
                    str(out / splits),
                    "--out",
                    str(out / "shards"),
                    "--cache",
                    str(out / "cache"),
                    "--config",
                    "config/sharding_smoke.yaml",
                    "--allow-network",
                    "127.0.0.1/32",
                    "--no-progress",
                ],
            )
    _run(
        "loaders",
        [
            "-m",
            "flora.loaders",
            "--config",
            "config/data_smoke.yaml",
            f"data.shards={out / 'shards'}",
            "data.backend=dali",
        ],
    )
    runs = out / "runs"
    teachers = {"global": "teacher_global_smoke", "regional": "teacher_regional_smoke"}
    for kind, name in teachers.items():
        extra = (
            [f"model.init_from={runs / teachers['global'] / 'best_model.pt'}"] if kind == "regional" else []
        )
        _run(
            f"teacher ({kind})",
            [
                "-m",
                "flora.training.train",
                "--config",
                f"config/{name}.yaml",
                f"run.root={runs}",
                f"data.shards={out / 'shards'}",
                "train.progress=false",
                *extra,
            ],
        )
        _run(
            f"evaluate ({kind})",
            [
                "-m",
                "flora.training.evaluate",
                "--checkpoint",
                str(runs / name / "best_model.pt"),
                "--split",
                "test",
            ],
        )
    best = {kind: runs / name / "best_model.pt" for kind, name in teachers.items()}
    teacher_list = ", ".join(
        f"{{name: {kind}, checkpoint: {path}, weight: 0.5}}" for kind, path in best.items()
    )
    students = {"online": "student_smoke", "cached": "student_smoke_cached"}
    for mode, name in students.items():
        _run(
            f"student ({mode} soft labels)",
            [
                "-m",
                "flora.training.train",
                "--config",
                "config/student_smoke.yaml",
                f"run.root={runs}",
                f"run.name={name}",
                f"data.shards={out / 'shards'}",
                "train.progress=false",
                f"distill.teachers=[{teacher_list}]",
                f"distill.soft_labels={mode}",
            ],
        )
    report = runs / students["online"] / "report"
    _run(
        "distillation report",
        ["-m", "flora.training.report", "--out", str(report)]
        + [arg for name in students.values() for arg in ("--student", str(runs / name / "best_model.pt"))]
        + [arg for path in best.values() for arg in ("--teacher", str(path))],
    )
    student = runs / students["online"] / "best_model.pt"
    exports = out / "exports"
    _run(
        "ONNX export",
        ["-m", "flora.export.onnx", "--checkpoint", str(student), "--out", str(exports / "student_onnx")],
    )
    _run(
        "TF.js export (parity in TF.js on Node's wasm backend)",
        ["-m", "flora.export.tfjs", "--checkpoint", str(student), "--out", str(exports / "student_tfjs")],
    )
    stats = json.loads((out / "splits" / "export_stats.json").read_text())
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    acc = manifest["accounting"]
    print("\n== demo summary")
    print(f"   catalog: {stats['input_records']} records -> {stats['written']} in splits, ", end="")
    print(f"{stats['species']} species")
    print(
        f"   shards:  {len(manifest['shards'])} tar shards, {acc['sharded']} samples, {acc['failed']} failed "
        f"(injected faults), {acc['content_duplicates']} content duplicates; "
        f"accounting {'ok' if acc['ok'] else 'BROKEN'}"
    )
    sources = json.loads((out / "splits" / "sources.json").read_text())["sources"]
    print("   sources: " + " + ".join(f"{source['format']} {source['name']}" for source in sources))
    credits = out / "shards" / "ATTRIBUTION.csv"
    with credits.open(encoding="utf-8", newline="") as fh:
        rows = sum(1 for _ in csv.reader(fh)) - 1  # the header
    print(f"   credits: {credits.relative_to(out)} ({rows} images); card: shards/dataset_card.md")
    for kind, name in teachers.items():
        summary = json.loads((runs / name / "metrics.json").read_text())["summary"]
        test = json.loads((runs / name / "eval_test" / "results.json").read_text())
        m, cal = test["metrics"], test["calibrated"]
        print(
            f"   teacher ({kind}): {summary['num_classes']} classes, {summary['steps']} steps; "
            f"test top-1 {m['top1']:.3f}, top-5 {m['top5']:.3f}, macro {m['macro_top1']:.3f}, "
            f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} (T={test['temperature']:.2f})"
        )
        print(f"     {_buckets_line(test['buckets'])}")
    comparison = json.loads((report / "comparison.json").read_text())
    for row in comparison["rows"]:
        if row["role"] == "student" and row["test_set"] == "all":
            print(
                f"   student ({row['soft_labels']}): {row['model']}, {row['params'] / 1e6:.2f} M params; "
                f"test top-1 {row['top1']:.3f}"
            )
            tops = " / ".join(_share(row[f"{b}_top1"]) for b in ("many", "medium", "few"))
            few, many = row["bucket_thresholds"]
            print(f"     many/medium/few-shot top-1: {tops} (thresholds {few}/{many} training images)")
    for pair in comparison["pairs"]:
        print(
            f"   {pair['student']} / {pair['teacher']} top-1 on {pair['test_set']}: {pair['top1_ratio']:.2f}"
        )
    onnx_report = json.loads((exports / "student_onnx" / "report.json").read_text())
    tfjs_report = json.loads((exports / "student_tfjs" / "report.json").read_text())
    for label, rep, size in (
        ("ONNX (onnxruntime)", onnx_report, onnx_report["size_bytes"]),
        (f"TF.js {tfjs_report['runtime']['tfjs']} ({tfjs_report['runtime']['backend']})", tfjs_report,
         tfjs_report["files"]["size_bytes"]),
    ):  # fmt: skip
        p = rep["parity"]
        print(
            f"   export {label}: {size / 1e6:.2f} MB; vs PyTorch on {p['samples']} test images: "
            f"top-1 agreement {p['top1_agreement']:.1%}, max |dlogit| {p['max_abs_logit_diff']:.1e} "
            f"(float32 floor "
            f"{p['fp32_floor']:.1e}) [{p['verdict']}]"
        )
    lat = tfjs_report["latency"]
    print(
        f"   batch-1 latency (this machine, shared): TF.js {lat['tfjs_ms']:.2f} ms, "
        f"PyTorch {lat['torch_ms_1_thread']:.2f} ms (1 thread); "
        f"try the page: flora serve --model {exports / 'student_tfjs'}"
    )
    print(f"   {SPEED_NOTE}")
    print(
        f"   outputs: {out}/splits, {out}/shards (manifest.json, failures.jsonl), {runs}/<run>, {report}, "
        f"{exports}"
    )
    return 0


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _buckets_line(buckets: dict) -> str:
    """Evaluation's many/medium/few-shot top-1 in one line (a bucket without test samples is '-')."""
    got = buckets["metrics"]
    few, many = buckets["thresholds"]
    tops = " / ".join(_share(got[b]["top1"] if got.get(b) else None) for b in ("many", "medium", "few"))
    return f"many/medium/few-shot top-1: {tops} (thresholds {few}/{many} training images)"


if __name__ == "__main__":
    sys.exit(main())
