"""Flora lives beside a user's own code: run from a folder that holds its own ``training/`` package,
``export.py``, ``loaders.py`` and ``sharding.py``, every documented launch still reaches Flora (the
one installed name ``flora``), and the CLI's list of commands each answers ``--help`` and a missing
argument with help or one error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flora.cli import GROUPS, STAGES, main

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: What a user's own modules do when imported: fail loudly, so a shadowed import cannot pass unseen.
SHADOW = "raise SystemExit('imported the user\\'s own {name}, not Flora')\n"


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> Path:
    """An ML repository of a user's: its own training package and export/loaders/sharding modules."""
    root = tmp_path_factory.mktemp("user_project")
    (root / "training").mkdir()
    (root / "training" / "__init__.py").write_text(SHADOW.format(name="training package"))
    (root / "training" / "train.py").write_text(SHADOW.format(name="training.train"))
    for name in ("export", "loaders", "sharding"):
        (root / f"{name}.py").write_text(SHADOW.format(name=f"{name}.py"))
    return root


def run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``argv`` from ``cwd`` as a user with Flora's environment activated runs it (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_user_folder_really_shadows_bare_names(user_project):
    """The check below can fail: a bare ``import training`` from there gets the user's package."""
    proc = run([sys.executable, "-c", "import training"], user_project)
    assert proc.returncode != 0 and "imported the user's own training package" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["flora", "--help"],
        ["flora", "train", "--help"],
        ["flora", "export", "tfjs", "--help"],
        ["python", "-m", "flora", "train", "--help"],
        ["python", "-m", "flora", "export", "onnx", "--help"],
        ["python", "-m", "flora", "loaders", "--help"],
        ["torchrun", "--standalone", "--nproc-per-node", "1", "--no-python", "flora", "train", "--help"],
        ["torchrun", "--standalone", "--nproc-per-node", "1", "-m", "flora", "train", "--help"],
    ],
    ids=" ".join,
)
def test_every_documented_launch_reaches_flora_from_a_user_folder(user_project, argv):
    exe = sys.executable if argv[0] == "python" else str(BIN / argv[0])
    if not Path(exe).is_file():
        pytest.skip(f"{argv[0]} is not installed in this environment")
    proc = run([exe, *argv[1:]], user_project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: flora" in proc.stdout and "imported the user's own" not in proc.stderr


def test_the_python_api_imports_from_a_user_folder(user_project):
    code = (
        "from flora.loaders import create_dataloaders\n"
        "from flora.export import tfjs, onnx\n"
        "import flora.training.train, flora.sharding.build.run, flora.sharding.catalog.run\n"
        "print(create_dataloaders.__module__, tfjs.__name__)\n"
    )
    proc = run([sys.executable, "-c", code], user_project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["flora.loaders.factory", "flora.export.tfjs"]


def test_a_real_train_under_torchrun_from_a_user_folder(user_project, tmp_path):
    """``torchrun --no-python flora train`` runs the real loop from there: a bad config is refused by
    Flora's own parser (one line), not by the user's ``training`` package."""
    torchrun = BIN / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed in this environment")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data:\n  shards: {tmp_path}\noptim:\n  lrate: 1\n")
    proc = run([str(torchrun), "--standalone", "--nproc-per-node", "1", "--no-python", "flora", "train",
                "--config", str(bad)], user_project)  # fmt: skip
    assert proc.returncode != 0 and "imported the user's own" not in proc.stderr
    assert "flora train: error: " in proc.stderr and "optim.lrate" in proc.stderr


def commands() -> list[list[str]]:
    """Every command ``flora --help`` lists, as words."""
    from flora.cli import usage

    listed = [line.strip().split("  ")[0] for line in usage().splitlines()[2:]]
    assert listed == list(STAGES)  # the walk below covers exactly what the help prints
    return [name.split() for name in listed]


@pytest.mark.parametrize("words", commands(), ids=" ".join)
def test_each_listed_command_gives_help(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    assert f"usage: flora {' '.join(words)}" in capsys.readouterr().out


@pytest.mark.parametrize("words", commands(), ids=" ".join)
def test_each_listed_command_without_its_arguments_is_one_error_line(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(words)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"flora {' '.join(words)}: error: "), captured.err
    assert "--help" in err[0] and captured.out == ""


@pytest.mark.parametrize("group", list(GROUPS))
def test_a_group_gives_help_and_wants_a_verb(group, capsys):
    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"{group} {verb}" in out for verb in GROUPS[group])
    assert main([group]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"flora {group}: error: expected a verb after 'flora {group}': one of {', '.join(GROUPS[group])}"
    ]
