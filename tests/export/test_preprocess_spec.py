"""preprocess.json's geometry: another tool reproduces Flora's evaluation logits from it with torchvision
alone (the function docs/export.md gives), on the smoke student's real test images."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flora.export.bundle import load_bundle, write_metadata
from flora.loaders.config import load_data_config
from flora.loaders.factory import make_loader
from flora.training.checkpoint import load_checkpoint

REPO = Path(__file__).parents[2]
DOCS = REPO / "docs" / "export.md"
WEB = REPO / "export" / "web"
#: What the documented function may import: torchvision, torch, PIL and the standard library's math.
ALLOWED_IMPORTS = {"math", "torch", "PIL", "torchvision.transforms.v2"}
#: The same float32 operations in the same order: only the scale (x * 1/255 against x / 255) may
#: differ, by an ulp of the input, which the network carries to about 1e-6 of a logit.
LOGIT_TOLERANCE = 5e-4


def documented_function():
    """``flora_input`` exactly as docs/export.md prints it (its only python block)."""
    (code,) = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    imported = set(re.findall(r"^(?:from|import) (\S+)", code, flags=re.MULTILINE))
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace["flora_input"]


def test_the_checkpoint_and_preprocess_json_state_the_geometry(student, tmp_path):
    raw = torch.load(student, weights_only=True)["preprocessing"]
    assert {k: raw[k] for k in ("interpolation", "antialias", "rounding", "layout")} == {
        "interpolation": "bilinear", "antialias": True, "rounding": "half_up", "layout": "NCHW",
    }  # fmt: skip
    assert raw["scale"] == 1 / 255
    bundle = load_bundle(student)
    write_metadata(bundle, tmp_path, "NCHW", "input", "logits")
    geometry = json.loads((tmp_path / "preprocess.json").read_text())["geometry"]
    assert geometry["resize"] == {
        "shorter_side": raw["val_resize"],
        "longer_side": "max(shorter_side, floor(longer * shorter_side / shorter + 0.5))",
        "interpolation": "bilinear",
        "antialias": True,
    }
    assert geometry["crop"]["size"] == raw["image_size"] == 64
    assert geometry["crop"]["offset"].startswith("floor((resized - size) / 2 + 0.5)")
    assert (geometry["mean"], geometry["std"], geometry["scale"]) == (raw["mean"], raw["std"], 1 / 255)


def test_torchvision_alone_reproduces_floras_evaluation_logits(student, tmp_path):
    """Every test image, decoded with PIL, through the documented function (parameters read from
    preprocess.json) and the checkpoint's network, against the logits of Flora's evaluation path: the
    reference loader (data.backend=torch) batches of the same samples."""
    flora_input = documented_function()
    bundle = load_bundle(student)
    write_metadata(bundle, tmp_path, "NCHW", "input", "logits")
    geometry = json.loads((tmp_path / "preprocess.json").read_text())["geometry"]
    checkpoint = load_checkpoint(student)
    cfg = load_data_config({"data": checkpoint.data}, ["data.backend=torch"])
    flora, ours, sizes = [], [], set()
    with torch.no_grad():
        for split in ("test", "val"):
            loader = make_loader(cfg, split, False, 0, 1, torch.device("cpu"))
            index = loader.index
            for batch in loader:
                valid = batch["valid"]
                flora.append(bundle.model(batch["image"][valid]))
                for sid in batch["index"][valid].tolist():
                    with open(index.shards[index.shard_of(sid)].path, "rb") as f:
                        f.seek(int(index.jpg_offset[sid]))
                        image = Image.open(io.BytesIO(f.read(int(index.jpg_size[sid]))))
                    sizes.add(image.size)
                    ours.append(flora_input(image, geometry))
            loader.close()
        flora_logits = torch.cat(flora)
        our_logits = bundle.model(torch.stack(ours))
    assert len(our_logits) == len(flora_logits) > 50 and len(sizes) > 1, (len(ours), sizes)
    difference = (our_logits - flora_logits).abs().max().item()
    assert difference <= LOGIT_TOLERANCE, difference
    assert torch.equal(our_logits.argmax(1), flora_logits.argmax(1))


def test_torchvision_alone_matches_on_odd_sizes(student, tmp_path):
    """Shapes where the roundings differ: torchvision's Resize + CenterCrop would be a pixel off here."""
    flora_input = documented_function()
    bundle = load_bundle(student)
    write_metadata(bundle, tmp_path, "NCHW", "input", "logits")
    geometry = json.loads((tmp_path / "preprocess.json").read_text())["geometry"]
    rng = np.random.default_rng(3)
    for h, w in [(300, 201), (75, 400), (73, 73), (101, 74)]:
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        want = bundle.transform(image)
        got = flora_input(image, geometry)
        assert got.shape == want.shape == (3, 64, 64)
        assert (got - want).abs().max().item() < 1e-5, (h, w)


