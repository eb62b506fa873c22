"""Export fixtures: a real smoke student (mobilenetv2_050, 64 px) trained and calibrated on the shared
test shards by the training loop and evaluation, and its TF.js export (session-scoped: converting
takes ~30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.export.bundle import ExportError
from flora.export.parity import node_ready
from flora.training.config import load_experiment
from flora.training.evaluate import evaluate
from flora.training.loop import Trainer
from tests.training.conftest import experiment


def converters_missing() -> str | None:
    from flora.export.tfjs import converter_venv

    try:
        converter_venv()
    except ExportError as exc:
        return str(exc)
    return node_ready()


@pytest.fixture(scope="session")
def student(shard_root, tmp_path_factory) -> Path:
    """best_model.pt of a mobilenetv2_050 trained one epoch at 64 px, temperature fitted on val."""
    root = tmp_path_factory.mktemp("student")
    cfg = experiment(
        shard_root,
        root,
        "student",
        model={"name": "mobilenetv2_050"},
        train={"epochs": 2},
    )
    cfg["data"]["image_size"] = 64
    Trainer(load_experiment(cfg)).fit()
    path = root / "student" / "best_model.pt"
    evaluate(path, split="test", out_dir=root / "eval")  # fits and stores the temperature
    return path


@pytest.fixture(scope="session")
def tfjs_export(student, tmp_path_factory) -> tuple[Path, dict]:
    """The float32 TF.js export of ``student`` and its report, in 256 KiB weight shards: more than the 6
    connections a browser opens per host, as a production-size model has (see export/web/flora.js)."""
    problem = converters_missing()
    if problem:
        pytest.fail(f"the TF.js toolchain is not installed (make tfjs-env js-deps): {problem}")
    from flora.export.tfjs import export

    out = tmp_path_factory.mktemp("tfjs") / "student_tfjs"
    report = export(student, out, latency_runs=5, shard_bytes=256 * 1024)
    return out, report
