"""Shards in object storage: ``flora build --out s3://bucket/prefix`` (flora/store.py does the requests).

Owns the three steps that make an object-store output keep the local guarantees:

* **Staging** (``prepare``): the build runs exactly as a local one, in a *staging* folder that mirrors
  the output on the driver's node: ``<cache root>/staging/<id>`` (cache/derived.py: ``$FLORA_CACHE_DIR``,
  else ``~/.cache/flora``; ``id``: the first 16 hex digits of the URL's sha256). The plan, chunk
  markers, increment and retry rounds live there, so resume, incremental builds, ``--retry-failed`` and
  ``--compact`` work unchanged. Before anything else the bucket is checked (a missing bucket, refused
  credentials, an unreachable endpoint: one line, exit 2, nothing written) and so is the prefix: a
  manifest of another data set there (neither this catalog's version nor one in its lineage) is refused
  the same way. When the store holds a manifest the staging folder lacks (a new driver machine, a wiped
  cache), the published set is downloaded once first, so the build continues from it.
* **Chunks from other nodes** (``ship_chunk``, ``fetch_chunk``): a chunk job that runs where the
  driver's staging folder is not (another Ray node: told apart by a random token the driver writes
  into its staging folder) writes its parts in its own node's staging folder, then uploads them and
  its marker, the marker last, under ``_work/`` in the store; the driver downloads a chunk whose
  marker it lacks from there before finalize. Such a node reads the catalog's splits file from the
  store too (``_work/splits-<sha256>.jsonl``, uploaded by the driver, downloaded once per node).
  Chunks that run on the driver's node never go through the store.
* **Publication** (``publish``), after finalize has written the staging folder: every published
  file (class mappings, shards and their DALI ``.idx``, the logs) whose object is missing or differs
  (size, or the sha256 the manifest records and each upload carries as ``x-amz-meta-sha256``) is
  uploaded (multipart above 64 MiB, retried with backoff on 5xx and throttling); then each tar's
  *sample table* (format.py: its samples' labels, jpg locations and sha256s, with the tar's sha256 and
  the store's ETag of the tar object; rebuilt when either differs), so that readers need not scan the
  tars; ``manifest.json`` goes last. If an object that the store's current manifest lists would be
  overwritten, that manifest is deleted first. So a reader sees the old set whole, no manifest (the
  loaders refuse), or the new set whole. Objects no manifest lists any more (an earlier plan's
  shards and tables, the store's ``_work/``) are deleted after the new manifest is in place. A crash
  at any point is finished by a re-run: the local build is idempotent and publication uploads only
  what differs.

One build per output: the lock is the staging folder's (lock.py), so two builds from one machine
never meet; two drivers on different machines writing one prefix are not prevented (S3 has no lock
that every compatible store honours); give each build its own prefix.

Leaves out: the requests (flora/store.py), the build itself (build.py), readers (loaders/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flora import store
from flora.errors import FloraError
from flora.io import sha256_file
from flora.sharding.build.incremental import catalog_lineage, manifest_version
from flora.sharding.build.lock import LOCK_FILE
from flora.sharding.build.plan import MARKER, WORK_DIR, ChunkJob, JobSettings, load_marker
from flora.sharding.cache.derived import cache_root
from flora.sharding.config import SPLIT_NAMES, BuildConfig
from flora.sharding.format.schema import MANIFEST, sample_rows, table_bytes, table_name
from flora.store import S3Url

log = logging.getLogger(__name__)

STAGING = "staging"
#: The driver's token in its staging folder (a chunk job that finds it runs on the driver's node).
NODE_TOKEN = "_driver.token"
#: Files of the staging folder that are never published.
PRIVATE = {WORK_DIR, LOCK_FILE, NODE_TOKEN}
#: Parallel uploads during publication.
UPLOAD_THREADS = 8
SHA_META = "sha256"
#: A sample table's metadata: ``<tar sha256>-<tar ETag>`` of the tar it describes.
TABLE_META = "tar"


class RemoteOutputError(FloraError, ValueError):
    """The object-store output cannot be used (another data set there)."""


@dataclass
class Remote:
    """An ``s3://`` output as a build sees it: the URL, this node's staging folder (where the build runs)
    and the driver's node token. It offers the steps that set such an output apart from a local folder
    (run.py's ``LocalOutput`` has the same ones, doing nothing): ``check`` the prefix, the
    ``job_settings`` that let a job on another node ship its chunk, ``share_splits`` with such nodes,
    ``fetch_chunk`` / ``collect`` a chunk that one finished, ``publish`` the finished set."""

    url: S3Url
    staging: Path
    token: str

    @property
    def folder(self) -> Path:
        """Where the build runs: the staging folder."""
        return self.staging

    def check(self, splits_dir: Path | None, version: str | None) -> None:
        """Refuses another data set's prefix; brings down a published set the staging folder lacks."""
        _check_prefix(self, splits_dir, version)

    def job_settings(self, cfg: BuildConfig, splits_sha256: str) -> JobSettings:
        """A job on another node finds its output, the driver's token and the splits in the store."""
        return JobSettings(cfg, splits_sha256, remote=self.url.url, driver_token=self.token)

    def share_splits(self, splits_path: Path, sha256: str) -> None:
        """Uploads the splits file once, for jobs on other nodes (they read records from it)."""
        key = self.url.join(splits_key(sha256))
        if store.head(key) is None:
            store.upload_file(splits_path, key)

    def fetch_chunk(self, job: ChunkJob) -> bool:
        """Downloads a chunk another node finished; False if the store lacks it."""
        return _fetch_chunk(self, job)

    def collect(self, job: ChunkJob) -> None:
        """After a job ran: its chunk comes down from the store if it ran on another node."""
        if load_marker(job) is None:
            self.fetch_chunk(job)

    def publish(self, manifest: dict) -> dict:
        """Publishes the finished set (see the module docstring); the manifest with ``published``."""
        return {**manifest, "published": {"url": self.url.url, **_publish(self, manifest)}}


def staging_dir(url: str) -> Path:
    """This node's staging folder for output ``url``, under the cache root (sharding/cache/derived.py)."""
    return cache_root() / STAGING / hashlib.sha256(url.encode()).hexdigest()[:16]


def prepare(out: str) -> Remote:
    """Checks the bucket; makes (or reuses) the staging folder; downloads a published set it lacks."""
    url = S3Url.parse(out)
    store.check_bucket(url)
    staging = staging_dir(url.url)
    staging.mkdir(parents=True, exist_ok=True)
    token_file = staging / NODE_TOKEN
    if not token_file.is_file():
        token_file.write_text(secrets.token_hex(16), encoding="ascii")
    return Remote(url, staging, token_file.read_text(encoding="ascii").strip())


def _check_prefix(remote: Remote, splits_dir: Path | None, version: str | None) -> None:
    """Refuses a prefix holding another data set's manifest; syncs down a published set staging lacks.
    ``version`` None (``--compact``): no data-set check, only the sync."""
    published = store.read_bytes(remote.url.join(MANIFEST))
    if published is None:
        return
    try:
        manifest = json.loads(published)
        theirs = manifest_version(manifest) if isinstance(manifest, dict) else None
    except ValueError:
        theirs = None
    if theirs is None:
        raise RemoteOutputError(
            f"{remote.url} holds a manifest.json that is not a Flora shard manifest; choose another prefix"
        )
    if version is not None and theirs != version and f"sha256:{theirs}" not in catalog_lineage(splits_dir):
        raise RemoteOutputError(
            f"{remote.url} holds the shards of another data set (catalog version {theirs[:12]}, not "
            f"{version[:12]} nor one in its lineage); choose another prefix or delete that one first"
        )
    local = remote.staging / MANIFEST
    if not local.is_file() or local.read_bytes() != published:
        _sync_down(remote, manifest, published)


def _published_files(manifest: dict) -> list[str]:
    names = []
    for shard in manifest.get("shards", []):
        names += [shard["path"], shard["path"][: -len(".tar")] + ".idx"]
    return names


def _sync_down(remote: Remote, manifest: dict, published: bytes) -> None:
    """Downloads the published set into staging (files that are missing or differ), manifest last."""
    log.info("downloading the published set of %s into %s", remote.url, remote.staging)
    (remote.staging / MANIFEST).unlink(missing_ok=True)
    listing = dict(store.list_objects(remote.url))
    top = [n for n in listing if "/" not in n and _is_public(n) and n != MANIFEST]  # logs, class mappings
    wanted = sorted(set(top) | {n for n in _published_files(manifest) if n in listing})
    todo = []
    for name in wanted:
        path = remote.staging / name
        if not (path.is_file() and path.stat().st_size == listing[name] and name.endswith((".tar", ".idx"))):
            todo.append(name)
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda n: store.download_file(remote.url.join(n), remote.staging / n), todo))
    tmp = remote.staging / (MANIFEST + ".tmp")
    tmp.write_bytes(published)
    os.replace(tmp, remote.staging / MANIFEST)


