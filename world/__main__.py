"""Command line of the sample world: ``python -m world generate|serve`` (``flora world``).

Owns: argument parsing, the one-line summary of ``generate``, and running ``serve`` in the foreground
until Ctrl-C. Anticipated bad input (a bad spec value, a missing folder, a port in use) ends with one
``error:`` line and exit status 2.

Leaves out: everything the commands do (``generate.py``, ``server.py``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from flora.errors import ArgumentParser, fail
from world.generate import DEFAULT_BASE_URL, WorldSpec, build_world
from world.images import image_owners
from world.server import ImageServer

DEFAULT_PORT = 8765  # matches DEFAULT_BASE_URL, so `generate` then `serve` work together


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog or "python -m world", description="Generate or serve the sample world.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = WorldSpec()
    gen = sub.add_parser("generate", help="write catalog.jsonl, images/ and faults.json")
    gen.add_argument("--out", type=Path, required=True, help="folder to write the world into")
    gen.add_argument("--records", type=int, default=defaults.n_records, help="number of catalog records")
    gen.add_argument("--species", type=int, default=defaults.n_species, help="number of species")
    gen.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random choice")
    gen.add_argument("--fault-rate", type=float, default=defaults.fault_rate, help="share of faulted URLs")
    gen.add_argument("--base-url", default=DEFAULT_BASE_URL, help="scheme://host:port the URLs point at")
    gen.add_argument("--no-images", action="store_true", help="write the catalog and faults only")
    serve = sub.add_parser("serve", help="serve a generated world's images on 127.0.0.1")
    serve.add_argument("--root", type=Path, required=True, help="world folder (or a folder of images)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--no-faults", action="store_true", help="ignore the world's faults.json")
    return parser


def _generate(args: argparse.Namespace) -> int:
    spec = WorldSpec(
        n_species=args.species, n_records=args.records, seed=args.seed, fault_rate=args.fault_rate
    )
    start = time.perf_counter()
    world = build_world(args.out, spec, args.base_url, images=not args.no_images)
    print(
        f"records={len(world.records)} unique_urls={len(image_owners(world.records))} "
        f"images={len(world.images)} "
        f"faults={len(world.faults)} seconds={time.perf_counter() - start:.1f} out={world.root}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    image_dir = args.root / "images" if (args.root / "images").is_dir() else args.root
    faults_path = args.root / "faults.json"
    faults = faults_path if faults_path.is_file() and not args.no_faults else None
    with ImageServer(image_dir, faults, host=args.host, port=args.port) as srv:
        print(f"serving {image_dir} at {srv.base_url} ({len(srv.faults)} faults); Ctrl-C to stop")
        stop = threading.Event()
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            print("stopped")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the ``flora world`` command line; return the exit status."""
    args = _parser(prog).parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _serve(args)
    except (ValueError, OSError) as exc:
        return fail("world", exc)


if __name__ == "__main__":
    sys.exit(main())
