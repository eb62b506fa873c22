"""Tests of benchmarks/sharder_stages.py: the breakdown arithmetic, the sampling, the figure."""

from __future__ import annotations

import json

from benchmarks import sharder_stages
from benchmarks.sharder_stages import STAGES, breakdown, plot, sample


def test_overhead_is_the_total_minus_the_timed_stages():
    flora = {"http": 1.0, "decode": 1.5, "resize": 1.0, "encode": 0.5, "hashing": 1.0, "cache put": 0.1}
    i2d = {"http": 0.8, "decode": 1.2, "resize": 2.0, "tar write": 0.5, "total": 6.0}
    rows = breakdown(flora, 6.1, i2d, floor=1.4, label="500 set")
    assert [r["tool"] for r in rows] == ["Flora", "img2dataset"]
    assert abs(rows[0]["python overhead & rest"] - 1.0) < 1e-9 and rows[0]["total"] == 6.1
    assert abs(rows[1]["python overhead & rest"] - 1.5) < 1e-9 and rows[1]["exif"] == 0.0
    for row in rows:
        assert abs(sum(row[s] for s in STAGES) - row["total"]) < 1e-9
        assert row["floor (decode only)"] == 1.4
    assert len(breakdown(flora, 6.1, None, floor=1.4, label="mix set")) == 1  # no img2dataset venv


def test_sample_is_seeded_shuffled_and_consistent(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "class_mapping.json").write_text("{}")
    records = [{"image_url": f"http://127.0.0.1/img/{i}.jpg?variant={i}", "label": i % 3} for i in range(100)]
    (splits / "dataset_splits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    first = sample(splits, 10, tmp_path / "a")
    (tmp_path / "b").mkdir()
    second = sample(splits, 10, tmp_path / "b")
    lines = (first[0] / "dataset_splits.jsonl").read_text().splitlines()
    assert lines == (second[0] / "dataset_splits.jsonl").read_text().splitlines()  # seeded
    urls = [json.loads(line)["image_url"] for line in lines]
    assert first[1].read_text().split() == urls and len(set(urls)) == 10
    assert urls != sorted(urls, key=lambda u: int(u.rsplit("=", 1)[1]))  # not the file's order
    assert (first[0] / "class_mapping.json").is_file()


def test_plot_writes_a_png(tmp_path):
    rows = breakdown({"http": 1.0, "decode": 2.0}, 4.0, {"decode": 2.5, "total": 5.0}, 1.5, "500 set")
    runs = [
        {"set": "500", "tool": t, "run": 1, "img_per_s": v}
        for t, v in (("Flora cold", 300.0), ("i2d", 200.0))
    ]
    path = tmp_path / "sharder.png"
    plot(rows, runs, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_marginal_total_cancels_fixed_costs(monkeypatch, tmp_path):
    calls = []

    def fake_run(splits, n, core, work, build_args):
        calls.append(n)
        return 5.0 + 0.004 * n, n  # 5 s of start-up, 4 ms per image

    monkeypatch.setattr(sharder_stages, "_flora_run", fake_run)
    assert abs(sharder_stages.flora_total(tmp_path, 2000, 0, tmp_path, []) - 4.0) < 1e-9
    assert calls == [2000, 2000 // sharder_stages.MARGINAL]