def _is_public(name: str) -> bool:
    return name.split("/", 1)[0] not in PRIVATE and not name.endswith(".tmp")


# ------------------------------------------------------------------------------- chunks on other nodes
def splits_key(sha256: str) -> str:
    return f"{WORK_DIR}/splits-{sha256}.jsonl"


def _chunk_prefix(job: ChunkJob) -> str:
    return f"{WORK_DIR}/{job.split}/{job.region}/{job.chunk_id}"


def localize(job: ChunkJob) -> bool:
    """In a chunk job: re-roots ``job`` on this node's staging folder when the driver's is not here
    (another node), fetching the splits file; returns whether the chunk must be shipped."""
    settings = job.settings
    if not settings.remote:
        return False
    staging = staging_dir(settings.remote)
    token = staging / NODE_TOKEN
    if token.is_file() and token.read_text(encoding="ascii").strip() == settings.driver_token:
        return False  # the driver's node: its staging folder is this one
    url = S3Url.parse(settings.remote)
    local_splits = staging / WORK_DIR / Path(splits_key(settings.splits_sha256)).name
    if not local_splits.is_file():
        store.download_file(url.join(splits_key(settings.splits_sha256)), local_splits)
    job.out_dir, job.splits_path = str(staging), str(local_splits)
    return True


