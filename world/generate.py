"""The sample world's catalog: the raw export of an iNaturalist-style plant image database.

Owns: ``WorldSpec``, generating the catalog records (long-tailed species counts, a mix of sources,
licenses spelled many ways, country/region spellings, reused URLs in textual variants, a small share
of invalid records), the fault assignment for the image server, writing JSONL, and ``build_world``,
which writes catalog, images and faults into one folder.

Leaves out: rendering images (``images.py``), serving them (``server.py``), and everything a consumer
does with the catalog (normalising licenses and countries, deduplication, validation): the records
are deliberately raw. Output is a pure function of the spec and the base URL: one
``random.Random(seed)`` drives every choice, in a fixed order.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from itertools import accumulate
from pathlib import Path
from urllib.parse import urlsplit

from flora.io import read_jsonl  # noqa: F401 - re-exported by world
from world import tables
from world.images import image_owners, plan_image, write_images
from world.server import FAULT_KINDS

DEFAULT_BASE_URL = "http://127.0.0.1:8765"
SOURCES: tuple[tuple[str, float], ...] = (("iNaturalist", 0.70), ("Legacy", 0.20), ("Perenual", 0.10))
MIN_RECORDS_PER_SPECIES = 2
MAX_SPECIES = 100_000
# Share of reused URLs that carry another species' name (the seed data: a few percent of duplicates).
CROSS_SPECIES_SHARE = 0.03
# Share of reused URLs spelled differently (scheme case, fragment, query order) but equal when normalised.
DUP_VARIANT_RATE = 0.3
# Share of original URLs that carry a query string (CDN resize parameters).
QUERY_RATE = 0.1
# Share of valid records whose Latin name is spelled sloppily (case, extra whitespace).
LATIN_VARIANT_RATE = 0.02
INVALID_KINDS: tuple[str, ...] = (
    "missing_latin_name",
    "blank_latin_name",
    "ftp_url",
    "javascript_url",
    "not_a_url",
    "missing_plant_id",
)
HUGE_FAULT_BYTES = 32 * 1024 * 1024  # above any sane per-image download cap
SLOW_FAULT_DELAY_S = 2.0  # the demo's: above the demo build's read timeout; tests set less (WorldSpec)
# How each source spells a record's location: (style, weight). "region" = region without country.
LOCATION_STYLES: dict[str, tuple[tuple[str, float], ...]] = {
    "iNaturalist": (("iso", 72), ("iso+region", 20), ("lower", 3), ("region", 3), ("none", 2)),
    "Legacy": (("name", 45), ("iso", 25), ("lower", 10), ("region", 10), ("name+region", 10)),
    "Perenual": (("iso", 55), ("name", 20), ("iso+region", 10), ("none", 15)),
}
# Role of a catalog position: a new URL, or a reuse of an earlier URL of the same / another species.
NEW_URL, SAME_SPECIES_DUP, CROSS_SPECIES_DUP = 0, 1, 2
FIRST_OBSERVATION = date(2008, 1, 1).toordinal()
LAST_OBSERVATION = date(2024, 12, 31).toordinal()


@dataclass
class WorldSpec:
    """What the sample world contains.

    Attributes:
        n_species: Number of species; beyond the built-in list, synthetic binomials are added.
        n_records: Number of catalog records (duplicates and invalid ones included).
        seed: Seed of every random choice (catalog, images, faults).
        duplicate_rate: Fraction of records that reuse the URL of an earlier record.
        invalid_rate: Fraction of records made invalid (see ``INVALID_KINDS``).
        zipf_exponent: Exponent of the long-tailed count per species (rank r gets weight r**-s).
        fault_rate: Fraction of unique URLs the image server answers with a fault.
        slow_fault_delay_s: How long a ``slow`` fault waits before it answers; a build meant to report
            it as ``timeout`` reads with a shorter ``download.read_timeout_s``.
    """

    n_species: int = 40
    n_records: int = 2000
    seed: int = 0
    duplicate_rate: float = 0.3
    invalid_rate: float = 0.01
    zipf_exponent: float = 1.0
    fault_rate: float = 0.03
    slow_fault_delay_s: float = SLOW_FAULT_DELAY_S

    def __post_init__(self) -> None:
        if not 1 <= self.n_species <= MAX_SPECIES:
            raise ValueError(f"n_species must be in [1, {MAX_SPECIES}], got {self.n_species}")
        if self.n_records < MIN_RECORDS_PER_SPECIES * self.n_species:
            raise ValueError(
                f"n_records must be at least {MIN_RECORDS_PER_SPECIES} * n_species = "
                f"{MIN_RECORDS_PER_SPECIES * self.n_species}, got {self.n_records}"
            )
        for name in ("duplicate_rate", "invalid_rate", "fault_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if not self.slow_fault_delay_s > 0:  # `not >` also refuses NaN
            raise ValueError(f"slow_fault_delay_s must be > 0, got {self.slow_fault_delay_s}")


@dataclass
class World:
    """A sample world written to disk by ``build_world``."""

    root: Path
    catalog_path: Path
    image_dir: Path
    faults_path: Path
    records: list[dict]
    faults: dict[str, dict] = field(default_factory=dict)
    images: dict[str, dict] = field(default_factory=dict)


def species_names(n_species: int) -> list[tuple[str, str, str | None]]:
    """Return ``(latin_name, group, common_name)`` of the first ``n_species`` species of the world.

    The built-in species come first; synthetic binomials ("Genus epithet", then "Genus epithet-k")
    follow, each with a group chosen by a stable rule, so a bigger world extends a smaller one.
    """
    if not 1 <= n_species <= MAX_SPECIES:
        raise ValueError(f"n_species must be in [1, {MAX_SPECIES}], got {n_species}")
    out: list[tuple[str, str, str | None]] = list(tables.SPECIES[:n_species])
    taken = {name for name, _, _ in tables.SPECIES}
    groups = sorted(tables.GROUP_COUNTRIES)
    genera, epithets = tables.SYNTH_GENERA, tables.SYNTH_EPITHETS
    k = 0
    while len(out) < n_species:
        genus, epithet = genera[k % len(genera)], epithets[(k // len(genera)) % len(epithets)]
        lap = k // (len(genera) * len(epithets))
        name = f"{genus} {epithet}" if lap == 0 else f"{genus} {epithet}-{lap}"
        if name not in taken:
            out.append((name, groups[(k * 7 + lap) % len(groups)], None))
        k += 1
    return out


class _Picker:
    """Weighted choice by bisection over cumulative weights (fast for hundreds of thousands of draws)."""

    def __init__(self, weighted: Iterable[tuple[object, float]]) -> None:
        items = list(weighted)
        self.values = [value for value, _ in items]
        self.cum = list(accumulate(weight for _, weight in items))

    def __call__(self, rng: random.Random) -> object:
        return self.values[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]


def _species_counts(spec: WorldSpec) -> list[int]:
    """Records per rank: ``MIN_RECORDS_PER_SPECIES`` each plus a Zipf share (largest remainder)."""
    weights = [1.0 / (rank**spec.zipf_exponent) for rank in range(1, spec.n_species + 1)]
    extra = spec.n_records - MIN_RECORDS_PER_SPECIES * spec.n_species
    total = sum(weights)
    shares = [extra * w / total for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: extra - sum(counts)]:
        counts[i] += 1
    return [MIN_RECORDS_PER_SPECIES + c for c in counts]


def _roles(slots: Sequence[int], spec: WorldSpec, rng: random.Random) -> list[int]:
    """Role of each catalog position (``NEW_URL``, ``SAME_SPECIES_DUP`` or ``CROSS_SPECIES_DUP``)."""
    seen: set[int] = set()
    eligible = []  # positions whose species already has a URL earlier in the catalog
    for pos, species in enumerate(slots):
        if species in seen:
            eligible.append(pos)
        seen.add(species)
    n_dup = min(round(spec.duplicate_rate * len(slots)), len(eligible))
    chosen = sorted(rng.sample(eligible, n_dup))
    n_cross = max(1, round(CROSS_SPECIES_SHARE * n_dup)) if n_dup and spec.n_species > 1 else 0
    roles = [NEW_URL] * len(slots)
    for pos in chosen:
        roles[pos] = SAME_SPECIES_DUP
    for pos in rng.sample(chosen, n_cross):
        roles[pos] = CROSS_SPECIES_DUP
    return roles


def _vary_url(url: str, rng: random.Random) -> str:
    """Spell ``url`` differently without changing what it normalises to."""
    scheme, rest = url.split("://", 1)
    if "?" in rest and rng.random() < 0.5:
        path, query = rest.split("?", 1)
        return f"{scheme}://{path}?{'&'.join(reversed(query.split('&')))}"
    if rng.random() < 0.5:
        return f"{scheme.upper()}://{rest}"
    return f"{url}#{rng.choice(('photo', 'main', 'gallery-1'))}"


class _RecordMaker:
    """Builds the fields of one record that depend on species and source, not on the URL."""

    def __init__(self, species: Sequence[tuple[str, str, str | None]], rng: random.Random) -> None:
        self.rng = rng
        self.species = species
        self.countries = []
        for name, group, _ in species:
            jitter = random.Random(f"spread\x00{name}")  # per-species tilt of the group's spread
            self.countries.append(
                _Picker((iso, w * (0.5 + jitter.random())) for iso, w in tables.GROUP_COUNTRIES[group])
            )
        self.license = _Picker(tables.LICENSE_WEIGHTS.items())
        self.location = {src: _Picker(styles) for src, styles in LOCATION_STYLES.items()}
        self.quality = _Picker(tables.QUALITY_GRADES)
        self.observers = [f"{a}_{b}" for a in tables.OBSERVER_FIRST for b in tables.OBSERVER_LAST]

    def plant_id(self, index: int, source: str) -> int | str:
        if source == "iNaturalist":
            return 40_000 + (index * 104_729) % 1_000_003
        if source == "Legacy":
            return 1_000 + index
        return f"perenual-{1 + (index * 7_919) % 100_003}"

    def location_fields(self, index: int, source: str) -> dict[str, str]:
        rng = self.rng
        if rng.random() < tables.ELSEWHERE_RATE:
            iso = rng.choice(tables.ELSEWHERE_COUNTRIES)
        else:
            iso = self.countries[index](rng)
        style = self.location[source](rng)
        regions = tables.COUNTRY_REGIONS.get(iso)
        if "region" in style and regions is None:
            style = "iso"
        out: dict[str, str] = {}
        if style in ("iso", "iso+region"):
            out["country"] = iso
        elif style == "lower":
            out["country"] = iso.lower()
        elif style in ("name", "name+region"):
            out["country"] = tables.COUNTRY_NAMES[iso]
        if "region" in style:
            out["region"] = rng.choice(regions)
        return out

    def extras(self, index: int, source: str) -> dict[str, object]:
        rng = self.rng
        day = date.fromordinal(rng.randint(FIRST_OBSERVATION, LAST_OBSERVATION))
        if source == "iNaturalist":
            return {
                "observation_id": rng.randint(1_000_000, 250_000_000),
                "observed_on": day.isoformat(),
                "observer": rng.choice(self.observers),
                "quality_grade": self.quality(rng),
            }
        if source == "Legacy":
            out: dict[str, object] = {"collection": rng.choice(tables.LEGACY_COLLECTIONS)}
            out["photographer"] = rng.choice(self.observers).replace("_", " ").title()
            if rng.random() < 0.8:
                out["date"] = day.strftime("%d/%m/%Y")
            return out
        return {
            "common_name": self.species[index][2],
            "perenual_image_id": rng.randint(1, 5_000_000),
            "cycle": rng.choice(tables.PERENUAL_CYCLES),
        }


def _check_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL like {DEFAULT_BASE_URL!r}, got {base_url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"base_url must have no path, query or fragment, got {base_url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _invalidate(record: dict, kind: str, rng: random.Random) -> None:
    if kind == "missing_latin_name":
        del record["latin_name"]
    elif kind == "blank_latin_name":
        record["latin_name"] = rng.choice(("", "   ", "\t"))
    elif kind == "ftp_url":
        record["image_url"] = "ftp://" + record["image_url"].split("://", 1)[1]
    elif kind == "javascript_url":
        record["image_url"] = "javascript:void(0)"
    elif kind == "not_a_url":
        record["image_url"] = rng.choice(("N/A", "not available", "see attached photo"))
    elif kind == "missing_plant_id":
        del record["plant_id"]
    else:
        raise ValueError(f"unknown invalid kind {kind!r}; expected one of {INVALID_KINDS}")


def generate_catalog(spec: WorldSpec, base_url: str = DEFAULT_BASE_URL) -> list[dict]:
    """Generate the raw catalog records of the world ``spec`` describes.

    Args:
        spec: Size, seed and rates of the world.
        base_url: ``scheme://host:port`` the image URLs point at (no path).

    Returns:
        One dict per record, in catalog order; the first record with a URL is its original, later
        ones reuse it. The same arguments always give the same records.
    """
    base = _check_base_url(base_url)
    rng = random.Random(spec.seed)
    species = species_names(spec.n_species)
    ranked = list(range(spec.n_species))
    rng.shuffle(ranked)  # which species is the head depends on the seed
    slots = [ranked[rank] for rank, count in enumerate(_species_counts(spec)) for _ in range(count)]
    rng.shuffle(slots)
    roles = _roles(slots, spec, rng)
    maker = _RecordMaker(species, rng)
    pick_source = _Picker(SOURCES)
    originals: list[list[str]] = [[] for _ in species]
    all_originals: list[tuple[int, str]] = []
    numbers = dict.fromkeys((name for name, _ in SOURCES), 0)
    records: list[dict] = []
    for index, role in zip(slots, roles, strict=True):
        source = pick_source(rng)
        if role == NEW_URL:
            numbers[source] += 1
            plan = plan_image(source, numbers[source], spec.seed)
            url = f"{base}/img/{source}/{numbers[source]:06d}.{plan.ext}"
            if rng.random() < QUERY_RATE:
                url += f"?w={rng.choice((500, 800, 1024))}&v={rng.randint(1, 9)}"
            originals[index].append(url)
            all_originals.append((index, url))
        else:
            url = rng.choice(originals[index])
            if role == CROSS_SPECIES_DUP:
                for _ in range(20):  # another species' URL (with one species, there is none)
                    other, other_url = rng.choice(all_originals)
                    if other != index:
                        url = other_url
                        break
            if rng.random() < DUP_VARIANT_RATE:
                url = _vary_url(url, rng)
        name = species[index][0]
        if rng.random() < LATIN_VARIANT_RATE:
            name = rng.choice((name.lower(), name.upper(), f" {name} ", name.replace(" ", "  ")))
        license_ = rng.choice(tables.LICENSE_SPELLINGS[maker.license(rng)])
        record: dict = {
            "plant_id": maker.plant_id(index, source),
            "latin_name": name,
            "image_url": url,
            "license": license_,
            "source": source,
        }
        record.update(maker.location_fields(index, source))
        record.update(maker.extras(index, source))
        records.append(record)
    n_invalid = round(spec.invalid_rate * len(records))
    for i, pos in enumerate(sorted(rng.sample(range(len(records)), n_invalid))):
        _invalidate(records[pos], INVALID_KINDS[i % len(INVALID_KINDS)], rng)
    return records


def assign_faults(
    records: Iterable[Mapping], fault_rate: float, seed: int, slow_delay_s: float = SLOW_FAULT_DELAY_S
) -> dict[str, dict]:
    """Choose the URL paths the image server answers with a fault, covering every kind once first.

    Args:
        records: Catalog records; only paths the world has an image for are candidates.
        fault_rate: Fraction of unique URL paths to fault (at least one of each kind if above 0).
        seed: World seed.
        slow_delay_s: The wait of each ``slow`` fault.

    Returns:
        ``{"/img/source/n.ext": fault spec}`` as ``ImageServer`` understands it.
    """
    paths = sorted("/" + rel for rel in image_owners(records))
    if fault_rate <= 0 or len(paths) < 2:
        return {}
    rng = random.Random(f"faults\x00{seed}")
    n = min(len(paths) - 1, max(len(FAULT_KINDS), round(fault_rate * len(paths))))
    chosen = rng.sample(paths, n + 1)
    target, chosen = chosen[0], chosen[1:]  # a healthy image that redirects point at
    statuses = (
        {"status": 404},
        {"status": 500},
        {"status": 503},
        {"status": 429, "retry_after": 1},
        {"status": 403},
        {"status": 410},
    )
    redirects = (
        target,
        "ftp://127.0.0.1/img/secret.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://example.invalid/img/elsewhere.jpg",
    )
    faults: dict[str, dict] = {}
    for i, path in enumerate(chosen):
        kind = FAULT_KINDS[i % len(FAULT_KINDS)]
        lap = i // len(FAULT_KINDS)
        spec: dict = {"kind": kind}
        if kind == "status":
            spec.update(statuses[lap % len(statuses)])
        elif kind == "flaky":
            spec.update(status=(503, 500, 429)[lap % 3], times=2 - lap % 2)
        elif kind == "slow":
            spec["delay_s"] = slow_delay_s
        elif kind == "redirect":
            spec["location"] = redirects[lap % len(redirects)]
        elif kind == "huge":
            spec["bytes"] = HUGE_FAULT_BYTES
        faults[path] = spec
    return faults


def write_jsonl(records: Iterable[Mapping], path: str | Path) -> int:
    """Write one JSON object per line (UTF-8, ``ensure_ascii=False``); return the number written."""
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False))
            fh.write("\n")
            count += 1
    return count


def build_world(
    out_dir: str | Path,
    spec: WorldSpec | None = None,
    base_url: str = DEFAULT_BASE_URL,
    images: bool = True,
) -> World:
    """Write a sample world: ``catalog.jsonl``, ``images/img/...`` and ``faults.json`` under ``out_dir``.

    Args:
        out_dir: Folder to write into (created if missing; existing images are reused).
        spec: The world; ``None`` means ``WorldSpec()``.
        base_url: Where the image server will listen (``ImageServer(world.image_dir).base_url``).
        images: Whether to render the images (benchmarks with large catalogs skip them).

    Returns:
        The ``World`` with its paths, records, faults and image index.
    """
    spec = WorldSpec() if spec is None else spec
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    records = generate_catalog(spec, base_url)
    world = World(root, root / "catalog.jsonl", root / "images", root / "faults.json", records)
    write_jsonl(records, world.catalog_path)
    world.faults = assign_faults(records, spec.fault_rate, spec.seed, spec.slow_fault_delay_s)
    world.faults_path.write_text(json.dumps(world.faults, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    world.image_dir.mkdir(exist_ok=True)
    if images:
        world.images = write_images(records, world.image_dir, spec.seed)
    return world
