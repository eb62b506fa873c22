"""Incremental builds: a new catalog version over the shards of an earlier one, and ``--compact``.

Owns:

* **When a build is incremental** (``plan_increment``): the output holds a manifest whose version
  (the ``splits_sha256`` of the catalog it was built from) is in the new catalog's lineage
  (``catalog_version.json``, lineage.py) and whose ``build_settings`` (seed, shard, image,
  download-policy and near-duplicate settings, the sample format: fields may have been added since)
  equal this build's. A re-run with
  the same splits stays today's resume; any other case starts a fresh plan.
* **The increment** (saved as ``_work/increment.json`` before any job runs, so that a crash, or a
  re-run after success, reuses it instead of comparing again against a manifest that may already be
  the new one): every published shard is verified against its manifest sha256 and read (its samples'
  ``json`` members, through the shard format's reader: format/reader.py). A sample stays *live* when
  the new catalog has its record (same sample key, split, region and label); otherwise its key becomes
  a **tombstone** of that shard (removed records, and relabelled ones: removed + new). Shards without
  tombstones are never rewritten. A shard whose sha256 no longer matches is not kept: its records are
  planned again (rebuilt from the cache or the network), it is listed in ``incremental.rebuilt_shards``
  and removed at publication.
* **What is planned**: every record of the new catalog that is not live in a kept shard: new records,
  relabelled ones, and those that failed or were content duplicates last time (they come back from
  the cache, negative entries included, so they fail or dedup again without a request: accounting
  stays ``records in = sharded + failed + duplicates``). They become chunks ``from<parent>-NNNNNN``
  (plan.py), written to shard indices after the highest index each stream had.
* **Tombstones leave the tars** (``drop_tombstones``, called by finalize.py once the new shards are
  placed): the kept shards with tombstones are rewritten from their own bytes without them, so that any
  WebDataset reader (webdataset, wids, DALI over the ``.idx`` files) gets each live sample once, with
  its current label. The swap is planned and saved first (``_work/tombstones.json``, kept with the
  work area), the manifest is removed before the first tar changes and the new one written last; a
  re-run finishes an interrupted swap and finds a finished one done. ``--keep-tombstones`` leaves them
  in the tars (Flora's loaders skip them; ``--compact`` later drops them).
* **Compaction** (``compact``, ``flora build --compact``): shards with tombstones are rewritten without
  them (writer.drop_samples on a copy in the work area), then published all or nothing: the plan of
  the swap is saved first (``_work/compact.json``), the manifest is removed before the first tar is
  replaced and the new one written last, so a crash leaves no manifest (loaders refuse) and a re-run
  of ``--compact`` finishes the swap.

Dedup against kept shards: their live samples' sha256s seed finalize's content index and their
perceptual hashes (whole and crops; computed from the stored JPEG for a tar written before they were
stored: ``stored_hashes``, once per increment, which saves them) are judged first by the near-duplicate
search, so a new sample that repeats a kept one is dropped as a full build would; the one
difference: where a full build would keep the copy in an earlier split (a new train sample near a
kept test sample), the kept one stays and the new one goes.

Leaves out: running chunks (job.py), placing new parts and writing the manifest (finalize.py), and
reading manifests and tars (format/: schema.py, reader.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flora.errors import FloraError, storage_error
from flora.io import sha256_file
from flora.sharding.build.plan import WORK_DIR
from flora.sharding.catalog.lineage import VERSION_FILE
from flora.sharding.catalog.records import url_key
from flora.sharding.format.reader import tar_samples
from flora.sharding.format.schema import (
    MANIFEST,
    SampleMeta,
    ShardFormatError,
    read_manifest,
    safe_key,
    write_index,
)
from flora.sharding.format.writer import drop_samples
from flora.sharding.images.neardup import perceptual_hashes
from flora.sharding.outputs import OutputSet, dumps

INCREMENT_FILE = "increment.json"
COMPACT_FILE = "compact.json"
COMPACT_DIR = "compact"
#: An incremental build's own compaction (``drop_tombstones``): its saved swap and its staged copies.
TOMBSTONES_FILE = "tombstones.json"
TOMBSTONES_DIR = "tombstones"


@dataclass
class Increment:
    """What an incremental build keeps from the published build it grows (see module docstring)."""

    parent: str  # the version (splits sha256) of the manifest grown from
    kept: list[dict]  # its shard entries kept byte for byte, each with "tombstones" and "version"
    #: [key, sha256, image_url, split, region, chunk, phash, crop hashes (joined: one str, 144 hex digits,
    #: a third of a list's memory at 900k samples)] of each live kept sample
    live: list[list]
    next_index: dict[str, int]  # "split/region" -> first index for new shards (after every old one)
    rebuilt_shards: list[str] = field(default_factory=list)  # failed their sha256: records re-planned
    new_tombstones: int = 0  # samples tombstoned by this version

    @property
    def prefix(self) -> str:
        return f"from{self.parent[:8]}-"

    def live_keys(self) -> set[str]:
        return {row[0] for row in self.live}

    def stats(self) -> dict:
        return {
            "parent": self.parent,
            "kept_shards": len(self.kept),
            "live_kept_samples": len(self.live),
            "tombstones": sum(len(s["tombstones"]) for s in self.kept),
            "new_tombstones": self.new_tombstones,
            "rebuilt_shards": self.rebuilt_shards,
        }


def build_settings(fingerprint: dict) -> dict:
    """The plan fingerprint without the catalog: what must be unchanged for shards to be kept."""
    return json.loads(json.dumps({k: v for k, v in fingerprint.items() if k != "splits_sha256"}))


def manifest_version(manifest: dict) -> str | None:
    return manifest.get("version") or manifest.get("splits_sha256")


def plan_increment(out: Path, splits_dir: Path, fingerprint: dict) -> Increment | None:
    """The saved increment of this work area, or a new one when the build is incremental, else None.

    The caller has already cleared a work area of another plan, so a saved increment is this plan's.
    """
    saved = out / WORK_DIR / INCREMENT_FILE
    if saved.is_file():
        return Increment(**json.loads(saved.read_text(encoding="utf-8")))
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_manifest(out).raw
    parent = manifest_version(manifest)
    version = fingerprint["splits_sha256"]
    if not _same_settings(manifest.get("build_settings"), build_settings(fingerprint)):
        return None  # another seed, shard or image setting: nothing published can be kept
    if parent == version and not manifest.get("parent"):
        return None  # the same catalog over a full build: the ordinary resume
    if f"sha256:{parent}" not in catalog_lineage(splits_dir):
        return None  # not an earlier version of this catalog
    increment = _compare(out, manifest, splits_dir / "dataset_splits.jsonl", parent)
    if parent == version:  # this version's own manifest, its work area gone (--compact): its parent stays
        increment.parent = manifest["parent"]
    tmp = saved.with_name(saved.name + ".tmp")
    tmp.write_text(dumps(asdict(increment)), encoding="utf-8")
    os.replace(tmp, saved)  # the plan now holds: a re-run reuses it
    return increment


def _same_settings(published: dict | None, wanted: dict) -> bool:
    """Equal settings; but for the sample format, which may have gained fields since, wherever they
    were added (an older sample reads them as None: ``SampleMeta.from_json``; the perceptual hashes are
    computed then; the credits come from the catalog: attribution.py); a field removed is not."""
    if not isinstance(published, dict) or "sample_meta" not in wanted:
        return published == wanted
    older, newer = published.get("sample_meta"), wanted["sample_meta"]
    added = isinstance(older, list) and set(older) <= set(newer)
    return added and {**published, "sample_meta": newer} == wanted


def catalog_lineage(splits_dir: Path) -> list[str]:
    path = splits_dir / VERSION_FILE
    if not path.is_file():
        return []
    try:
        lineage = json.loads(path.read_text(encoding="utf-8")).get("lineage", [])
    except (ValueError, AttributeError):
        return []
    return lineage if isinstance(lineage, list) else []


def _wanted(splits_path: Path) -> dict[str, tuple]:
    """Sample key -> (split, region, label) of every readable record of the new catalog."""
    wanted = {}
    with open(splits_path, "rb") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                wanted[safe_key(url_key(row["image_url"]))] = (row["split"], row["region"], row["label"])
            except (ValueError, KeyError, TypeError):
                continue  # plan_jobs refuses or counts damaged lines
    return wanted


def shard_samples(tar: Path) -> list[tuple[str, SampleMeta]]:
    """(key, json meta) of each sample of a tar, read by its index's offsets (by its headers without
    an index: a tar rewritten by ``drop_samples``)."""
    out = []
    for sample in tar_samples(tar, ("json",)):
        if sample.meta is None:
            raise ShardFormatError(f"{tar}: sample {sample.key} has no json member")
        out.append((sample.key, sample.meta))
    return out


def stored_hashes(tar: Path, keys: set[str]) -> dict[str, tuple[str, list[str]]]:
    """``key -> perceptual_hashes`` of the stored JPEG of each of ``keys`` in a published tar."""
    return {s.key: perceptual_hashes(s.jpg) for s in tar_samples(tar, ("jpg",), keys) if s.jpg is not None}


def _index_of(path: str) -> int:
    return int(Path(path).stem.rsplit("-", 1)[1])


def _compare(out: Path, manifest: dict, splits_path: Path, parent: str) -> Increment:
    wanted = _wanted(splits_path)
    kept, live, rebuilt, claimed = [], [], [], set()
    next_index: Counter = Counter()
    new_tombstones = 0
    for entry in manifest.get("shards", []):
        stream = f"{entry['split']}/{entry['region']}"
        next_index[stream] = max(next_index[stream], _index_of(entry["path"]) + 1)
        tar = out / entry["path"]
        if not tar.is_file() or sha256_file(tar) != entry.get("sha256"):
            rebuilt.append(entry["path"])  # never silently reused: its records are planned again
            continue
        old = set(entry.get("tombstones", []))
        tombstones = sorted(old)
        unhashed = {}  # live samples of a tar written before (crop) hashes were stored
        for key, meta in shard_samples(tar):
            if key in old:
                continue
            if key not in claimed and wanted.get(key) == (entry["split"], entry["region"], meta.label):
                claimed.add(key)
                where = [entry["split"], entry["region"], entry.get("chunk")]
                crops = "".join(meta.phash_crops) if meta.phash_crops is not None else None
                live.append([key, meta.sha256, meta.image_url, *where, meta.phash, crops])
                if not meta.phash or meta.phash_crops is None:
                    unhashed[key] = live[-1]
            else:
                tombstones.append(key)
                new_tombstones += 1
        if unhashed:  # a function of the stored bytes, as job.py computes it for an old cache entry
            for key, (phash, crops) in stored_hashes(tar, set(unhashed)).items():
                unhashed[key][6:8] = [phash, "".join(crops)]
        kept.append({**entry, "tombstones": sorted(tombstones), "version": entry.get("version") or parent})
    return Increment(parent, kept, live, dict(sorted(next_index.items())), rebuilt, new_tombstones)


# -------------------------------------------------------------------------------------------- compact
class CompactError(FloraError, ValueError):
    """``--compact`` cannot run on this folder; the message says why."""


def compact(out: Path) -> dict:
    """Rewrites the shards with tombstones without those samples and publishes the result all or
    nothing (module docstring); returns the new manifest. The caller holds the output lock. An
    ``OSError`` (a full disk) becomes one line naming the file; a re-run finishes the compaction."""
    try:
        return _compact(out)
    except OSError as exc:
        raise storage_error("build --compact", out, exc, "run --compact again to finish") from exc


def _compact(out: Path) -> dict:
    work = out / WORK_DIR
    plan_path = work / COMPACT_FILE
    if not plan_path.is_file():
        if not (out / MANIFEST).is_file():
            raise CompactError(f"--compact: no {MANIFEST} in {out} (build first)")
        plan = _plan_compaction(out, read_manifest(out).raw)
        if not plan["moves"]:
            return plan["manifest"]  # no tombstones: nothing to rewrite
        tmp = plan_path.with_name(plan_path.name + ".tmp")
        tmp.write_text(dumps(plan), encoding="utf-8")
        os.replace(tmp, plan_path)  # from here a re-run finishes this swap
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    (out / MANIFEST).unlink(missing_ok=True)  # before the first published tar changes
    _swap(out, plan["moves"], lambda _path: None)
    with OutputSet(out) as outputs:
        outputs.json(MANIFEST, plan["manifest"])
    # the work area's increment described the shards before compaction: a re-run starts afresh
    shutil.rmtree(work, ignore_errors=True)
    return plan["manifest"]


def _plan_compaction(out: Path, manifest: dict) -> dict:
    staging = out / WORK_DIR / COMPACT_DIR
    staging.mkdir(parents=True, exist_ok=True)
    shards, moves, dropped = [], [], 0
    for entry in manifest["shards"]:
        if not entry.get("tombstones"):
            shards.append(entry)
            continue
        dropped += len(entry["tombstones"])
        rewritten, move = _stage_without(out, entry, staging, manifest_version(manifest))
        shards += [rewritten] if rewritten else []
        moves.append(move)
    done = {"shards_rewritten": len(moves), "samples_dropped": dropped}
    new = {**manifest, "shards": shards, "compacted": done}
    new["totals"] = _totals(shards)
    return {"manifest": new, "moves": moves}


def _stage_without(out: Path, entry: dict, staging: Path, version: str | None) -> tuple[dict | None, list]:
    """A copy of ``entry``'s published tar in ``staging`` without its tombstoned samples: its new manifest
    entry (None when no sample is left) and its move ``[staged path in the work area or None, final]``."""
    copy = staging / Path(entry["path"]).name
    shutil.copyfile(out / entry["path"], copy)
    if drop_samples(copy, set(entry["tombstones"])) == 0:
        copy.unlink()
        return None, [None, entry["path"]]
    metas = [meta for _key, meta in shard_samples(copy)]
    rewritten = {
        **entry, "samples": len(metas), "bytes": copy.stat().st_size, "sha256": sha256_file(copy),
        "classes": sorted({m.label for m in metas}), "tombstones": [], "version": version,
        "licenses": dict(sorted(Counter(m.license_class for m in metas).items())),
    }  # fmt: skip
    return rewritten, [str(copy.relative_to(out / WORK_DIR)), entry["path"]]


def _swap(out: Path, moves: list[list], changing: Callable[[Path], None]) -> None:
    """Puts each staged copy in place of its published tar (a ``None`` copy: the tar goes), its ``.idx``
    written again from the new tar. ``changing(path)`` is called before a published file changes (the
    caller's manifest goes first). Idempotent: a move already made (its copy gone) only gets its index
    back if a crash took it, so a re-run finishes an interrupted swap and changes nothing after one."""
    work = out / WORK_DIR
    for staged, final in moves:
        final = out / final
        if staged is None:  # every sample was tombstoned: the shard goes
            if final.exists() or final.with_suffix(".idx").exists():
                changing(final)
                final.with_suffix(".idx").unlink(missing_ok=True)
                final.unlink(missing_ok=True)
            continue
        if (work / staged).exists():
            changing(final)
            final.with_suffix(".idx").unlink(missing_ok=True)  # never the old index beside the new tar
            os.replace(work / staged, final)
        if not final.with_suffix(".idx").exists():
            changing(final)
            write_index(final)


def drop_tombstones(
    out: Path, shards: list[dict], version: str, changing: Callable[[Path], None], plan_new: bool = True
) -> tuple[list[dict], dict]:
    """An incremental build's compaction (finalize.py, after the new shards are placed, before the
    manifest): each shard of ``shards`` with tombstones is rewritten from its own bytes without them, so
    that every WebDataset reader of the folder (webdataset, wids, DALI with the ``.idx`` files) gets the
    live samples only; shards without tombstones are not touched.

    The swap is planned once (``_work/tombstones.json``: staged copies, their entries) and kept with the
    work area, so a re-run after a crash at any point finishes it, and a re-run after success sees the
    swap done; ``changing`` (finalize's publication) removes the manifest before the first tar changes.
    ``plan_new`` false (``--keep-tombstones``): no new swap is planned (a saved one is still finished:
    it describes the tars on disk). Returns the shards as published and ``{shards_rewritten: [paths],
    samples_dropped}``.
    """
    plan_path = out / WORK_DIR / TOMBSTONES_FILE
    if not plan_path.is_file():
        if not plan_new or not any(s.get("tombstones") for s in shards):
            return shards, {"shards_rewritten": [], "samples_dropped": 0}
        staging = out / WORK_DIR / TOMBSTONES_DIR
        staging.mkdir(parents=True, exist_ok=True)
        entries, moves = {}, []
        for entry in (s for s in shards if s.get("tombstones")):
            entries[entry["path"]], move = _stage_without(out, entry, staging, version)
            moves.append(move)
        dropped = sum(len(s["tombstones"]) for s in shards if s["path"] in entries)
        tmp = plan_path.with_name(plan_path.name + ".tmp")
        plan = {"entries": entries, "moves": moves, "samples_dropped": dropped}
        tmp.write_text(dumps(plan), encoding="utf-8")
        os.replace(tmp, plan_path)  # from here every re-run of this plan finishes this swap
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    _swap(out, plan["moves"], changing)
    entries = plan["entries"]
    published = [entries.get(s["path"], s) for s in shards]  # a None entry: the shard went
    done = {"shards_rewritten": sorted(entries), "samples_dropped": plan["samples_dropped"]}
    return [s for s in published if s is not None], done


def live_samples(entry: dict) -> int:
    """Samples of a manifest entry that readers get: its samples less its tombstones."""
    return entry["samples"] - len(entry.get("tombstones", []))


def _totals(shards: list[dict]) -> dict:
    totals: dict = {}
    for s in shards:
        t = totals.setdefault(s["split"], {}).setdefault(s["region"], {"shards": 0, "samples": 0, "bytes": 0})
        t["shards"] += 1
        t["samples"] += live_samples(s)
        t["bytes"] += s["bytes"]
    return {split: dict(sorted(regions.items())) for split, regions in sorted(totals.items())}
