"""ONNX export of a Flora checkpoint, checked against PyTorch with onnxruntime.

``flora export onnx --checkpoint runs/student/best_model.pt --out exports/student_onnx`` writes
``model.onnx`` (input ``input``: NCHW float32 normalised, dynamic batch; output ``logits``),
``labels.json``, ``preprocess.json`` (bundle.py) and ``report.json`` (onnxruntime vs PyTorch on
real test images: top-1 agreement, max |logit difference|, probability difference after the
checkpoint's temperature). It is also the first step of the TF.js route (tfjs.py).

The exporter is torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 17: it is
the route onnx2tf is known to take cleanly for timm CNNs. An operator it cannot express becomes an
``ExportError`` naming the operator, not a traceback.

Leaves out: TF.js (tfjs.py) and what the numbers must reach (parity.py holds the thresholds).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flora.errors import ArgumentParser, fail
from flora.export.bundle import (
    ExportError,
    exact_logits,
    load_bundle,
    sample_inputs,
    torch_logits,
    write_metadata,
)
from flora.export.parity import compare
from flora.io import OverlapError, refuse_overlap

log = logging.getLogger(__name__)

OPSET = 17
IMAGES_HELP = "parity images: a folder of JPEGs or a shard root (default: the checkpoint's test shards)"
INPUT, OUTPUT = "input", "logits"


class BlockedLinear(torch.nn.Module):
    """``nn.Linear`` with its dot products summed in blocks: the same function, less float32 drift.

    TF.js's wasm backend (XNNPACK) accumulates a fully connected layer's 1,280-term dot products in
    one running float32 sum; measured on the smoke student that alone costs ~9e-6 on the logits
    (about 4x PyTorch's own rounding). Splitting the input features into blocks of ``block`` and
    adding the partial products (blocked summation) keeps every exported runtime near PyTorch.
    """

    def __init__(self, linear: torch.nn.Linear, block: int = 128):
        super().__init__()
        weight = linear.weight.detach()
        self.bounds = [(i, min(i + block, weight.shape[1])) for i in range(0, weight.shape[1], block)]
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(weight[:, a:b].t().contiguous(), requires_grad=False) for a, b in self.bounds
        )
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, a:b] @ w for (a, b), w in zip(self.bounds, self.weights, strict=True)]
        out = torch.stack(parts).sum(0)
        return out if self.bias is None else out + self.bias


def for_export(model: torch.nn.Module, block: int = 128) -> torch.nn.Module:
    """A copy of ``model`` whose classifier (timm ``get_classifier``) sums in blocks and whose attention
    (timm's ``fused_attn``) runs unfused; the rest unchanged."""
    import copy

    model = copy.deepcopy(model).eval()
    for module in model.modules():  # timm attention: the explicit softmax(q k^T) v, the same function;
        if getattr(module, "fused_attn", False):  # the fused one exports a scaled q and k onnx2tf breaks
            module.fused_attn = False
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear) and head.in_features > block:
        for name, module in model.named_modules():
            if module is head:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, BlockedLinear(head, block))
                break
    return model


def export_module(
    model: torch.nn.Module, path: str | Path, image_size: int, opset: int = OPSET, batch: int | None = None
) -> Path:
    """Writes ``model`` (NCHW in, logits out; a dynamic batch, or ``batch`` images); ExportError for what
    ONNX cannot hold."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(batch or 1, 3, image_size, image_size)
    dynamic = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if batch is None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model.eval(),
                (dummy,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        path.unlink(missing_ok=True)
        text = str(exc)
        op = re.search(r"operator '?([\w:.]+)'?", text) or re.search(r"(aten::\w+)", text)
        what = f"operator {op.group(1)} " if op else ""
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise ExportError(f"ONNX export (opset {opset}) failed: {what}is not supported: {first}") from exc
    import onnx

    onnx.checker.check_model(str(path))
    return path


def output_folder(out: str | Path) -> Path:
    """``out`` as a Path; ExportError, one line, when it (or a folder above it) is an existing file."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise ExportError(f"output folder {out}: {existing} is a file, expected a folder (--out)")
    return out


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: str | Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    return ort_session(path, threads).run([OUTPUT], {INPUT: x.astype(np.float32)})[0]


def export(
    checkpoint: str | Path, out: str | Path, images: str | Path | None = None, samples: int = 64
) -> dict:
    """The whole ONNX export: model, metadata, onnxruntime parity; returns the report (also written)."""
    started = time.perf_counter()
    out = output_folder(out)
    bundle = load_bundle(checkpoint)
    model_path = export_module(for_export(bundle.model), out / "model.onnx", bundle.image_size)
    write_metadata(bundle, out, layout="NCHW", input_name=INPUT, output_name=OUTPUT)
    names, x = sample_inputs(bundle, images, samples)
    reference = torch_logits(bundle, x)
    got = run_onnxruntime(model_path, x.numpy())
    report = {
        "format": "onnx",
        "checkpoint": str(bundle.checkpoint),
        "model": bundle.model_name,
        "opset": OPSET,
        "size_bytes": model_path.stat().st_size,
        "runtime": f"onnxruntime {__import__('onnxruntime').__version__} (CPU)",
        "parity": compare(reference, got, bundle.temperature, None, names, exact_logits(bundle, x)),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora export onnx", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a Flora checkpoint (best_model.pt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", help=IMAGES_HELP)
    parser.add_argument("--samples", type=int, default=64, help="parity images (default 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        refuse_overlap("export onnx", args.out, {"--checkpoint": args.checkpoint, "--images": args.images})
        report = export(args.checkpoint, args.out, args.images, args.samples)
    except (ExportError, OverlapError) as exc:
        return fail("export onnx", exc)
    p = report["parity"]
    print(
        f"{args.out}/model.onnx: {report['size_bytes'] / 1e6:.2f} MB; onnxruntime vs PyTorch on "
        f"{p['samples']} images: top-1 agreement {p['top1_agreement']:.1%}, "
        f"max |dlogit| {p['max_abs_logit_diff']:.2e} ({p['verdict']})"
    )
    return 0 if p["verdict"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
