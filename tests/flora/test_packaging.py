"""The wheel: everything installs under the one name ``flora``; an installed Flora (``pip install`` into
a clean venv, run from another folder) runs ``flora catalog`` and ``flora build`` with its bundled
configs; the sample world is not in it."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from world import ImageServer, WorldSpec, build_world

REPO = Path(__file__).resolve().parents[2]


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
def test_installed_wheel_runs_catalog_and_build_with_bundled_configs(tmp_path):
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO)])
    (wheel,) = wheels.glob("flora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flora/configs/sharding_smoke.yaml" in names and "flora/export/web/index.html" in names
    assert "flora/sharding/build/run.py" in names and "flora/loaders/factory.py" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("flora-")}  # flora-0.1.0.dist-info/
    assert tops == {"flora"}, tops  # one installed name: no top-level sharding/, training/, world/...

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)])  # the core's few dependencies
    flora = str(venv / "bin" / "flora")
    elsewhere = tmp_path / "elsewhere"  # no config/ here: the bundled configs are found
    elsewhere.mkdir()
    (elsewhere / "images").mkdir()
    with ImageServer(elsewhere / "images") as server:
        world = build_world(
            elsewhere, WorldSpec(n_records=150, n_species=10, seed=2), base_url=server.base_url
        )
        for path, fault in world.faults.items():
            server.set_fault(path, fault)
        run([flora, "catalog", "--config", "config/catalog_smoke.yaml", "--source", str(world.catalog_path),
             "--out", "splits", "progress=false"], cwd=elsewhere)  # fmt: skip
        run([flora, "build", "--config", "sharding_smoke.yaml", "--splits", "splits", "--out", "shards",
             "progress=false", "download.allow_networks=[127.0.0.1/32]"], cwd=elsewhere)  # fmt: skip
    manifest = json.loads((elsewhere / "shards" / "manifest.json").read_text())
    assert manifest["accounting"]["ok"] and manifest["accounting"]["sharded"] > 50
    assert manifest["shards"] and (elsewhere / "shards" / manifest["shards"][0]["path"]).is_file()
    proc = subprocess.run(
        [flora, "train", "--config", "x.yaml"], capture_output=True, text=True, cwd=elsewhere
    )
    assert proc.returncode == 2 and "pip install 'flora[train]'" in proc.stderr  # torch is an extra
