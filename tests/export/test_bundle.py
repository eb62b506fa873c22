"""Reading a checkpoint for export: labels in index order, preprocessing and temperature, clear errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flora.export.bundle import (
    ExportError,
    labels_in_order,
    load_bundle,
    preprocess,
    preprocess_spec,
    probabilities,
    sample_inputs,
    write_metadata,
)
from flora.training.checkpoint import load_checkpoint, save_checkpoint


def test_labels_follow_the_class_index_not_the_mapping_order():
    assert labels_in_order({"b": 1, "c": 2, "a": 0}) == ["a", "b", "c"]
    with pytest.raises(ExportError, match="indices must be 0..2"):
        labels_in_order({"a": 0, "b": 2, "c": 3})


def test_bundle_carries_the_checkpoints_labels_preprocessing_and_temperature(student, tmp_path):
    state = load_checkpoint(student)
    bundle = load_bundle(student)
    assert not bundle.model.training
    assert [bundle.labels[i] for i in state.class_mapping.values()] == list(state.class_mapping)
    assert bundle.image_size == 64 == state.preprocessing.image_size
    assert bundle.calibrated and bundle.temperature == pytest.approx(state.temperature)

    write_metadata(bundle, tmp_path, "NHWC", "input", "output_0")
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert [entry["name"] for entry in labels] == bundle.labels
    counts = [entry["training_images"] for entry in labels]  # each species' training images, for apps
    assert counts == load_checkpoint(student).class_counts and min(counts) >= 1
    assert json.loads((tmp_path / "preprocess.json").read_text())["few_shot_below"] == 20
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec == json.loads(json.dumps(preprocess_spec(bundle, "NHWC", "input", "output_0")))
    assert spec["input"]["shape"] == [None, 64, 64, 3] and spec["input"]["layout"] == "NHWC"
    assert spec["resize_shorter"] == state.preprocessing.val_resize
    assert spec["mean"] == pytest.approx(state.preprocessing.mean)
    assert spec["temperature"] == pytest.approx(state.temperature)
    assert spec["probabilities"] == "softmax(logits / temperature)"


def test_probabilities_apply_the_temperature():
    logits = np.array([[2.0, 0.0, -1.0]])
    p = probabilities(logits, 2.0)
    expected = np.exp([1.0, 0.0, -0.5]) / np.exp([1.0, 0.0, -0.5]).sum()
    assert p == pytest.approx(expected[None])
    assert probabilities(logits, 0.5)[0, 0] > probabilities(logits, 1.0)[0, 0] > p[0, 0]


def test_bad_checkpoints_fail_with_one_clear_error(tmp_path, student):
    with pytest.raises(ExportError, match="no checkpoint at"):
        load_bundle(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not a Flora checkpoint"):
        load_bundle(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match=r"junk.pt: not a Flora checkpoint \(torch.load: ") as junk:
        load_bundle(tmp_path / "junk.pt")
    assert "weights_only" not in str(junk.value) and "\n" not in str(junk.value)
    state = load_checkpoint(student)
    state.model_name = "mobilenetv2_100"  # weights of the 050 under another name
    save_checkpoint(tmp_path / "mismatch.pt", state)
    with pytest.raises(ExportError, match="do not match model"):
        load_bundle(tmp_path / "mismatch.pt")


def test_sample_inputs_from_the_checkpoints_test_shards_and_from_a_folder(student, tmp_path):
    bundle = load_bundle(student)
    names, x = sample_inputs(bundle, None, limit=5)
    assert len(names) == 5 and x.shape == (5, 3, 64, 64) and x.dtype == torch.float32
    assert all(".tar/" in n for n in names)
    assert float(x.min()) > -3 and float(x.max()) < 3  # normalised, not 0..255

    rgb = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    names, x = sample_inputs(bundle, tmp_path, limit=5)
    assert names == ["a.png"]
    assert torch.equal(x[0], preprocess(buf.getvalue(), bundle))
    with pytest.raises(ExportError, match="does not exist"):
        sample_inputs(bundle, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images found"):
        sample_inputs(bundle, tmp_path / "empty")
