"""Tests of sharding/images/convert.py on real encoded images: conversion, resize, orientation, reasons."""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from flora.config import ConfigError
from flora.sharding.images.convert import ImageConfig, ImageError, ProcessedImage, StageClock, process_image
from world import render_image
from world.server import HTML_PAGE, bomb_png, corrupt_jpeg, tiny_jpeg

NAME = "Quercus ilex"
ORIENTATION_TAG = 0x0112


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def decoded(result: ProcessedImage) -> Image.Image:
    img = Image.open(io.BytesIO(result.jpeg))
    img.load()
    return img


def check_rgb_jpeg(result: ProcessedImage, size: tuple[int, int]) -> Image.Image:
    img = decoded(result)
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size)
    assert (result.width, result.height) == size
    assert result.sha256 == hashlib.sha256(result.jpeg).hexdigest()
    return img


def test_rgb_jpeg_is_kept_byte_for_byte():
    data = render_image(NAME, 1, 0, size=(500, 375))
    result = process_image(data, ImageConfig())
    assert result.jpeg == data
    assert (result.width, result.height, result.original_width, result.original_height) == (
        500,
        375,
        500,
        375,
    )
    assert (result.original_format, result.original_mode) == ("JPEG", "RGB")
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    # small enough for the resize: still kept
    assert process_image(data, ImageConfig(resize_shorter_side=400)).jpeg == data


def test_keep_original_off_reencodes_at_the_configured_quality():
    data = render_image(NAME, 1, 0, size=(500, 375), quality=95)
    low = process_image(data, ImageConfig(keep_original_jpeg=False, jpeg_quality=30))
    check_rgb_jpeg(low, (500, 375))
    assert low.jpeg != data and len(low.jpeg) < len(data) / 2


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGB"), ("WEBP", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L")])
def test_world_formats_become_rgb_jpeg(fmt, mode):
    data = render_image(NAME, 2, 0, fmt=fmt, size=(120, 90), mode=mode)
    result = process_image(data, ImageConfig())
    img = check_rgb_jpeg(result, (120, 90))
    assert (result.original_format, result.original_mode) == (fmt, mode)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    error = np.abs(np.asarray(img, np.int16) - np.asarray(reference, np.int16)).mean()
    assert error < 6  # same picture, up to one JPEG generation


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 48), (200, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 32, 48))  # left half fully transparent
    for data, mode in [(encode(rgba, "PNG"), "RGBA"), (encode(rgba.convert("LA"), "PNG"), "LA")]:
        result = process_image(data, ImageConfig())
        pixels = np.asarray(check_rgb_jpeg(result, (64, 48)), np.int16)
        assert result.original_mode == mode
        assert (pixels[:, :28] > 245).all()  # white, not the hidden blue or black
        assert pixels[:, 36:].mean() < 200  # the opaque half keeps its colour


