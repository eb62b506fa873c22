"""The shared core: ``flora <stage> <verb>`` routes to every stage, one error style, torchrun's env."""

import subprocess
import sys
from pathlib import Path

import pytest

from flora.cli import STAGES, main, resolve
from flora.distributed import torchrun_env
from flora.errors import FloraError, fail, one_line

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, stage in STAGES.items():
        assert name in out and stage.help in out


def test_unknown_stage_is_one_line_and_status_2(capsys):
    assert main(["exprot", "tfjs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora: error: unknown stage 'exprot'") and err.count("\n") == 1
    assert main(["export", "keras"]) == 2
    assert "unknown stage 'export keras'" in capsys.readouterr().err
    assert resolve(["export", "onnx", "--out", "x"])[2] == ["--out", "x"]


def test_the_command_and_the_module_fail_alike(tmp_path):
    """``flora catalog`` and ``flora catalog``: same line, same status."""
    missing = str(tmp_path / "missing.jsonl")
    outs = []
    for cmd in (["-m", "flora.cli", "catalog"], ["-m", "flora.sharding", "catalog"]):
        proc = subprocess.run(
            [sys.executable, *cmd, "--source", missing, "--out", str(tmp_path / "o")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        outs.append((proc.returncode, proc.stderr))
    assert outs[0] == outs[1] == (2, f"flora catalog: error: source file not found: {missing}\n")


def test_stage_errors_share_one_base():
    from flora.config import ConfigError
    from flora.export.bundle import ExportError
    from flora.loaders import LoaderError
    from flora.sharding.format.schema import ShardFormatError
    from flora.training.checkpoint import CheckpointError
    from flora.training.loop import TrainingError

    for cls in (ExportError, ConfigError, LoaderError, ShardFormatError, CheckpointError, TrainingError):
        assert issubclass(cls, FloraError), cls


def test_fail_prints_one_line(capsys):
    assert fail("train", ValueError("first\n\n  second  ")) == 2
    assert capsys.readouterr().err == "flora train: error: first | second\n"
    assert one_line("a\nb") == "a | b"


def test_torchrun_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert torchrun_env() == torchrun_env(0, 1) and not torchrun_env().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = torchrun_env()
    assert (env.rank, env.world_size, env.local_rank, env.distributed) == (3, 4, 1, True)
    with pytest.raises(ValueError, match="rank must be in"):
        torchrun_env(4, 4)


def test_a_missing_optional_part_names_its_extra(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def without_onnx(name, *args):
        if name == "flora.export.onnx":
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnx)
    assert main(["export", "onnx", "--checkpoint", "c.pt", "--out", "o"]) == 2
    assert capsys.readouterr().err == (
        "flora export onnx: error: onnx is not installed: pip install 'flora[export]' (or flora[all])\n"
    )


def test_cache_root_and_store_keys(monkeypatch, tmp_path):
    from flora.sharding.cache.derived import ENV_VAR, cache_root, derived_dir, store_key

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "flora"
    a, b = tmp_path / "team-a" / "shards", tmp_path / "team-b" / "shards"
    assert store_key(a) != store_key(b) and store_key(a).startswith("shards-")  # same name, two stores
    assert store_key(a) == store_key(str(a) + "/") and store_key("s3://bucket/shards").startswith("shards-")
    assert derived_dir("soft_labels", a, tmp_path / "c") == tmp_path / "c" / "soft_labels" / store_key(a)


def test_flora_world_runs_from_a_checkout_as_a_console_script(tmp_path):
    """The console script does not put the checkout on sys.path; the dev-only world is found anyway."""
    flora = Path(sys.executable).parent / "flora"
    if not flora.is_file():
        pytest.skip("the flora console script is not installed in this environment")
    proc = subprocess.run(
        [str(flora), "world", "generate", "--out", str(tmp_path / "w"), "--records", "30", "--species", "6"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w" / "catalog.jsonl").is_file()