def test_the_reference_loader_rounds_a_tied_longer_side_half_up_as_dali_does(student, tmp_path):
    flora_input = documented_function()
    bundle = load_bundle(student)
    write_metadata(bundle, tmp_path, "NCHW", "input", "logits")
    geometry = json.loads((tmp_path / "preprocess.json").read_text())["geometry"]
    assert geometry["resize"]["shorter_side"] == 73  # 320 * 73 / 128 = 182.5 exactly
    image = Image.fromarray((np.random.default_rng(4).random((128, 320, 3)) * 255).astype(np.uint8))
    assert (flora_input(image, geometry) - bundle.transform(image)).abs().max().item() < 1e-5


def _page_preprocess(spec: dict, image: Image.Image, raw: Path) -> subprocess.CompletedProcess:
    """export/web/flora.js's preprocessPixels in Node on ``image``'s RGBA pixels; output in raw.f32."""
    rgba = image.convert("RGBA")
    raw.write_bytes(rgba.tobytes())
    code = (
        f"import {{ preprocessPixels }} from '{(WEB / 'flora.js').as_uri()}';"
        "import fs from 'node:fs';"
        f"const px = new Uint8ClampedArray(fs.readFileSync('{raw}'));"
        f"const out = preprocessPixels(px, {rgba.width}, {rgba.height}, {json.dumps(spec)});"
        f"fs.writeFileSync('{raw}.f32', Buffer.from(out.buffer));"
    )
    return subprocess.run(["node", "--input-type=module", "-e", code], capture_output=True, text=True)


def test_the_page_reads_the_geometry_from_preprocess_json(student, tmp_path):
    """flora.js takes sizes, offsets and constants from ``geometry`` (the top-level fields are set to
    nonsense here), matches evaluation within one 8-bit level, and refuses a geometry it does not
    implement with one line naming the field."""
    bundle = load_bundle(student)
    write_metadata(bundle, tmp_path, "NHWC", "input", "logits")
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    spec.update(image_size=1, resize_shorter=1, mean=[9, 9, 9], std=[9, 9, 9], scale=9)
    image = Image.fromarray((np.random.default_rng(5).random((101, 74, 3)) * 255).astype(np.uint8))
    done = _page_preprocess(spec, image, tmp_path / "a.rgba")
    assert done.returncode == 0, done.stderr
    got = np.fromfile(tmp_path / "a.rgba.f32", "<f4").reshape(64, 64, 3)
    want = bundle.transform(image).permute(1, 2, 0).numpy()
    assert (np.abs(got - want) * np.array(bundle.preprocessing.std) * 255).max() <= 1.01
    spec["geometry"]["resize"]["interpolation"] = "bicubic"
    refused = _page_preprocess(spec, image, tmp_path / "b.rgba")
    assert refused.returncode != 0
    assert 'preprocess.json geometry.resize.interpolation is "bicubic", this page implements "bilinear"' in (
        refused.stderr
    )
