"""Command line of the sharding package: ``flora catalog|build`` (``flora catalog|build``).

Owns argument parsing, turning anticipated failures (missing file, unreachable MongoDB, bad config
key) into one ``error: ...`` line and exit status 2, and the end-of-run summary. A build that ran but
sharded too little (no record, or under ``min_sharded_share``: build/outcome.py) prints its summary, then
one ``error: ...`` line naming the dominant failure reason and its remedy, and exits 1.

Verbs: ``catalog`` (catalog.py; ``--previous DIR``: frozen splits, lineage.py) and ``build`` (build.py:
the sharder; ``--compact``: incremental.py's compaction of tombstoned shards).

Leaves out: the work itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from flora.config import from_dict, load_config
from flora.errors import ArgumentParser, FloraError, fail
from flora.io import refuse_overlap
from flora.sharding.build.outcome import too_few_sharded, top_reasons
from flora.sharding.cache.config import check_cache_dir
from flora.sharding.catalog.formats import FORMATS
from flora.sharding.catalog.sources import redact
from flora.sharding.config import CatalogConfig
from flora.sharding.download.fetch import DownloadConfig

#: ``--wait-lock`` without a number: YAML's infinity, so the flag goes through ``wait_lock_s``'s validation.
WAIT_FOREVER = ".inf"
#: Exit status of a build that ran to the end but sharded too little (``min_sharded_share``, outcome.py):
#: its outputs are written; 2 stays the status of a command refused before it ran.
EXIT_TOO_FEW = 1


def _catalog(args: argparse.Namespace) -> int:
    from flora.sharding.catalog.run import run_catalog

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"split.seed={args.seed}")
    if args.production_only:
        overrides.append("production_only=true")
    if args.no_progress:
        overrides.append("progress=false")
    if args.format:
        overrides.append(f"format={args.format}")
    cfg = load_config(CatalogConfig, args.config, overrides)
    if args.region:
        cfg.regions = sorted(set(cfg.regions) | set(args.region))
    # --previous DIR --out DIR is the in-place update (read first, replaced atomically); nesting is refused
    refuse_overlap(
        "catalog",
        args.out,
        {
            **{"--source" if len(args.source) == 1 else f"--source {s}": s for s in args.source},
            "--previous": args.previous,
        },
        same_ok=("--previous",),
    )
    started = time.perf_counter()
    config_dir = Path(args.config).parent if args.config else None
    result = run_catalog(args.source, args.out, cfg, config_dir, previous=args.previous)
    seconds = time.perf_counter() - started
    s = result.stats
    print(
        f"catalog {s['source']}: {s['input_records']} records in = {s['written']} written "
        f"+ {s['rejected']} rejected + {s['duplicates']} duplicates "
        f"({'ok' if s['accounting_ok'] else 'MISMATCH'})"
    )
    print(
        f"  {s['species']} species; train/val/test = {s['splits']['train']}/{s['splits']['val']}/"
        f"{s['splits']['test']}; leakage: {'none' if s['leakage_ok'] else 'FOUND'}; "
        f"permissive {s['permissive_fraction']['written']}"
    )
    for name, sub in s["subsets"].items():
        print(f"  region {name}: {sub['records']} records, {sub['classes']} species")
    if s["rejects_by_reason"]:
        print("  rejects: " + ", ".join(f"{k} {v}" for k, v in s["rejects_by_reason"].items()))
    if s["growth"]:
        g = s["growth"]
        counts = ", ".join(f"{k} {g[k]}" for k in ("kept", "new", "removed", "moved"))
        print(f"  frozen splits (--previous): {counts}")
    rate = s["input_records"] / max(seconds, 1e-9)
    print(f"  wrote {result.out_dir} in {seconds:.1f} s ({rate:,.0f} records/s)")
    return 0


def _build(args: argparse.Namespace) -> int:
    from flora.sharding.build.run import BuildConfig, build

    overrides = list(args.overrides)
    if args.cache:  # named as the flag when refused; then validated again as its config key
        check_cache_dir(args.cache, "--cache")
        overrides.append(f"cache.path={args.cache}")
    if args.processes is not None:
        overrides.append(f"processes={args.processes}")
    if args.distributor:
        overrides.append(f"distributor={args.distributor}")
    if args.ray_address:
        overrides.append(f"ray_address={args.ray_address}")
    if args.no_progress:
        overrides.append("progress=false")
    if args.allow_damaged_splits:
        overrides.append("allow_damaged_splits=true")
    if args.wait_lock is not None:  # validated as the config key is ("abc", -1: one error line)
        if "=" in args.wait_lock:  # `--wait-lock key=value`: that was an override, not a number of seconds
            overrides.append(args.wait_lock)
            args.wait_lock = WAIT_FOREVER
        overrides.append(f"wait_lock_s={args.wait_lock}")
    cfg = load_config(BuildConfig, args.config, overrides)
    if args.compact:
        return _compact(args, cfg)
    if args.allow_network:  # merged with the config's list, then validated as the config key is
        networks = sorted(set(cfg.download.allow_networks) | set(args.allow_network))
        download = {**asdict(cfg.download), "allow_networks": networks}
        cfg.download = from_dict(DownloadConfig, download, "download")
    manifest = build(
        args.splits, args.out, cfg, retry_failed=args.retry_failed, fresh=args.fresh,
        keep_tombstones=args.keep_tombstones,
    )  # fmt: skip
    _summary(manifest)
    print(f"  wrote {args.out}/manifest.json")
    _card(manifest, args.out)
    too_few = too_few_sharded(manifest, cfg.min_sharded_share, args.out)
    return fail("build", too_few, EXIT_TOO_FEW) if too_few else 0


def _summary(manifest: dict) -> None:
    """The end-of-run summary: accounting, this run, an incremental build's shards, cache, failures."""
    a, run = manifest["accounting"], manifest["last_run"]
    print(
        f"build: {a['records_in']} records in = {a['sharded']} sharded + {a['failed']} failed "
        f"+ {a['content_duplicates']} content duplicates ({'ok' if a['ok'] else 'MISMATCH'})"
    )
    print(
        f"  {len(manifest['shards'])} shards; this run: {run['chunks_run']} chunks run, "
        f"{run['chunks_reused']} reused, "
        f"{run['from_network']} downloaded, {run['from_cache']} from cache, {run['seconds']} s "
        f"({run['images_per_s'] or 0} img/s)"
    )
    if run.get("incremental"):
        inc = run["incremental"]
        print(
            f"  incremental over {inc['parent'][:12]}: {inc['kept_shards']} shards kept byte for byte, "
            f"{len(inc.get('rewritten_shards', []))} rewritten without "
            f"{inc.get('tombstones_dropped', 0)} removed samples ({inc['live_kept_samples']} live samples "
            f"kept, {inc['tombstones']} tombstoned in the tars), {inc['new_shards']} new, "
            f"{len(inc['rebuilt_shards'])} rebuilt"
        )
    if run["cache"]:
        print("  cache: " + ", ".join(f"{k} {v}" for k, v in run["cache"].items()))
    if manifest["failures_by_reason"]:
        print(f"  failures: {top_reasons(manifest['failures_by_reason'])}")
    _published(manifest)


