"""Synthetic "plant photos" for the sample world.

Owns: the per-species look (derived from the Latin name with a stable hash, so the same name always
draws the same kind of plant), the per-URL image plan (format, mode, size, extension, variant, all a
pure function of ``(seed, source, number)``), rendering one image to encoded bytes, and writing the
images of a catalog to disk.

Leaves out: the catalog itself (``generate.py``), serving the files and the fault bodies
(``server.py``). The pictures are not botanically meaningful: they only carry a species-dependent
signal (background palette, leaf colour and shape, petal count and colour, stem angle) that a tiny
CNN can learn, plus per-variant nuisance (position, scale, rotation, lighting, noise).
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw

# (format, mode, share) of the images behind the catalog's URLs: mostly RGB JPEG, as in an
# iNaturalist export, with the odd PNG, WebP, CMYK JPEG (scanned herbarium sheets) and grayscale JPEG.
FORMAT_MIX: tuple[tuple[str, str, float], ...] = (
    ("JPEG", "RGB", 0.80),
    ("PNG", "RGB", 0.07),
    ("WEBP", "RGB", 0.05),
    ("JPEG", "CMYK", 0.03),
    ("JPEG", "L", 0.05),
)
# Extensions a URL may carry per real format; repeated entries weight the common spelling.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": ("jpg", "jpg", "jpg", "jpg", "jpeg", "JPG"),
    "PNG": ("png",),
    "WEBP": ("webp",),
}
# Share of URLs whose extension lies about the real format (real exports rename files freely).
EXT_MISMATCH_RATE = 0.04
# Share of images at the typical iNaturalist "medium" size (500 px on the long side).
TYPICAL_SIZE_RATE = 0.6
TYPICAL_LONG_SIDE = 500
LONG_SIDE_RANGE = (200, 1000)
MIN_SHORT_SIDE = 150
# Aspect ratios (width / height) with their weights: 4:3 landscape dominates camera photos.
ASPECTS: tuple[tuple[float, float], ...] = ((4 / 3, 0.45), (3 / 4, 0.25), (1.0, 0.10), (3 / 2, 0.10))
ASPECT_RANGE = (0.6, 1.6)  # the remaining share draws uniformly from this range
JPEG_QUALITY_RANGE = (85, 92)
WEBP_QUALITY = 80
PNG_COMPRESS_LEVEL = 3  # fast; file size is not the point of the synthetic images
DEFAULT_SIZE = (500, 375)

_ELLIPSE_POINTS = 20
_UNIT = np.stack(
    [
        np.cos(np.linspace(0, 2 * math.pi, _ELLIPSE_POINTS, endpoint=False)),
        np.sin(np.linspace(0, 2 * math.pi, _ELLIPSE_POINTS, endpoint=False)),
    ],
    axis=1,
)
_URL_PATH_RE = re.compile(r"/img/([^/]+)/(\d+)\.([A-Za-z0-9]+)$")


def stable_hash(text: str, salt: str = "") -> int:
    """Return a 64-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _unit_floats(key: str, count: int) -> list[float]:
    """Return ``count`` (at most 16) deterministic floats in [0, 1) derived from ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=64).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 2**32 for i in range(count)]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class SpeciesLook:
    """What every picture of one species has in common."""

    bg_top: tuple[int, int, int]
    bg_bottom: tuple[int, int, int]
    leaf: tuple[int, int, int]
    leaf_aspect: float
    leaf_count: int
    leaf_size: float  # leaf length as a fraction of the short side
    petals: int  # 0 = no flower
    petal: tuple[int, int, int]
    petal_aspect: float
    flower_size: float  # flower radius as a fraction of the short side
    centre: tuple[int, int, int]
    stem_angle: float  # degrees from vertical


def canonical_name(latin_name: str) -> str:
    """``"  quercus   ILEX "`` -> ``"Quercus ilex"``: whitespace collapsed, genus capitalised."""
    words = latin_name.split()
    if not words:
        raise ValueError(f"latin_name must contain a name, got {latin_name!r}")
    return " ".join([words[0][:1].upper() + words[0][1:].lower(), *(w.lower() for w in words[1:])])


@lru_cache(maxsize=16384)
def species_look(latin_name: str) -> SpeciesLook:
    """Derive the look of a species from its name (a stable hash of its canonical spelling)."""
    u = _unit_floats(f"look\x00{canonical_name(latin_name)}", 16)
    bg_hue, bg_sat, bg_val = u[0], 0.25 + 0.4 * u[1], 0.45 + 0.4 * u[2]
    return SpeciesLook(
        bg_top=_hsv(bg_hue, bg_sat * 0.7, min(1.0, bg_val + 0.15)),
        bg_bottom=_hsv(bg_hue + 0.05, bg_sat, bg_val * 0.8),
        leaf=_hsv(0.17 + 0.25 * u[3], 0.4 + 0.5 * u[4], 0.3 + 0.4 * u[5]),
        leaf_aspect=1.4 + 3.1 * u[6],
        leaf_count=3 + int(7 * u[7]),
        leaf_size=0.10 + 0.12 * u[8],
        petals=0 if u[9] < 0.15 else 3 + int(10 * u[10]),
        petal=_hsv(u[11], 0.5 + 0.5 * u[12], 0.7 + 0.3 * u[13]),
        petal_aspect=1.2 + 1.8 * u[14],
        flower_size=0.08 + 0.12 * u[15],
        centre=_hsv(0.1 + 0.05 * u[13], 0.8, 0.6 + 0.3 * u[2]),
        stem_angle=-35.0 + 70.0 * u[10],
    )


def _ellipse(cx: float, cy: float, a: float, b: float, angle: float) -> list[tuple[float, float]]:
    """Polygon points of an ellipse with half-axes ``a`` (along ``angle``, radians) and ``b``."""
    cos_t, sin_t = math.cos(angle), math.sin(angle)
    x = _UNIT[:, 0] * a
    y = _UNIT[:, 1] * b
    xs = cx + x * cos_t - y * sin_t
    ys = cy + x * sin_t + y * cos_t
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * factor))) for c in colour)  # type: ignore[return-value]


def _default_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(LONG_SIDE_RANGE[0], LONG_SIDE_RANGE[1] + 1))
    aspect = float(rng.uniform(*ASPECT_RANGE))
    return _fit(long_side, aspect)


def _fit(long_side: int, aspect: float) -> tuple[int, int]:
    if aspect >= 1.0:
        return long_side, max(MIN_SHORT_SIDE, round(long_side / aspect))
    return max(MIN_SHORT_SIDE, round(long_side * aspect)), long_side


def _draw_plant(img: Image.Image, look: SpeciesLook, rng: np.random.Generator) -> None:
    """Draw background blobs, stem, leaves and flower of one variant onto ``img``."""
    w, h = img.size
    short = min(w, h)
    draw = ImageDraw.Draw(img)
    for _ in range(5):  # out-of-focus foliage behind the plant
        bx, by = rng.uniform(0, w), rng.uniform(0, h)
        br = short * rng.uniform(0.08, 0.25)
        draw.ellipse((bx - br, by - br, bx + br, by + br), fill=_shade(look.bg_bottom, rng.uniform(0.8, 1.2)))
    scale = rng.uniform(0.75, 1.25)
    tilt = math.radians(look.stem_angle + rng.uniform(-15, 15))
    base_x = w * (0.5 + rng.uniform(-0.15, 0.15))
    stem_len = h * rng.uniform(0.5, 0.75) * scale
    top_x = base_x + stem_len * math.sin(tilt)
    top_y = h - stem_len * math.cos(tilt)
    stem_colour = _shade(look.leaf, 0.7)
    draw.line((base_x, h, top_x, top_y), fill=stem_colour, width=max(2, round(short * 0.015 * scale)))
    leaf_len = short * look.leaf_size * scale
    for i in range(look.leaf_count):
        t = 0.15 + 0.7 * (i + 0.5) / look.leaf_count
        sx, sy = base_x + (top_x - base_x) * t, h + (top_y - h) * t
        side = 1 if i % 2 else -1
        angle = tilt - math.pi / 2 + side * math.radians(rng.uniform(40, 70))
        cx, cy = sx + leaf_len * math.cos(angle), sy + leaf_len * math.sin(angle)
        points = _ellipse(cx, cy, leaf_len, leaf_len / look.leaf_aspect, angle)
        draw.polygon(points, fill=_shade(look.leaf, rng.uniform(0.85, 1.15)), outline=stem_colour)
    if look.petals:
        radius = short * look.flower_size * scale
        spin = rng.uniform(0, 2 * math.pi)
        for k in range(look.petals):
            angle = spin + 2 * math.pi * k / look.petals
            px, py = top_x + 0.6 * radius * math.cos(angle), top_y + 0.6 * radius * math.sin(angle)
            points = _ellipse(px, py, 0.6 * radius, 0.6 * radius / look.petal_aspect, angle)
            draw.polygon(points, fill=look.petal)
        disc = 0.3 * radius
        draw.ellipse((top_x - disc, top_y - disc, top_x + disc, top_y + disc), fill=look.centre)


def render_image(
    latin_name: str,
    variant: int,
    seed: int,
    fmt: str = "JPEG",
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    quality: int | None = None,
) -> bytes:
    """Render one synthetic photo of ``latin_name`` and return it encoded.

    Args:
        latin_name: The species; its look is derived from the name alone.
        variant: Which photo of the species (position, scale, rotation, lighting, noise).
        seed: World seed; together with ``variant`` it fixes every random choice.
        fmt: ``"JPEG"``, ``"PNG"`` or ``"WEBP"``.
        size: ``(width, height)``; ``None`` draws a size from the variant.
        mode: ``"RGB"``, ``"L"`` (grayscale) or ``"CMYK"`` (JPEG only).
        quality: JPEG quality; ``None`` draws one in ``JPEG_QUALITY_RANGE``.

    Returns:
        The encoded image; the same arguments always give the same bytes.
    """
    if fmt not in EXTENSIONS:
        raise ValueError(f"fmt must be one of {sorted(EXTENSIONS)}, got {fmt!r}")
    if mode not in ("RGB", "L", "CMYK"):
        raise ValueError(f"mode must be 'RGB', 'L' or 'CMYK', got {mode!r}")
    if mode == "CMYK" and fmt != "JPEG":
        raise ValueError(f"CMYK is only written as JPEG, got fmt={fmt!r}")
    name_key = stable_hash(canonical_name(latin_name))
    rng = np.random.default_rng([seed & 0xFFFFFFFF, variant & 0xFFFFFFFF, name_key])
    w, h = _default_size(rng) if size is None else size
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {(w, h)}")
    look = species_look(latin_name)
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    rows = np.asarray(look.bg_top, np.float32) * (1 - ramp) + np.asarray(look.bg_bottom, np.float32) * ramp
    img = Image.fromarray(np.repeat(rows.astype(np.uint8)[:, None, :], w, axis=1), "RGB")
    _draw_plant(img, look, rng)
    brightness = int(256 * rng.uniform(0.88, 1.12))
    sigma = int(rng.integers(3, 10))
    pixels = np.asarray(img, dtype=np.int32) * brightness >> 8
    pixels += rng.integers(-sigma, sigma + 1, size=(h, w, 1), dtype=np.int32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    if fmt == "JPEG":
        low, high = JPEG_QUALITY_RANGE
        img.save(out, "JPEG", quality=int(rng.integers(low, high + 1)) if quality is None else quality)
    elif fmt == "PNG":
        img.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        img.save(out, "WEBP", quality=WEBP_QUALITY, method=2)
    return out.getvalue()


@dataclass(frozen=True)
class ImagePlan:
    """Everything about the image behind one URL that does not depend on the species."""

    fmt: str
    mode: str
    ext: str
    width: int
    height: int
    variant: int


def _pick(u: float, weighted: Iterable[tuple[object, float]]) -> object:
    items = list(weighted)
    total = sum(weight for _, weight in items)
    acc = 0.0
    for item, weight in items:
        acc += weight / total
        if u < acc:
            return item
    return items[-1][0]


def plan_image(source: str, number: int, seed: int) -> ImagePlan:
    """Return the plan of the image ``img/{source}/{number:06d}.*`` in the world of ``seed``.

    The plan is a pure function of its arguments, so the catalog (which needs the extension) and
    ``write_images`` (which needs everything else) agree without sharing state.
    """
    u = _unit_floats(f"plan\x00{seed}\x00{source}\x00{number}", 9)
    fmt, mode = _pick(u[0], (((f, m), share) for f, m, share in FORMAT_MIX))  # type: ignore[misc]
    ext_fmt = fmt
    if u[1] < EXT_MISMATCH_RATE:
        others = [f for f in EXTENSIONS if f != fmt]
        ext_fmt = others[int(u[2] * len(others))]
    choices = EXTENSIONS[ext_fmt]
    ext = choices[int(u[3] * len(choices))]
    if u[4] < TYPICAL_SIZE_RATE:
        long_side = TYPICAL_LONG_SIDE
    else:
        long_side = LONG_SIDE_RANGE[0] + int(u[5] * (LONG_SIDE_RANGE[1] - LONG_SIDE_RANGE[0]))
    tail = 1.0 - sum(weight for _, weight in ASPECTS)
    aspect = _pick(u[6], (*ASPECTS, (None, tail)))
    if aspect is None:
        aspect = ASPECT_RANGE[0] + u[7] * (ASPECT_RANGE[1] - ASPECT_RANGE[0])
    width, height = _fit(long_side, float(aspect))  # type: ignore[arg-type]
    return ImagePlan(fmt, mode, ext, width, height, variant=int(u[8] * 2**31))


def image_relpath(url: str) -> str | None:
    """Return ``img/{source}/{number}.{ext}`` for a catalog URL, or ``None`` if it is not one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https"):
        return None
    match = _URL_PATH_RE.search(parts.path)
    return None if match is None else f"img/{match[1]}/{match[2]}.{match[3]}"


