"""Parity: an exported model against its PyTorch checkpoint, and running TF.js itself in Node.

Owns the thresholds and the verdict. For float32 exports the target is 100% top-1 agreement and
max |logit difference| <= 1e-5 (``pass``); up to 1e-4 is ``warn``; beyond 1e-4, or a changed top-1,
is an ``error`` and the export command exits non-zero. Quantised exports (float16, uint8 weights)
change the numbers by design: their drift is measured and reported (``drift``), never hidden, and
not held to the float32 thresholds.

Every comparison also measures the float32 floor of the model itself: max |PyTorch float32 - PyTorch
float64| on the same inputs. Most networks sit near 5e-6, but a briefly trained one with near-dead
BatchNorm channels (their 1/sqrt(var + eps) scales folded into conv weights) was measured here at 1e-4
in PyTorch alone, so no float32 runtime can be held closer to PyTorch than that. Two refinements follow,
both reported: a difference within ``FLOOR_FACTOR`` (4) times the floor (``within_fp32_floor``) is a
``warn``, not an ``error`` (TF.js runs another graph, BatchNorm folded into the conv weights and another
summation order, whose own float32 error PyTorch cannot measure: a briefly trained student with a 1.0e-4
floor differed by 2.3e-4 in CI, top-1 100%, mean 2.7e-5); and a top-1 flip between two classes that
PyTorch itself separates by less than twice the difference (a tie at float32 precision) is counted in
``tie_flips`` and is a ``warn``. A conversion bug (a wrong layout, a mistranslated operator) lands
orders of magnitude beyond either.

``run_tfjs`` feeds the already-preprocessed NHWC batch to ``export/js/parity.mjs``, which loads
the graph model with ``@tensorflow/tfjs`` on the wasm backend (``@tensorflow/tfjs-node`` does not
install here) and writes the logits back; it also times batch-1 inference. The Node packages come
from ``export/js/package-lock.json`` (``make js-deps``).

``flora parity --export exports/student_tfjs --checkpoint runs/student/best_model.pt``
re-checks an existing export against its checkpoint (after copying it somewhere, say): labels and
preprocessing must be the checkpoint's, and the numbers must hold; exit 1 otherwise.

Leaves out: producing the exports (onnx.py, tfjs.py) and preprocessing (bundle.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from flora.errors import ArgumentParser, fail
from flora.export.bundle import (
    Bundle,
    ExportError,
    exact_logits,
    label_entries,
    load_bundle,
    preprocess_spec,
    probabilities,
    sample_inputs,
    torch_logits,
)

JS_DIR = Path(__file__).resolve().parent / "js"
TARGET_ABS = 1e-5
ERROR_ABS = 1e-4
#: A float32 difference up to this many times the model's own float32 floor is rounding, not a bug.
FLOOR_FACTOR = 4


def compare(
    reference: np.ndarray,
    got: np.ndarray,
    temperature: float,
    quantize: str | None,
    names: list[str] | None = None,
    exact: np.ndarray | None = None,
) -> dict:
    """Top-1 agreement, top-5 overlap, logit and probability differences, and the verdict."""
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    if reference.shape != got.shape:
        raise ExportError(f"exported model gives logits of shape {got.shape}, PyTorch {reference.shape}")
    diff = np.abs(reference - got)
    top1_ref, top1_got = reference.argmax(1), got.argmax(1)
    k = min(5, reference.shape[1])
    top5_ref = np.argsort(-reference, 1)[:, :k]
    top5_got = np.argsort(-got, 1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top5_ref, top5_got, strict=True)])
    agreement = float(np.mean(top1_ref == top1_got))
    max_abs = float(diff.max()) if np.isfinite(got).all() else float("inf")
    floor = float(np.abs(reference - np.asarray(exact, np.float64)).max()) if exact is not None else None
    noise = max(max_abs, floor or 0.0)
    disagree = np.flatnonzero(top1_ref != top1_got)
    ordered = np.sort(reference, 1)
    margin = ordered[:, -1] - ordered[:, -2] if reference.shape[1] > 1 else np.full(len(reference), np.inf)
    ties = [int(i) for i in disagree if margin[i] <= 2 * noise]
    if not np.isfinite(got).all():
        verdict = "error"
    elif quantize:
        verdict = "drift"
    elif len(disagree) > len(ties) or max_abs > max(ERROR_ABS, FLOOR_FACTOR * (floor or 0.0)):
        verdict = "error"
    elif ties or max_abs > TARGET_ABS:
        verdict = "warn"
    else:
        verdict = "pass"
    return {
        "samples": int(reference.shape[0]),
        "classes": int(reference.shape[1]),
        "quantize": quantize,
        "top1_agreement": agreement,
        "top5_overlap": float(overlap),
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_prob_diff": float(
            np.abs(probabilities(reference, temperature) - probabilities(got, temperature)).max()
        ),
        "temperature": temperature,
        "fp32_floor": floor,
        "within_fp32_floor": None if floor is None else max_abs <= max(TARGET_ABS, FLOOR_FACTOR * floor),
        "disagreements": [names[i] if names else int(i) for i in disagree[:20]],
        "tie_flips": len(ties),
        "thresholds": {"target_max_abs": TARGET_ABS, "error_max_abs": ERROR_ABS, "top1_agreement": 1.0},
        "verdict": verdict,
    }


def node_ready() -> str | None:
    """Why TF.js cannot run here, or None when Node and the packages are in place."""
    if shutil.which("node") is None:
        return "node is not installed (the project needs Node.js >= 18 for TF.js)"
    for package in ("@tensorflow/tfjs", "@tensorflow/tfjs-backend-wasm"):
        if not (JS_DIR / "node_modules" / package / "package.json").is_file():
            return f"{package} is not installed under {JS_DIR}: run `make js-deps` (npm ci in export/js)"
    return None


#: Images per ``predict`` call in Node for a model that takes any batch.
NODE_BATCH = 16


def run_tfjs(
    model_dir: str | Path,
    x_nhwc: np.ndarray,
    backend: str = "wasm",
    batch: int = NODE_BATCH,
    latency_runs: int = 50,
    threads: int = 0,
) -> tuple[np.ndarray, dict]:
    """Logits of the TF.js graph model in ``model_dir`` on ``x_nhwc``, and the runtime's facts and timing."""
    problem = node_ready()
    if problem:
        raise ExportError(problem)
    x = np.ascontiguousarray(x_nhwc, dtype="<f4")
    with tempfile.TemporaryDirectory(prefix="flora-parity-") as tmp:
        inp, out = Path(tmp) / "x.f32", Path(tmp) / "logits.f32"
        x.tofile(inp)
        cmd = [
            "node", str(JS_DIR / "parity.mjs"), "--model", str(Path(model_dir).resolve()),
            "--input", str(inp), "--shape", ",".join(map(str, x.shape)), "--out", str(out),
            "--backend", backend, "--batch", str(batch), "--latency-runs", str(latency_runs),
            "--threads", str(threads),
        ]  # fmt: skip
        env = {**os.environ, "NODE_NO_WARNINGS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=JS_DIR, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ExportError("TF.js in Node failed: " + " | ".join(tail))
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
        logits = np.fromfile(out, dtype="<f4").reshape(facts["output_shape"])
    return logits, facts


def quantization_of(model_dir: Path) -> str | None:
    """The weight quantisation recorded in a TF.js model.json (None for float32)."""
    model = json.loads((Path(model_dir) / "model.json").read_text())
    kinds = {
        w["quantization"]["dtype"]
        for group in model["weightsManifest"]
        for w in group["weights"]
        if "quantization" in w
    }
    if len(kinds) > 1:
        raise ExportError(f"{model_dir}/model.json mixes weight quantisations {sorted(kinds)}")
    return kinds.pop() if kinds else None


def fixed_batch(model_dir: Path) -> int | None:
    """The batch the graph model's input is fixed to (model.json's signature), None when it is dynamic."""
    signature = json.loads((Path(model_dir) / "model.json").read_text()).get("signature", {})
    for spec in signature.get("inputs", {}).values():
        dims = spec.get("tensorShape", {}).get("dim", [])
        size = int(dims[0].get("size", -1)) if dims else -1
        return size if size > 0 else None
    return None


def check_tfjs(
    model_dir: Path,
    bundle: Bundle,
    names: list[str],
    x: torch.Tensor,
    backend: str = "wasm",
    latency_runs: int = 0,
) -> tuple[dict, dict]:
    """Runs the TF.js model in Node on ``x`` (NCHW, preprocessed) and compares with the checkpoint."""
    got, runtime = run_tfjs(
        model_dir,
        x.permute(0, 2, 3, 1).numpy(),
        backend=backend,
        batch=fixed_batch(model_dir) or NODE_BATCH,
        latency_runs=latency_runs,
    )
    quantize = quantization_of(model_dir)
    parity = compare(
        torch_logits(bundle, x), got, bundle.temperature, quantize, names, exact_logits(bundle, x)
    )
    return parity, runtime


def check_metadata(model_dir: Path, bundle: Bundle) -> list[str]:
    """Where labels.json / preprocess.json disagree with the checkpoint (empty when they agree)."""
    problems = []
    for name in ("labels.json", "preprocess.json", "model.json"):
        if not (model_dir / name).is_file():
            problems.append(f"{name} is missing")
    if problems:
        return problems
    labels = json.loads((model_dir / "labels.json").read_text())
    names = [entry.get("name") if isinstance(entry, dict) else entry for entry in labels]
    if names != bundle.labels:
        problems.append("labels.json is not the checkpoint's class order")
    elif labels != label_entries(bundle):
        problems.append("labels.json's training_images are not the checkpoint's class_counts")
    spec = json.loads((model_dir / "preprocess.json").read_text())
    wanted = preprocess_spec(bundle, spec.get("input", {}).get("layout", "NHWC"), "", "")
    for key in ("image_size", "resize_shorter", "mean", "std", "temperature"):
        value = wanted[key]
        if not np.allclose(spec.get(key, np.nan), value):
            problems.append(f"preprocess.json {key} is {spec.get(key)!r}, the checkpoint says {value!r}")
    return problems


def verify(
    model_dir: str | Path,
    checkpoint: str | Path,
    images: str | Path | None = None,
    samples: int = 64,
    backend: str = "wasm",
) -> dict:
    """Re-checks a TF.js export against its checkpoint; the result has ``ok`` and the reasons when not."""
    model_dir = Path(model_dir)
    bundle = load_bundle(checkpoint)
    problems = check_metadata(model_dir, bundle)
    if problems:
        return {"ok": False, "problems": problems, "parity": None}
    names, x = sample_inputs(bundle, images, samples)
    parity, runtime = check_tfjs(model_dir, bundle, names, x, backend)
    if parity["verdict"] == "error":
        problems.append(
            f"parity: top-1 agreement {parity['top1_agreement']:.1%}, "
            f"max |dlogit| {parity['max_abs_logit_diff']:.2e}"
        )
    return {"ok": not problems, "problems": problems, "parity": parity, "runtime": runtime}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora parity", description="Re-checks a TF.js export.")
    parser.add_argument("--export", required=True, help="the TF.js export folder")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint it was exported from")
    parser.add_argument(
        "--images", help="a folder of JPEGs or a shard root (default: the checkpoint's test shards)"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--backend", choices=["wasm", "cpu"], default="wasm")
    args = parser.parse_args(argv)
    try:
        result = verify(args.export, args.checkpoint, args.images, args.samples, args.backend)
    except ExportError as exc:
        return fail("parity", exc)
    p = result["parity"]
    if p:
        print(
            f"{args.export}: {p['samples']} images, top-1 agreement {p['top1_agreement']:.1%}, "
            f"max |dlogit| {p['max_abs_logit_diff']:.2e} (fp32 floor {p['fp32_floor']:.2e}) [{p['verdict']}]"
        )
    for problem in result["problems"]:
        print(f"flora parity: {problem}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
