"""Tests of the sample world's catalog, images and CLI (world: generate, images, __main__)."""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
from PIL import Image

from world import (
    FAULT_KINDS,
    INVALID_KINDS,
    LICENSE_SPELLINGS,
    SPECIES,
    WorldSpec,
    build_world,
    canonical_name,
    generate_catalog,
    image_owners,
    image_relpath,
    load_faults,
    plan_image,
    read_jsonl,
    render_image,
    species_names,
    write_images,
    write_jsonl,
)
from world.__main__ import main
from world.tables import GROUP_COUNTRIES

BASE = "http://127.0.0.1:9999"
MEDITERRANEAN = {iso for iso, _ in GROUP_COUNTRIES["mediterranean"]}


@pytest.fixture(scope="module")
def catalog() -> list[dict]:
    return generate_catalog(WorldSpec(), BASE)


def _usable(record: dict) -> bool:
    name, url = record.get("latin_name"), record.get("image_url")
    return (
        isinstance(name, str)
        and bool(name.strip())
        and "plant_id" in record
        and isinstance(url, str)
        and url.lower().startswith("http")
    )


def _normalise(url: str) -> str:
    parts = urlsplit(url)
    query = "&".join(sorted(parts.query.split("&"))) if parts.query else ""
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, query, ""))


def _family(raw: str | None) -> str:
    return next(family for family, spellings in LICENSE_SPELLINGS.items() if raw in spellings)


# --- catalog ----------------------------------------------------------------------------------------


