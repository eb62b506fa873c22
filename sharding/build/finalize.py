"""The sharder's last step: finished chunks -> published shards, logs and the manifest (idempotent).

Owns ``finalize``: content-hash dedup in global plan order (train, then val, then test: a copy in
train is kept, so identical bytes under two URLs never leak into evaluation; the index lives in
SQLite beside the work area, so finalizing 10^6 records needs no more memory than 10^4), then
near-duplicate dedup in the same order (``near_duplicates`` config, neardup.py: the same photograph
at another size or JPEG quality, or cropped; the perceptual hashes of all samples, whole image and
crops, are held in memory for the candidate search), both logged to ``duplicates.jsonl`` (reason
``same_content`` or ``near_duplicate`` with the Hamming ``distance`` and its ``match``: ``whole`` or
``crop``); work parts
renamed to their final names with a DALI ``.idx`` beside each; ``failures.jsonl``,
``duplicates.jsonl``, ``ATTRIBUTION.csv`` (attribution.py: the credits of every live sample, its
counts in the manifest's ``attribution``) and ``manifest.json`` committed together, the manifest last
(a shard listed there is complete); shards of an earlier, different plan removed.

All or nothing for readers: the published ``manifest.json`` is taken away before the first change to
the published shards (a rename over an old tar, a stale shard removed), and a tar's old ``.idx`` goes
before the tar is replaced. So a reader sees the old set whole, or no manifest (the loaders refuse to
start), or the new set whole; never an old manifest over partly replaced tars. A failure midway (a
full disk) is one line naming the stage and the file; the work area is kept, and a re-run finishes.

An incremental build (incremental.py) passes the shards it keeps: they seed the content index and the
near-duplicate search, and new parts get indices after theirs; placing a part at a new path does not
invalidate the published manifest (readers see nothing new until the manifest lists it), so v1 stays
readable until v2's manifest replaces it. Then, the new shards placed, the kept shards that now have
tombstones are rewritten without them (incremental.py's ``drop_tombstones``: the same saved, all or
nothing swap, the manifest removed before the first tar changes), so that the tars hold the live
samples only; with ``keep_tombstones`` they are listed as they are, with their tombstones.

Accounting: records in = sharded + failed + content duplicates (exact and near; the manifest's
``duplicates_by_reason`` splits them; ``sharded`` counts live samples, tombstones excluded),
checked before anything is committed.

Leaves out: running chunks (job.py), the format's rules (format.py).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from flora.errors import storage_error
from flora.io import sha256_file
from flora.sharding.build.attribution import write_attribution
from flora.sharding.build.incremental import Increment, drop_tombstones, live_samples
from flora.sharding.build.job import RESUME
from flora.sharding.build.plan import WORK_DIR, ChunkJob, load_marker
from flora.sharding.catalog.lineage import SPLITS_FILE
from flora.sharding.config import SPLIT_NAMES
from flora.sharding.format.schema import ATTRIBUTION, DUPLICATES, FAILURES, MANIFEST, shard_name, write_index
from flora.sharding.format.writer import drop_samples
from flora.sharding.images.neardup import NearDupConfig, hamming, hash_value, judge
from flora.sharding.outputs import OutputSet

#: The SQLite file of content hashes, in the work area (removed when finalize ends).
CONTENT_INDEX = "content.sqlite"


class ContentIndex:
    """sha256 -> the first sample with those bytes, in SQLite (flat memory at any catalog size)."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE seen (sha BLOB PRIMARY KEY, url TEXT, split TEXT, region TEXT, chunk TEXT)"
        )

    def first(self, sha256: str, url: str, split: str, region: str, chunk: str) -> dict | None:
        """None when these bytes are new (now recorded); else the sample that had them first."""
        row = (bytes.fromhex(sha256), url, split, region, chunk)
        if self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, ?)", row).rowcount:
            return None
        url, split, region, chunk = self.db.execute(
            "SELECT url, split, region, chunk FROM seen WHERE sha = ?", row[:1]
        ).fetchone()
        return {"image_url": url, "split": split, "region": region, "chunk": chunk}

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)


class _Publication:
    """The published set in ``out``: invalidated (its manifest removed) before its first change."""

    def __init__(self, out: Path):
        self.out = out
        self.invalidated = False
        self.writing: Path = out  # the file being written now, for a disk error's message

    def changing(self, path: Path) -> None:
        """Called before ``path`` (a published file) is replaced or removed."""
        if not self.invalidated:
            (self.out / MANIFEST).unlink(missing_ok=True)
            self.invalidated = True
        self.writing = path