def _usable_name(record: Mapping) -> str | None:
    name = record.get("latin_name")
    return canonical_name(name) if isinstance(name, str) and name.strip() else None


def _is_current(path: Path, plan: ImagePlan) -> bool:
    try:
        with Image.open(path) as img:
            return img.format == plan.fmt and img.size == (plan.width, plan.height)
    except (OSError, SyntaxError, ValueError):
        return False


def image_owners(records: Iterable[Mapping]) -> dict[str, str]:
    """Map each image path of the catalog to the species its picture shows.

    That is the first record (in catalog order) with the path and a usable Latin name, in its
    canonical spelling; the generator places a URL's original record before its duplicates. Paths
    only invalid records point at have no picture and are left out.
    """
    owners: dict[str, str] = {}
    for record in records:
        url, name = record.get("image_url"), _usable_name(record)
        rel = image_relpath(url) if isinstance(url, str) else None
        if rel is not None and name is not None and rel not in owners:
            owners[rel] = name
    return owners


def write_images(records: Iterable[Mapping], image_dir: str | Path, seed: int) -> dict[str, dict]:
    """Write the image behind every path of ``image_owners(records)`` under ``image_dir``.

    Files that already exist with the planned format and size are kept.

    Args:
        records: Catalog records as ``generate_catalog`` returns them (invalid ones are skipped).
        image_dir: Folder to write ``img/{source}/{number}.{ext}`` files under.
        seed: The world seed the catalog was generated with.

    Returns:
        ``{relative path: {"format", "width", "height", "latin_name"}}`` for every path.
    """
    root = Path(image_dir)
    index: dict[str, dict] = {}
    for rel, name in image_owners(records).items():
        _, source, filename = rel.split("/")
        plan = plan_image(source, int(filename.split(".")[0]), seed)
        target = root / rel
        if not _is_current(target, plan):
            data = render_image(name, plan.variant, seed, plan.fmt, (plan.width, plan.height), plan.mode)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        index[rel] = {"format": plan.fmt, "width": plan.width, "height": plan.height, "latin_name": name}
    return index
