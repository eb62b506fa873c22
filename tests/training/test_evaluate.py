"""Evaluation of trained checkpoints: metrics, calibration, files; the regional teacher from the global."""

import json

import pytest

from flora.training.checkpoint import load_checkpoint
from flora.training.evaluate import evaluate, mapping_difference
from flora.training.evaluate import main as evaluate_main
from flora.training.loop import TrainingError


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
    calibrated = load_checkpoint(global_teacher)
    assert (
        calibrated.temperature == pytest.approx(results["temperature"])
        and calibrated.temperature_split == "val"
    )
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
    assert set(regional.class_mapping) < set(global_.class_mapping)
    summary = json.loads((teachers["regional"].parent / "metrics.json").read_text())["summary"]
    assert summary["init_from"]["species_copied"] == len(regional.class_mapping)
    results = evaluate(teachers["regional"], split="test", calibration_split=None, out_dir=tmp_path / "eval")
    assert list(results["per_region"]) == ["EU_SW"]
    with pytest.raises(TrainingError, match="predicts the classes of region"):
        evaluate(teachers["regional"], split="test", region="AMERICAS_NORTH", calibration_split=None)


def test_mapping_difference_names_the_species_bounded():
    checkpoint = {"a": 0, "b": 1, "c": 2, "d": 3}
    shards = {"a": 0, "c": 1, "b": 2, "e": 3}
    assert mapping_difference(checkpoint, shards) == (
        "only in the checkpoint (1): 'd'; only in the shards (1): 'e'; "
        "at other indices (2): 'b' 1 -> 2, 'c' 2 -> 1"
    )
    many = {f"s{i:02d}": i for i in range(8)}
    assert mapping_difference({}, many, limit=5) == (
        "only in the shards (8): 's00', 's01', 's02', 's03', 's04', ... (+3 more)"
    )
    assert mapping_difference(checkpoint, dict(checkpoint)) == "the same species at the same indices"


def test_shards_of_another_label_space_are_refused_naming_the_species(teachers, capsys):
    regional = load_checkpoint(teachers["regional"]).class_mapping
    global_ = load_checkpoint(teachers["global"]).class_mapping  # the shards' global mapping
    argv = ["--checkpoint", str(teachers["regional"]), "--no-calibration", "data.label_space=global"]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"flora evaluate: error: the 'test' shards' class mapping ({len(global_)} classes) is not the "
        f"checkpoint's ({len(regional)}): "
    ), err
    extra = sorted(set(global_) - set(regional))
    listed = ", ".join(repr(name) for name in extra[:5]) + (
        f", ... (+{len(extra) - 5} more)" if len(extra) > 5 else ""
    )
    assert f"only in the shards ({len(extra)}): {listed}" in err, err
    assert "only in the checkpoint" not in err
    moved = [name for name in regional if regional[name] != global_[name]]
    assert (f"at other indices ({len(moved)}): " in err) if moved else ("at other indices" not in err), err
