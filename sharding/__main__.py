"""Command line of the sharding package: ``python -m sharding catalog ...`` (also ``flora-sharding``).

Owns argument parsing, turning anticipated failures (missing file, unreachable MongoDB, bad config
key) into one ``error: ...`` line and exit status 2, and the end-of-run summary.

Leaves out: the work itself (catalog.py); the ``build`` verb arrives with the sharder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import CatalogConfig, ConfigError, load_config
from .sources import SourceError, redact

EXIT_USAGE = 2


def _catalog(args: argparse.Namespace) -> int:
    from .catalog import run_catalog

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"split.seed={args.seed}")
    if args.production_only:
        overrides.append("production_only=true")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = load_config(CatalogConfig, args.config, overrides)
    if args.region:
        cfg.regions = sorted(set(cfg.regions) | set(args.region))
    started = time.perf_counter()
    result = run_catalog(args.source, args.out, cfg, Path(args.config).parent if args.config else None)
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
    rate = s["input_records"] / max(seconds, 1e-9)
    print(f"  wrote {result.out_dir} in {seconds:.1f} s ({rate:,.0f} records/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sharding", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    cat = verbs.add_parser("catalog", help="records (JSONL or MongoDB) -> validated, deduplicated splits")
    cat.add_argument("--source", required=True, help="a JSONL(.gz) file or mongodb://host:port/DB.COLLECTION")
    cat.add_argument("--out", required=True, help="output folder")
    cat.add_argument("--config", help="YAML config (default: built-in defaults, as config/catalog.yaml)")
    cat.add_argument(
        "--region", action="append", default=[], help="also write this regional subset (repeatable)"
    )
    cat.add_argument("--production-only", action="store_true", help="keep only permissive licenses")
    cat.add_argument("--seed", type=int, help="split seed (overrides split.seed)")
    cat.add_argument("--no-progress", action="store_true", help="no progress bar")
    cat.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cat.set_defaults(func=_catalog)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, SourceError, OSError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
