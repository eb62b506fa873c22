"""TF.js export of a Flora checkpoint, proven against PyTorch in the TF.js runtime itself.

``flora export tfjs --checkpoint runs/student/best_model.pt --out exports/student_tfjs
[--quantize float16|uint8]`` writes a TF.js graph model (``model.json`` + weight shards),
``labels.json``, ``preprocess.json`` (bundle.py: NHWC input, size, resize, mean, std, temperature) and
``report.json`` (parity with PyTorch in TF.js on Node's wasm backend, model size, batch-1 latency of
TF.js and of PyTorch on the CPU, the converter versions).

The route, each step with the converter made for it:
1. ``torch.onnx.export(dynamo=False, opset 17)`` in the main environment (onnx.py), with the
   classifier's dot products summed in blocks (``onnx.BlockedLinear``: the same function; TF.js's
   wasm matmul otherwise adds ~9e-6 of float32 drift on its own);
2. ``onnx2tf -osd -nuo`` -> TensorFlow SavedModel, NCHW -> NHWC (so the TF.js model takes NHWC);
3. ``tensorflowjs_converter --input_format=tf_saved_model --output_format=tfjs_graph_model``, with
   ``--quantize_float16`` / ``--quantize_uint8`` for quantised weights.
Steps 2 and 3 run in their own environment (``make tfjs-env`` builds ``.venv-tfjs``; TensorFlow's
pins clash with torch's); ``FLORA_TFJS_VENV`` points elsewhere. onnx2tf would download a
calibration array from the internet; the export writes the file it looks for into its working
folder first, so nothing leaves the machine.

Which networks take this route: the timm families in ``FAMILIES``, checked before any conversion
work (``refuse_unsupported``: one line naming the families that export). A ViT (Flora's teachers)
goes with a fixed batch of 1 (``FIXED_BATCH``: report.json's ``input.batch``) and timm's attention
unfused (onnx.for_export); a dynamic batch loses the class-token concat's shape in onnx2tf. Others
fail late: a ConvNeXt in onnx2tf after up to a minute; a MobileNetV3 converts, then TF.js refuses
one of its fused convolutions (a rank-0 bias). ONNX (onnx.py) exports both, matching PyTorch in
onnxruntime.

Leaves out: the thresholds (parity.py) and the page that uses the model (``export/web/``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flora.errors import ArgumentParser, fail
from flora.export.bundle import ExportError, ParityError, load_bundle, sample_inputs, write_metadata
from flora.export.onnx import IMAGES_HELP, export_module, for_export, output_folder
from flora.export.parity import check_tfjs
from flora.io import OverlapError, refuse_overlap

ROOT = Path(__file__).resolve().parent.parent
QUANTIZE = {None: [], "float16": ["--quantize_float16=*"], "uint8": ["--quantize_uint8=*"]}
RUNTIME_FACTS = ("backend", "tfjs", "tfjs_backend_wasm", "simd", "multithread", "threads")
CALIBRATION = "calibration_image_sample_data_20x128x128x3_float32.npy"
#: The timm model classes whose ONNX graphs onnx2tf converts and TF.js runs at parity, by what a user
#: calls them (timm builds MobileNetV2 with its EfficientNet class). Measured with timm 1.0, onnx2tf
#: and tensorflowjs as pinned in requirements-tfjs.txt; anything else is refused before converting.
FAMILIES = {"EfficientNet": "MobileNetV2 / EfficientNet", "ResNet": "ResNet", "VisionTransformer": "ViT"}
#: Families exported with a fixed batch: under a dynamic one, onnx2tf loses the shape of a ViT's
#: class-token concat and its position-embedding add fails (``layer "tf.math.add_2"``).
FIXED_BATCH = {"VisionTransformer": 1}


def refuse_unsupported(model: torch.nn.Module, model_name: str) -> None:
    """ExportError, one line, for a network whose family is not in ``FAMILIES`` (before any conversion)."""
    if type(model).__name__ not in FAMILIES:
        raise ExportError(
            f"{model_name} ({type(model).__name__}) does not export to TF.js; the families that do: "
            f"{', '.join(FAMILIES.values())} (flora export onnx exports it)"
        )


def converter_venv() -> Path:
    """The TensorFlow converter environment, checked; ExportError saying how to make it."""
    venv = Path(os.environ.get("FLORA_TFJS_VENV", ROOT / ".venv-tfjs"))
    for tool in ("onnx2tf", "tensorflowjs_converter"):
        if not (venv / "bin" / tool).is_file():
            raise ExportError(f"{venv}/bin/{tool} is missing: run `make tfjs-env` (or set FLORA_TFJS_VENV)")
    return venv


def converter_versions(venv: Path) -> dict:
    code = (
        "import json; from importlib.metadata import version as v; "
        "print(json.dumps({p: v(p) for p in ('onnx2tf', 'tensorflow', 'tensorflowjs', 'onnx')}))"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def _run(cmd: list[str], cwd: Path, step: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"  # oneDNN fuses a ViT's layer norms into _MklLayerNorm: no TF.js op
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "unsupported" in line.lower()]
        raise ExportError(f"{step} failed (exit {proc.returncode}): " + " | ".join((errors or lines)[-4:]))
    return proc.stdout + proc.stderr


def convert(
    onnx_path: Path, out: Path, quantize: str | None, venv: Path, work: Path, shard_bytes: int | None = None
) -> dict:
    """ONNX -> SavedModel (onnx2tf) -> TF.js graph model in ``out``; returns the model.json facts."""
    np.save(work / CALIBRATION, np.zeros((20, 128, 128, 3), np.float32))  # keeps onnx2tf offline
    saved = work / "saved_model"
    onnx2tf = str(venv / "bin" / "onnx2tf")
    _run([onnx2tf, "-i", str(onnx_path), "-o", str(saved), "-osd", "-nuo"], work, "onnx2tf")
    staging = work / "tfjs"
    _run(
        [
            str(venv / "bin" / "tensorflowjs_converter"),
            "--input_format=tf_saved_model",
            "--output_format=tfjs_graph_model",
            *QUANTIZE[quantize],
            *([f"--weight_shard_size_bytes={shard_bytes}"] if shard_bytes else []),
            str(saved),
            str(staging),
        ],
        work,
        "tensorflowjs_converter",
    )
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("group*-shard*of*.bin"), out / "model.json"]:
        stale.unlink(missing_ok=True)
    for f in staging.iterdir():
        shutil.copy2(f, out / f.name)
    model = json.loads((out / "model.json").read_text())
    signature = model.get("signature", {})
    inputs, outputs = signature.get("inputs", {}), signature.get("outputs", {})
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(
            f"model.json: expected one input and one output, got {list(inputs)} -> {list(outputs)}"
        )
    shards = [p for group in model["weightsManifest"] for p in group["paths"]]
    return {
        "input_name": next(iter(inputs)),
        "output_name": next(iter(outputs)),
        "ops": sorted({node["op"] for node in model["modelTopology"]["node"]}),
        "size_bytes": (out / "model.json").stat().st_size + sum((out / p).stat().st_size for p in shards),
        "weight_bytes": sum((out / p).stat().st_size for p in shards),
        "weight_shards": len(shards),
    }


def median_ms(call, runs: int, warmup: int = 5) -> float:
    """Median wall time of ``call()`` in milliseconds over ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


