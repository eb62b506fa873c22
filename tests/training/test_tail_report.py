"""The distillation report's many / medium / few-shot and macro top-5 columns."""

import json

from flora.training.report import SPEED_NOTE, markdown
from flora.training.report import main as report_main


def _row(name: str, thresholds: list[int], few: float | None) -> dict:
    return {
        "name": name, "role": "student", "model": "m", "test_set": "all", "samples": 10, "top1": 0.5,
        "top5": 0.9, "macro_top1": 0.4, "macro_top5": 0.8, "many_top1": 0.7, "medium_top1": 0.45,
        "few_top1": few, "bucket_thresholds": thresholds, "ece": 0.1, "ece_calibrated": 0.05,
        "params": 2e6, "macs": 3e6,
    }  # fmt: skip


def test_markdown_has_the_tail_columns_and_states_the_thresholds():
    table = markdown({"split": "test", "rows": [_row("a", [13, 27], None)], "pairs": []})
    header, rule, row = table.splitlines()[2:5]
    assert "| macro top-5 | many top-1 | medium top-1 | few top-1 |" in header
    assert header.count("|") == rule.count("|") == row.count("|")
    assert "| 0.400 | 0.800 | 0.700 | 0.450 | - | 0.100 |" in row  # an empty bucket: "-"
    assert "Many / medium / few: > 27 / 13-27 / < 13 training images per species." in table
    two = markdown(
        {"split": "test", "rows": [_row("a", [13, 27], 0.2), _row("b", [6, 15], 0.1)], "pairs": []}
    )
    assert "per model: a 13/27, b 6/15." in two


def test_markdown_leaves_speed_to_the_json_and_says_it_is_no_benchmark():
    row = {**_row("a", [13, 27], None), "train_steps_per_s": 9.5}
    table = markdown({"split": "test", "rows": [row], "pairs": []})
    assert "steps/s" not in table.splitlines()[2] and "9.5" not in table
    assert SPEED_NOTE in table and "not a benchmark" in SPEED_NOTE


def test_an_out_that_is_a_file_is_one_line_before_any_evaluation(tmp_path, capsys):
    taken = tmp_path / "report.txt"
    taken.write_text("")
    missing = tmp_path / "missing.pt"  # never read: the folder is checked first
    out = taken / "report"
    assert report_main(["--student", str(missing), "--teacher", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flora report: error: output folder {out}: {taken} is a file, expected a folder (--out)"


def test_report_rows_carry_the_buckets(teachers, tmp_path, capsys):
    argv = [
        "--student",
        str(teachers["global"]),
        "--teacher",
        str(teachers["regional"]),
        "--out",
        str(tmp_path),
    ]
    assert report_main([*argv, "--buckets", "10,40"]) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert (report["buckets"], report["bucket_scaling"]) == ([10, 40], True)
    for row in report["rows"]:  # both on EU_SW's test samples; each by its own training counts
        assert row["test_set"] == "EU_SW" and row["bucket_thresholds"][0] < row["bucket_thresholds"][1]
        results = json.loads((tmp_path / f"{row['role']}_{row['name']}_EU_SW" / "results.json").read_text())
        assert row["bucket_rule"] == results["buckets"]["rule"] and "10/40 scaled" in row["bucket_rule"]
        assert row["macro_top5"] == results["metrics"]["macro_top5"]
        for name in ("many", "medium", "few"):
            bucket = results["buckets"]["metrics"][name]
            assert row[f"{name}_top1"] == (bucket["top1"] if bucket else None)
    assert (tmp_path / "comparison.md").read_text() == markdown(report)
    assert "| many top-1 |" in capsys.readouterr().out
