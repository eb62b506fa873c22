"""The sharder's plan without a server: every chunk job is created complete (the build's settings,
the retry round's negative-cache bypass), a retry round's job file is read back with the running
build's settings, files written by earlier versions included, and a folder output does nothing
where an ``s3://`` one checks, ships or publishes."""

from __future__ import annotations

import json

from flora.config import load_config
from flora.sharding.build.plan import WORK_DIR, JobSettings, new_retry_round, plan_jobs, retry_rounds
from flora.sharding.build.run import LocalOutput, open_output
from flora.sharding.config import BuildConfig
from flora.sharding.format.schema import MANIFEST


def splits_file(tmp_path, n: int = 7):
    path = tmp_path / "dataset_splits.jsonl"
    rows = [{"split": "train", "region": "EU_SW", "image_url": f"http://h/{i}.jpg"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(sha: str = "ab" * 32) -> JobSettings:
    return JobSettings(load_config(BuildConfig, None, ["shards.max_samples=3"]), sha)


def test_planned_jobs_carry_the_builds_settings(tmp_path):
    given = settings()
    jobs, n, unreadable = plan_jobs(splits_file(tmp_path), tmp_path / "out", given)
    assert (n, unreadable) == (7, []) and [j.size for j in jobs] == [3, 3, 1]
    assert all(j.settings is given and j.use_negative_cache for j in jobs)


def test_a_retry_round_is_created_complete_and_read_back_with_the_running_settings(tmp_path):
    out, path, first = tmp_path / "out", splits_file(tmp_path), settings()
    (out / WORK_DIR).mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps({"splits_sha256": first.splits_sha256, "retry_rounds": 0}))
    failures = [{"split": "train", "region": "EU_SW", "offset": o, "reason": "http_404"} for o in (0, 40)]
    (out / "failures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failures))
    planned = new_retry_round(out, path, first)
    assert [j.chunk_id for j in planned] == ["retry01-000000"]
    assert planned[0].settings is first and not planned[0].use_negative_cache
    saved = json.loads((out / WORK_DIR / "retry-round-001.json").read_text())
    assert set(saved[0]) == {
        "chunk_id",
        "split",
        "region",
        "splits_path",
        "out_dir",
        "offsets",
        "use_negative_cache",
    }
    later = settings()
    (loaded,) = retry_rounds(out, later)
    assert loaded.settings is later and list(loaded.offsets) == [0, 40] and not loaded.use_negative_cache


def test_a_retry_round_file_of_an_earlier_version_loads(tmp_path):
    old = {"chunk_id": "retry01-000000", "split": "val", "region": "X", "splits_path": "s", "out_dir": "o",
           "offsets": [5], "use_negative_cache": False}  # fmt: skip
    old.update(remote=None, driver_token="", splits_sha256="")  # the run's settings, always empty there
    (tmp_path / WORK_DIR).mkdir()
    (tmp_path / WORK_DIR / "retry-round-001.json").write_text(json.dumps([old]))
    given = settings()
    (job,) = retry_rounds(tmp_path, given)
    assert (job.chunk_id, job.split, job.offsets, job.use_negative_cache) == (
        "retry01-000000",
        "val",
        [5],
        False,
    )
    assert job.settings is given


def test_a_folder_output_has_nothing_to_check_ship_or_publish(tmp_path):
    output = open_output(tmp_path / "shards")
    assert isinstance(output, LocalOutput) and output.folder == tmp_path / "shards"
    given = output.job_settings(settings().cfg, "cd" * 32)
    assert (given.splits_sha256, given.remote, given.driver_token) == ("cd" * 32, None, "")
    manifest = {"shards": []}
    assert output.publish(manifest) is manifest