def ship_chunk(job: ChunkJob) -> None:
    """Uploads a finished chunk's parts, then its marker, under ``_work/`` in the store."""
    url = S3Url.parse(job.settings.remote)
    prefix = _chunk_prefix(job)
    files = sorted(p for p in job.work_dir.iterdir() if p.name != MARKER and not p.name.endswith(".tmp"))
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda p: store.upload_file(p, url.join(prefix, p.name)), files))
    store.upload_file(job.work_dir / MARKER, url.join(prefix, MARKER))  # the chunk is complete only now


def _fetch_chunk(remote: Remote, job: ChunkJob) -> bool:
    """Downloads a chunk another node finished (parts, then the marker); False if the store lacks it."""
    prefix = remote.url.join(_chunk_prefix(job))
    marker = store.read_bytes(prefix.join(MARKER))
    if marker is None:
        return False
    try:
        parts = [p["name"] for p in json.loads(marker)["parts"]]
    except (ValueError, KeyError, TypeError):
        return False  # a damaged marker: the chunk is redone
    job.work_dir.mkdir(parents=True, exist_ok=True)
    for name in parts:
        store.download_file(prefix.join(name), job.work_dir / name)
    tmp = job.work_dir / (MARKER + ".tmp")
    tmp.write_bytes(marker)
    os.replace(tmp, job.work_dir / MARKER)
    return True


