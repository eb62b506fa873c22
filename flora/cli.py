"""``flora <stage> [<verb>]``: one command for every stage (also ``python -m flora``).

Each stage keeps its own parser and ``main(argv, prog)``; this module only routes to it and imports a
stage only when it is asked for (DALI, TensorFlow's converters or Ray load only where used). A stage
with verbs (``flora export tfjs|onnx``) is a group: ``flora export --help`` lists its verbs, and a
missing or unknown verb is one error line.

    flora catalog --source catalog.jsonl --out splits/
    flora build --splits splits/ --out shards/
    flora train --config config/teacher_global.yaml          (torchrun --no-python flora train ...)
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


_SHARDING, _TRAINING, _EXPORT = "flora.sharding.__main__", "flora.training", "flora.export"
STAGES: dict[str, Stage] = {
    "catalog": Stage(_SHARDING, "records (JSONL or MongoDB) -> deduplicated splits", "catalog"),
    "build": Stage(_SHARDING, "splits -> WebDataset shards (+ DALI index, manifest)", "build"),
    "loaders": Stage("flora.loaders.__main__", "iterate the shards as training batches (DALI or torch)"),
    "train": Stage(f"{_TRAINING}.train", "train a teacher or distil a student (torchrun for several GPUs)"),
    "evaluate": Stage(f"{_TRAINING}.evaluate", "top-1/5, macro, ECE, temperature of a checkpoint"),
    "soft-labels": Stage(f"{_TRAINING}.soft_labels", "precompute the teachers' soft labels for distillation"),
    "report": Stage(f"{_TRAINING}.report", "teachers vs students, one table"),
    "export tfjs": Stage(f"{_EXPORT}.tfjs", "a checkpoint -> TF.js graph model, parity checked in TF.js"),
    "export onnx": Stage(f"{_EXPORT}.onnx", "a checkpoint -> ONNX, parity checked in onnxruntime"),
    "parity": Stage(f"{_EXPORT}.parity", "re-check an export against its checkpoint"),
    "serve": Stage(f"{_EXPORT}.serve", "the browser demo page for an export"),
    "world": Stage("world.__main__", "generate or serve the sample world (tests, demo)"),
}  # fmt: skip


def _groups() -> dict[str, list[str]]:
    """Stages with verbs (``flora export tfjs``) -> their verbs, from STAGES."""
    groups: dict[str, list[str]] = {}
    for name in STAGES:
        if " " in name:
            group, verb = name.split(" ", 1)
            groups.setdefault(group, []).append(verb)
    return groups


GROUPS = _groups()


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


def usage(group: str | None = None) -> str:
    """``flora --help`` (every stage), or ``flora <group> --help`` (the group's verbs)."""
    names = [n for n in STAGES if group is None or n.startswith(group + " ")]
    width = max(len(name) for name in names)
    head = f"flora {group} <verb>" if group else "flora <stage> [<verb>]"
    lines = [f"usage: {head} [options]   (flora <stage> [<verb>] --help for a command's options)", ""]
    lines += [f"  {name.ljust(width)}  {STAGES[name].help}" for name in names]
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
    if found is None and argv[0] in GROUPS:
        return _without_verb(argv[0], argv[1:])
    if found is None:
        return fail(None, f"unknown stage {argv[0]!r}; expected one of: {', '.join(STAGES)}")
    name, stage, rest = found
    try:
        entry: Callable[..., int] = _import(stage.module).main
    except ModuleNotFoundError as exc:
        return fail(name, missing_module(exc.name or ""))
    if stage.verb:
        return entry([stage.verb, *rest], prog="flora")
    return entry(rest, prog=f"flora {name}")


def _without_verb(group: str, rest: list[str]) -> int:
    """``flora <group>`` without a known verb: help for ``--help``, else one error line."""
    verbs = GROUPS[group]
    if rest and rest[0] in ("-h", "--help", "help"):
        print(usage(group))
        return 0
    if not rest or rest[0].startswith("-"):
        return fail(group, f"expected a verb after 'flora {group}': one of {', '.join(verbs)}")
    return fail(None, f"unknown stage '{group} {rest[0]}'; expected one of: {', '.join(STAGES)}")


if __name__ == "__main__":
    sys.exit(main())
