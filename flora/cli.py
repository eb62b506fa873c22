"""``flora <stage> <verb>``: one command for every stage.

Each stage keeps its own parser and ``main(argv, prog)``; this module only routes to it (so
``python -m sharding``, ``python -m training.train``... keep working, torchrun calls those) and
imports a stage only when it is asked for (DALI, TensorFlow's converters or Ray load only where used).

    flora catalog --source catalog.jsonl --out splits/
    flora build --splits splits/ --out shards/
    flora train --config config/teacher_global.yaml
    flora export tfjs --checkpoint runs/student/best_model.pt --out exports/student_tfjs

Leaves out: what each stage does (its module) and error formatting (flora.errors).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_USAGE, fail


@dataclass(frozen=True)
class Stage:
    module: str  # has main(argv, prog)
    help: str
    verb: str | None = None  # passed first to the module's main (sharding's catalog / build)


STAGES: dict[str, Stage] = {
    "catalog": Stage("sharding.__main__", "records (JSONL or MongoDB) -> deduplicated splits", "catalog"),
    "build": Stage("sharding.__main__", "splits -> WebDataset shards (+ DALI index, manifest)", "build"),
    "loaders": Stage("loaders.__main__", "iterate the shards as training batches (DALI or torch)"),
    "train": Stage("training.train", "train a teacher or distil a student (under torchrun for several GPUs)"),
    "evaluate": Stage("training.evaluate", "top-1/5, macro, ECE, temperature of a checkpoint"),
    "soft-labels": Stage("training.soft_labels", "precompute the teachers' soft labels for distillation"),
    "report": Stage("training.report", "teachers vs students, one table"),
    "export tfjs": Stage("export.tfjs", "a checkpoint -> TF.js graph model, parity checked in TF.js"),
    "export onnx": Stage("export.onnx", "a checkpoint -> ONNX, parity checked in onnxruntime"),
    "parity": Stage("export.parity", "re-check an export against its checkpoint"),
    "serve": Stage("export.serve", "the browser demo page for an export"),
    "world": Stage("world.__main__", "generate or serve the sample world (tests, demo)"),
}  # fmt: skip


#: Optional parts and the extra that installs each (``pip install 'flora[<extra>]'``).
EXTRAS = {"nvidia": "dali", "ray": "ray", "onnx": "export", "onnxruntime": "export", "pymongo": "mongo",
          "torch": "train", "torchvision": "train", "timm": "train", "webdataset": "train"}  # fmt: skip


def missing_module(module: str) -> str:
    """What to install (or where to run from) when ``module`` cannot be imported."""
    top = module.split(".")[0]
    if top == "world":
        return "the sample world is development tooling, not in the installed package: run it from a checkout"
    if top in EXTRAS:
        return f"{module} is not installed: pip install 'flora[{EXTRAS[top]}]' (or flora[all])"
    return f"{module} is not installed (pip install 'flora[all]' installs every optional part)"


def _import(module: str):
    """The stage's module; the dev-only ``world`` is found in the checkout this flora runs from (an
    editable install), which is not on ``sys.path`` when ``flora`` starts as a console script."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        checkout = Path(__file__).resolve().parents[1]
        if exc.name != "world" or not (checkout / "world" / "__init__.py").is_file():
            raise
        sys.path.insert(0, str(checkout))
        return importlib.import_module(module)


def usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = ["usage: flora <stage> [<verb>] [options]   (flora <stage> --help for a stage's options)", ""]
    lines += [f"  {name.ljust(width)}  {stage.help}" for name, stage in STAGES.items()]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, Stage, list[str]] | None:
    """The stage named by the first one or two words of ``argv``, and the rest of ``argv``."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in STAGES:
            return name, STAGES[name], argv[words:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    found = resolve(argv)
    if found is None:
        wanted = " ".join(argv[:2]) if argv[0] == "export" else argv[0]
        return fail(None, f"unknown stage {wanted!r}; expected one of: {', '.join(STAGES)}")
    name, stage, rest = found
    try:
        entry: Callable[..., int] = _import(stage.module).main
    except ModuleNotFoundError as exc:
        return fail(name, missing_module(exc.name or ""))
    if stage.verb:
        return entry([stage.verb, *rest], prog="flora")
    return entry(rest, prog=f"flora {name}")


if __name__ == "__main__":
    sys.exit(main())
