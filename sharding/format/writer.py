"""Tar shards: rolling WebDataset writers, DALI index files, and the shard-level bookkeeping.

Owns the bytes on disk of a shard:

* ``RollingTarWriter`` writes samples (``key.cls``, ``key.jpg``, ``key.json``, in that order, as
  webdataset's ``TarWriter`` does) into ``<stem>-<part>.tar.tmp`` files, rolling to the next part at
  a sample count or a byte size, and renames a part to ``.tar`` only when it is closed complete.
  Tar headers carry a fixed mtime, owner and mode, so the same samples give byte-identical shards.
  Headers are built here (``tar_header``: the exact bytes ``tarfile`` writes for such a member, a
  test checks it) rather than through ``tarfile``/webdataset: ``tarfile``'s stream writer was 70% of
  a warm rebuild's time, and importing webdataset imports torch (~500 MB, ~2 s in every worker).
  Each part's DALI index lines are recorded while writing (schema.py owns the index format).
* ``drop_samples`` rewrites a shard without some keys (content-hash duplicates found later).

Leaves out: the format itself (schema.py: members, keys, index files, manifest), reading shards
(reader.py), which samples go where (sharding/build/) and downloading (sharding/download/).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.sharding.format.schema import MEMBERS, check_key, index_line
from flora.sharding.outputs import dumps

#: Tar metadata of every member: fixed so that shards are reproducible byte for byte.
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_OWNER = "flora"


@dataclass
class Sample:
    key: str
    jpg: bytes
    label: int
    meta: dict[str, Any]

    def members(self) -> list[tuple[str, bytes]]:
        """The tar members of this sample, in webdataset's (sorted extension) order."""
        key = check_key(self.key)
        data = {
            "cls": str(self.label).encode("ascii"),
            "jpg": self.jpg,
            "json": dumps(self.meta, sort_keys=True).encode("utf-8"),
        }
        return [(f"{key}.{ext}", data[ext]) for ext in MEMBERS]


@dataclass
class PartInfo:
    """A finished tar part: its path (final name), samples, bytes and per-sample facts."""

    path: Path
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    #: The wds2idx line of each sample, known while writing (no second pass over the tar).
    index: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    license_classes: list[str] = field(default_factory=list)


class _HashingFile:
    """A write-only file that also hashes what goes through it (the shard's sha256, for free)."""

    def __init__(self, path: Path):
        self.fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


_POSIX_MAGIC = b"ustar\x0000"
_OWNER_FIELD = TAR_OWNER.encode("ascii").ljust(32, b"\0")
_HEADER_HEAD = b"%07o\x00" % TAR_MODE + b"0000000\x00" * 2  # mode, uid, gid
_HEADER_TAIL = b"0" + b"\0" * 100 + _POSIX_MAGIC + _OWNER_FIELD * 2 + b"\0" * 16 + b"\0" * 155 + b"\0" * 12
_END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header ``tarfile`` (default PAX format) writes for a regular file ``name`` of
    ``size`` bytes with this module's mtime, mode and owner; ``name`` must be ASCII, < 100 bytes."""
    raw = name.encode("ascii")
    if len(raw) >= 100:  # tarfile would need a PAX extension: keys are short, so this is a bug
        raise ValueError(f"tar member name too long for a plain header: {name!r}")
    buf = raw.ljust(100, b"\0") + _HEADER_HEAD + b"%011o\x00" % size + b"%011o\x00" % TAR_MTIME
    buf += b"        " + _HEADER_TAIL
    return buf[:148] + b"%06o\x00" % sum(buf) + buf[155:]


class RollingTarWriter:
    """Writes ``<stem>-<part:03d>.tar`` parts, each at most ``max_samples`` / ``max_bytes``."""

    def __init__(self, directory: Path, stem: str, max_samples: int, max_bytes: int):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples and max_bytes must be >= 1, got {max_samples}, {max_bytes}")
        self.directory, self.stem = Path(directory), stem
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.parts: list[PartInfo] = []
        self._writer: _HashingFile | None = None
        self._offset = 0
        self._stream = None
        self._current: PartInfo | None = None

    @property
    def current(self) -> Path | None:
        """The file being written now (the open part's ``.tar.tmp``), if any."""
        return self._tmp(self._current) if self._current is not None else None

    def _tmp(self, info: PartInfo) -> Path:
        return info.path.with_name(info.path.name + ".tmp")

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        info = PartInfo(path=self.directory / f"{self.stem}-{len(self.parts):03d}.tar")
        self._writer = self._stream = _HashingFile(self._tmp(info))
        self._offset = 0
        self._current = info

    def _finish(self) -> None:
        if self._writer is None:
            return
        end = self._offset + len(_END_OF_ARCHIVE)  # then pad to a whole record, as tarfile does
        self._writer.write(_END_OF_ARCHIVE + b"\0" * (-end % tarfile.RECORDSIZE))
        self._stream.close()
        info = self._current
        info.sha256 = self._stream.digest.hexdigest()
        os.replace(self._tmp(info), info.path)
        self.parts.append(info)
        self._writer = self._stream = self._current = None

    def write(self, sample: Sample) -> None:
        size = len(sample.jpg)
        cur = self._current
        if (
            cur is not None
            and cur.samples
            and (cur.samples >= self.max_samples or cur.bytes + size > self.max_bytes)
        ):
            self._finish()
        if self._writer is None:
            self._open()
        entries, chunks = [], []
        for name, data in sample.members():
            pad = -len(data) % tarfile.BLOCKSIZE
            chunks += (tar_header(name, len(data)), data, b"\0" * pad)
            entries.append((name, self._offset + tarfile.BLOCKSIZE, len(data)))
            self._offset += tarfile.BLOCKSIZE + len(data) + pad
        self._writer.write(b"".join(chunks))  # one write and one hash update per sample
        cur = self._current
        cur.index.append(index_line(entries))
        cur.samples += 1
        cur.bytes += size
        cur.keys.append(sample.key)
        cur.labels.append(sample.label)
        cur.license_classes.append(sample.meta.get("license_class", "unknown"))

    def close(self) -> list[PartInfo]:
        """Finishes the open part; returns every part written."""
        self._finish()
        return self.parts

    def abort(self) -> None:
        """Removes the unfinished part (finished parts stay); never raises, even on a full disk, where
        closing the file fails to flush its buffer: the abort path must not hide the first error."""
        if self._writer is not None:
            try:
                self._stream.close()
            except OSError:
                pass  # the buffered bytes could not be written: they are being thrown away anyway
            finally:
                self._tmp(self._current).unlink(missing_ok=True)
                self._writer = self._stream = self._current = None


def drop_samples(tar_path: Path, keys: set[str]) -> int:
    """Rewrites ``tar_path`` (atomically) without the samples whose key is in ``keys``; returns
    how many samples remain."""
    tmp = tar_path.with_name(tar_path.name + ".rewrite")
    kept_keys: set[str] = set()
    try:
        # the default tar format, as RollingTarWriter
        with (
            tarfile.open(tar_path, "r:") as src,
            open(tmp, "wb") as out,
            tarfile.open(fileobj=out, mode="w|") as dst,
        ):
            for member in src:
                stem = member.name.split(".", 1)[0]
                if stem in keys:
                    continue
                kept_keys.add(stem)
                dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
        os.replace(tmp, tar_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written rewrite behind
        raise
    return len(kept_keys)