def test_palette_png_and_animated_gif_first_frame():
    palette = Image.new("RGB", (40, 40), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    result = process_image(encode(palette, "PNG"), ImageConfig())
    assert result.original_mode == "P"
    assert np.asarray(check_rgb_jpeg(result, (40, 40)))[20, 20, 1] > 100

    frames = [Image.new("RGB", (50, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    red = np.asarray(check_rgb_jpeg(process_image(gif, ImageConfig()), (50, 40)), np.int16)
    assert red[..., 0].mean() > 200 and red[..., 2].mean() < 60


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    result = process_image(encode(Image.fromarray(ramp), "PNG"), ImageConfig())
    pixels = np.asarray(check_rgb_jpeg(result, (64, 64)), np.int16)[..., 0]
    assert abs(pixels[:8].mean() - (ramp[:8] >> 8).mean()) < 4  # clipping would give 255


@pytest.mark.parametrize(("size", "expected"), [((500, 375), (341, 256)), ((375, 500), (256, 341))])
def test_resize_shorter_side_keeps_aspect(size, expected):
    cfg = ImageConfig(resize_shorter_side=256)
    for fmt in ("JPEG", "PNG"):
        result = process_image(render_image(NAME, 3, 0, fmt=fmt, size=size), cfg)
        check_rgb_jpeg(result, expected)
        assert abs(result.width / result.height - size[0] / size[1]) * max(expected) < 1  # within 1 px
        assert (result.original_width, result.original_height) == size


def test_large_jpeg_is_drafted_and_still_exact():
    data = render_image(NAME, 4, 0, size=(1200, 900))
    result = process_image(data, ImageConfig(resize_shorter_side=200))
    img = check_rgb_jpeg(result, (267, 200))
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((267, 200), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(img, np.int16) - np.asarray(reference, np.int16)).mean() < 4


def test_never_upscales():
    data = render_image(NAME, 5, 0, fmt="PNG", size=(200, 150))
    result = process_image(data, ImageConfig(resize_shorter_side=256))
    check_rgb_jpeg(result, (200, 150))


@pytest.mark.parametrize(("orientation", "turned"), [(6, True), (8, True), (3, False)])
def test_exif_orientation_is_applied(orientation, turned):
    img = Image.new("RGB", (120, 80), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 60, 80))  # stored left half red
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    result = process_image(data, ImageConfig())
    assert result.jpeg != data  # a rotated JPEG is not stored as is
    upright = np.asarray(check_rgb_jpeg(result, (80, 120) if turned else (120, 80)), np.int16)
    assert (result.original_width, result.original_height) == ((80, 120) if turned else (120, 80))
    red = upright[..., 0] > 128
    # 6 = rotate 90 clockwise: the red left half ends on top; 8: at the bottom; 3 (180): on the right
    part = {6: red[:55], 8: red[65:], 3: red[:, 65:]}[orientation]
    assert part.mean() > 0.95 and red.mean() < 0.55
    resized = process_image(data, ImageConfig(resize_shorter_side=40))
    check_rgb_jpeg(resized, (40, 60) if turned else (60, 40))


@pytest.mark.parametrize(
    ("data", "cfg", "reason"),
    [
        (HTML_PAGE, ImageConfig(), "not_an_image"),
        (b"", ImageConfig(), "not_an_image"),
        (corrupt_jpeg(), ImageConfig(), "corrupt"),
        (tiny_jpeg(), ImageConfig(min_side=32), "too_small"),
        (bomb_png(), ImageConfig(), "decompression_bomb"),
        (render_image(NAME, 6, 0, size=(200, 200)), ImageConfig(max_pixels=10_000), "decompression_bomb"),
        (
            render_image(NAME, 6, 0, fmt="WEBP", size=(64, 64)),
            ImageConfig(formats=["JPEG"]),
            "format_not_allowed",
        ),
        (render_image(NAME, 6, 0, size=(300, 100)), ImageConfig(max_side=256), "too_large_dimensions"),
    ],
    ids=["html", "empty", "corrupt", "tiny", "bomb", "pixels", "format", "max_side"],
)
def test_every_reason_from_a_real_input(data, cfg, reason):
    with pytest.raises(ImageError) as info:
        process_image(data, cfg)
    assert info.value.reason == reason


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_jpeg_is_corrupt_kept_or_not(cut):
    data = render_image(NAME, 7, 0, size=(400, 300))
    for cfg in (ImageConfig(), ImageConfig(resize_shorter_side=128), ImageConfig(keep_original_jpeg=False)):
        with pytest.raises(ImageError) as info:
            process_image(data[: int(len(data) * cut)], cfg)
        assert info.value.reason == "corrupt"


def test_pillow_bomb_warning_is_an_error_inside_only():
    """Between Pillow's warning threshold and its error threshold, Pillow only warns."""
    side = 10_000  # 100 M pixels: over MAX_IMAGE_PIXELS (89 M), under twice that
    data = encode(Image.new("L", (1, 1)), "PNG")
    # patch the IHDR size (and its CRC): a header-only bomb, never decoded
    ihdr = b"IHDR" + side.to_bytes(4, "big") * 2 + data[24:29]
    data = data[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + data[33:]
    before = list(warnings.filters)
    with pytest.raises(ImageError) as info:
        process_image(data, ImageConfig(max_pixels=Image.MAX_IMAGE_PIXELS))
    assert info.value.reason == "decompression_bomb" and "Pillow" in str(info.value)
    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as caught:  # outside process_image: still only a warning
        warnings.simplefilter("always")
        Image.open(io.BytesIO(data))
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)


def test_concurrent_calls_leave_no_warning_filter_behind():
    data = render_image(NAME, 8, 0, size=(200, 150))
    before = list(warnings.filters)
    errors = []

    def work() -> None:
        try:
            for _ in range(20):
                process_image(data, ImageConfig(resize_shorter_side=64))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and warnings.filters == before


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"jpeg_quality": 0}, "images.jpeg_quality must be in 1..100, got 0"),
        ({"min_side": 0}, "images.min_side"),
        ({"max_side": 16, "min_side": 32}, "images.max_side"),
        ({"max_pixels": 0}, "images.max_pixels"),
        ({"max_pixels": 10**12}, "images.max_pixels"),
        ({"resize_shorter_side": 0}, "images.resize_shorter_side"),
        ({"formats": ["JPG"]}, "images.formats"),
        ({"resample": "cubic"}, "images.resample"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ImageConfig(**kwargs)


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("orientation", [1, 6])
def test_drafted_decode_matches_the_full_size_reference(progressive, orientation):
    """The scaled (DCT-domain) decode of a large JPEG, progressive or not, EXIF-rotated or not, against
    a full-size decode, rotation and resize of the same bytes: same size, same orientation, same colours."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    source = Image.open(io.BytesIO(render_image(NAME, 8, 0, size=(1600, 1200)))).convert("RGB")
    source.paste((250, 20, 20), (0, 0, 400, 1200))  # stored left quarter red
    data = encode(source, "JPEG", quality=92, progressive=progressive, exif=exif.tobytes())
    result = process_image(data, ImageConfig(resize_shorter_side=256, resample="box"))
    size = (256, 341) if orientation == 6 else (341, 256)
    img = check_rgb_jpeg(result, size)
    full = Image.open(io.BytesIO(data))
    full.load()
    reference = full.transpose(Image.Transpose.ROTATE_270) if orientation == 6 else full
    reference = reference.convert("RGB").resize(size, Image.Resampling.BOX)
    assert psnr(img, reference) > 32  # measured 36.2-36.3 dB (draft at 1/4, then box; JPEG q90)
    pixels = np.asarray(img, np.int16)
    top_or_left = pixels[:40] if orientation == 6 else pixels[:, :40]
    assert top_or_left[..., 0].mean() > 200 and top_or_left[..., 1].mean() < 80  # the red quarter, turned


def test_stage_clock_times_every_stage_and_changes_nothing():
    data = render_image(NAME, 9, 0, size=(800, 600))
    cfg = ImageConfig(resize_shorter_side=256)
    clock = StageClock()
    timed = process_image(data, cfg, clock=clock)
    assert timed == process_image(data, cfg)
    assert set(clock.ns) == {"open", "decode", "orient", "colour", "resize", "encode", "hashes"}
    assert all(ns >= 0 for ns in clock.ns.values()) and clock.ns["decode"] > 0
    kept = StageClock()
    process_image(render_image(NAME, 9, 0, size=(200, 150)), cfg, clock=kept)
    assert set(kept.ns) == {"open", "decode", "hashes"}  # stored as is: no resize, no encode
