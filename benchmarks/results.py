"""The shared results writer of the benchmarks: a printed table, ``benchmarks/results/<name>.json`` and
its chart ``<name>.png``.

Owns the format of results (one JSON object per benchmark, with the command that produced it and the
machine it ran on, no machine paths), the table printed to the terminal, the charts' figure settings,
and ``publish``: the end of every benchmark (JSON, chart, the line saying what was written). Leaves
out: measuring (each benchmark script does its own, always against a baseline in the same run) and
what each chart shows.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = RESULTS_DIR.parents[1]
FIGURE_DPI = 110  # the committed charts' resolution


def portable(value: Any) -> Any:
    """``value`` with every absolute path inside the repository made repository-relative (results are
    committed and compared across machines; no machine paths in them)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith(str(REPO) + "/"):
        return value[len(str(REPO)) + 1 :]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Prints ``rows`` as an aligned text table with the given columns."""
    cells = [columns] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How a result was produced: ``python -m <module>`` and the arguments given (``argv``, else the
    process's own), for the result's ``command``."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_result(name: str, result: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Writes ``result`` (plus a UTC timestamp) to ``results_dir/<name>.json`` and returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    payload = {**portable(result), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def publish(
    name: str,
    result: dict[str, Any],
    chart: Callable[[Path], None] | None = None,
    png: str | None = None,
    results_dir: Path = RESULTS_DIR,
    note: str = "",
) -> Path:
    """The end of a benchmark: ``result`` to ``results_dir/<name>.json`` (``write_result``), the chart
    that ``chart(path)`` draws to ``results_dir/<png>`` (default ``<name>.png``), and one line naming
    what was written (``note`` appended). Returns the JSON's path."""
    path = write_result(name, result, results_dir)
    written = [path]
    if chart is not None:
        written.append(results_dir / (png or f"{name}.png"))
        chart(written[-1])
    print(f"wrote {' and '.join(map(str, written))}{note}")
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_panels(rows: list[dict[str, Any]], key: str, width: float, height: float):
    """A figure with one panel per distinct ``row[key]``, side by side (matplotlib, Agg backend);
    returns the figure and (axes, group name, the group's rows) per panel."""
    groups = list(dict.fromkeys(r[key] for r in rows))
    fig, axes = pyplot().subplots(1, len(groups), figsize=(width * len(groups), height), squeeze=False)
    return fig, [(ax, g, [r for r in rows if r[key] == g]) for ax, g in zip(axes[0], groups, strict=True)]


def rate_bars(
    rows: list[dict[str, Any]], group: str, label: str, value: str, path: Path, size=(7.0, 4.5), title=None
) -> None:
    """Horizontal bars of ``row[value]`` (images/s) labelled ``row[label]``, one panel per ``row[group]``."""
    fig, panels = group_panels(rows, group, *size)
    for ax, name, mine in panels:
        ax.barh([r[label] for r in mine], [r[value] for r in mine], color="#4a7f3b")
        ax.set_title(name)
        ax.set_xlabel("images / s (higher is better)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Writes ``fig`` to ``path`` (tight layout, 110 dpi, the size of every chart in results/) and
    closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    pyplot().close(fig)
