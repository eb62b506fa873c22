"""Loaders from object storage vs local disk, in one run: images/s, and bytes read per shard.

    python -m benchmarks.loader_s3                  # the photo set of benchmarks/loader.py (3,000 500x375)
    python -m benchmarks.loader_s3 --shards DIR     # shards you already have

The shards are uploaded to an S3 server on 127.0.0.1: the one the AWS environment names
(``AWS_ENDPOINT_URL`` and credentials), else a SeaweedFS started here (world/s3.py). Then, with the
same threads and training augmentations for both:

1. **Throughput**: DALI-CPU and the reference torch loader, each from the local folder and from
   ``s3://``, alternating local / S3 epochs in the same run (a warm-up epoch each, then whole
   epochs until ``--min-images``); the S3 runs talk to the server directly.
2. **Bytes read**: a first epoch from S3 with a cold scan cache, through a counting proxy in front
   of the server (a separate process: DALI's S3 client runs while its Python call holds the GIL):
   bytes the index read per shard (the sample table, the publisher's; a scan's tar bytes where a
   table is missing; x the tar's size), bytes the epoch read (x the planned samples' jpg bytes, and
   x the tar's size), GET requests.

Prints a table, writes ``benchmarks/results/loader_s3.json`` and a bar chart ``loader_s3.png``.
``python -m benchmarks.loader_s3 --proxy UPSTREAM [--throttle-every N]`` runs only the proxy (prints
its URL; ``GET /__counts__`` answers its counts), which the S3 loader tests use too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from benchmarks.loader import AUGMENTS, OUT, cores, time_loader
from benchmarks.photos import build_photo_shards
from benchmarks.results import command_line, print_table, publish, rate_bars
from flora import store
from flora.loaders import create_dataloaders
from flora.sharding.build.remote import publish_tables
from flora.sharding.format.schema import MANIFEST, table_name
from flora.store import S3Url

#: S3's throttling answer (what a store over its request rate sends).
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
#: Where the proxy answers its counts.
COUNTS_PATH = "/__counts__"
#: What the issue asks of S3 epochs: images/s within 15% of the local folder's.
TARGET_RATIO = 0.85
SETTINGS = ("threads", "batch", "size", "buffer", "min_images", "rounds")
PROG = "python -m benchmarks.loader_s3"


# ------------------------------------------------------------------------------------- the proxy
class CountingProxy:
    """A loopback HTTP proxy in front of an S3 server: counts response bytes and requests per object
    path; with ``throttle_every`` it answers every N-th ranged GET (a loader's sample read; with
    ``throttle_any``, every N-th request of any kind) ``503 SlowDown`` instead, ``throttle_max`` times
    at most (0: no limit). ``serve_forever`` in a process of its own (``proxy_process``), or as a
    context manager, in a thread of this one."""

    def __init__(
        self, upstream: str, throttle_every: int = 0, throttle_max: int = 0, throttle_any: bool = False
    ):
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port or 80
        self.bytes: Counter = Counter()
        self.requests: Counter = Counter()
        self.seen = self.throttled = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status: int, data: bytes, headers=(), length: str | None = None):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length if length is not None else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _any(self):
                if self.path == COUNTS_PATH:
                    return self._reply(200, json.dumps(proxy.counts()).encode())
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    ranged = throttle_any or (self.command == "GET" and "Range" in self.headers)
                    proxy.seen += ranged
                    slow = bool(throttle_every) and ranged and proxy.seen % throttle_every == 0
                    slow = slow and (not throttle_max or proxy.throttled < throttle_max)
                    proxy.throttled += slow
                if slow:
                    return self._reply(503, SLOW_DOWN, [("Content-Type", "application/xml")])
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                got = conn.getresponse()
                data = got.read()
                conn.close()
                path = self.path.split("?", 1)[0]
                with proxy.lock:
                    proxy.requests[f"{self.command} {path}"] += 1
                    if self.command == "GET":
                        proxy.bytes[path] += len(data)
                head_length = got.getheader("Content-Length") if self.command == "HEAD" else None
                self._reply(got.status, data, got.getheaders(), head_length)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def counts(self) -> dict:
        with self.lock:
            return {
                "bytes": dict(self.bytes),
                "requests": dict(self.requests),
                "throttled": self.throttled,
            }

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def proxy_process(upstream: str, throttle_every: int = 0, throttle_max: int = 0):
    """A ``CountingProxy`` in a process of its own; yields its URL (``counts(url)`` reads it)."""
    cmd = [sys.executable, "-m", "benchmarks.loader_s3", "--proxy", upstream]
    cmd += ["--throttle-every", str(throttle_every), "--throttle-max", str(throttle_max)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the counting proxy did not start (printed {url!r})")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def counts(proxy_url: str) -> dict:
    with urllib.request.urlopen(proxy_url + COUNTS_PATH, timeout=10) as got:
        return json.loads(got.read())


# ------------------------------------------------------------------------------------- the store
def upload_folder(root: Path, url: str) -> int:
    """Puts a local shard folder's published files under ``url`` (not its ``_work``/caches) with the
    sample tables ``flora build --out s3://`` publishes beside the tars."""
    base = S3Url.parse(url)
    n = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not rel.parts[0].startswith("_"):
            store.upload_file(path, base.join(rel.as_posix()))
            n += 1
    shards = json.loads((root / MANIFEST).read_text())["shards"]
    return n + publish_tables(base, root, shards, {s["path"] for s in shards})


