"""The sharder's plan: catalog splits -> chunk jobs, deterministic and resumable.

Owns ``ChunkJob`` (one planned shard: records of one ``(split, region)`` stream, by byte offset into
the splits file, with the ``JobSettings`` every job of a build carries; ``load_marker`` reads the
marker of a finished one), ``plan_jobs`` (each stream ordered by ``sha256(seed, url key)``, the seeded
shuffle, and cut into chunks of ``shards.max_samples`` records; only offsets are held, ~16 bytes a
record), ``chunk_stream`` (the one chunking rule, shared by plans and retry rounds), retry rounds
(``--retry-failed``: the records of ``failures.jsonl`` as new chunks, saved so that a crash resumes
the round instead of planning it again) and the work area's fingerprint (another catalog or config
makes the work area unusable).

Leaves out: running a job (job.py), assembling shards (finalize.py).
"""

from __future__ import annotations

import json
import re
from array import array
from collections import defaultdict
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from flora.config import ConfigError
from flora.errors import FloraError
from flora.io import read_jsonl, sha256_file
from flora.sharding.catalog.records import url_key
from flora.sharding.catalog.split import seeded_rank
from flora.sharding.config import SPLIT_NAMES, BuildConfig
from flora.sharding.format.schema import MANIFEST, SampleMeta, safe_key
from flora.sharding.outputs import dumps

WORK_DIR = "_work"
MARKER = "chunk.json"
PLAN_FILE = "plan.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
#: Download settings that decide whether a URL fails (a negative cache entry is only valid for
#: the same ones: a URL refused under one allow-list is retried under another).
FAILURE_POLICY_KEYS = ("allow_networks", "max_bytes", "max_redirects")


@dataclass(frozen=True)
class JobSettings:
    """What every chunk job of one build carries besides its records: the build config, the splits
    file's sha256 (the catalog version being built) and, for an object-store output (remote.py), the
    output's URL and the driver's node token (with them a job on another node works in its own staging
    folder, reads the splits from the store and ships its chunk there)."""

    cfg: BuildConfig
    splits_sha256: str
    remote: str | None = None
    driver_token: str = ""


@dataclass
class ChunkJob:
    """One planned shard: records of one stream, by byte offset into the splits file."""

    chunk_id: str
    split: str
    region: str
    splits_path: str
    out_dir: str
    offsets: Sequence[int]  # a numpy int64 array when planned, a list when loaded from a retry round
    settings: JobSettings
    use_negative_cache: bool = True  # False in a retry round: it re-attempts the URLs that failed

    @property
    def work_dir(self) -> Path:
        return Path(self.out_dir) / WORK_DIR / self.split / self.region / self.chunk_id

    @property
    def size(self) -> int:
        return len(self.offsets)


#: The fields of a job that a retry round's job file holds (the settings are the running build's).
SAVED_FIELDS = ("chunk_id", "split", "region", "splits_path", "out_dir", "offsets", "use_negative_cache")


def load_marker(job: ChunkJob) -> dict | None:
    """The job's ``chunk.json`` (job.py writes it last); None while the chunk is unfinished or damaged."""
    path = job.work_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged marker: redo the chunk


def stream_order(stream: tuple[str, str]) -> tuple[int, str]:
    """Streams in global plan order: train, val, test; regions by name."""
    return SPLIT_NAMES.index(stream[0]), stream[1]


def chunk_stream(
    split: str,
    region: str,
    offsets: Sequence[int],
    splits_path,
    out_dir,
    settings: JobSettings,
    prefix: str,
    use_negative_cache: bool = True,
) -> list[ChunkJob]:
    """One stream's records (in plan order) cut into chunks of ``shards.max_samples``: ``<prefix>NNNNNN``
    each."""
    per = settings.cfg.shards.max_samples
    return [
        ChunkJob(
            f"{prefix}{c:06d}",
            split,
            region,
            str(splits_path),
            str(out_dir),
            offsets[start : start + per].copy(),
            settings,
            use_negative_cache,
        )
        for c, start in enumerate(range(0, len(offsets), per))
    ]