def _card(manifest: dict, out: str) -> None:
    """The dataset card's few figures and its path (build/card.py); the whole card is for reading."""
    c = manifest.get("card")
    if not c:
        return
    splits = c["splits"]
    tail, share = c["train_tail"], c["permissive_share"]
    dups = c["duplicates"]
    n = c["sources"]
    sources = "sources not recorded" if n is None else f"{n} source{'' if n == 1 else 's'}"
    print(
        f"  dataset card: {c['species']} species, {sources}; images train/val/test "
        f"{'/'.join(str(s['images']) for s in splits.values())}, species "
        f"{'/'.join(str(s['species']) for s in splits.values())}"
    )
    print(
        f"  train species with 1 / <5 / <20 images: {tail['with_1']}/{tail['under_5']}/{tail['under_20']}; "
        f"permissive {'-' if share is None else f'{share:.1%}'}; removed {dups.get('same_content', 0)} "
        f"same-content and {dups.get('near_duplicate', 0)} near-duplicates"
    )
    print(f"  wrote {out}/dataset_card.md (+ dataset_card.json, {c['plots']} plots)")


def _published(manifest: dict) -> None:
    if "published" in manifest:  # an s3:// output (remote.py)
        p = manifest["published"]
        print(f"  published to {p['url']}: {p['uploaded']} uploaded, {p['unchanged']} unchanged, "
              f"{p['deleted']} stale objects deleted")  # fmt: skip