def finalize(
    out: Path,
    jobs: list[ChunkJob],
    n_records: int,
    unreadable: list[dict],
    splits_dir: Path,
    run_stats: dict,
    release: dict | None = None,
    increment: Increment | None = None,
    keep_tombstones: bool = False,
) -> dict:
    """Dedups by content, moves parts to their final names, writes indexes, logs and the manifest;
    an ``OSError`` (a full disk) becomes one line naming the stage and the file.

    ``release``: the manifest's ``version``, ``parent`` and ``build_settings``; ``increment``: the
    kept shards of an incremental build (incremental.py), listed first; those with tombstones are
    rewritten without them (``drop_tombstones``) unless ``keep_tombstones``.
    """
    publication = _Publication(out)
    try:
        return _finalize(
            out,
            jobs,
            n_records,
            unreadable,
            splits_dir,
            run_stats,
            publication,
            release or {},
            increment,
            keep_tombstones,
        )
    except OSError as exc:
        raise storage_error("build: finalize", publication.writing, exc, RESUME) from exc
    except sqlite3.Error as exc:  # the content index beside the work area: "database or disk is full"
        code = errno.ENOSPC if "full" in str(exc) else errno.EIO
        path = out / WORK_DIR / CONTENT_INDEX
        raise storage_error("build: finalize", path, OSError(code, str(exc)), RESUME) from exc


