"""The stored form of one cache entry: header (magic, crc32, meta length, data length) + meta JSON +
data, keyed by ``url_hash`` (sha256 of the URL). The crc32 covers everything after itself; a record
that fails it (or is truncated, or whose meta is not a JSON object) is corrupt: ``decode_record``
says why instead of returning an entry.

Leaves out: where records live and when they are evicted (cache.py, cache_lmdb.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

#: LMDB stores a value's length in 32 bits.
MAX_RECORD_BYTES = 2**32 - 1
_MAGIC = b"FLC1"
_HEADER = struct.Struct(">4sIIQ")  # magic, crc32 of the rest, meta length, data length
_LENGTHS = struct.Struct(">IQ")


@dataclass(frozen=True)
class CacheEntry:
    """A cached image: its bytes and the metadata dict stored with them."""

    data: bytes
    meta: dict


def url_hash(url: str) -> bytes:
    """The 32-byte key of ``url`` (sha256 of its UTF-8 text, lone surrogates passed through)."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()


def encode_record(data: bytes, meta: dict) -> bytes:
    """The stored form of an entry: header + meta JSON + data (see the module docstring)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    meta_json = json.dumps(meta, separators=(",", ":"), default=str).encode("ascii")
    lengths = _LENGTHS.pack(len(meta_json), len(data))
    crc = zlib.crc32(data, zlib.crc32(meta_json, zlib.crc32(lengths)))
    return b"".join((_MAGIC, crc.to_bytes(4, "big"), lengths, meta_json, data))


def decode_record(record: bytes) -> CacheEntry | str:
    """The entry stored in ``record``, or the reason it is corrupt."""
    if len(record) < _HEADER.size:
        return f"truncated header ({len(record)} bytes)"
    magic, crc, meta_len, data_len = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        return f"bad magic {magic!r}"
    if _HEADER.size + meta_len + data_len != len(record):
        return f"length {len(record)} != header {_HEADER.size} + meta {meta_len} + data {data_len}"
    if zlib.crc32(memoryview(record)[8:]) != crc:
        return "checksum mismatch"
    try:
        meta = json.loads(record[_HEADER.size : _HEADER.size + meta_len])
    except ValueError as exc:
        return f"unparseable meta: {exc}"
    if not isinstance(meta, dict):
        return f"meta is a {type(meta).__name__}, not an object"
    return CacheEntry(data=record[_HEADER.size + meta_len :], meta=meta)