def test_same_spec_gives_identical_jsonl_bytes(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_jsonl(generate_catalog(WorldSpec(seed=3), BASE), a)
    write_jsonl(generate_catalog(WorldSpec(seed=3), BASE), b)
    write_jsonl(generate_catalog(WorldSpec(seed=4), BASE), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert read_jsonl(a) == generate_catalog(WorldSpec(seed=3), BASE)


def test_jsonl_keeps_non_ascii(tmp_path, catalog):
    path = tmp_path / "c.jsonl"
    assert write_jsonl(catalog, path) == len(catalog)
    text = path.read_text(encoding="utf-8")
    assert "\\u" not in text and any(ord(ch) > 127 for ch in text)  # e.g. "Andalucía" as is
    assert len(text.splitlines()) == len(catalog)


def test_spec_and_base_url_are_validated():
    with pytest.raises(ValueError, match="n_records"):
        WorldSpec(n_species=40, n_records=50)
    with pytest.raises(ValueError, match="duplicate_rate"):
        WorldSpec(duplicate_rate=1.5)
    with pytest.raises(ValueError, match="n_species"):
        WorldSpec(n_species=0)
    with pytest.raises(ValueError, match="slow_fault_delay_s must be > 0, got 0"):
        WorldSpec(slow_fault_delay_s=0)
    with pytest.raises(ValueError, match="base_url"):
        generate_catalog(WorldSpec(n_species=2, n_records=10), "ftp://127.0.0.1:1")
    with pytest.raises(ValueError, match="no path"):
        generate_catalog(WorldSpec(n_species=2, n_records=10), "http://127.0.0.1:1/prefix")


def test_species_counts_have_a_long_tail(catalog):
    counts = Counter(canonical_name(r["latin_name"]) for r in catalog if _usable(r))
    assert len(counts) == 40
    assert set(counts) == {name for name, _, _ in SPECIES[:40]}
    assert min(counts.values()) >= 2
    assert max(counts.values()) >= 10 * min(counts.values())


def test_duplicates_at_the_configured_rate_some_cross_species(catalog):
    valid = [r for r in catalog if _usable(r)]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in valid:
        groups[_normalise(r["image_url"])].append(r)
    duplicates = len(valid) - len(groups)
    assert 0.25 * len(catalog) <= duplicates <= 0.35 * len(catalog)
    cross = [g for g in groups.values() if len({canonical_name(r["latin_name"]) for r in g}) > 1]
    assert 1 <= len(cross) <= 0.1 * duplicates
    raw = [r["image_url"] for g in groups.values() if len(g) > 1 for r in g]
    assert any(u.startswith("HTTP://") for u in raw)
    assert any("#" in u for u in raw)
    spelled = {u.split("?", 1)[1].split("#")[0] for u in raw if "?" in u}
    assert any(q.startswith("v=") for q in spelled) and any(q.startswith("w=") for q in spelled)


def test_first_record_of_a_url_is_its_unvaried_original(catalog):
    first: dict[str, str] = {}
    for r in catalog:
        rel = image_relpath(str(r.get("image_url", "")))
        if rel is not None:
            first.setdefault(rel, r["image_url"])
    assert not [u for u in first.values() if "#" in u or u.startswith("HTTP:")]
    owners = image_owners(catalog)
    assert set(owners) <= set(first) and len(owners) >= len(first) - 10


def test_license_spellings_are_varied_and_in_the_table(catalog):
    raw = Counter(r["license"] for r in catalog)
    assert len(raw) >= 10
    families = Counter(_family(value) for value in raw.elements())
    share = {family: n / len(catalog) for family, n in families.items()}
    assert 0.28 <= share["cc-by-nc"] <= 0.42
    assert 0.14 <= share["cc-by"] <= 0.26
    assert {"cc0", "pdm", "all-rights-reserved", "unknown", "cc-by-sa"} <= set(share)


def test_invalid_records_of_every_kind(catalog):
    kinds = Counter()
    for r in catalog:
        url = r.get("image_url", "")
        if "latin_name" not in r:
            kinds["missing_latin_name"] += 1
        elif not r["latin_name"].strip():
            kinds["blank_latin_name"] += 1
        if "plant_id" not in r:
            kinds["missing_plant_id"] += 1
        if url.startswith("ftp://"):
            kinds["ftp_url"] += 1
        elif url.startswith("javascript:"):
            kinds["javascript_url"] += 1
        elif "://" not in url:
            kinds["not_a_url"] += 1
    assert set(kinds) == set(INVALID_KINDS)
    assert sum(kinds.values()) == round(0.01 * len(catalog))


def test_sources_ids_and_extra_fields(catalog):
    sources = Counter(r["source"] for r in catalog)
    assert 0.62 <= sources["iNaturalist"] / len(catalog) <= 0.78
    assert sources["Legacy"] > sources["Perenual"] > 0
    ids: dict[tuple[str, str], set] = defaultdict(set)
    for r in catalog:
        if not _usable(r):
            continue
        ids[(canonical_name(r["latin_name"]), r["source"])].add(r["plant_id"])
        if r["source"] == "Perenual":
            assert r["plant_id"].startswith("perenual-") and "cycle" in r
        else:
            assert isinstance(r["plant_id"], int)
        if r["source"] == "iNaturalist":
            assert {"observation_id", "observed_on", "observer", "quality_grade"} <= set(r)
    assert all(len(v) == 1 for v in ids.values())  # one id per species and source


def test_country_spellings_and_spread(catalog):
    countries = Counter(r.get("country") for r in catalog)
    assert any(c and len(c) == 2 and c.isupper() for c in countries)
    assert any(c and len(c) == 2 and c.islower() for c in countries)
    assert "Spain" in countries
    assert any("region" in r and "country" not in r for r in catalog)
    assert any("region" in r and "country" in r for r in catalog)
    med = {name for name, group, _ in SPECIES if group == "mediterranean"}
    iso = [r["country"] for r in catalog if r.get("latin_name") in med and len(r.get("country", "")) == 2]
    inside = sum(c.upper() in MEDITERRANEAN for c in iso)
    assert inside >= 0.85 * len(iso)


def test_synthetic_species_extend_the_built_in_list():
    names = [name for name, _, _ in species_names(len(SPECIES) + 500)]
    assert names[: len(SPECIES)] == [name for name, _, _ in SPECIES]
    assert len(set(names)) == len(names)
    assert all(len(name.split()) == 2 for name in names)
    records = generate_catalog(WorldSpec(n_species=100, n_records=600), BASE)
    assert len({r["latin_name"] for r in records if _usable(r)} | {""}) >= 100


# --- images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "expected_mode"),
    [
        ("JPEG", "RGB", "RGB"),
        ("JPEG", "CMYK", "CMYK"),
        ("JPEG", "L", "L"),
        ("PNG", "RGB", "RGB"),
        ("WEBP", "RGB", "RGB"),
    ],
)
def test_render_image_formats_and_modes(fmt, mode, expected_mode):
    data = render_image("Quercus ilex", 7, 0, fmt=fmt, size=(320, 200), mode=mode)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert (img.format, img.mode, img.size) == (fmt, expected_mode, (320, 200))


def test_render_image_is_deterministic():
    a = render_image("Olea europaea", 3, 1)
    assert a == render_image("Olea europaea", 3, 1)
    assert a != render_image("Olea europaea", 4, 1)
    assert a != render_image("Olea europaea", 3, 2)
    assert render_image("olea  EUROPAEA", 3, 1) == a  # sloppy spelling draws the same plant
    with Image.open(io.BytesIO(a)) as img:
        w, h = img.size
    assert min(w, h) >= 150 and max(w, h) <= 1000 and 0.6 <= w / h <= 1.6 + 1e-9


def test_render_image_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fmt"):
        render_image("Quercus ilex", 0, 0, fmt="GIF")
    with pytest.raises(ValueError, match="CMYK"):
        render_image("Quercus ilex", 0, 0, fmt="PNG", mode="CMYK")


def test_species_differ_more_than_variants_of_one_species():
    def mean_colour(name: str, variant: int) -> np.ndarray:
        data = render_image(name, variant, 0, size=(160, 120))
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32).mean(axis=(0, 1))

    names = [name for name, _, _ in SPECIES[:6]]
    means = {n: [mean_colour(n, v) for v in range(4)] for n in names}
    intra = [np.linalg.norm(m[i] - m[j]) for m in means.values() for i in range(4) for j in range(i + 1, 4)]
    centres = [np.mean(means[n], axis=0) for n in names]
    inter = [np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]]
    assert np.mean(inter) > 2 * np.mean(intra)
    assert np.min(inter) > 0


