"""Evaluation of trained checkpoints: metrics, calibration, files; the regional teacher from the global."""

import json

import pytest

from training.checkpoint import load_checkpoint
from training.evaluate import evaluate
from training.evaluate import main as evaluate_main
from training.loop import TrainingError


@pytest.fixture
def global_teacher(teachers):
    return teachers["global"]


def test_evaluate_writes_metrics_calibration_and_figures(global_teacher, tmp_path):
    results = evaluate(global_teacher, split="test", out_dir=tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["metrics"] == results["metrics"]
    m = results["metrics"]
    assert m["samples"] == results["samples"] > 0
    assert 0 <= m["top1"] <= m["top5"] <= 1 and 0 <= m["ece"] <= 1 and m["nll"] > 0
    assert sum(r["samples"] for r in results["per_region"].values()) == m["samples"]
    assert results["temperature"] > 0
    c = results["calibrated"]
    assert c["nll_after"] <= c["nll_before"] + 1e-6  # the val-fitted T rarely hurts test NLL this little set
    assert sum(b["count"] for b in results["reliability_bins"]["before"]) == m["samples"]
    for name in ("reliability.png", "confusion.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 1000
    assert load_checkpoint(global_teacher)["temperature"] == pytest.approx(results["temperature"])
    for pair in results["confused_pairs"]:
        assert pair["true"] != pair["predicted"] and pair["count"] >= 1


def test_region_filter_and_cli(global_teacher, tmp_path, capsys):
    everything = evaluate(global_teacher, split="val", calibration_split=None, out_dir=tmp_path / "all")
    region = max(everything["per_region"], key=lambda r: everything["per_region"][r]["samples"])
    code = evaluate_main(
        [
            "--checkpoint",
            str(global_teacher),
            "--split",
            "val",
            "--region",
            region,
            "--no-calibration",
            "--out",
            str(tmp_path / "one"),
        ]
    )
    assert code == 0 and "top-1" in capsys.readouterr().out
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert list(one["per_region"]) == [region]
    same = everything["per_region"][region]  # the same samples, the same model (other batches: float noise)
    assert one["metrics"] == pytest.approx(same, rel=1e-5)
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_regional_teacher_from_the_global_one(teachers, tmp_path):
    regional = load_checkpoint(teachers["regional"])
    global_ = load_checkpoint(teachers["global"])
    assert set(regional["class_mapping"]) < set(global_["class_mapping"])
    summary = json.loads((teachers["regional"].parent / "metrics.json").read_text())["summary"]
    assert summary["init_from"]["species_copied"] == len(regional["class_mapping"])
    results = evaluate(teachers["regional"], split="test", calibration_split=None, out_dir=tmp_path / "eval")
    assert list(results["per_region"]) == ["EU_SW"]
    with pytest.raises(TrainingError, match="predicts the classes of region"):
        evaluate(teachers["regional"], split="test", region="AMERICAS_NORTH", calibration_split=None)
