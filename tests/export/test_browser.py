"""The demo page in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright-core):
it loads the exported model, a photo is picked with the file input, the top-5 appears, and the
page's answer is PyTorch's. A screenshot is kept beside the test's files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from flora.export.bundle import (
    exact_logits,
    load_bundle,
    preprocess,
    probabilities,
    sample_images,
    torch_logits,
)
from flora.export.serve import serve_in_thread

JS = Path(__file__).resolve().parents[2] / "export" / "js"
CHROMIUM = os.environ.get("FLORA_CHROMIUM", "/usr/bin/chromium")

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def run_page(url: str, images: list[Path], screenshot: Path) -> dict:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser-deps` installs Debian's chromium")
    cmd = ["node", str(JS / "browser_check.mjs"), "--url", url, "--images", ",".join(map(str, images))]
    cmd += ["--screenshot", str(screenshot), "--chromium", CHROMIUM, "--timeout", "90000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=JS, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_page_classifies_a_photo_like_pytorch(student, tfjs_export, tmp_path):
    out, _ = tfjs_export
    bundle = load_bundle(student)
    # Four test images whose answer is not a near-tie in PyTorch (largest top-1 probability margins):
    # the page's input may differ from PyTorch's by one 8-bit level, which moves a near-tie either way.
    candidates = sample_images(bundle, None, 16)
    x_all = torch.stack([preprocess(data, bundle) for _, data in candidates])
    p_all = probabilities(torch_logits(bundle, x_all), bundle.temperature)
    top2 = np.sort(p_all, 1)[:, -2:]
    chosen = np.argsort(top2[:, 0] - top2[:, 1])[:4]  # most negative second-minus-first first
    found = [candidates[i] for i in chosen]
    paths = []
    for i, (_, data) in enumerate(found):
        paths.append(tmp_path / f"sample_{i}.jpg")
        paths[-1].write_bytes(data)
    server, url = serve_in_thread(out)
    try:
        page = run_page(url, paths, tmp_path / "page.png")
    finally:
        server.shutdown()
        server.server_close()

    assert page["state"] == "ready" and page["backend"] == "wasm", page
    assert page["console_errors"] == []
    assert len(list(out.glob("group1-shard*.bin"))) > 6  # more shards than a browser's connections per host
    assert page["runtime"]["crossOriginIsolated"] is True
    assert f"{len(bundle.labels)} species" in page["footer"]
    assert len(page["results"]) == len(paths)
    for (_, data), shown in zip(found, page["results"], strict=True):
        assert shown["state"] == "done", shown.get("error")
        result = shown["result"]
        x = preprocess(data, bundle)
        logits = torch_logits(bundle, x[None])[0]
        size = bundle.image_size
        page_input = (
            torch.tensor(result["input"], dtype=torch.float32).reshape(size, size, 3).permute(2, 0, 1)
        )
        # What the page fed the network is what evaluation feeds it (within one 8-bit level) ...
        levels = (page_input - x).abs().permute(1, 2, 0).numpy() * np.array(bundle.preprocessing.std) * 255
        assert levels.max() <= 1.01
        # ... TF.js in the page computes PyTorch's logits on that input (as close as float32 allows) ...
        on_page_input = torch_logits(bundle, page_input[None])[0]
        floor = np.abs(on_page_input - exact_logits(bundle, page_input[None])[0]).max()
        assert np.abs(np.array(result["logits"]) - on_page_input).max() <= max(1e-4, 4 * floor)
        # ... so the top-1 is PyTorch's, with the checkpoint's temperature applied the same way.
        assert result["top"][0]["index"] == int(logits.argmax())
        assert result["top"][0]["species"] == bundle.labels[int(logits.argmax())]
        want = probabilities(on_page_input[None], bundle.temperature)[0]
        assert np.abs(np.array(result["probabilities"]) - want).max() < 1e-3
        # The list a person sees: five species, best first, with percentages.
        assert len(shown["shown"]) == 5
        assert shown["shown"][0].startswith(bundle.labels[int(logits.argmax())])
        seen = bundle.training_images[int(logits.argmax())]  # how much the model saw of the species
        assert f"{seen} training photo" in shown["shown"][0]
        assert result["top"][0]["trainingImages"] == seen
        assert shown["shown"][0].endswith(f"{result['top'][0]['probability'] * 100:.1f}%")

    shot = tmp_path / "page.png"
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("FLORA_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(keep) / "browser_demo.png")


def test_the_page_says_when_the_model_is_missing(tfjs_export, tmp_path):
    out, _ = tfjs_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "labels.json").write_text(json.dumps(["only one"]))
    server, url = serve_in_thread(broken)
    try:
        page = run_page(url, [tmp_path / "unused.jpg"], tmp_path / "error.png")
    finally:
        server.shutdown()
        server.server_close()
    assert page["state"] == "error"
    assert "labels.json has 1 names" in page["status"]


def test_the_static_bundle_works_from_a_plain_web_server(student, tfjs_export, tmp_path):
    """``export.serve --bundle``: the page, TF.js and the model as files, served by Python's stock
    http.server (no special headers, no COOP/COEP): the page loads and classifies."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from flora.export.serve import main as serve_main

    out, _ = tfjs_export
    site = tmp_path / "site"
    assert serve_main(["--model", str(out), "--bundle", str(site)]) == 0
    assert (site / "model" / "model.json").is_file() and not (site / "model" / "report.json").exists()
    assert (site / "vendor" / "tfjs" / "tf.min.js").is_file()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(site)))
    server.request_queue_size = 1024
    Thread(target=server.serve_forever, daemon=True).start()
    image = tmp_path / "one.jpg"
    image.write_bytes(sample_images(load_bundle(student), None, 1)[0][1])
    try:
        page = run_page(f"http://127.0.0.1:{server.server_address[1]}/", [image], tmp_path / "bundle.png")
    finally:
        server.shutdown()
        server.server_close()
    assert page["state"] == "ready" and page["console_errors"] == []
    assert page["runtime"]["crossOriginIsolated"] is False  # still works, single-threaded
    assert page["results"][0]["state"] == "done" and len(page["results"][0]["shown"]) == 5
