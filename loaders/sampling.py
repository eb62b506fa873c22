"""Sampling for the long tail: which samples, and how often, make one training epoch.

Owns ``SamplingConfig`` and ``StreamConfig`` (the ``sampling:`` part of the data config) and the
sampling step of the epoch plan, a pure function of (the split's labels, each sample's stream, the
config, seed, epoch): ``epoch_samples`` returns the epoch's sample ids before the rank cut.

Policies (within each stream, when streams are configured):

* ``uniform``: every sample once (today's plan). Without streams and with ``epoch_samples`` left at
  the split's size the plan is ``np.arange(n)``, unshuffled, so the caller's shard-order shuffle is
  untouched and existing configs read exactly as before.
* ``class_balanced`` and ``power``: ``epoch_samples`` draws with replacement; a species is drawn with
  probability proportional to ``count ** p`` (``class_balanced`` is ``p = 0``; ``p = 1`` gives
  uniform's class frequencies; ``p = 0.5`` is square-root sampling), then a sample uniformly within it.
* ``repeat_factor``: a sample whose species has frequency ``f < t`` in its stream is repeated
  ``r = t / f`` times, rounded stochastically per epoch (``floor(r)`` plus one with probability
  ``frac(r)``); a species with ``f >= t`` keeps each sample exactly once. (LVIS / detectron2 repeat
  ``sqrt(t / f)`` times; Flora repeats ``t / f`` times, which lifts every rare species to
  ``t * n`` draws.) Without streams and without ``epoch_samples`` the epoch is the repeated list, its
  length varying with the rounding; otherwise the list is resized to the stream's quota.

Streams: each sample belongs to at most one stream (``stream_ids`` assigns them from each sample's
region and licence class, first match wins); stream ``s`` gets ``round(proportion_s * E)`` of the
``E`` draws, by largest remainder so the quotas sum to ``E`` exactly (``stream_quotas``). ``uniform``
and ``repeat_factor`` fill a quota as mosaic streaming fills a stream's share: whole copies of the
stream's list, then a subset without replacement. The epoch's list is shuffled at the end (species
interleaved), except for the unsampled identity plan.

Randomness: ``SeedSequence([seed, epoch, SAMPLING_SALT])``, spawned into one PCG64 generator per
stream and one for the final shuffle, so a stream's draws do not depend on the other streams' sizes.

Leaves out: wiring into the loaders (base.py's plan, DALI's index files, the reference loader), the
rank cut (index.py's ``rank_bounds`` over the returned list), mid-epoch resume and resume on another
world size (the list is a pure function, so a resumed run recomputes it), validation and test (never
sampled: callers do not call this for them), and where a sample's region or licence class comes from
(the caller passes them to ``stream_ids``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from flora.config import ConfigError
from flora.sharding.format.schema import LICENSE_CLASSES

POLICIES = ("uniform", "class_balanced", "power", "repeat_factor")
#: ``power``'s exponent when none is given: square-root sampling (Mahajan et al., 2018, "Exploring the
#: limits of weakly supervised pretraining"; the usual choice for iNaturalist-style long tails).
DEFAULT_POWER = 0.5
#: The species exponent of the two fixed weighted policies (``count ** exponent``).
POLICY_EXPONENTS = {"uniform": 1.0, "class_balanced": 0.0}
#: How far the streams' proportions may be from summing to 1 (YAML decimals such as 0.333333 each).
PROPORTION_TOLERANCE = 1e-6
#: ``repeat_factor`` refuses a threshold that makes a stream's repeated list this many times longer
#: than the stream (``t = 1`` over 18,000 species would make it ~18,000 times longer): the list is
#: built in memory, and so long an epoch is a threshold chosen for a far smaller label set.
MAX_REPEAT_GROWTH = 100
#: The last entry of the epoch's SeedSequence: keeps the sampling draws apart from the other streams
#: keyed by (seed, epoch) (index.py's shard order, base.py's ``epoch_seed``). Any fixed value works.
SAMPLING_SALT = 0x5A3D
#: The stream id of a sample that no stream selects (it is never drawn).
NO_STREAM = -1
#: How many species ``summary`` lists at each end.
SUMMARY_SPECIES = 5


@dataclass
class StreamConfig:
    """One stream of a mix: a named selection of the split's samples and its share of each epoch.

    A sample belongs to the first stream whose selection matches: ``regions`` (names; null: any
    region) and ``license_classes`` (null: any). A stream with neither selects every sample the
    earlier streams left, so it must come last (``{name: rest, proportion: 0.5}``).
    """

    name: str
    proportion: float
    regions: str | list[str] | None = None
    license_classes: str | list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.regions, str):
            self.regions = [self.regions]
        if isinstance(self.license_classes, str):
            self.license_classes = [self.license_classes]

    @property
    def selects_rest(self) -> bool:
        """True for a stream without a selection: everything the earlier streams left."""
        return self.regions is None and self.license_classes is None


@dataclass
class SamplingConfig:
    """The sampling policy of training epochs (``data.sampling``); validation and test are never sampled."""

    policy: Literal["uniform", "class_balanced", "power", "repeat_factor"] = "uniform"
    #: ``power``: a species is drawn in proportion to ``count ** power``; null = DEFAULT_POWER.
    power: float | None = None
    #: ``repeat_factor``: the frequency ``t`` in (0, 1] below which a species' samples are repeated
    #: ``t / f`` times. Required: an epoch grows to about ``sum(max(count, t * n)) / n`` times the
    #: split, so choose it against the label set (near ``1 / species`` lifts the species below the
    #: mean count; LVIS used 0.001 with 1,203 categories).
    repeat_threshold: float | None = None
    #: Draws per epoch when sampling; null = the split's size.
    epoch_samples: int | None = None
    streams: list[StreamConfig] = field(default_factory=list)
    #: ``uniform`` only: read the epoch as a random permutation of its samples, in windows of
    #: ``shuffle_buffer`` (plan.py), instead of shard by shard: for shards whose samples are ordered
    #: (by species, say), where a shuffle buffer alone leaves batches of few species. The other
    #: policies always read so.
    interleave: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"sampling.policy: expected one of {list(POLICIES)}, got {self.policy!r}")
        for key, owner in (("power", "power"), ("repeat_threshold", "repeat_factor")):
            if getattr(self, key) is not None and self.policy != owner:
                raise ConfigError(
                    f"sampling.{key}: only policy: {owner} uses it, got {getattr(self, key)} "
                    f"with policy: {self.policy}"
                )
        if self.power is not None and not (math.isfinite(self.power) and self.power >= 0):
            raise ConfigError(
                "sampling.power: expected an exponent >= 0 (1: uniform, 0.5: square root, "
                f"0: class-balanced), got {self.power}"
            )
        if self.policy == "repeat_factor" and self.repeat_threshold is None:
            raise ConfigError(
                "sampling.repeat_threshold: policy: repeat_factor needs a threshold t in (0, 1], got null"
            )
        if self.repeat_threshold is not None and not 0 < self.repeat_threshold <= 1:
            raise ConfigError(
                f"sampling.repeat_threshold: expected a frequency in (0, 1], got {self.repeat_threshold}"
            )
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise ConfigError(
                f"sampling.epoch_samples: expected >= 1 (null: the split's size), got {self.epoch_samples}"
            )
        self._check_streams()

    def _check_streams(self) -> None:
        for i, stream in enumerate(self.streams):
            key = f"sampling.streams[{i}]"
            if not isinstance(stream.name, str) or not stream.name.strip():
                raise ConfigError(f"{key}.name: expected a non-empty name, got {stream.name!r}")
            if not (math.isfinite(stream.proportion) and stream.proportion > 0):
                raise ConfigError(f"{key}.proportion: expected a share > 0, got {stream.proportion}")
            if stream.regions is not None and not (stream.regions and all(stream.regions)):
                raise ConfigError(
                    f"{key}.regions: expected region names (leave it out for any region), "
                    f"got {stream.regions}"
                )
            classes = stream.license_classes
            if classes is not None and (not classes or any(c not in LICENSE_CLASSES for c in classes)):
                raise ConfigError(
                    f"{key}.license_classes: expected some of {list(LICENSE_CLASSES)}, got {classes}"
                )
            if stream.selects_rest and i != len(self.streams) - 1:
                raise ConfigError(
                    f"{key}: {stream.name!r} has no regions or license_classes, so it takes every sample "
                    f"the streams before it left and must be the last stream, not {i + 1} of "
                    f"{len(self.streams)}"
                )
        names = [s.name for s in self.streams]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"sampling.streams: names must be unique, got {twice[0]!r} twice in {names}")
        total = sum(s.proportion for s in self.streams)
        if self.streams and abs(total - 1) > PROPORTION_TOLERANCE:
            shares = ", ".join(f"{s.name} {s.proportion:g}" for s in self.streams)
            raise ConfigError(
                f"sampling.streams: proportions must sum to 1 (within {PROPORTION_TOLERANCE:g}), "
                f"got {total:.9g} ({shares})"
            )

    @property
    def exponent(self) -> float | None:
        """The species exponent of a weighted policy (``count ** exponent``); None for repeat_factor."""
        if self.policy == "power":
            return DEFAULT_POWER if self.power is None else float(self.power)
        return POLICY_EXPONENTS.get(self.policy)

    def unsampled(self, n: int) -> bool:
        """True when the plan is the split itself, in order (uniform, no streams, an epoch of ``n``)."""
        return (
            self.policy == "uniform"
            and not self.streams
            and not self.interleave
            and self.epoch_samples in (None, n)
        )


# ------------------------------------------------------------------------------------------ the plan
def epoch_samples(
    labels: np.ndarray, streams_of: np.ndarray | None, cfg: SamplingConfig, seed: int, epoch: int
) -> np.ndarray:
    """The sample ids (int64) of one training epoch, before the rank cut.

    Args:
        labels: each sample's species (class index), in sample-id order.
        streams_of: each sample's stream (an index into ``cfg.streams``, ``NO_STREAM`` for none), as
            ``stream_ids`` makes it; None when ``cfg`` has no streams.
        cfg: the policy.
        seed, epoch: the run's seed and the epoch: the same inputs give the same array.

    Returns ``np.arange(n)`` when ``cfg.unsampled(n)``; otherwise the drawn ids, shuffled.
    """
    labels = _as_labels(labels)
    n = len(labels)
    if cfg.unsampled(n):
        return np.arange(n, dtype=np.int64)
    populations = _populations(n, streams_of, cfg)
    quotas = _quotas(n, cfg)
    seeds = np.random.SeedSequence([seed, epoch, SAMPLING_SALT]).spawn(len(populations) + 1)
    where = [f"stream {s.name!r}" for s in cfg.streams] or ["the split"]
    parts = [
        _draw(members, labels[members], cfg, quota, _rng(ss), place)
        for members, quota, ss, place in zip(populations, quotas, seeds[:-1], where, strict=True)
    ]
    ids = np.concatenate(parts)
    _rng(seeds[-1]).shuffle(ids)
    return ids


def stream_quotas(proportions: list[float] | np.ndarray, total: int) -> np.ndarray:
    """Each stream's draws out of ``total``: ``round(p * total)`` by largest remainder, so they sum to
    ``total`` exactly (ties go to the earlier stream). Proportions are normalised first."""
    p = np.asarray(proportions, dtype=np.float64)
    raw = p / p.sum() * total
    quotas = np.floor(raw).astype(np.int64)
    short = int(total - quotas.sum())  # in [0, len(p)): the floors lose less than 1 each
    quotas[np.argsort(-(raw - quotas), kind="stable")[:short]] += 1
    return quotas


def stream_ids(streams: list[StreamConfig], regions: np.ndarray, license_classes: np.ndarray) -> np.ndarray:
    """Each sample's stream: the first of ``streams`` whose selection matches the sample's region and
    licence class (per-sample arrays of names), ``NO_STREAM`` where none does."""
    regions, license_classes = np.asarray(regions), np.asarray(license_classes)
    if regions.shape != license_classes.shape or regions.ndim != 1:
        raise ValueError(
            f"regions and license_classes must be 1-D and of one length, got shapes {regions.shape} "
            f"and {license_classes.shape}"
        )
    out = np.full(len(regions), NO_STREAM, dtype=np.int64)
    for i, stream in enumerate(streams):
        match = out == NO_STREAM
        if stream.regions is not None:
            match &= np.isin(regions, stream.regions)
        if stream.license_classes is not None:
            match &= np.isin(license_classes, stream.license_classes)
        out[match] = i
    return out


def target_frequencies(labels: np.ndarray, streams_of: np.ndarray | None, cfg: SamplingConfig) -> np.ndarray:
    """The policy's expected share of an epoch's draws per species id (``labels.max() + 1`` values,
    summing to 1): what the realised frequencies of ``epoch_samples`` converge to (for
    ``repeat_factor``, the expectation of the stochastic rounding)."""
    labels = _as_labels(labels)
    n = len(labels)
    out = np.zeros(int(labels.max()) + 1 if n else 0, dtype=np.float64)
    populations = _populations(n, streams_of, cfg)
    quotas = _quotas(n, cfg)
    drawn = [len(m) if q is None else q for m, q in zip(populations, quotas, strict=True)]
    for members, share in zip(populations, np.asarray(drawn) / max(sum(drawn), 1), strict=True):
        species, counts = np.unique(labels[members], return_counts=True)
        weight = _species_weight(counts, len(members), cfg)
        out[species] += share * weight / weight.sum()
    return out


def summary(
    ids: np.ndarray,
    labels: np.ndarray,
    stream_of: np.ndarray | None = None,
    stream_names: list[str] | None = None,
) -> dict:
    """What an epoch's plan realised, for ``info``: per-species draws (species in the split, seen,
    min / median / max draws, the most and least drawn) and, given ``stream_of``, each stream's share.

    ``stream_names``: the names of stream ids 0, 1, ... (default ``stream <i>``); ``NO_STREAM`` is
    ``(none)``. Plain ints and floats only, ready for JSON.
    """
    ids, labels = np.asarray(ids, dtype=np.int64), _as_labels(labels)
    size = int(labels.max()) + 1 if len(labels) else 0
    in_split = np.flatnonzero(np.bincount(labels, minlength=size))
    draws = np.bincount(labels[ids], minlength=size)[in_split]
    most = np.lexsort((in_split, -draws))  # most drawn first, ties by species id
    least = np.lexsort((in_split, draws))
    out = {
        "samples": len(ids),
        "distinct_samples": int(np.unique(ids).size),
        "species": len(in_split),
        "species_seen": int((draws > 0).sum()),
        "draws_per_species": {
            "min": int(draws.min()) if len(draws) else 0,
            "median": float(np.median(draws)) if len(draws) else 0.0,
            "max": int(draws.max()) if len(draws) else 0,
        },
        "top": [{"species": int(in_split[i]), "draws": int(draws[i])} for i in most[:SUMMARY_SPECIES]],
        "bottom": [{"species": int(in_split[i]), "draws": int(draws[i])} for i in least[:SUMMARY_SPECIES]],
    }
    if stream_of is not None:
        found = np.asarray(stream_of, dtype=np.int64)[ids]
        values, counts = np.unique(found, return_counts=True)
        names = list(stream_names) if stream_names is not None else []

        def name(v: int) -> str:
            if v == NO_STREAM:
                return "(none)"
            return names[v] if v < len(names) else f"stream {v}"

        out["stream_shares"] = {
            name(int(v)): float(c) / max(len(ids), 1) for v, c in zip(values, counts, strict=True)
        }
    return out


# --------------------------------------------------------------------------------------------- steps
def _rng(seq: np.random.SeedSequence) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seq))


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    return labels


def _populations(n: int, streams_of: np.ndarray | None, cfg: SamplingConfig) -> list[np.ndarray]:
    """The sample ids each stream draws from (one population, every sample, without streams)."""
    if not cfg.streams:
        if streams_of is not None:
            raise ValueError("streams_of was given, but the sampling config has no streams")
        if n == 0:
            raise ConfigError("sampling: the split has no samples to draw from")
        return [np.arange(n, dtype=np.int64)]
    if streams_of is None:
        raise ValueError(f"the sampling config has {len(cfg.streams)} streams, but no streams_of was given")
    streams_of = np.asarray(streams_of)
    if streams_of.shape != (n,) or not np.issubdtype(streams_of.dtype, np.integer):
        raise ValueError(
            f"streams_of must be {n} integers, got {streams_of.dtype} of shape {streams_of.shape}"
        )
    if n and (streams_of.min() < NO_STREAM or streams_of.max() >= len(cfg.streams)):
        raise ValueError(
            f"streams_of must hold stream ids 0..{len(cfg.streams) - 1} or {NO_STREAM}, "
            f"got {int(streams_of.min())}..{int(streams_of.max())}"
        )
    members = [np.flatnonzero(streams_of == i) for i in range(len(cfg.streams))]
    for i, m in enumerate(members):
        if not len(m):
            raise ConfigError(
                f"sampling.streams[{i}] ({cfg.streams[i].name!r}): selects no sample of the split, so its "
                f"proportion "
                f"{cfg.streams[i].proportion:g} cannot be drawn"
            )
    return members


def _quotas(n: int, cfg: SamplingConfig) -> list[int | None]:
    """Draws per stream; None: the stream's own list as it is (repeat_factor without a size)."""
    if cfg.policy == "repeat_factor" and not cfg.streams and cfg.epoch_samples is None:
        return [None]
    total = cfg.epoch_samples or n
    proportions = [s.proportion for s in cfg.streams] or [1.0]
    return [int(q) for q in stream_quotas(proportions, total)]