@torch.no_grad()
def torch_latency_ms(model: torch.nn.Module, x: torch.Tensor, threads: int, runs: int = 50) -> float:
    """Median batch-1 latency of PyTorch eager on the CPU with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return median_ms(lambda: model(x[:1]), runs)
    finally:
        torch.set_num_threads(before)


def export(
    checkpoint: str | Path,
    out: str | Path,
    quantize: str | None = None,
    images: str | Path | None = None,
    samples: int = 64,
    backend: str = "wasm",
    latency_runs: int = 50,
    shard_bytes: int | None = None,
) -> dict:
    """The whole TF.js export and its parity check; returns the report (also written) or raises."""
    if quantize not in QUANTIZE:
        raise ExportError(f"--quantize must be float16 or uint8, got {quantize!r}")
    started = time.perf_counter()
    out = output_folder(out)
    bundle = load_bundle(checkpoint)
    refuse_unsupported(bundle.model, bundle.model_name)
    venv = converter_venv()
    names, x = sample_inputs(bundle, images, samples)  # fail on missing images before converting
    steps = {}
    with tempfile.TemporaryDirectory(prefix="flora-tfjs-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        batch = FIXED_BATCH.get(type(bundle.model).__name__)
        onnx_path = export_module(
            for_export(bundle.model), work / "model.onnx", bundle.image_size, batch=batch
        )
        steps["onnx_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        facts = convert(onnx_path, out, quantize, venv, work, shard_bytes)
        steps["convert_s"] = round(time.perf_counter() - t0, 2)
    write_metadata(bundle, out, "NHWC", input_name=facts["input_name"], output_name=facts["output_name"])

    t0 = time.perf_counter()
    parity, runtime = check_tfjs(out, bundle, names, x, backend, latency_runs)
    steps["parity_s"] = round(time.perf_counter() - t0, 2)
    if parity["quantize"] != quantize:
        raise ExportError(f"asked for {quantize or 'float32'} weights, model.json has {parity['quantize']}")
    latency = {
        "tfjs_ms": runtime["latency_ms_median"],
        "tfjs_backend": runtime["backend"],
        "tfjs_threads": runtime["threads"],
        "torch_ms_1_thread": torch_latency_ms(bundle.model, x, 1, latency_runs) if latency_runs else None,
        "torch_ms_all_threads": torch_latency_ms(bundle.model, x, os.cpu_count() or 1, latency_runs)
        if latency_runs
        else None,
        "torch_threads": os.cpu_count(),
        "batch": 1,
        "image_size": bundle.image_size,
    }
    report = {
        "format": "tfjs_graph_model",
        "checkpoint": str(bundle.checkpoint),
        "model": bundle.model_name,
        "quantize": quantize,
        "files": {k: facts[k] for k in ("size_bytes", "weight_bytes", "weight_shards")},
        "input": {"name": facts["input_name"], "layout": "NHWC", "batch": batch},  # None: any batch
        "output": {"name": facts["output_name"], "kind": "logits"},
        "ops": facts["ops"],
        "runtime": {k: runtime[k] for k in RUNTIME_FACTS},
        "converters": {"torch": torch.__version__, **converter_versions(venv)},
        "parity": parity,
        "latency": latency,
        "seconds": {**steps, "total_s": round(time.perf_counter() - started, 2)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if parity["verdict"] == "error":
        raise ParityError(
            f"TF.js parity failed: top-1 agreement {parity['top1_agreement']:.1%}, max |dlogit| "
            f"{parity['max_abs_logit_diff']:.2e} (error above {parity['thresholds']['error_max_abs']:.0e}); "
            f"see {out}/report.json"
        )
    return report


def summary_line(report: dict, out: str | Path) -> str:
    p, lat = report["parity"], report["latency"]
    line = (
        f"{out}: {report['files']['size_bytes'] / 1e6:.2f} MB ({report['quantize'] or 'float32'}); TF.js "
        f"{report['runtime']['tfjs']} {report['runtime']['backend']} vs PyTorch on {p['samples']} images: "
        f"top-1 agreement {p['top1_agreement']:.1%}, "
        f"max |dlogit| {p['max_abs_logit_diff']:.2e} [{p['verdict']}]"
    )
    if lat["tfjs_ms"] is not None:
        line += (
            f"; batch-1 latency TF.js {lat['tfjs_ms']:.2f} ms vs PyTorch {lat['torch_ms_1_thread']:.2f} ms "
            f"(1 thread) / {lat['torch_ms_all_threads']:.2f} ms ({lat['torch_threads']} threads)"
        )
    return line


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora export tfjs", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a Flora checkpoint (best_model.pt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--quantize", choices=["float16", "uint8"], help="quantise weights (default: float32)"
    )
    parser.add_argument("--images", help=IMAGES_HELP)
    parser.add_argument("--samples", type=int, default=64, help="parity images (default 64)")
    parser.add_argument("--backend", choices=["wasm", "cpu"], default="wasm", help="TF.js backend in Node")
    parser.add_argument("--shard-bytes", type=int, help="weight shard size (converter default: 4 MiB)")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 runs (0: skip timing)")
    args = parser.parse_args(argv)
    try:
        refuse_overlap("export tfjs", args.out, {"--checkpoint": args.checkpoint, "--images": args.images})
        report = export(
            args.checkpoint,
            args.out,
            args.quantize,
            args.images,
            args.samples,
            args.backend,
            args.latency_runs,
            args.shard_bytes,
        )
    except ParityError as exc:
        return fail("export tfjs", exc, code=1)  # the export exists; it failed its check
    except (ExportError, OverlapError) as exc:
        return fail("export tfjs", exc)
    print(summary_line(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