def _finalize(
    out: Path,
    jobs: list[ChunkJob],
    n_records: int,
    unreadable: list[dict],
    splits_dir: Path,
    run_stats: dict,
    publication: _Publication,
    release: dict,
    increment: Increment | None,
    keep_tombstones: bool = False,
) -> dict:
    """Markers are read one at a time and the content index lives in SQLite beside the work area, so
    finalizing 10^6 records needs no more memory than 10^4, but for the near-duplicate search: 169
    bytes a sample (hash, content hash prefix, split, place, 9 crop hashes and their owner), ~150 MB
    at 900k, and the search's own ~560 MiB there (benchmarks/neardup.py). The near-duplicate settings
    are the build config's that every job carries.
    """
    failures: dict[str, dict] = {}  # by URL: a later round's outcome replaces an earlier failure
    duplicates, shards = [], list(increment.kept) if increment else []
    repeats = 0
    next_index: Counter = Counter()
    version = release.get("version")
    near_cfg = jobs[0].settings.cfg.near_duplicates if jobs else NearDupConfig(enabled=False)
    started = time.perf_counter()
    near = near_duplicates(jobs, near_cfg, increment.live if increment else ())
    run_stats["near_duplicates"] = {**asdict(near_cfg), "dropped": len(near),
                                    "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    content = ContentIndex(out / WORK_DIR / CONTENT_INDEX)
    if increment is not None:  # kept samples hold their bytes first; new shards go after old indices
        next_index.update({tuple(k.split("/")): v for k, v in increment.next_index.items()})
        for key, sha, url, split, region, chunk, *_hashes in increment.live:
            content.first(sha, url, split, region, chunk or key)
    try:
        for n, job in enumerate(jobs):
            marker = load_marker(job)
            by_key = {s["key"]: s for s in marker["samples"]}
            for failure in marker["failures"]:
                failures.pop(failure["image_url"], None)
                failures[failure["image_url"]] = failure
            for part in marker["parts"]:
                dropped = set()
                for key, label in zip(part["keys"], part["labels"], strict=True):
                    sample = by_key[key]
                    failures.pop(sample["image_url"], None)
                    first = content.first(
                        sample["sha256"], sample["image_url"], job.split, job.region, job.chunk_id
                    )
                    if first is None:
                        if (n, key) in near:  # an earlier kept sample is the same photograph
                            dropped.add(key)
                            duplicates.append(
                                {"reason": "near_duplicate", "image_url": sample["image_url"],
                                 "split": job.split, "region": job.region, "label": label,
                                 "sha256": sample["sha256"], **near[(n, key)]}
                            )  # fmt: skip
                        continue
                    if (
                        first["image_url"] == sample["image_url"]
                    ):  # the same record twice (never expected): shard it once
                        dropped.add(key)
                        repeats += 1
                    else:
                        dropped.add(key)
                        duplicates.append(
                            {"reason": "same_content", "image_url": sample["image_url"], "split": job.split,
                             "region": job.region, "label": label, "sha256": sample["sha256"],
                             "duplicate_of": first}
                        )  # fmt: skip
                shard = _place_part(out, job, part, dropped, next_index, publication)
                if shard is not None:
                    shards.append({**shard, "version": version, "tombstones": []})
    finally:
        content.close()
    for row in unreadable:
        failures[f"offset:{row['offset']}"] = row
    run_stats["repeated_records_dropped"] = repeats
    if increment is not None:  # tombstoned samples leave the tars too, unless the user keeps them
        new_shards = len(shards) - len(increment.kept)
        shards, done = drop_tombstones(out, shards, version, publication.changing, not keep_tombstones)
        run_stats["incremental"] = {
            **increment.stats(),
            "kept_shards": len(increment.kept) - len(done["shards_rewritten"]),  # byte for byte
            "tombstones": sum(len(s["tombstones"]) for s in shards),  # still in the tars
            "rewritten_shards": done["shards_rewritten"],
            "tombstones_dropped": done["samples_dropped"],
            "new_shards": new_shards,
        }
    reports = (shards, list(failures.values()), duplicates, n_records, splits_dir, run_stats)
    return _write_reports(out, *reports, publication, release)


def near_duplicates(
    jobs: list[ChunkJob], cfg: NearDupConfig, kept: Sequence = ()
) -> dict[tuple[int, str], dict]:
    """``(job index, sample key) -> {phash, distance, duplicate_of}`` of every near-duplicate to drop.

    Samples are judged in the order the content index sees them (jobs in order, samples in marker
    order), so the earliest split keeps its copy and a retry round never changes an earlier decision.
    A repeat of earlier bytes (same sha256) is left to the content index: it never reaches ``judge``.
    ``kept``: the live samples of an incremental build's kept shards (``Increment.live`` rows), judged
    first: a new sample near one of them is dropped; they are never dropped (their tars stay as they are).
    A row without crop hashes (an increment saved before them) is matched by its whole-image hash.
    """
    if not cfg.enabled:
        return {}
    phash, sha, split, where = array("Q"), array("Q"), array("B"), array("q")
    crops, crop_owner = array("Q"), array("q")  # 9 crop hashes a sample: 144 bytes with their owners

    def add(whole: str, crop_hashes: list[str] | str | None, sha256: str, split_name: str, place: int):
        if isinstance(crop_hashes, str):  # a kept sample's, joined (Increment.live)
            crop_hashes = [crop_hashes[i : i + 16] for i in range(0, len(crop_hashes), 16)]
        for crop in crop_hashes or ():  # none in an increment saved before crop hashes
            crops.append(hash_value(crop))
            crop_owner.append(len(phash))
        phash.append(hash_value(whole))
        sha.append(int(sha256[:16], 16))
        split.append(SPLIT_NAMES.index(split_name))
        where.append(place)

    for i, (_key, sha256, _url, split_name, _region, _chunk, kept_phash, *kept_crops) in enumerate(kept):
        if not kept_phash or not sha256:  # a tar from before the hash was recorded: content dedup only
            continue
        add(kept_phash, kept_crops[0] if kept_crops else None, sha256, split_name, -1 - i)  # < 0: kept
    for n, job in enumerate(jobs):
        for i, sample in enumerate(load_marker(job)["samples"]):
            add(sample["phash"], sample["phash_crops"], sample["sha256"], job.split, n << 32 | i)
    if not phash:
        return {}
    _, first = np.unique(np.frombuffer(sha, dtype=np.uint64), return_index=True)
    fresh = np.sort(first)  # the first sample with each content; later copies are content duplicates
    hashes = np.frombuffer(phash, dtype=np.uint64)[fresh]
    owner = np.frombuffer(crop_owner, dtype=np.int64)
    at = np.searchsorted(fresh, owner)  # the crop owners' places among the fresh samples
    judged = fresh[np.minimum(at, fresh.size - 1)] == owner
    verdicts = judge(hashes, np.frombuffer(split, dtype=np.uint8)[fresh], cfg.threshold, cfg.within_split,
                     np.frombuffer(crops, dtype=np.uint64)[judged], at[judged])  # fmt: skip
    located = np.frombuffer(where, dtype=np.int64)[fresh]

    def place(s: int) -> tuple[int, int]:  # (job index, sample index in its marker); (-1, i): kept
        located_s = int(located[s])
        return (-1, -1 - located_s) if located_s < 0 else divmod(located_s, 1 << 32)

    verdicts = {s: v for s, v in verdicts.items() if place(s)[0] >= 0}  # kept tars are never changed
    wanted: dict[int, dict[int, dict]] = defaultdict(dict)
    for s, (of, _) in verdicts.items():
        for n, i in (place(s), place(of)):
            wanted[n][i] = {}
    for n, samples in wanted.items():  # only the markers involved are read again, for keys and URLs
        if n < 0:
            for i in samples:
                key, _sha, url, split_name, region, chunk, kept_phash, *_crops = kept[i]
                samples[i] = {"key": key, "image_url": url, "split": split_name, "region": region,
                              "chunk": chunk, "phash": kept_phash}  # fmt: skip
            continue
        job, listed = jobs[n], load_marker(jobs[n])["samples"]
        for i in samples:
            samples[i] = {**listed[i], "split": job.split, "region": job.region, "chunk": job.chunk_id}
    found = {}
    for s, (of, distance) in verdicts.items():
        (n, i), (m, j) = place(s), place(of)
        this, kept = wanted[n][i], wanted[m][j]
        whole = hamming(int(hashes[s]), int(hashes[of])) == distance
        found[(n, this["key"])] = {
            "phash": this["phash"],
            "distance": distance,
            "match": "whole" if whole else "crop",  # whole-image hashes, or one's whole and a crop's
            "duplicate_of": {k: kept[k] for k in ("image_url", "split", "region", "chunk", "phash")},
        }
    return found


def _place_part(
    out: Path, job: ChunkJob, part: dict, dropped: set[str], next_index: Counter, publication: _Publication
) -> dict | None:
    work = job.work_dir / part["name"]
    remaining = part["samples"] - len(dropped)
    if remaining == 0:
        work.unlink(missing_ok=True)
        return None
    stream = (job.split, job.region)
    index = next_index[stream]
    next_index[stream] += 1
    final = out / shard_name(job.split, job.region, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    if work.exists():
        if dropped:
            publication.writing = work
            drop_samples(work, dropped)
        if final.exists():  # a rename over a published tar; a new path changes nothing readers see
            publication.changing(final)
        publication.writing = final
        final.with_suffix(".idx").unlink(missing_ok=True)  # never an old plan's index beside the new tar
        os.replace(work, final)
    elif not final.exists():
        raise RuntimeError(f"{work} and {final} are both missing; remove {out / WORK_DIR} and run again")
    publication.writing = final.with_suffix(".idx")
    write_index(final, None if dropped else part["index"])
    keep = [i for i, k in enumerate(part["keys"]) if k not in dropped]
    labels = [part["labels"][i] for i in keep]
    return {
        "path": str(final.relative_to(out)),
        "split": job.split,
        "region": job.region,
        "samples": remaining,
        "bytes": final.stat().st_size,
        "sha256": part["sha256"] if not dropped else sha256_file(final),
        "classes": sorted(set(labels)),
        "licenses": dict(sorted(Counter(part["license_classes"][i] for i in keep).items())),
        "chunk": job.chunk_id,
    }


def _write_reports(
    out: Path,
    shards: list[dict],
    failures: list[dict],
    duplicates: list[dict],
    n_records: int,
    splits_dir: Path,
    run_stats: dict,
    publication: _Publication,
    release: dict,
) -> dict:
    listed = {out / s["path"] for s in shards}
    for split in SPLIT_NAMES:  # shards of an earlier, different plan
        for stale in sorted((out / split).glob("*/*.tar")) if (out / split).is_dir() else []:
            if stale not in listed:
                publication.changing(stale)
                stale.unlink()
                stale.with_suffix(".idx").unlink(missing_ok=True)
    totals: dict = defaultdict(lambda: defaultdict(lambda: {"shards": 0, "samples": 0, "bytes": 0}))
    for s in shards:
        t = totals[s["split"]][s["region"]]
        t["shards"] += 1
        t["samples"] += live_samples(s)
        t["bytes"] += s["bytes"]
    sharded = sum(live_samples(s) for s in shards)  # tombstoned samples are not served
    accounting = {
        "records_in": n_records,
        "sharded": sharded,
        "failed": len(failures),
        "content_duplicates": len(duplicates),
        "ok": n_records == sharded + len(failures) + len(duplicates),
    }
    by_reason = dict(sorted(Counter(d["reason"] for d in duplicates).items()))
    manifest = {
        "shards": shards,
        "totals": {split: dict(sorted(regions.items())) for split, regions in totals.items()},
        "accounting": accounting,
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "duplicates_by_reason": by_reason,  # same_content, near_duplicate: together content_duplicates
        "class_mapping": "class_mapping.json",
        "splits_sha256": run_stats["splits_sha256"],  # --retry-failed checks it against the catalog
        "retry_rounds": run_stats["retry_rounds"],  # rounds finalized; a later one is unfinished
        "last_run": run_stats,
        **release,  # version, parent, build_settings (incremental.py)
    }
    publication.writing = out / f"{MANIFEST} (and the logs beside it)"
    with OutputSet(out) as outputs:
        for mapping in sorted(splits_dir.glob("class_mapping*.json")):
            outputs.json(mapping.name, json.loads(mapping.read_text(encoding="utf-8")))
        outputs.jsonl(FAILURES, failures)
        outputs.jsonl(DUPLICATES, duplicates)
        with outputs._open(ATTRIBUTION) as fh:  # streamed rows: OutputSet has no public writer for them
            credits = write_attribution(fh, out, shards, splits_dir / SPLITS_FILE, out / WORK_DIR)
        manifest["attribution"] = {"file": ATTRIBUTION, **credits}
        if not accounting["ok"]:  # a bug, not bad input: raised inside, so nothing is committed
            raise AssertionError(f"sharder accounting broken: {accounting}")
        outputs.json(MANIFEST, manifest)
    return manifest