def _species_weight(counts: np.ndarray, members: int, cfg: SamplingConfig) -> np.ndarray:
    """Each species' expected share of a stream's draws, unnormalised."""
    if cfg.policy == "repeat_factor":
        return np.maximum(counts, cfg.repeat_threshold * members).astype(np.float64)
    return counts.astype(np.float64) ** cfg.exponent


def _draw(
    members: np.ndarray, labels: np.ndarray, cfg: SamplingConfig, quota: int | None, rng, where: str
) -> np.ndarray:
    """One stream's draws (``where`` names it): ``quota`` ids, or the repeated list itself when
    ``quota`` is None."""
    if cfg.policy in ("class_balanced", "power"):
        return _weighted(members, labels, cfg.exponent, quota, rng)
    base = members
    if cfg.policy == "repeat_factor":
        base = _repeated(members, labels, cfg.repeat_threshold, rng, where)
    return base if quota is None else _resize(base, quota, rng)


def _weighted(members: np.ndarray, labels: np.ndarray, exponent: float, quota: int, rng) -> np.ndarray:
    """``quota`` draws with replacement: a species with probability ``count ** exponent / sum``, then a
    sample uniformly within it (two uniforms per draw, one sort of the members)."""
    order = np.argsort(labels, kind="stable")
    grouped, sorted_labels = members[order], labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_labels)])
    cdf = np.cumsum(counts.astype(np.float64) ** exponent)
    species = np.searchsorted(cdf, rng.random(quota) * cdf[-1], side="right")
    np.minimum(species, len(cdf) - 1, out=species)  # u * total rounded up to total
    size = counts[species]
    offset = (rng.random(quota) * size).astype(np.int64)
    np.minimum(offset, size - 1, out=offset)
    return grouped[starts[species] + offset]