def image_fingerprint(cfg) -> str:
    """Cache keys include the image settings: a resize change must not reuse old bytes."""
    import hashlib

    return hashlib.sha256(dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def failure_policy(cfg) -> str:
    """The download settings a cached failure depends on, as a short fingerprint."""
    import hashlib

    policy = {k: getattr(cfg, k) for k in FAILURE_POLICY_KEYS}
    return hashlib.sha256(dumps(policy, sort_keys=True).encode()).hexdigest()[:12]


def plan_fingerprint(splits_path: Path, cfg: BuildConfig) -> dict:
    """What the work area was planned from; another value means nothing in it can be reused."""
    return {
        "splits_sha256": sha256_file(splits_path),
        "seed": cfg.seed,
        "shards": asdict(cfg.shards),
        "images": image_fingerprint(cfg.images),
        "download_policy": failure_policy(cfg.download),  # a new allow-list re-attempts everything
        # other opt-out directives judge every image again (opted_out failures are not final)
        "opt_out": sorted(cfg.download.opt_out_directives),
        # finalize drops near-duplicates from the work parts for good: other settings start afresh
        "near_duplicates": asdict(cfg.near_duplicates),
        "sample_meta": [f.name for f in fields(SampleMeta)],  # parts of an older format are not reused
    }


class DamagedSplitsError(FloraError, ValueError):
    """A line of the catalog's splits file is not the record the catalog writes: the file was damaged."""


def plan_jobs(
    splits_path: Path, out_dir: Path, settings: JobSettings, exclude: Container[str] = (), prefix: str = ""
) -> tuple[list[ChunkJob], int, list[dict]]:
    """Chunks every stream of the splits file; returns (jobs in global order, records, unreadable rows).
    Every job carries ``settings`` (its build config: seed, chunk size, ``allow_damaged_splits``).

    ``exclude``: sample keys (``safe_key``) already sharded (an incremental build's kept shards,
    incremental.py): counted as records but not planned; ``prefix`` names the chunks of such a plan.

    The file is the catalog's own output, so an unreadable line means it was damaged (truncated,
    edited, a disk fault): refused with the line's number, unless ``cfg.allow_damaged_splits``, where
    each such line becomes a counted ``bad_record`` failure.
    """
    import numpy as np

    cfg = settings.cfg
    # 8 bytes a record for the rank and 8 for the offset: the plan's memory stays flat
    ranks: dict[tuple[str, str], array] = defaultdict(lambda: array("Q"))
    offsets: dict[tuple[str, str], array] = defaultdict(lambda: array("q"))
    unreadable: list[dict] = []
    n = 0
    with open(splits_path, "rb") as fh:
        offset = 0
        for line_no, line in enumerate(fh, 1):
            here, offset = offset, offset + len(line)
            if not line.strip():
                continue
            n += 1
            row = None
            try:
                row = json.loads(line)
                split, region, url = row["split"], row["region"], row["image_url"]
                if split not in SPLIT_NAMES or not _SAFE_NAME.fullmatch(str(region)):
                    raise ValueError(f"split {split!r} / region {region!r} is not a valid stream")
            except (ValueError, KeyError, TypeError) as exc:
                if not cfg.allow_damaged_splits:
                    raise DamagedSplitsError(
                        f"{splits_path} line {line_no} is damaged ({_why(exc)}); expected a JSON record with"
                        " split, region and image_url as the catalog writes it: re-run the catalog, or pass"
                        " --allow-damaged-splits to count such lines as bad_record failures"
                    ) from None
                known = row if isinstance(row, dict) else {}
                unreadable.append(
                    {"offset": here, "line": line_no, "image_url": known.get("image_url"),
                     "split": known.get("split"), "region": known.get("region"), "reason": "bad_record",
                     "message": str(exc)[:300]}
                )  # fmt: skip
                continue
            if exclude and safe_key(url_key(url)) in exclude:
                continue
            stream = (split, region)
            ranks[stream].append(int.from_bytes(seeded_rank(cfg.seed, url_key(url))[:8], "big"))
            offsets[stream].append(here)
    jobs = []
    for split, region in sorted(ranks, key=stream_order):
        order = np.argsort(np.frombuffer(ranks[(split, region)], dtype=np.uint64), kind="stable")
        offs = np.frombuffer(offsets[(split, region)], dtype=np.int64)[order]
        jobs += chunk_stream(split, region, offs, splits_path, out_dir, settings, prefix)
        del ranks[(split, region)], offsets[(split, region)]
    return jobs, n, unreadable


def _why(exc: Exception) -> str:
    """A short reason for a damaged line: json's message, or the missing key."""
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} key"
    if isinstance(exc, TypeError):
        return "not a JSON object"
    return str(exc)[:120]


def retry_rounds(out: Path, settings: JobSettings) -> list[ChunkJob]:
    """Chunk jobs of earlier ``--retry-failed`` rounds, from their saved job files, in round order."""
    jobs = []
    for path in sorted((out / WORK_DIR).glob("retry-round-*.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))
        # files of earlier versions also hold the run's settings (always empty there): not read
        jobs.extend(
            ChunkJob(**{k: row[k] for k in SAVED_FIELDS if k in row}, settings=settings) for row in rows
        )
    return jobs


def new_retry_round(out: Path, splits_path: Path, settings: JobSettings) -> list[ChunkJob]:
    """Plans and saves a ``--retry-failed`` round: the records of ``failures.jsonl`` (but unreadable
    lines) as new chunks ``retryNN-NNNNNN``, negative cache bypassed; none while an earlier round is
    unfinished (it is resumed). Refuses failures of another catalog than ``settings.splits_sha256``."""
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("splits_sha256") != settings.splits_sha256:
        raise ConfigError(
            f"--retry-failed: {out}/failures.jsonl belongs to another catalog than {splits_path}; "
            "run a full build first"
        )
    rounds = sorted((out / WORK_DIR).glob("retry-round-*.json"))
    if len(rounds) > manifest.get("retry_rounds", 0):
        return []  # the last round never finished: it is resumed (see retry_rounds), not planned again
    failures = [
        f for f in read_jsonl(out / "failures.jsonl") if "split" in f and f.get("reason") != "bad_record"
    ]
    round_no = len(rounds) + 1
    by_stream: dict[tuple[str, str], list[int]] = defaultdict(list)
    for f in failures:
        by_stream[(f["split"], f["region"])].append(f["offset"])
    jobs = []
    for stream in sorted(by_stream, key=stream_order):
        offs = by_stream[stream]
        jobs += chunk_stream(
            *stream, offs, splits_path, out, settings, f"retry{round_no:02d}-", use_negative_cache=False
        )
    saved = [{**{k: getattr(j, k) for k in SAVED_FIELDS}, "offsets": list(map(int, j.offsets))} for j in jobs]
    (out / WORK_DIR / f"retry-round-{round_no:03d}.json").write_text(json.dumps(saved), encoding="utf-8")
    return jobs