def test_plan_image_is_stable_and_mixes_formats():
    plans = [plan_image("iNaturalist", n, 0) for n in range(1, 2001)]
    assert plans[:50] == [plan_image("iNaturalist", n, 0) for n in range(1, 51)]
    kinds = Counter((p.fmt, p.mode) for p in plans)
    assert kinds[("JPEG", "RGB")] > 0.7 * len(plans)
    assert {("PNG", "RGB"), ("WEBP", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L")} <= set(kinds)
    ext_fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
    assert any(ext_fmt[p.ext.lower()] != p.fmt for p in plans)  # extensions that lie exist
    assert Counter((p.width, p.height) for p in plans).most_common(1)[0][0] == (500, 375)


def test_write_images_writes_index_and_reuses_files(tmp_path):
    spec = WorldSpec(n_species=4, n_records=30, seed=5)
    records = generate_catalog(spec, BASE)
    index = write_images(records, tmp_path, spec.seed)
    assert set(index) == set(image_owners(records)) and index
    for rel, entry in index.items():
        with Image.open(tmp_path / rel) as img:
            assert (img.format, img.size) == (entry["format"], (entry["width"], entry["height"]))
    rel = next(iter(index))
    before = {r: (tmp_path / r).stat().st_mtime_ns for r in index}
    (tmp_path / rel).write_bytes(b"not an image")
    assert write_images(records, tmp_path, spec.seed) == index
    assert Image.open(tmp_path / rel).format == index[rel]["format"]
    assert all((tmp_path / r).stat().st_mtime_ns == before[r] for r in index if r != rel)


def test_build_world_writes_catalog_images_and_faults(tmp_path):
    world = build_world(tmp_path / "w", WorldSpec(n_species=5, n_records=80, seed=2), BASE)
    assert read_jsonl(world.catalog_path) == world.records
    assert load_faults(world.faults_path) == world.faults
    assert {spec["kind"] for spec in world.faults.values()} == set(FAULT_KINDS)
    assert all(path.lstrip("/") in world.images for path in world.faults)
    assert all((world.image_dir / rel).is_file() for rel in world.images)
    redirect = [s["location"] for s in world.faults.values() if s["kind"] == "redirect"]
    assert redirect[0].lstrip("/") in world.images and redirect[0] not in world.faults


def test_the_wait_of_slow_faults_comes_from_the_spec(tmp_path):
    spec = WorldSpec(n_species=5, n_records=80, seed=2, slow_fault_delay_s=0.3)
    world = build_world(tmp_path / "w", spec, BASE, images=False)
    slow = [fault for fault in world.faults.values() if fault["kind"] == "slow"]
    assert slow and all(fault["delay_s"] == 0.3 for fault in slow)


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["generate", "--out", str(out), "--records", "120", "--species", "6", "--no-images"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("records=120 ") and "images=0" in line
    assert len(read_jsonl(out / "catalog.jsonl")) == 120 and (out / "faults.json").is_file()
    assert main(["generate", "--out", str(out), "--records", "3", "--species", "6"]) == 2
    assert capsys.readouterr().err.startswith("flora world: error: n_records")


@pytest.mark.slow
def test_benchmark_scale_catalog(tmp_path):
    spec = WorldSpec(n_species=7000, n_records=340_000, seed=1)
    records = generate_catalog(spec, BASE)
    assert len(records) == 340_000
    assert write_jsonl(records, tmp_path / "big.jsonl") == 340_000
    names = {r["latin_name"] for r in records if _usable(r)}
    assert len({canonical_name(n) for n in names}) == 7000