def _repeated(members: np.ndarray, labels: np.ndarray, threshold: float, rng, where: str) -> np.ndarray:
    """Each member ``r = t / f`` times for a species of frequency ``f < t`` in the stream (``r`` rounded
    stochastically: floor, plus one with probability of the fraction), once otherwise."""
    m = len(members)
    _species, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    floor_count = threshold * m  # f < t  <=>  count < t * m
    growth = float(np.maximum(counts, floor_count).sum()) / m
    if growth > MAX_REPEAT_GROWTH:
        raise ConfigError(
            f"sampling.repeat_threshold: t={threshold:g} would repeat the {m:,} samples of {where} into "
            f"about {growth * m:,.0f} ({growth:,.0f} times as many, at most {MAX_REPEAT_GROWTH}); lower t "
            f"(near 1 / species = {1 / len(counts):.2g} lifts the species below the mean count)"
        )
    per_sample = counts[inverse]
    r = np.where(per_sample >= floor_count, 1.0, floor_count / per_sample)
    whole = np.floor(r)
    repeats = whole.astype(np.int64) + (rng.random(m) < r - whole)
    return np.repeat(members, repeats)


def _resize(base: np.ndarray, quota: int, rng) -> np.ndarray:
    """``quota`` ids from ``base``: whole copies, then a subset without replacement (mosaic streaming's
    way of filling a stream's share: no id more than once above the others)."""
    whole, rest = divmod(quota, len(base))
    parts = [np.tile(base, whole)] if whole else []
    parts.append(base[rng.choice(len(base), size=rest, replace=False)])
    return np.concatenate(parts)
