"""A stored JPEG's cheap checks, shared by the shard scan (index.py) and the re-checks (recheck.py).

Owns ``check_jpeg`` (under ``verify: full`` the sha256 the sample's json records; otherwise the SOI and
EOI markers, a start-of-frame segment, and its size against the json's width and height) and
``jpeg_size`` (the frame header's size, without decoding).

Leaves out: decoding (the loaders), which samples are checked when (index.py, recheck.py).
"""

from __future__ import annotations

import hashlib
import struct

from flora.sharding.format.schema import SampleMeta

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
#: Start-of-frame markers (baseline, extended, progressive, lossless...) that carry the image size.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def check_jpeg(data: bytes, meta: SampleMeta, verify: str) -> str | None:
    """None when the JPEG looks intact, else the reason it is skipped."""
    if verify == "full" and meta.sha256:
        return None if hashlib.sha256(data).hexdigest() == meta.sha256 else "sha256_mismatch"
    if not data.startswith(_JPEG_SOI) or not data.rstrip(b"\0").endswith(_JPEG_EOI):
        return "not_a_jpeg"
    dims = jpeg_size(data)
    if dims is None:
        return "no_jpeg_frame"
    if meta.width is not None and meta.height is not None and dims != (meta.width, meta.height):
        return "size_mismatch"
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, or None."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None
