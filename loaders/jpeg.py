"""Why the loaders leave a sample out, and a stored JPEG's cheap checks behind most of the reasons.

Owns ``SKIP_REASONS``, every code a loader counts in ``skipped`` (stable strings: reports, audits and
``skipped_samples`` show them; as ``download.REASONS`` is the sharder's list of download failures),
each also a named constant that the code producing it uses: the scan's (index.py), the filters'
(index.py), and the re-checks' and decoders' after the scan (recheck.py, the loaders). Also owns
``check_jpeg`` (under ``verify: full`` the sha256 the sample's json records; otherwise the SOI and EOI
markers, a start-of-frame segment, and its size against the json's width and height), shared by the
shard scan and the re-checks, and ``jpeg_size`` (the frame header's size, without decoding).

Leaves out: decoding (the loaders), which samples are checked when (index.py, recheck.py), and counting
the skips (index.py, base.py).
"""

from __future__ import annotations

import hashlib
import struct

from flora.sharding.format.schema import SampleMeta

# The scan's verdicts on one sample's members (index.py).
MISSING_JPG = "missing_jpg"  # the index lists no jpg member
TRUNCATED_SHARD = "truncated_shard"  # the jpg lies (partly) past the tar's end; also a re-check's
BAD_JSON = "bad_json"  # the json member does not parse as a SampleMeta
BAD_LABEL = "bad_label"  # neither the cls member nor the json holds an integer label
# check_jpeg's (the scan's and the re-checks').
SHA256_MISMATCH = "sha256_mismatch"  # the jpg's bytes are not those its json's sha256 names
NOT_A_JPEG = "not_a_jpeg"  # no SOI or EOI marker
NO_JPEG_FRAME = "no_jpeg_frame"  # no start-of-frame segment before the scan
SIZE_MISMATCH = "size_mismatch"  # the frame's size is not the json's width and height
# A decoder's, after the scan (recheck.py's decode level, the reference loader).
DECODE_ERROR = "decode_error"
# The filters' (index.py): the sample is intact, but not in this run's selection or label space.
LICENSE_FILTERED = "license_filtered"  # production_only, and the license class is not permissive
NOT_IN_LABEL_SPACE = "not_in_label_space"  # label_space: region, and the species is not in the region's
LABEL_OUT_OF_RANGE = "label_out_of_range"  # a label past the class mapping's classes

#: Every reason a loader counts in ``skipped``.
SKIP_REASONS: tuple[str, ...] = (
    MISSING_JPG, TRUNCATED_SHARD, BAD_JSON, BAD_LABEL, SHA256_MISMATCH, NOT_A_JPEG, NO_JPEG_FRAME,
    SIZE_MISMATCH, DECODE_ERROR, LICENSE_FILTERED, NOT_IN_LABEL_SPACE, LABEL_OUT_OF_RANGE,
)  # fmt: skip

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
#: Start-of-frame markers (baseline, extended, progressive, lossless...) that carry the image size.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def check_jpeg(data: bytes, meta: SampleMeta, verify: str) -> str | None:
    """None when the JPEG looks intact, else the reason it is skipped."""
    if verify == "full" and meta.sha256:
        return None if hashlib.sha256(data).hexdigest() == meta.sha256 else SHA256_MISMATCH
    if not data.startswith(_JPEG_SOI) or not data.rstrip(b"\0").endswith(_JPEG_EOI):
        return NOT_A_JPEG
    dims = jpeg_size(data)
    if dims is None:
        return NO_JPEG_FRAME
    if meta.width is not None and meta.height is not None and dims != (meta.width, meta.height):
        return SIZE_MISMATCH
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