def _compact(args: argparse.Namespace, cfg) -> int:
    from flora.sharding.build.run import compact_shards

    if args.retry_failed:
        return fail("build", "--compact and --retry-failed are separate runs; pass one of them")
    manifest = compact_shards(args.out, cfg.wait_lock_s)
    done = manifest.get("compacted", {"shards_rewritten": 0, "samples_dropped": 0})
    print(
        f"build --compact: {done['shards_rewritten']} shards rewritten, {done['samples_dropped']} tombstoned"
        f" samples dropped; wrote {args.out}/manifest.json"
    )
    _card(manifest, args.out)
    _published(manifest)
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog or "flora catalog|build", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    cat = verbs.add_parser(
        "catalog",
        help="records (JSONL, MongoDB, GBIF DwC-A, iNaturalist, CSV/Parquet) -> deduplicated splits",
    )
    cat.add_argument(
        "--source",
        required=True,
        action="append",
        help="a JSONL(.gz) file, mongodb://host:port/DB.COLLECTION, a GBIF Darwin Core Archive (.zip or "
        "folder), an iNaturalist open-data folder, or a CSV/TSV/Parquet table; repeatable",
    )
    cat.add_argument("--format", choices=FORMATS, help="force the sources' format (default: detected)")
    cat.add_argument("--out", required=True, help="output folder")
    cat.add_argument("--config", help="YAML config (default: built-in defaults, as config/catalog.yaml)")
    cat.add_argument(
        "--region", action="append", default=[], help="also write this regional subset (repeatable)"
    )
    cat.add_argument("--production-only", action="store_true", help="keep only permissive licenses")
    cat.add_argument("--seed", type=int, help="split seed (overrides split.seed)")
    cat.add_argument("--no-progress", action="store_true", help="no progress bar")
    cat.add_argument(
        "--previous",
        metavar="DIR",
        help="an earlier catalog output (same seed, fractions, group_by): its images keep their splits",
    )
    cat.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cat.set_defaults(func=_catalog)

    bld = verbs.add_parser("build", help="splits -> cached, validated downloads -> WebDataset shards")
    bld.add_argument("--splits", required=True, help="the catalog's output folder")
    bld.add_argument("--out", required=True, help="shard folder (SHARDS), or s3://bucket/prefix")
    bld.add_argument("--cache", help="LMDB cache folder (overrides cache.path)")
    bld.add_argument("--config", help="YAML config (default: built-in defaults, as config/sharding.yaml)")
    bld.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="exempt a network from the private-address refusal, e.g. 127.0.0.1/32 (repeatable)",
    )
    bld.add_argument(
        "--retry-failed", action="store_true", help="re-attempt only the records in failures.jsonl"
    )
    bld.add_argument(
        "--fresh",
        action="store_true",
        help="set the folder's manifest.json aside (kept, renamed) and build afresh: the way out of a "
        "damaged manifest",
    )
    bld.add_argument(
        "--compact",
        action="store_true",
        help="rewrite the shards that have tombstones (samples an incremental build removed) without them",
    )
    bld.add_argument(
        "--keep-tombstones",
        action="store_true",
        help="an incremental build leaves removed samples in the kept tars, listed as tombstones (Flora's "
        "loaders skip them; other WebDataset readers do not) instead of rewriting those shards",
    )
    bld.add_argument("--distributor", choices=["local", "ray"], help="where shard jobs run (default local)")
    bld.add_argument("--ray-address", help="address of an existing Ray cluster")
    bld.add_argument("--processes", type=int, help="local worker processes (0: one per CPU)")
    bld.add_argument("--no-progress", action="store_true", help="no progress bar")
    bld.add_argument(
        "--allow-damaged-splits",
        action="store_true",
        help="count unreadable lines of the splits file as bad_record failures (default: refuse the file)",
    )
    bld.add_argument(
        "--wait-lock",
        nargs="?",
        const=WAIT_FOREVER,
        metavar="SECONDS",
        help="if another build holds --out, wait (up to SECONDS; default: no limit) instead of refusing",
    )
    bld.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    bld.set_defaults(func=_build)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except (FloraError, OSError) as exc:
        return fail(args.verb, redact(str(exc)))


if __name__ == "__main__":
    sys.exit(main())
