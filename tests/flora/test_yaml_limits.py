"""Hostile config files: a nesting thousands of levels deep, an alias bomb and an oversized file are
refused in one line, naming the limit, by the real commands; Flora's own configs still load.

The commands run as subprocesses with a generous timeout: before the bounds, the alias bomb kept
``flora catalog`` busy for minutes, so a regression fails here instead of hanging the suite."""

import subprocess
import sys
from pathlib import Path

import pytest

from flora.config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    ConfigError,
    ConfigLimitError,
    apply_overrides,
    parse_yaml,
    read_yaml,
)

REPO = Path(__file__).resolve().parents[2]
RETURNS_WITHIN_S = 120  # a bound that only a hang crosses; the refusals themselves take milliseconds


def deep_mapping(levels: int) -> str:
    """``{a: {a: ... 1}}``, ``levels`` mappings deep."""
    return "{a: " * levels + "1" + "}" * levels + "\n"


def alias_bomb(key: str) -> str:
    """ "Billion laughs" under ``key``: nine levels, each a list of ten aliases of the level below."""
    lines = [f"{key}:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def oversized() -> str:
    """A valid config just over the size limit (a long comment: no parsing is needed to refuse it)."""
    return "progress: false\n" + "#" * MAX_CONFIG_BYTES + "\n"


# The key each command reads its own settings from, so the bomb sits where a real value would.
BOMB_KEYS = {"catalog": "mongo", "loaders": "data"}
CASES = {
    "deep": (lambda cli: deep_mapping(5_000), f"nested deeper than the limit of {MAX_CONFIG_DEPTH} levels"),
    "bomb": (lambda cli: alias_bomb(BOMB_KEYS[cli]), f"more than the limit of {MAX_CONFIG_NODES:,} values"),
    "size": (lambda cli: oversized(), f"over the limit of {MAX_CONFIG_BYTES:,} bytes"),
}


def run_cli(cli: str, config: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = {"catalog": ["--source", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "splits")]}
    (tmp_path / "records.jsonl").write_text("")
    return subprocess.run(
        [sys.executable, "-m", "flora.cli", cli, "--config", str(config), *args.get(cli, []), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=RETURNS_WITHIN_S,
    )  # fmt: skip


@pytest.mark.parametrize("cli", ["catalog", "loaders"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_config_is_refused_in_one_line(tmp_path, cli, case):
    text, limit = CASES[case]
    config = tmp_path / f"{case}.yaml"
    config.write_text(text(cli))
    proc = run_cli(cli, config, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"flora {cli}: error: {config}: ")
    assert limit in proc.stderr


def test_an_override_is_bounded_too(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("progress: false\n")
    proc = run_cli("catalog", config, tmp_path, "split.fractions=" + "[" * 5_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"flora catalog: error: override split.fractions: nested deeper than the limit of "
        f"{MAX_CONFIG_DEPTH} levels (line 1)\n"
    )


def test_the_bounds_are_exact_and_aliases_count_as_copies(tmp_path):
    assert parse_yaml(deep_mapping(MAX_CONFIG_DEPTH), "t") is not None  # the limit itself is allowed
    with pytest.raises(ConfigLimitError, match=f"deeper than the limit of {MAX_CONFIG_DEPTH} levels"):
        parse_yaml(deep_mapping(MAX_CONFIG_DEPTH + 1), "t")
    # a list of 1,001 nodes, then 98 aliases of it (99,103 nodes in all: within), or 100 (over the limit)
    items = ", ".join(["1"] * 1_000)
    within = f"a: &a [{items}]\nb: [{', '.join(['*a'] * 98)}]\n"
    assert len(parse_yaml(within, "t")["b"]) == 98
    with pytest.raises(ConfigLimitError, match=r"counting each alias as the values it repeats \(line 2\)"):
        parse_yaml(f"a: &a [{items}]\nb: [{', '.join(['*a'] * 100)}]\n", "t")
    with pytest.raises(ConfigLimitError, match=r"alias \*x refers to a node that contains it"):
        parse_yaml("a: &x {b: *x}\n", "t")
    with pytest.raises(ConfigError, match="t: invalid YAML: found undefined alias"):
        parse_yaml("a: *nowhere\n", "t")
    (tmp_path / "binary.yaml").write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_yaml(tmp_path / "binary.yaml")


def test_ordinary_yaml_still_loads(tmp_path):
    for path in sorted((REPO / "config").glob("*.yaml")):
        assert isinstance(read_yaml(path), dict), path.name
    (tmp_path / "anchors.yaml").write_text(
        "base: &base {lr: 0.1, sizes: [1, 2]}\nteacher: {<<: *base, lr: 0.2}\nstudent: *base\n"
    )
    assert read_yaml(tmp_path / "anchors.yaml") == {
        "base": {"lr": 0.1, "sizes": [1, 2]},
        "teacher": {"lr": 0.2, "sizes": [1, 2]},
        "student": {"lr": 0.1, "sizes": [1, 2]},
    }
    assert apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}
