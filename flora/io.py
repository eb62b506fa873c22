"""Small file helpers every stage uses: JSONL, atomic writes, a file's sha256, and the check that a
stage's output folder stays clear of everything the same command reads (``refuse_overlap``).

Leaves out: the sharder's staged multi-file commits (sharding/outputs.py) and strict JSON encoding of
odd values (``sharding.outputs.dumps``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flora.errors import FloraError

#: Read size for hashing: 1 MiB blocks keep memory flat on multi-GB files.
HASH_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: str | Path) -> list[Any]:
    """All values of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file and a rename: readers see the old file or
    the new one, never half of it (and processes writing the same file at once never mix theirs)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class FolderError(FloraError, ValueError):
    """An output that must be a folder is a file, or lies under one."""


def expect_folder(path: str | Path, what: str) -> None:
    """Refuses (``FolderError``, one line) a ``path`` that is, or lies under, an existing file."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise FolderError(f"{what} {path}: {existing} is a file, expected a folder")


class OverlapError(FloraError, ValueError):
    """A command's output folder is, holds, or lies inside something the same command reads."""


def _local(location: object) -> Path | None:
    text = str(location)
    if "://" in text:  # s3://, mongodb://, http(s)://: not a folder of this machine
        return None
    return Path(text).expanduser().resolve()


def refuse_overlap(stage: str, out: object, reads: dict[str, object], same_ok: tuple[str, ...] = ()) -> None:
    """Refuses (``OverlapError``, one line) an output folder ``out`` that equals, contains or sits inside
    a folder the same command reads (``reads``: what the user calls it, e.g. ``"--splits"`` -> its
    path; None and remote locations are skipped), or that equals a file it reads. Symlinks are
    followed, so a link to the input is the input. A stage writes, replaces and removes files in its
    output folder; overlapping an input, it would replace what it reads (a catalog's audit trail, a
    cache, a shard set) in silence. ``same_ok``: the names whose folder may *be* the output (a stage
    designed to replace that input in place, atomically, e.g. ``flora catalog --previous DIR --out
    DIR``); nesting either way is still refused."""
    target = _local(out)
    if target is None:
        return
    for name, location in reads.items():
        source = _local(location) if location is not None else None
        if source is None:
            continue
        if source.is_file():
            if target == source:
                raise OverlapError(
                    f"{stage}: the output {out} is the file {name} reads; choose another output"
                )
            continue
        if target == source:
            if name in same_ok:
                continue
            relation = f"is the folder {name} ({location})"
        elif source in target.parents:
            relation = f"lies inside {name} ({location})"
        elif target in source.parents:
            relation = f"contains {name} ({location})"
        else:
            continue
        raise OverlapError(
            f"{stage}: the output folder {out} {relation}, which this command reads; the output would "
            "overwrite or remove what it reads: choose an output folder outside it"
        )