@contextmanager
def s3_environment(work: Path):
    """The AWS environment of a store to benchmark against: the one set, else a SeaweedFS here (yields
    its process id, or None)."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield None
        return
    from world.s3 import S3Server  # the test and demo launcher (SeaweedFS on 127.0.0.1)

    with S3Server(work / "seaweedfs") as server:
        saved = server.apply_env()
        try:
            yield server.pid
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# ------------------------------------------------------------------------------------- measuring
def data_cfg(shards: str, args, cache: Path, **over) -> dict:
    data = {
        "shards": shards,
        "image_size": args.size,
        "batch_size": args.batch,
        "threads": args.threads,
        "device": "cpu",
        "shuffle_buffer": args.buffer,
        "cache_root": str(cache),
        "augment": dict(AUGMENTS["full"]),
        "worker_start": "fork",  # torch workers as this process's children: their CPU time is counted
        **over,
    }
    return {"data": data}


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far; 0 without one (Linux /proc)."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def own_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the torch loader's workers, reaped at
    each epoch's end; DALI's threads are this process's)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def throughput(local: Path, url: str, args, cache: Path, server_pid: int | None) -> tuple[list[dict], dict]:
    """Images/s of both backends from the folder and from the store, the runs alternating; with the
    store's process id, the CPU it spent per image (it shares this machine's cores)."""
    rows, out = [], {}
    for backend in ("dali", "torch"):
        label = "DALI-CPU" if backend == "dali" else "reference torch"
        loaders = {}
        for where, shards in (("local", str(local)), ("s3", url)):
            train, _, _ = create_dataloaders(data_cfg(shards, args, cache, backend=backend))
            loaders[where] = train
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        store_ms: dict[str, list[float]] = {"local": [], "s3": []}
        loader_ms: dict[str, list[float]] = {"local": [], "s3": []}
        for _round in range(args.rounds):
            for where, train in loaders.items():
                before, mine = cpu_seconds(server_pid), own_cpu_seconds()
                rate, n = time_loader(train, args.min_images)
                images = n + train.samples_per_epoch  # time_loader's warm-up epoch included
                loader_ms[where].append(1000 * (own_cpu_seconds() - mine) / images)
                if server_pid:
                    store_ms[where].append(1000 * (cpu_seconds(server_pid) - before) / images)
                rates[where].append(rate)
                print(
                    f"  {label} from {where}: {rate:,.0f} img/s ({n} images), CPU ms/image: loader "
                    f"{loader_ms[where][-1]:.1f}, store {store_ms[where][-1] if server_pid else 0:.1f}",
                    flush=True,
                )
        for where in ("local", "s3"):
            best = max(rates[where])  # the least disturbed run on a shared machine
            out[f"{backend}_{where}"] = best
            out[f"{backend}_{where}_runs"] = rates[where]
            out[f"{backend}_{where}_store_cpu_ms_per_image"] = store_ms[where]
            out[f"{backend}_{where}_loader_cpu_ms_per_image"] = loader_ms[where]
            rows.append({"loader": f"{label} from {where}", "img/s": best, "runs": len(rates[where])})
        out[f"{backend}_s3_vs_local"] = out[f"{backend}_s3"] / out[f"{backend}_local"]
        # CPU per image (load-robust on a shared machine): the loader's own, and with the store's added
        local_ms, s3_ms = min(loader_ms["local"]), min(loader_ms["s3"])
        store = min(store_ms["s3"]) if store_ms["s3"] else 0.0
        out[f"{backend}_loader_cpu_s3_vs_local"] = s3_ms / local_ms
        out[f"{backend}_loader_and_store_cpu_s3_vs_local"] = (s3_ms + store) / local_ms
        for train in loaders.values():
            train.close()
    return rows, out


def bytes_per_shard(url: str, args, work: Path) -> dict:
    """A first epoch (validation, then training) of each backend from the store with a cold scan
    cache, through the counting proxy, each backend in a fresh process (DALI's S3 client reads
    ``AWS_ENDPOINT_URL`` once per process)."""
    out = {}
    for backend in ("dali", "torch"):
        with proxy_process(os.environ["AWS_ENDPOINT_URL"]) as proxy:
            cmd = [sys.executable, "-m", "benchmarks.loader_s3", "--first-epoch", backend, "--url", url]
            cmd += [f"--{k}={getattr(args, k)}" for k in ("threads", "batch", "size", "buffer")]
            env = {**os.environ, "AWS_ENDPOINT_URL": proxy}
            root = Path(__file__).resolve().parents[1]
            done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"first epoch ({backend}) failed: {done.stderr[-2000:]}")
            facts = json.loads(done.stdout.strip().splitlines()[-1])
        snaps = facts["counts"]
        out[backend] = {}
        for split, before in (("val", "scanned"), ("train", "val")):
            res = summarize(
                facts["shards"][split], snaps["start"], snaps["scanned"], snaps[before], snaps[split], url
            )
            out[backend][split] = res
            line = ", ".join(f"{k} {v:.3f}" for k, v in res.items() if "_x_" in k)
            print(f"  {backend} {split}: {line}", flush=True)
    return out


def first_epoch(backend: str, url: str, args, work: Path, proxy: str) -> dict:
    """(In the child process) the scans, then a validation and a training epoch from ``url``: the
    proxy's counts after each, and the jpg bytes each epoch planned per shard."""
    cache = work / f"cache-bytes-{backend}-{secrets.token_hex(3)}"
    snaps = {"start": counts(proxy)}
    train, val, _ = create_dataloaders(data_cfg(url, args, cache, backend=backend))
    snaps["scanned"] = counts(proxy)
    shards = {}
    for name, loader in (("val", val), ("train", train)):
        loader.set_epoch(0)
        for _ in loader:
            pass
        snaps[name] = counts(proxy)
        index = loader.index
        jpg = Counter()
        for sid in loader.plan(0).tolist():
            jpg[index.shards[index.shard_of(sid)].rel] += int(index.jpg_size[sid])
        shards[name] = [{"rel": s.rel, "bytes": s.bytes, "jpg": jpg[s.rel]} for s in index.shards]
        loader.close()
    return {"shards": shards, "counts": snaps}