# ---------------------------------------------------------------------------------------- publication
def _publish(remote: Remote, manifest: dict) -> dict:
    """Uploads the staging folder's published set (see the module docstring); returns counts."""
    staging, url = remote.staging, remote.url
    listing = dict(store.list_objects(url))
    current_bytes = store.read_bytes(url.join(MANIFEST)) if MANIFEST in listing else None
    try:
        current = json.loads(current_bytes) if current_bytes else None
    except ValueError:
        current = None
    listed_now = set(_published_files(current)) if isinstance(current, dict) else set()
    known = {s["path"]: s["sha256"] for s in (current or {}).get("shards", [])}
    shas = {s["path"]: s["sha256"] for s in manifest["shards"]}
    files = sorted(
        p.relative_to(staging).as_posix()
        for p in staging.rglob("*")
        if p.is_file() and _is_public(p.relative_to(staging).as_posix())
    )
    files = [f for f in files if f != MANIFEST]
    shards = set(_published_files(manifest))
    files = [f for f in files if f in shards or "/" not in f]  # never a stray file of an earlier plan

    def differs(name: str) -> bool:
        size = (staging / name).stat().st_size
        if listing.get(name) != size:
            return True
        if name in shas and known.get(name) == shas[name]:
            return False
        if (
            name.endswith(".idx")
            and name in listed_now
            and known.get(name[:-4] + ".tar") == shas.get(name[:-4] + ".tar")
        ):
            return False
        got = store.head(url.join(name))
        return got is None or got["metadata"].get(SHA_META) != _sha(staging / name, shas.get(name))

    upload = [f for f in files if differs(f)]
    if current_bytes is not None and (set(upload) & (listed_now | _mappings(listing))):
        store.delete([url.join(MANIFEST)])  # readers: no manifest rather than an old one over new objects
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(
            pool.map(
                lambda n: store.upload_file(
                    staging / n, url.join(n), {SHA_META: _sha(staging / n, shas.get(n))}
                ),
                upload,
            )
        )
    tables = publish_tables(url, staging, manifest["shards"], set(upload))
    store.upload_file(staging / MANIFEST, url.join(MANIFEST))  # last: a shard listed there is complete
    keep = set(files) | {MANIFEST} | {table_name(s["path"]) for s in manifest["shards"]}
    unlisted = [n for n in listing if n not in keep]
    stale = [url.join(n) for n in unlisted if n.startswith(f"{WORK_DIR}/") or _shard_file(n)]
    deleted = store.delete(stale) if stale else 0
    return {
        "uploaded": len(upload),
        "unchanged": len(files) - len(upload),
        "tables": tables,
        "deleted": deleted,
    }


def publish_tables(url: S3Url, root: Path, shards: list[dict], fresh: set[str]) -> int:
    """Uploads the sample table (format.py) of each of ``shards`` (manifest entries) whose tar in the
    store at ``url`` has none for its current ETag and sha256, built from the tar under ``root``;
    ``fresh``: tars uploaded just now (their tables are rebuilt without asking). Returns the count."""

    def one(shard: dict) -> int:
        rel, sha = shard["path"], shard["sha256"]
        tar = store.head(url.join(rel))
        if tar is None:
            return 0
        etag = str(tar["etag"]).strip('"')
        if rel not in fresh:
            have = store.head(url.join(table_name(rel)))
            if have and have["metadata"].get(TABLE_META) == f"{sha}-{etag}":
                return 0
        rows = sample_rows(root / rel, sha)
        if rows is None:
            log.warning("%s: no sample table (the staged tar is not the manifest's, or damaged)", rel)
            return 0
        data = table_bytes(rows, tar["size"], sha, etag)
        store.write_bytes(url.join(table_name(rel)), data, {TABLE_META: f"{sha}-{etag}"})
        return 1

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        return sum(pool.map(one, shards))


def _mappings(listing: dict) -> set[str]:
    return {n for n in listing if n.startswith("class_mapping") and n.endswith(".json")}


def _shard_file(name: str) -> bool:
    """Whether ``name`` is where a published shard or its index lives (an earlier plan's, if unlisted)."""
    return name.split("/", 1)[0] in SPLIT_NAMES and name.endswith((".tar", ".idx", ".samples.json"))


def _sha(path: Path, known: str | None) -> str:
    return known or sha256_file(path)
