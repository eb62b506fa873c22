"""``python -m benchmarks.export``: the student in TF.js - size, parity and latency per quantisation.

In one run, for each model and each weight format (float32, float16, uint8): the TF.js graph model's
size, its parity with PyTorch measured in TF.js itself (Node, wasm backend) and its batch-1 latency,
next to the alternatives a user would run instead on the same CPU and the same inputs: PyTorch eager
(1 thread, as TF.js wasm runs here, and all cores) and onnxruntime (1 thread) on the ONNX export.

Models: the production shape (``mobilenetv2_100``, 224 px, 7,120 species: random weights, real
latency and size) on photographs (benchmarks/photos.py), and the demo's distilled smoke student
(``make demo`` first) on its own test shards (a trained network: representative drift).
Prints a table, writes ``benchmarks/results/export.json`` and a bar chart ``export.png``.

Leaves out: browser (Chromium) timings: the page reports its own inference time; the test suite
checks its answers, not its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.photos import fetch_sources, make_photos
from benchmarks.results import command_line, group_panels, print_table, publish, save_figure
from flora.export import onnx as onnx_export
from flora.export import tfjs
from flora.export.bundle import load_bundle
from flora.training.checkpoint import Checkpoint, Preprocessing, save_checkpoint
from flora.training.config import ModelConfig
from flora.training.models import build_model

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "export"
DEMO_STUDENT = REPO / "demo_out" / "runs" / "student_smoke" / "best_model.pt"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def production_checkpoint(path: Path, classes: int, size: int, seed: int = 0) -> Path:
    """A Flora checkpoint of the production student's shape with random weights (no download)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="mobilenetv2_100"), num_classes=classes, image_size=size)
    crop_pct = 0.875
    save_checkpoint(
        path,
        Checkpoint(
            kind="best",
            model=model.state_dict(),
            model_name="mobilenetv2_100",
            class_mapping={f"species_{i:04d}": i for i in range(classes)},
            preprocessing=Preprocessing(
                image_size=size, **IMAGENET, crop_pct=crop_pct, val_resize=int(round(size / crop_pct))
            ),
            config={"model": {"name": "mobilenetv2_100"}, "data": {}},
        ),
    )
    return path


def onnx_latency_ms(path: Path, image_size: int, runs: int) -> float:
    """Median batch-1 latency of onnxruntime with one thread (the input's content does not matter)."""
    session = onnx_export.ort_session(path, threads=1)
    one = {onnx_export.INPUT: np.zeros((1, 3, image_size, image_size), np.float32)}
    return tfjs.median_ms(lambda: session.run(None, one), runs)


def bench_model(label: str, checkpoint: Path, images: Path, samples: int, runs: int, out: Path) -> list[dict]:
    rows = []
    onnx_dir = out / "onnx"
    onnx_report = onnx_export.export(checkpoint, onnx_dir, images, samples)
    image_size = json.loads((onnx_dir / "preprocess.json").read_text())["image_size"]
    ort_ms = onnx_latency_ms(onnx_dir / "model.onnx", image_size, runs)
    for quantize in (None, "float16", "uint8"):
        name = quantize or "float32"
        report = tfjs.export(checkpoint, out / f"tfjs_{name}", quantize, images, samples, "wasm", runs)
        p, lat = report["parity"], report["latency"]
        rows.append(
            {
                "model": label,
                "weights": name,
                "MB": report["files"]["size_bytes"] / 1e6,
                "top-1 agree": f"{p['top1_agreement']:.1%}",
                "max |dlogit|": f"{p['max_abs_logit_diff']:.1e}",
                "fp32 floor": f"{p['fp32_floor']:.1e}",
                "verdict": p["verdict"],
                "TF.js wasm ms": lat["tfjs_ms"],
                "torch 1T ms": lat["torch_ms_1_thread"],
                f"torch {lat['torch_threads']}T ms": lat["torch_ms_all_threads"],
                "ORT 1T ms": ort_ms,
                "TF.js / torch 1T": lat["tfjs_ms"] / lat["torch_ms_1_thread"],
                "_report": report,
                "_onnx": {"size_bytes": onnx_report["size_bytes"], "parity": onnx_report["parity"]},
            }
        )
    return rows


BASELINE_LABELS = ["PyTorch\n1 thread", "PyTorch\nall cores", "ORT\n1 thread"]


def chart(rows: list[dict], path: Path) -> None:
    fig, panels = group_panels(rows, "model", 6.5, 4.2)
    torch_all = f"torch {os.cpu_count()}T ms"
    for ax, model, mine in panels:
        labels = [f"TF.js\n{r['weights']}" for r in mine] + [
            "PyTorch\n1 thread",
            "PyTorch\nall cores",
            "ORT\n1 thread",
        ]
        values = [r["TF.js wasm ms"] for r in mine] + [
            float(np.median([r["torch 1T ms"] for r in mine])),
            float(np.median([r[torch_all] for r in mine])),
            mine[0]["ORT 1T ms"],
        ]
        colors = ["#4f9a5c"] * len(mine) + ["#7a7a7a", "#a0a0a0", "#5b7fb0"]
        ax.bar(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("batch-1 latency, ms (lower is better)")
    fig.suptitle(
        "Flora student: TF.js (Node, wasm) vs PyTorch and onnxruntime on the CPU, same run", fontsize=11
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=7120)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=32, help="parity images per model")
    parser.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per runtime")
    parser.add_argument(
        "--student", type=Path, default=DEMO_STUDENT, help="a trained student (default: the demo's)"
    )
    parser.add_argument("--student-images", default=None, help="its parity images (default: its test shards)")
    args = parser.parse_args(argv)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    photos = OUT / "photos"
    make_photos(fetch_sources(REPO / "benchmarks" / "out" / "photos_src"), photos, args.samples)
    ckpt = production_checkpoint(OUT / "mobilenetv2_100.pt", args.classes, args.size)
    rows = bench_model(
        f"mobilenetv2_100 {args.size}px, {args.classes} classes (random weights)",
        ckpt,
        photos,
        args.samples,
        args.runs,
        OUT / "production",
    )
    if args.student.is_file():
        label = f"demo student {load_bundle(args.student).model_name} (distilled)"
        rows += bench_model(label, args.student, args.student_images, 64, args.runs, OUT / "student")
    else:
        print(f"(no trained student at {args.student}: run `make demo` for the second set of rows)")
    columns = [c for c in rows[0] if not c.startswith("_")]
    print_table(rows, columns)
    result = {
        "command": command_line("benchmarks.export", argv),
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "device": "CPU only"},
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "reports": [{"model": r["model"], "tfjs": r["_report"], "onnx": r["_onnx"]} for r in rows],
    }
    publish("export", result, lambda png: chart(rows, png), png="flora.export.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