def summarize(shards: list[dict], start: dict, scanned: dict, before: dict, after: dict, url: str) -> dict:
    """Bytes and GETs per shard: the scan's (the tar's bytes a scan read, and the sample table's; x the
    tar), the epoch's (x its planned jpg bytes, x tar)."""
    root = S3Url.parse(url)
    prefix = "/" + "/".join([root.bucket, root.key]).strip("/") + "/"
    per_shard = []
    for shard in shards:
        path, table = prefix + shard["rel"], prefix + table_name(shard["rel"])
        get = f"GET {path}"
        per_shard.append(
            {
                "shard": shard["rel"],
                "tar_bytes": shard["bytes"],
                "scan_bytes": scanned["bytes"].get(path, 0) - start["bytes"].get(path, 0),
                "table_bytes": scanned["bytes"].get(table, 0) - start["bytes"].get(table, 0),
                "epoch_bytes": after["bytes"].get(path, 0) - before["bytes"].get(path, 0),
                "epoch_jpg_bytes": shard["jpg"],
                "epoch_gets": after["requests"].get(get, 0) - before["requests"].get(get, 0),
            }
        )
    tar = sum(r["tar_bytes"] for r in per_shard)
    scan = sum(r["scan_bytes"] + r["table_bytes"] for r in per_shard)
    epoch = sum(r["epoch_bytes"] for r in per_shard)
    needed = sum(r["epoch_jpg_bytes"] for r in per_shard)
    return {
        "shards": len(per_shard),
        "scan_x_tar": scan / tar,
        "epoch_x_jpg": epoch / needed,
        "epoch_x_tar": epoch / tar,
        "first_epoch_with_scan_x_tar": (scan + epoch) / tar,
        "max_shard_epoch_x_jpg": max(r["epoch_bytes"] / max(1, r["epoch_jpg_bytes"]) for r in per_shard),
        "epoch_gets": sum(r["epoch_gets"] for r in per_shard),
        "per_shard": per_shard,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader_s3", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shards", type=Path, help="a local shard root (default: the photo set)")
    parser.add_argument("--photos", type=int, default=3000, help="photographs in the photo set")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--buffer", type=int, default=512)
    parser.add_argument("--min-images", type=int, default=2000, help="images timed per run")
    parser.add_argument("--rounds", type=int, default=2, help="local/S3 alternations per backend")
    parser.add_argument("--name", default="loader_s3", help="result name under benchmarks/results/")
    parser.add_argument(
        "--proxy", metavar="UPSTREAM", help="run only the counting proxy in front of UPSTREAM"
    )
    parser.add_argument("--throttle-every", type=int, default=0, help="proxy: answer every N-th request 503")
    parser.add_argument("--throttle-max", type=int, default=0, help="proxy: throttle at most N times")
    parser.add_argument("--first-epoch", choices=["dali", "torch"], help=argparse.SUPPRESS)  # the child
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_epoch:
        work = OUT.parent / "loader_s3"
        print(json.dumps(first_epoch(args.first_epoch, args.url, args, work, os.environ["AWS_ENDPOINT_URL"])))
        return 0
    if args.proxy:
        proxy = CountingProxy(args.proxy, args.throttle_every, args.throttle_max)
        print(proxy.url, flush=True)
        proxy.serve_forever()
        return 0
    work = OUT.parent / "loader_s3"
    work.mkdir(parents=True, exist_ok=True)
    local = args.shards or build_photo_shards(OUT, args.photos)[0]
    with s3_environment(work) as server_pid:
        bucket = f"bench-{secrets.token_hex(3)}"
        store.client().create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/shards"
        started = time.perf_counter()
        files = upload_folder(local, url)
        print(
            f"uploaded {files} files of {local} to {url} in {time.perf_counter() - started:.1f} s", flush=True
        )
        cache = work / f"cache-{secrets.token_hex(3)}"
        rows, rates = throughput(local, url, args, cache, server_pid)
        read = bytes_per_shard(url, args, work)
    print()
    print_table(rows, ["loader", "img/s", "runs"])
    for backend in ("dali", "torch"):
        ratio = rates[f"{backend}_s3_vs_local"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"{backend}: S3 / local = {ratio:.2f} (target >= {TARGET_RATIO}: {verdict}); CPU per image "
              f"S3 / local: loader {rates[f'{backend}_loader_cpu_s3_vs_local']:.2f}, loader + store "
              f"{rates[f'{backend}_loader_and_store_cpu_s3_vs_local']:.2f}")  # fmt: skip
        for split in ("val", "train"):
            r = read[backend][split]
            print(f"  {split}: scan {r['scan_x_tar']:.2f}x the tars, epoch {r['epoch_x_jpg']:.3f}x its "
                  f"planned jpg bytes ({r['epoch_x_tar']:.2f}x the tars), {r['epoch_gets']} GET")  # fmt: skip
    publish(
        args.name,
        {
            "command": command_line("benchmarks.loader_s3", argv),
            "machine": {
                "cores": cores(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
            },
            "shards": str(local),
            "store": "SeaweedFS on 127.0.0.1 (loopback)",
            "settings": {k: getattr(args, k) for k in SETTINGS},
            "throughput": rates,
            "target_s3_vs_local": TARGET_RATIO,
            "bytes_read": read,
        },
        lambda png: rate_bars([{**r, "set": "photos"} for r in rows], "set", "loader", "img/s", png),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
