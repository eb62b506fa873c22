"""The export bundle carries the credits of the training images: an ONNX export of the smoke student
(trained on the shared test shards, which hold ATTRIBUTION.csv) copies the file beside the model and
says so in preprocess.json (its attribution entry, as preprocess_spec gives it); a checkpoint whose
shards are in a store gets the file's location there; a local shard root without the file (built
before it existed) is said to have none."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

from flora.export.bundle import load_bundle, write_metadata
from flora.export.onnx import export
from flora.io import sha256_file


def test_an_onnx_export_carries_the_training_shards_attribution(student, tmp_path):
    bundle = load_bundle(student)
    shards = bundle.data["shards"]
    source = f"{shards}/ATTRIBUTION.csv"
    export(student, tmp_path / "onnx", samples=4)
    copied = tmp_path / "onnx" / "ATTRIBUTION.csv"
    assert copied.read_bytes() == open(source, "rb").read()  # noqa: SIM115 - a one-shot comparison
    lines = copied.read_text(encoding="utf-8").splitlines()
    manifest = json.loads(open(f"{shards}/manifest.json", encoding="utf-8").read())  # noqa: SIM115
    assert (
        lines[0].startswith("key,split,region,latin_name,creator")
        and len(lines) - 1 == (manifest["attribution"]["rows"])
    )
    spec = json.loads((tmp_path / "onnx" / "preprocess.json").read_text())
    assert spec["attribution"] == {
        "kind": "file", "file": "ATTRIBUTION.csv", "source": source, "sha256": sha256_file(copied),
        "format": "csv",
    }  # fmt: skip


def test_shards_in_a_store_give_a_link_and_older_local_shards_none(student, tmp_path):
    bundle = load_bundle(student)
    remote = replace(bundle, data={**bundle.data, "shards": "s3://bucket/flora/shards/"})
    write_metadata(remote, tmp_path / "remote", "NCHW", "input", "logits")
    spec = json.loads((tmp_path / "remote" / "preprocess.json").read_text())
    assert spec["attribution"] == {
        "kind": "link", "location": "s3://bucket/flora/shards/ATTRIBUTION.csv", "format": "csv",
    }  # fmt: skip
    assert not (tmp_path / "remote" / "ATTRIBUTION.csv").exists()

    older = tmp_path / "older-shards"
    shutil.copytree(bundle.data["shards"], older, ignore=shutil.ignore_patterns("ATTRIBUTION.csv", "_*"))
    local = replace(bundle, data={**bundle.data, "shards": str(older)})
    write_metadata(local, tmp_path / "local", "NCHW", "input", "logits")
    spec = json.loads((tmp_path / "local" / "preprocess.json").read_text())
    assert (
        spec["attribution"]["kind"] == "none"
        and "ATTRIBUTION.csv does not exist" in spec["attribution"]["reason"]
    )
    assert not (tmp_path / "local" / "ATTRIBUTION.csv").exists()
