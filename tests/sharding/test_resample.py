"""sharding/images/resample.py: Pillow 13's Lanczos resampling of 8-bit images as exact matrix products, the
same pixels as ``Image.resize`` on random sizes, boxes and contents (smooth, noise, extremes), pinned
by a digest so that its results do not move with the installed Pillow; the pHashes built on it equal
the ones ten ``Image.resize`` calls give; and the luma decoded by simplejpeg is Pillow's draft("L")."""

import hashlib
import io

import numpy as np
import PIL
import pytest
from PIL import Image

from flora.sharding.images import neardup
from flora.sharding.images.resample import plan, resample
from world import render_image, species_names

#: Pillow 13 introduced the vertical-first pass order this module copies; other versions differ on
#: some shapes, so the comparison with the installed Pillow needs 13.x (the digest test does not).
PILLOW_13 = PIL.__version__.split(".")[0] == "13"


def contents(seed: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kind = seed % 4
    if kind == 0:  # noise: every tap matters
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    if kind == 1:  # smooth gradients, like photos at 1/8 scale
        steps = rng.integers(-6, 7, (h, w)).cumsum(axis=1) + rng.integers(-6, 7, (h, 1)).cumsum(axis=0)
        return np.clip(steps + 128, 0, 255).astype(np.uint8)
    if kind == 2:  # hard 0/255 edges: Lanczos overshoot, the clip at both ends
        return (((np.arange(w)[None, :] // 2 + np.arange(h)[:, None] // 3) % 2) * 255).astype(np.uint8)
    return np.full((h, w), rng.choice([0, 255]), dtype=np.uint8)


def windows(w: int, h: int, rng: np.random.Generator) -> list:
    boxes = list(neardup.crop_boxes(w, h))
    x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
    return [*boxes, (x0, y0, rng.uniform(x0 + 0.25, w), rng.uniform(y0 + 0.25, h))]


def cases(n: int):
    rng = np.random.default_rng(19)
    sizes = [(43, 32), (32, 43), (32, 32), (64, 48), (1, 1), (3, 97), (97, 3), (33, 200), (200, 33)]
    sizes += [tuple(int(v) for v in rng.integers(1, 160, 2)) for _ in range(n - len(sizes))]
    for i, (w, h) in enumerate(sizes):
        out = (32, 32) if i % 3 else tuple(int(v) for v in rng.integers(1, 64, 2))
        yield i, (w, h), out, windows(w, h, rng)


@pytest.mark.skipif(not PILLOW_13, reason=f"the reference is Pillow 13's resize; installed {PIL.__version__}")
def test_resample_equals_pillow_13_resize_exactly():
    mismatched = []
    for i, (w, h), out, boxes in cases(400):
        pixels = contents(i, w, h)
        mine = resample(pixels, plan((w, h), out, boxes))
        image = Image.fromarray(pixels, "L")
        pillow = np.stack([np.asarray(image.resize(out, Image.Resampling.LANCZOS, box=b)) for b in boxes])
        assert mine.shape == pillow.shape
        if not np.array_equal(mine, pillow):
            mismatched.append(((w, h), out, int(np.abs(mine - pillow).max())))
    assert not mismatched, mismatched[:5]


def test_resample_results_are_pinned():
    """The same pixels on every machine and Pillow: a digest of 200 cases' outputs, recorded with Pillow
    13.0.0 agreeing on every pixel (the test above)."""
    digest = hashlib.sha256()
    for i, (w, h), out, boxes in cases(200):
        result = resample(contents(i, w, h), plan((w, h), out, boxes))
        assert result.min() >= 0 and result.max() <= 255 and np.array_equal(result, np.round(result))
        digest.update(result.astype(np.uint8).tobytes())
    assert digest.hexdigest() == PINNED


PINNED = "66395b348804ada5e2a01e08646c77369809de8de7901e8bb32851f7761547a5"


@pytest.mark.skipif(not PILLOW_13, reason=f"the reference is Pillow 13's resize; installed {PIL.__version__}")
def test_phashes_equal_the_ten_pillow_resizes():
    """perceptual_hashes through resample.py = the per-window ``Image.resize`` path it replaced, on
    photos of both orientations and several stored sizes."""
    names = [n for n, *_ in species_names(12)]
    for i, name in enumerate(names):
        size = [(500, 375), (375, 500), (341, 256), (256, 341), (1024, 768), (256, 256)][i % 6]
        jpeg = render_image(name, i, seed=3, size=size)
        luma = neardup._luma(jpeg)
        w, h = luma.size
        boxes = neardup.crop_boxes(w, h)
        small = [np.asarray(luma.resize((32, 32), Image.Resampling.LANCZOS, box=b)) for b in boxes]
        coeffs = (neardup._DCT @ np.stack(small).astype(np.int64) @ neardup._DCT.T).reshape(len(boxes), -1)
        ranked = np.sort(coeffs, axis=1)
        bits = 2 * coeffs > (ranked[:, 31] + ranked[:, 32])[:, None]
        expected = [row.tobytes().hex() for row in np.packbits(bits, axis=1)]
        assert neardup.perceptual_hashes(jpeg) == (expected[0], expected[1:])


def jpeg_kinds() -> list[tuple[str, bytes]]:
    """Stored-JPEG variants (and the files simplejpeg must leave to Pillow), sizes around the DCT
    scale steps."""
    photo = Image.open(io.BytesIO(render_image(species_names(1)[0][0], 1, seed=5, size=(1024, 768))))
    out = []
    for w, h in [
        (341, 256),
        (256, 341),
        (253, 253),
        (256, 256),
        (255, 300),
        (512, 384),
        (1024, 768),
        (40, 33),
    ]:
        img = photo.resize((w, h))
        for label, kwargs in [
            ("4:2:0", {"subsampling": 2}),
            ("4:2:2", {"subsampling": 1}),
            ("4:4:4", {"subsampling": 0}),
            ("progressive", {"progressive": True}),
            ("optimized", {"optimize": True, "quality": 60}),
        ]:
            out.append((f"{w}x{h} {label}", encode(img, "JPEG", **kwargs)))
        out.append((f"{w}x{h} grey", encode(img.convert("L"), "JPEG")))
        out.append((f"{w}x{h} cmyk", encode(img.convert("CMYK"), "JPEG")))
    small = photo.resize((15, 12))
    out += [("15x12", encode(small, "JPEG")), ("png", encode(photo.resize((300, 200)), "PNG"))]
    return out


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_luma_decode_equals_pillow_draft(monkeypatch):
    """The pHash's luma: simplejpeg's decode gives Pillow's draft("L") pixels byte for byte, at the
    same scale, on colour and grey JPEGs of every kind; CMYK, PNG and tiny images go through Pillow."""
    assert neardup.simplejpeg is not None  # a dependency: the fast path is what builds use
    reference, through_pillow = neardup._luma, []
    monkeypatch.setattr(neardup, "_luma", lambda data: through_pillow.append(data) or reference(data))
    kinds = jpeg_kinds()
    for label, data in kinds:
        mine = neardup._luma_pixels(data)
        expected = np.asarray(reference(data))
        assert mine.shape == expected.shape and np.array_equal(mine, expected), label
    assert through_pillow == [d for label, d in kinds if label.endswith(("cmyk", "png", "15x12"))]
    assert neardup._draft_scale(253, 253) == 4 and neardup._draft_scale(256, 256) == 8
    assert neardup._draft_scale(31, 500) == 1 and neardup._draft_scale(64, 64) == 2
