"""Which networks export: ONNX and TF.js take a ViT teacher as they take a convnet student (TF.js with a
fixed batch of 1); TF.js refuses a family it cannot take (ConvNeXt) at once, in one line naming the
families that export, before any conversion work; an ``--out`` that is a file is one line saying a
folder was expected."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flora.export.bundle import ExportError
from flora.export.onnx import export as onnx_export
from flora.export.onnx import main as onnx_main
from flora.export.parity import fixed_batch
from flora.export.tfjs import FAMILIES
from flora.export.tfjs import export as tfjs_export
from flora.export.tfjs import main as tfjs_main
from flora.training.config import load_experiment
from flora.training.loop import Trainer
from tests.export.conftest import converters_missing
from tests.training.conftest import experiment


@pytest.fixture(scope="session")
def vit(shard_root, tmp_path_factory) -> Path:
    """best_model.pt of timm's test_vit (the teachers' VisionTransformer family), one epoch at 48 px."""
    root = tmp_path_factory.mktemp("vit")
    Trainer(load_experiment(experiment(shard_root, root, "vit", train={"epochs": 1}))).fit()
    return root / "vit" / "best_model.pt"


@pytest.fixture(scope="session")
def convnext(shard_root, tmp_path_factory) -> Path:
    """best_model.pt of timm's test_convnext (a family onnx2tf fails on), one epoch at 48 px."""
    root = tmp_path_factory.mktemp("convnext")
    cfg = experiment(shard_root, root, "convnext", model={"name": "test_convnext"}, train={"epochs": 1})
    Trainer(load_experiment(cfg)).fit()
    return root / "convnext" / "best_model.pt"


def fake_converters(venv: Path, marker: Path) -> Path:
    """A converter environment whose onnx2tf and tensorflowjs_converter only record that they ran."""
    (venv / "bin").mkdir(parents=True)
    for tool in ("onnx2tf", "tensorflowjs_converter"):
        script = venv / "bin" / tool
        script.write_text(f"#!/bin/sh\necho {tool} >> '{marker}'\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return venv


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_vit_exports_to_onnx_and_matches_pytorch(vit, tmp_path):
    report = onnx_export(vit, tmp_path / "vit_onnx", samples=16)
    assert report["model"] == "test_vit" and (tmp_path / "vit_onnx" / "model.onnx").is_file()
    assert report["parity"]["top1_agreement"] == 1.0 and report["parity"]["verdict"] != "error"


def test_tfjs_refuses_a_family_it_cannot_take_before_any_conversion(convnext, tmp_path, monkeypatch, capsys):
    ran = tmp_path / "converters_ran.txt"
    monkeypatch.setenv("FLORA_TFJS_VENV", str(fake_converters(tmp_path / "venv", ran)))
    out = tmp_path / "convnext_tfjs"
    assert tfjs_main(["--checkpoint", str(convnext), "--out", str(out), "--latency-runs", "0"]) == 2
    err = error_line(capsys)
    assert err.startswith("flora export tfjs: error: test_convnext (ConvNeXt) does not export to TF.js")
    assert all(family in err for family in FAMILIES.values()) and "ViT" in err and "MobileNetV2" in err
    assert not ran.exists(), "a converter ran before the refusal"
    assert not out.exists(), "the refused export wrote its output folder"


@pytest.mark.slow
def test_a_vit_exports_to_tfjs_with_a_fixed_batch_and_matches_pytorch(vit, tmp_path):
    problem = converters_missing()
    if problem:
        pytest.fail(f"the TF.js toolchain is not installed (make tfjs-env js-deps): {problem}")
    report = tfjs_export(vit, tmp_path / "vit_tfjs", samples=16, latency_runs=0)
    assert report["model"] == "test_vit" and report["input"]["batch"] == 1
    assert fixed_batch(tmp_path / "vit_tfjs") == 1
    p = report["parity"]
    assert p["samples"] == 16 and p["top1_agreement"] == 1.0 and p["verdict"] in ("pass", "warn"), p


@pytest.mark.parametrize("command", [onnx_main, tfjs_main], ids=["onnx", "tfjs"])
@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_out_that_is_a_file_is_one_line_expecting_a_folder(command, where, tmp_path, capsys):
    taken = tmp_path / "exports.txt"
    taken.write_text("not a folder\n")
    out = taken if where == "out" else taken / "student"
    checkpoint = tmp_path / "missing.pt"  # the folder is checked first: no checkpoint is read
    assert command(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = error_line(capsys)
    assert err.endswith(f"output folder {out}: {taken} is a file, expected a folder (--out)"), err
    assert taken.read_text() == "not a folder\n"


def test_the_export_functions_raise_the_same_line(tmp_path):
    taken = tmp_path / "model"
    taken.write_text("")
    with pytest.raises(ExportError, match="is a file, expected a folder"):
        onnx_export(tmp_path / "missing.pt", taken)
