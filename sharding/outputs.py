"""Writing a stage's JSON and JSONL files so that a crash never leaves a mix of old and new ones.

Owns ``OutputSet``: every file of a run is written to ``<name>.tmp`` first and all of them are
renamed into place by ``commit()`` once the whole run has succeeded; on failure the temporaries are
removed and the previous run's files stay as they were. A temporary is created anew (``O_EXCL |
O_NOFOLLOW``, whatever held its name removed first), and a rename replaces a link rather than writing
through it, so no file of a run is written outside its folder. Also owns the JSON encoding used for those
files (``dumps``): UTF-8 text, values JSON cannot hold kept as text (datetimes as ISO 8601, ObjectIds
and Decimal128 via ``str``, NaN and infinities as strings), lone surrogates escaped rather than
failing the run.

Leaves out: tar shards (the sharder's writer) and what goes into the files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def _default(value: Any) -> Any:
    iso = getattr(value, "isoformat", None)
    return iso() if callable(iso) else str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": strict JSON readers reject bare NaN
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (see module docstring); never raises for odd values."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_default, **kwargs)
    except ValueError:  # a NaN or infinity somewhere: rare, so only then walk the object
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, default=_default, **kwargs)


class OutputSet:
    """Files of one run in ``out_dir``, staged as ``*.tmp`` and renamed together by ``commit()``."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._staged: list[Path] = []

    def _open(self, name: str):
        path = self.out_dir / (name + TMP_SUFFIX)
        if os.path.lexists(path):  # a crash's leftover, or a planted link: removed, never written through
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        self._staged.append(path)
        # backslashreplace: a lone surrogate from a JSON escape becomes the same escape, still valid JSON
        return open(fd, "w", encoding="utf-8", errors="backslashreplace", newline="\n")

    def jsonl(self, name: str, rows: Iterable[Any]) -> int:
        """Stages ``name`` with one JSON value per line; returns the number of lines."""
        count = 0
        with self._open(name) as fh:
            for row in rows:
                fh.write(dumps(row))
                fh.write("\n")
                count += 1
        return count

    def json(self, name: str, obj: Any) -> None:
        """Stages ``name`` as indented JSON with sorted keys (stable, diffable reports)."""
        with self._open(name) as fh:
            fh.write(dumps(obj, indent=2, sort_keys=True))
            fh.write("\n")

    def commit(self) -> None:
        """Renames every staged file into place."""
        for tmp in self._staged:
            os.replace(tmp, tmp.with_name(tmp.name[: -len(TMP_SUFFIX)]))
        self._staged.clear()

    def abort(self) -> None:
        """Removes every staged file; the previous files stay."""
        for tmp in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
