"""Parity: an exported model against its PyTorch checkpoint, and running TF.js itself in Node.

Owns the thresholds and the verdict. For float32 exports the target is 100% top-1 agreement and
max |logit difference| <= 1e-5 (``pass``); up to 1e-4 is reported as ``warn``; beyond 1e-4, or any
top-1 disagreement, is an ``error`` and the export command exits non-zero. Quantised exports
(float16, uint8 weights) change the numbers by design: their drift is measured and reported
(``drift``), never hidden, and not held to the float32 thresholds.

``run_tfjs`` feeds the already-preprocessed NHWC batch to ``export/js/parity.mjs``, which loads
the graph model with ``@tensorflow/tfjs`` on the wasm backend (``@tensorflow/tfjs-node`` does not
install here) and writes the logits back; it also times batch-1 inference. The Node packages come
from ``export/js/package-lock.json`` (``make js-deps``).

Leaves out: producing the exports (onnx.py, tfjs.py) and preprocessing (bundle.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .bundle import ExportError, probabilities

JS_DIR = Path(__file__).resolve().parent / "js"
TARGET_ABS = 1e-5
ERROR_ABS = 1e-4


def compare(
    reference: np.ndarray,
    got: np.ndarray,
    temperature: float,
    quantize: str | None,
    names: list[str] | None = None,
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
    max_abs = float(diff.max())
    if not np.isfinite(got).all():
        verdict = "error"
    elif quantize:
        verdict = "drift"
    elif agreement < 1.0 or max_abs > ERROR_ABS:
        verdict = "error"
    elif max_abs > TARGET_ABS:
        verdict = "warn"
    else:
        verdict = "pass"
    disagree = np.flatnonzero(top1_ref != top1_got)
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
        "disagreements": [names[i] if names else int(i) for i in disagree[:20]],
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


def run_tfjs(
    model_dir: str | Path,
    x_nhwc: np.ndarray,
    backend: str = "wasm",
    batch: int = 16,
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
