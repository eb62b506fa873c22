"""Importing a package, or reading a config, costs no heavy dependency: ``flora.loaders`` and its data
config load without torch (its public names are imported on first use), and the product packages'
``__init__`` modules import none of torch, DALI, TensorFlow, Ray, pymongo or numpy. Each check runs
in a fresh interpreter, since this one has imported them all long ago."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: What no package import nor data config may pull in (imported where used, STYLE.md "Dependencies").
HEAVY = ("torch", "nvidia.dali", "tensorflow", "ray", "pymongo", "numpy")


def loaded_after(code: str) -> list[str]:
    """The heavy modules in ``sys.modules`` after ``code`` ran in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_data_config_loads_without_torch(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  shards: /x\n  batch_size: 8\n")
    code = (
        "import flora.loaders.config, flora.loaders\n"
        "from flora.loaders import DataConfig, AugmentConfig, load_data_config\n"
        f"assert load_data_config({str(path)!r}).batch_size == 8\n"
    )
    assert "torch" not in loaded_after(code)


@pytest.mark.parametrize(
    "package", ["flora", "flora.sharding", "flora.training", "flora.export", "flora.loaders"]
)
def test_package_imports_are_light(package):
    assert loaded_after(f"import {package}") == []


def test_the_lazy_names_are_the_real_ones():
    import flora.loaders
    from flora.loaders import config, factory, index

    assert flora.loaders.create_dataloaders is factory.create_dataloaders
    assert flora.loaders.LoaderInfo is factory.LoaderInfo
    assert flora.loaders.LoaderError is index.LoaderError
    assert flora.loaders.DataConfig is config.DataConfig
    assert set(flora.loaders.__all__) <= set(dir(flora.loaders))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flora.loaders.nope  # noqa: B018
