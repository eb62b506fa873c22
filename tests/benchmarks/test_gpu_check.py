"""The prepared GPU check on a CPU: ``python -m benchmarks.gpu --device cpu --tiny`` end to end (the
same code a GPU runs, toy sizes), and the bundle that carries DALI to the GPU machine in parts."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.gpu_bundle import BundleError, pack, receive, split
from flora.io import sha256_file
from flora.loaders.dali import HAVE_DALI

REPO = Path(__file__).resolve().parents[2]


def source_photos(folder: Path, n: int = 4) -> Path:
    """Photo-like sources (smooth gradients plus noise, 640x480 JPEGs) to cut the benchmark set from."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, (xx + yy) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"src{i}.jpg", quality=92)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_gpu_check_dry_runs_on_the_cpu(tmp_path):
    sources = source_photos(tmp_path / "sources")
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--tiny", "--sources", str(sources)]
    cmd += ["--work", str(tmp_path / "work"), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "gpu.json").read_text())
    assert (results / "gpu.png").stat().st_size > 10_000
    assert str(tmp_path) not in (results / "gpu.json").read_text()  # no machine paths
    device = result["device"]
    assert device["gpu"] is None and device["torch"] and device["dali"] and device["cuda"] is not None
    tests = result["tests"]
    assert tests["gpu_graph"]["passed"] >= 40 and tests["gpu_graph"]["returncode"] == 0
    assert tests["gpu_marked"]["skipped"] >= 3 and tests["gpu_marked"].get("failed", 0) == 0  # no CUDA here
    parts = [r["part"] for r in result["rows"]]
    assert parts.count("loader") == 4 and parts.count("train") == 2 and parts.count("distill") == 2
    for row in result["rows"]:
        assert row["img_per_s"] > 0, row
    train = [r for r in result["rows"] if r["part"] == "train"]
    assert train[1]["data_wait"] < 0.05  # the resident batch never waits
    assert result["targets"]["applies"] is False and "met" not in result["targets"]
    assert result["targets"]["kd_cached_vs_online"] > 0


def test_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cuda"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("benchmarks.gpu: error:") and "\n" not in proc.stderr.strip()


def test_bundle_parts_are_at_most_the_part_size_and_rejoin(tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    payload = np.random.default_rng(1).bytes(250_000)
    (wheels / "big-1.0-py3-none-any.whl").write_bytes(payload)
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"\xff\xd8fake")
    bundle = tmp_path / ".gpu-bundle"
    manifest = pack([photo], sorted(wheels.glob("*.whl")), bundle, part_bytes=100_000)
    assert len(manifest["parts"]) == 3 and all(p["bytes"] <= 100_000 for p in manifest["parts"])

    # the machine side: one part per call; the bundle folder holds only what this call carried
    stage = tmp_path / "stage"
    carried = tmp_path / "carried"
    for i, part in enumerate(manifest["parts"]):
        (carried / part["name"]).mkdir(parents=True)
        (carried / "manifest.json").write_bytes((bundle / "manifest.json").read_bytes())
        (carried / part["name"] / "bundle.part").write_bytes(
            (bundle / part["name"] / "bundle.part").read_bytes()
        )
        state = receive(carried, stage, install=False)
        assert state["ready"] == (i == 2)
        if i < 2:
            assert state["missing"] == [p["name"] for p in manifest["parts"][i + 1 :]]
        for p in carried.glob("part-*"):  # the next call carries another part only
            (p / "bundle.part").unlink()
            p.rmdir()
    assert (stage / "wheels" / "big-1.0-py3-none-any.whl").read_bytes() == payload
    assert (stage / "photos" / "0000.jpg").read_bytes() == b"\xff\xd8fake"
    assert receive(carried, stage, install=False)["ready"]  # a further call finds it ready


def test_bundle_refuses_a_damaged_part_and_a_missing_manifest(tmp_path):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(__file__, arcname="wheels/x.py")
    bundle = tmp_path / "b"
    manifest = split(archive, bundle, part_bytes=4096)
    assert sha256_file(archive) == manifest["sha256"]
    part = bundle / manifest["parts"][0]["name"] / "bundle.part"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(BundleError, match="sha256 differs"):
        receive(bundle, tmp_path / "stage", install=False)
    with pytest.raises(BundleError, match="carry .gpu-bundle/manifest.json"):
        receive(tmp_path / "nothing", tmp_path / "stage", install=False)
