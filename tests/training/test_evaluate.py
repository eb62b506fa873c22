"""Evaluation of trained checkpoints: metrics, calibration, files; the regional teacher from the global."""

import dataclasses
import json

import numpy as np
import pytest

from flora.training.checkpoint import load_checkpoint, save_checkpoint
from flora.training.evaluate import evaluate, mapping_difference, tail_line
from flora.training.evaluate import main as evaluate_main
from flora.training.loop import TrainingError
from flora.training.metrics import BUCKETS, bucket_rule


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
    for name in ("reliability.png", "confusion.png", "per_species.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 1000
    assert m["macro_top1"] <= m["macro_top5"] <= 1
    assert saved["buckets"] == results["buckets"]
    _check_buckets(results, load_checkpoint(global_teacher).class_counts)
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
    _check_buckets(results, regional.class_counts)  # its own label space's counts, one region
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


def _check_buckets(results: dict, class_counts: list[int]) -> None:
    """The ``buckets`` section agrees with the rule, the training counts and the global figures."""
    b = results["buckets"]
    rule = bucket_rule(class_counts)
    assert (b["thresholds"], b["requested"], b["scaled"], b["rule"]) == (
        list(rule.thresholds), [20, 100], rule.scaled, rule.rule
    )  # fmt: skip
    assigned = rule.assign(class_counts)
    assert list(b["species"].values()) == np.bincount(assigned, minlength=3).tolist()
    assert sum(b["training_samples"].values()) == sum(class_counts)
    assert sum(b["test_samples"].values()) == results["samples"]
    top1_hits = 0.0
    for name in BUCKETS:
        m = b["metrics"][name]
        assert (m is None) == (b["test_samples"][name] == 0)
        if m is not None:
            assert m["samples"] == b["test_samples"][name] and m["species"] <= b["species"][name]
            assert 0 <= m["macro_top1"] <= 1 and m["top1"] <= m["top5"] and 0 <= m["ece"] <= 1
            assert (m["ece_calibrated"] is None) == (results["temperature"] is None)
            top1_hits += m["top1"] * m["samples"]
    assert top1_hits == pytest.approx(results["metrics"]["top1"] * results["samples"])
    if len(results["per_region"]) > 1:  # the same buckets per region: they add up to the split's
        assert list(b["per_region"]) == list(results["per_region"])
        for name in BUCKETS:
            parts = [r[name] for r in b["per_region"].values() if r[name] is not None]
            assert sum(p["samples"] for p in parts) == b["test_samples"][name]
            if parts:
                hits = sum(p["top1"] * p["samples"] for p in parts)
                assert hits == pytest.approx(b["metrics"][name]["top1"] * b["test_samples"][name])
    else:
        assert b["per_region"] == {}


def test_a_checkpoint_without_class_counts_has_them_counted_and_says_so(global_teacher, tmp_path, capsys):
    old = dataclasses.replace(load_checkpoint(global_teacher), class_counts=None)
    save_checkpoint(tmp_path / "old.pt", old)
    argv = ["--checkpoint", str(tmp_path / "old.pt"), "--no-calibration", "--split", "val"]
    assert evaluate_main([*argv, "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    b = results["buckets"]
    assert (
        b["class_counts"].startswith("counted in the 'train' split of ") and "predates" in b["class_counts"]
    )
    _check_buckets(results, load_checkpoint(global_teacher).class_counts)  # the counts the run saved
    assert tail_line(results) in out and out.count("many/medium/few top-1: ") == 1
    assert "training counts counted in the 'train' split" in tail_line(results)
    # the thresholds as given (no scaling), and a bad --buckets value: one line, exit status 2
    assert (
        evaluate_main([*argv, "--buckets", "5,50", "--no-bucket-scaling", "--out", str(tmp_path / "f")]) == 0
    )
    fixed = json.loads((tmp_path / "f" / "results.json").read_text())["buckets"]
    assert (fixed["thresholds"], fixed["scaled"]) == ([5, 50], False) and "as requested" in fixed["rule"]
    assert "(thresholds 5/50 training images; " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([*argv, "--buckets", "100,20"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "expected 0 < FEW < MANY, got '100,20'" in err


def test_tail_line_states_the_scaled_thresholds_and_a_missing_bucket():
    results = {
        "metrics": {"macro_top5": 0.95},
        "buckets": {
            "requested": [20, 100],
            "thresholds": [13, 27],
            "scaled": True,
            "class_count_range": [7, 86],
            "class_counts": "the checkpoint's class_counts",
            "species": {"many": 3, "medium": 4, "few": 5},
            "metrics": {"many": {"top1": 0.9123}, "medium": {"top1": 0.74}, "few": None},
        },
    }
    assert tail_line(results) == (
        "many/medium/few top-1: 0.912 / 0.740 / -, macro top-5 0.950 (thresholds 20/100 scaled to 13/27: "
        "the largest class has 86 training images; 3 / 4 / 5 species)"
    )
