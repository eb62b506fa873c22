"""Downloaded bytes -> the RGB JPEG that goes into a shard, or an ``ImageError`` with a reason code.

Owns ``ImageConfig`` and ``process_image``: identify the format (allow-list), check the dimensions
and the pixel count from the header before anything is decoded (decompression bombs), decode fully
(truncated and garbage files fail here), apply the EXIF orientation, convert any mode to RGB
(transparency composited on white, 16-bit scaled), optionally resize the shorter side (never
upscaling), and encode a baseline JPEG. A JPEG that is already RGB, upright and small enough is
stored byte for byte (``keep_original_jpeg``): no second generation of compression loss, no encode.
Every stored JPEG gets its perceptual hashes (``neardup.perceptual_hashes`` of the stored bytes: the
whole image and its 95% crops), which finalize uses to find near-duplicates.

Reason codes (``ImageError.reason``, written to failures.jsonl): ``not_an_image``, ``corrupt``,
``too_small``, ``too_large_dimensions``, ``decompression_bomb``, ``format_not_allowed``.

Memory: with a ``DecodeBudget`` (budget.py), the image's estimated peak memory is reserved after the
header checks and before any pixel is decoded, and given back once its pixels are freed (on failure
too), so the decodes a process's threads run at once stay within the budget.

Threading: ``process_image`` is thread-safe and keeps no state between calls. While any call is
running, Pillow's ``DecompressionBombWarning`` is an error process-wide (a counted filter, removed
when the last call returns), so Pillow's own bomb check can never be bypassed by a warning filter.

Leaves out: downloading (download.py), caching and shard writing, and any content judgement
(which images are duplicates: finalize.py and neardup.py; blur; whether the picture shows a plant).
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from flora.config import ConfigError
from flora.sharding.images.budget import DecodeBudget, DecodePlan, decode_cost, plan_of
from flora.sharding.images.neardup import perceptual_hashes

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: Pillow reports JPEGs with a multi-picture extension (many camera photos) as MPO: still a JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}
#: Resampling filters by config name. "bicubic" is the default: sharp and alias-free when shrinking.
#: Measured on a 500x375 -> 341x256 RGB shrink (Pillow 13, 2-core EPYC VM): box 0.9 ms,
#: bilinear 1.3 ms (torchvision's antialiased default), bicubic 2.3 ms, lanczos 3.1 ms.
RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
#: Pillow docs (Image.resize): with reducing_gap >= 3 the two-step result is indistinguishable from a
#: single resample "in most cases"; it only acts on shrinks of more than 3x.
REDUCING_GAP = 3.0
#: libjpeg decodes at 1/2, 1/4 and 1/8 scale almost for free (Pillow's ``draft``); worth it from 2x.
DRAFT_MIN_FACTOR = 2
#: Validating a stored-as-is JPEG decodes every entropy-coded block (where truncation and garbage
#: show) at 1/8 scale, skipping most of the inverse DCT: ~15% cheaper than a full-size decode.
VALIDATE_SCALE = 8
WHITE = (255, 255, 255)
_ORIENTATION = ExifTags.Base.Orientation
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: Pillow plugins raise any of these on malformed data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)
#: Leading bytes of the formats Pillow reads: an unidentifiable file that starts like one of them is
#: a broken image (``corrupt``), anything else (HTML, JSON, text) is ``not_an_image``.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(ValueError):
    """The bytes are not a usable image; ``reason`` is a stable code for failures.jsonl."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ImageConfig:
    """Which images are accepted and how they are stored."""

    #: Pillow format names allowed (``Image.open(...).format``; MPO counts as JPEG).
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    #: Images whose shorter side is below this are rejected (``too_small``).
    min_side: int = 32
    #: Images whose longer side is above this are rejected (``too_large_dimensions``).
    max_side: int = 16384
    #: Decompression-bomb guard, checked from the header before decoding; at most Pillow's own
    #: ``Image.MAX_IMAGE_PIXELS``, above which Pillow refuses first.
    max_pixels: int = 64_000_000
    #: Shorter side scaled to this, aspect kept, never upscaled (img2dataset's "keep_ratio"); None keeps
    #: the size.
    resize_shorter_side: int | None = None
    #: Filter for the resize: one of ``RESAMPLE``.
    resample: str = "bicubic"
    jpeg_quality: int = 90
    #: Store an RGB JPEG that needs no resize and no rotation as downloaded (no recompression loss).
    keep_original_jpeg: bool = True

    def __post_init__(self) -> None:
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown or not self.formats:
            raise ConfigError(
                f"images.formats must be Pillow format names from {sorted(Image.OPEN)}, got {self.formats}"
            )
        if self.min_side < 1:
            raise ConfigError(f"images.min_side must be >= 1, got {self.min_side}")
        if self.max_side < self.min_side:
            raise ConfigError(f"images.max_side must be >= min_side ({self.min_side}), got {self.max_side}")
        pillow_cap = Image.MAX_IMAGE_PIXELS
        if self.max_pixels < 1 or (pillow_cap is not None and self.max_pixels > pillow_cap):
            raise ConfigError(
                f"images.max_pixels must be in 1..{pillow_cap} (PIL.Image.MAX_IMAGE_PIXELS), "
                f"got {self.max_pixels}"
            )
        if self.resize_shorter_side is not None and self.resize_shorter_side < 1:
            raise ConfigError(
                f"images.resize_shorter_side must be >= 1 or null, got {self.resize_shorter_side}"
            )
        if self.resample not in RESAMPLE:
            raise ConfigError(f"images.resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"images.jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class ProcessedImage:
    """What goes into the shard, and what the original was."""

    #: The stored JPEG.
    jpeg: bytes
    #: Size of the stored JPEG.
    width: int
    height: int
    #: Size of the downloaded image, upright (after the EXIF orientation).
    original_width: int
    original_height: int
    #: Pillow's format name (``JPEG``, ``PNG``, ``MPO``...) and mode (``RGB``, ``CMYK``, ``P``...).
    original_format: str
    original_mode: str
    #: Hex SHA-256 of ``jpeg``.
    sha256: str
    #: 64-bit perceptual hash of ``jpeg`` (16 hex digits, ``neardup.perceptual_hash``).
    phash: str
    #: The perceptual hashes of 95% crops of ``jpeg`` (``neardup.perceptual_hashes``).
    phash_crops: list[str]


# ---------------------------------------------------------------------- Pillow's bomb warning as error

_bomb_lock = threading.Lock()
_bomb_users = 0
_bomb_added = False  # whether the filter in place is ours (a caller's identical filter stays put)
_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


@contextmanager
def _bomb_warning_is_error() -> Iterator[None]:
    """Makes ``DecompressionBombWarning`` an error while at least one caller is inside.

    ``warnings.catch_warnings`` is not thread-safe (concurrent exits restore each other's snapshots
    and can leave a filter behind for good), so the filter is counted instead: the first caller in
    adds it, the last one out removes it.
    """
    global _bomb_users, _bomb_added
    with _bomb_lock:
        if _bomb_users == 0 and warnings.filters[:1] != [_BOMB_FILTER]:
            warnings.filters.insert(0, _BOMB_FILTER)  # type: ignore[arg-type]
            _filters_changed()
            _bomb_added = True
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0 and _bomb_added:
                warnings.filters.remove(_BOMB_FILTER)  # type: ignore[arg-type]
                _filters_changed()
                _bomb_added = False


def _filters_changed() -> None:
    """Tells the C warnings module that ``warnings.filters`` changed (what ``filterwarnings`` does)."""
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()


# ------------------------------------------------------------------------------------------ pipeline


class StageClock:
    """Thread CPU time per stage of ``process_image``, summed over calls (the sharder benchmark's
    per-image breakdown): ``open`` (header, checks, EXIF), ``decode``, ``orient``, ``colour``, ``resize``,
    ``encode``, ``hashes`` (SHA-256 and the perceptual hashes)."""

    def __init__(self) -> None:
        self.ns: Counter[str] = Counter()
        self._last = 0

    def start(self) -> None:
        self._last = time.thread_time_ns()

    def lap(self, stage: str) -> None:
        now = time.thread_time_ns()
        self.ns[stage] += now - self._last
        self._last = now


def process_image(
    data: bytes, cfg: ImageConfig, *, clock: StageClock | None = None, budget: DecodeBudget | None = None
) -> ProcessedImage:
    """Validates ``data`` and returns the JPEG to store (see the module docstring for the steps).

    Args:
        data: The downloaded bytes.
        cfg: What is accepted, and the resize and encode settings.
        clock: Times the stages (benchmarks); None times nothing.
        budget: The process's decode budget (budget.py): the image's estimated peak memory, from its
            header, is reserved before any pixel is decoded and given back once the pixels are freed
            (an image above the whole budget runs alone); None reserves nothing.

    Returns:
        The stored JPEG with its size, the original's size, format and mode, and the SHA-256.

    Raises:
        ImageError: With ``reason`` one of ``not_an_image``, ``corrupt``, ``too_small``,
            ``too_large_dimensions``, ``decompression_bomb``, ``format_not_allowed``.
    """
    if clock is not None:
        clock.start()
    with _bomb_warning_is_error():
        img = _open(data)
        steps = _plan(img, data, cfg)
        if clock is not None:
            clock.lap("open")
        with budget.reserve(decode_cost(steps.memory)) if budget is not None else nullcontext():
            try:
                return _decode_and_store(img, data, steps, cfg, clock)
            except BaseException as exc:
                _drop_frames(exc)  # a traceback's frames (Pillow's decoder among them) hold the pixels
                raise
            finally:
                img.close()  # the pixels are freed before the reservation is given back


@dataclass(frozen=True)
class _Steps:
    """What ``process_image`` does with one image, decided from its header."""

    fmt: str  # the format's name with aliases resolved (MPO -> JPEG)
    size: tuple[int, int]  # as in the file
    target: tuple[int, int] | None  # the resize, in the file's orientation
    orientation: int  # a JPEG's, from the header; others' is read after decoding
    keep: bool  # stored as downloaded
    mode: str  # Pillow's mode in the file
    memory: DecodePlan


def _plan(img: Image.Image, data: bytes, cfg: ImageConfig) -> _Steps:
    """The format, size and decompression-bomb checks, the decode scale (``draft``: JPEG only) and the
    facts the decode's memory estimate needs; nothing is decoded."""
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
    if fmt not in cfg.formats:
        raise ImageError("format_not_allowed", f"format {img.format} is not in images.formats {cfg.formats}")
    width, height = img.size
    _check_size(width, height, cfg)
    target = _target_size(width, height, cfg.resize_shorter_side)
    orientation = _orientation(img) if fmt == "JPEG" else 1  # a JPEG's EXIF is read with the header
    keep = cfg.keep_original_jpeg and img.format == "JPEG" and img.mode == "RGB"
    keep = keep and target is None and orientation == 1
    mode = img.mode
    try:
        if keep:
            img.draft(img.mode, (max(1, width // VALIDATE_SCALE), max(1, height // VALIDATE_SCALE)))
        elif fmt == "JPEG" and target is not None and min(width, height) >= DRAFT_MIN_FACTOR * min(target):
            img.draft(img.mode, target)
    except _DECODE_ERRORS as exc:
        raise ImageError("corrupt", f"{img.format} does not decode: {exc}") from exc
    memory = plan_of(
        img,
        fmt,
        len(data),
        full=(width, height),
        keep=keep,
        rotates=_may_rotate(img, fmt, data, orientation),
        target=target,
        reducing_gap=REDUCING_GAP,
    )
    return _Steps(fmt, (width, height), target, orientation, keep, mode, memory)


def _decode_and_store(
    img: Image.Image, data: bytes, steps: _Steps, cfg: ImageConfig, clock: StageClock | None
) -> ProcessedImage:
    """Decodes ``img`` at its planned scale, turns it upright and RGB, resizes and encodes it."""
    original_mode = steps.mode
    width, height = steps.size
    target, orientation = steps.target, steps.orientation
    try:
        img.load()
        if steps.fmt != "JPEG":
            orientation = _orientation(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", f"Pillow refused a frame: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError("corrupt", f"{img.format} does not decode: {exc}") from exc
    if clock is not None:
        clock.lap("decode")
    if orientation in _SWAPS_AXES:
        width, height = height, width
        target = None if target is None else (target[1], target[0])
    if steps.keep:
        result = _result(data, (width, height), (width, height), img.format or "", original_mode)
        if clock is not None:
            clock.lap("hashes")
        return result
    if orientation != 1:
        ImageOps.exif_transpose(img, in_place=True)
    if clock is not None:
        clock.lap("orient")
    rgb = _to_rgb(img)
    if clock is not None:
        clock.lap("colour")
    if target is not None and rgb.size != target:
        rgb = rgb.resize(target, RESAMPLE[cfg.resample], reducing_gap=REDUCING_GAP)
    if clock is not None:
        clock.lap("resize")
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=cfg.jpeg_quality, optimize=False, progressive=False)
    if clock is not None:
        clock.lap("encode")
    result = _result(out.getvalue(), rgb.size, (width, height), img.format or "", original_mode)
    if clock is not None:
        clock.lap("hashes")
    return result


def _may_rotate(img: Image.Image, fmt: str, data: bytes, orientation: int) -> bool:
    """Whether the upright image may need a rotated copy, known before decoding: a JPEG's orientation
    is in its header; a PNG may carry its EXIF or XMP after the pixels (Pillow reads those only by
    decoding), so one that holds either is assumed to rotate; other formats' EXIF is in the header."""
    if fmt == "JPEG":
        return orientation != 1
    if fmt == "PNG" and "exif" not in img.info:
        return b"eXIf" in data or b"Orientation" in data
    return _orientation(img) != 1


def _drop_frames(exc: BaseException) -> None:
    """Clears the locals of the finished frames in ``exc``'s traceback and those of its causes, so that
    the buffers they reference are freed now rather than when the caller drops the exception."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # a frame still running is skipped
        current = current.__cause__ or current.__context__


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", f"Pillow refused the header: {exc}") from exc
    except UnidentifiedImageError as exc:
        head = data[:16]
        if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            raise ImageError("corrupt", f"starts like an image but does not parse: {head[:8]!r}") from exc
        raise ImageError("not_an_image", f"not an image ({len(data)} bytes starting {head!r})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError("corrupt", f"header does not parse: {exc}") from exc


def _check_size(width: int, height: int, cfg: ImageConfig) -> None:
    if width * height > cfg.max_pixels:
        raise ImageError(
            "decompression_bomb", f"{width}x{height} = {width * height} pixels > max_pixels {cfg.max_pixels}"
        )
    if max(width, height) > cfg.max_side:
        raise ImageError("too_large_dimensions", f"{width}x{height} has a side > max_side {cfg.max_side}")
    if min(width, height) < cfg.min_side:
        raise ImageError("too_small", f"{width}x{height} has a side < min_side {cfg.min_side}")


def _target_size(width: int, height: int, shorter: int | None) -> tuple[int, int] | None:
    """``(w, h)`` with the shorter side ``shorter`` and the aspect kept, or None when no shrink is due."""
    if shorter is None or min(width, height) <= shorter:
        return None
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except _DECODE_ERRORS:  # a broken EXIF block is not a broken image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any mode: alpha and palette transparency composited on white, 16-bit scaled to 8."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError("corrupt", f"mode {img.mode} cannot be converted to RGB: {exc}") from exc


def _result(
    jpeg: bytes, size: tuple[int, int], original: tuple[int, int], fmt: str, mode: str
) -> ProcessedImage:
    return ProcessedImage(
        jpeg=jpeg,
        width=size[0],
        height=size[1],
        original_width=original[0],
        original_height=original[1],
        original_format=fmt,
        original_mode=mode,
        sha256=hashlib.sha256(jpeg).hexdigest(),
        phash=(hashes := perceptual_hashes(jpeg))[0],
        phash_crops=hashes[1],
    )
