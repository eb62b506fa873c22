"""A local MongoDB-wire-protocol server for tests, the demo and benchmarks, and a bulk loader.

Owns: starting SecantusDB (a MongoDB-compatible server over WiredTiger, installed from PyPI) as a
subprocess bound to 127.0.0.1 on a free port, proving it answers a real pymongo ``ping`` before
handing it out, stopping it cleanly, and ``load_records``, which fills a collection in batches the
way the catalog stage will later read it.

Leaves out: installing or managing a real ``mongod``; authentication, TLS and replica sets
(SecantusDB has SCRAM and TLS, but nothing in Flora's tests needs them); the record schema
(``sharding/catalog/records.py``) and reading records back for the catalog (``sharding/catalog/sources.py``).

The server runs in its own process so a crashing test cannot wedge it, it does not compete with the
test for the GIL, and ``stop()`` can always end it with a signal.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymongo import MongoClient

HAVE_PYMONGO = importlib.util.find_spec("pymongo") is not None
HAVE_SECANTUS = importlib.util.find_spec("secantus") is not None

LOOPBACK_HOST = "127.0.0.1"
# SecantusDB answers about 0.4 s after launch on the project's 2-core machines (Python import plus
# opening WiredTiger); 30 s leaves room for a loaded CI box without letting a dead server hang a run.
STARTUP_TIMEOUT_S = 30.0
# Between readiness probes; short, so startup costs little more than the server's own boot.
POLL_INTERVAL_S = 0.1
# One readiness probe: how long pymongo may wait to select / connect to the server.
PROBE_TIMEOUT_MS = 500
# Default server-selection timeout of clients from ``MongoTestServer.client()``: a loopback server
# either answers within milliseconds or is gone, so fail fast instead of pymongo's 30 s.
CLIENT_SELECTION_TIMEOUT_MS = 5000
# SecantusDB's SIGTERM handler drains connections for up to 5 s before closing WiredTiger.
STOP_TIMEOUT_S = 10.0
# While waiting for a stopping server to exit, how often to wake its accept thread (see _Run.terminate).
STOP_POLL_S = 0.05
# A port found free can be taken by another process before the server binds it; retry that many
# times on a fresh port.
START_ATTEMPTS = 3
# How much of the server's log goes into a startup error message.
LOG_TAIL_CHARS = 4000
# WiredTiger cache for a test server: SecantusDB's default is 1G, more than Flora's test data needs.
DEFAULT_CACHE_SIZE = "256M"
DEFAULT_BATCH_SIZE = 5000
ADDRESS_IN_USE = "Address already in use"

# Runs the SecantusDB daemon so that it dies with its parent on Linux (PR_SET_PDEATHSIG = 1), so a
# test process killed with SIGKILL does not leave servers behind holding ports and temp dirs.
_LAUNCHER = """\
import signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
from secantus.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port(host: str = LOOPBACK_HOST) -> int:
    """Returns a TCP port on ``host`` that was free a moment ago (bind port 0, then release it).

    Another process can still take the port before the caller binds it; callers retry on a clash.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class MongoTestServer:
    """A SecantusDB server in a subprocess on 127.0.0.1, usable as a context manager.

    Example:
        with MongoTestServer() as server, server.client() as client:
            client.flora.images.insert_one({"latin_name": "Bellis perennis"})

    Args:
        storage_path: WiredTiger home directory; created if missing and kept after ``stop()``.
            ``None`` uses a temporary directory that ``stop()`` removes.
        port: port to bind; ``None`` picks a free one and retries on another if it is taken meanwhile.
            An explicit port is tried once.
        startup_timeout_s: how long ``start()`` waits for the server to answer ``ping``.
        cache_size: WiredTiger cache size, a string like ``"256M"`` or ``"1G"``.
        standalone: advertise a standalone server (no oplog, faster writes) rather than SecantusDB's
            default single-node replica set, which change streams and transactions need.
    """

    def __init__(
        self,
        storage_path: str | Path | None = None,
        *,
        port: int | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        cache_size: str = DEFAULT_CACHE_SIZE,
        standalone: bool = True,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self._storage_path = Path(storage_path) if storage_path is not None else None
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._cache_size = cache_size
        self._standalone = standalone
        self._port: int | None = None
        self._run: _Run | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def port(self) -> int:
        """The port the running server listens on."""
        if self._port is None:
            raise RuntimeError("MongoTestServer is not running; call start() or use it in a with block")
        return self._port

    @property
    def uri(self) -> str:
        """A MongoDB connection string for the running server, e.g. ``mongodb://127.0.0.1:40123``."""
        return f"mongodb://{LOOPBACK_HOST}:{self.port}"

    @property
    def storage_path(self) -> Path:
        """The WiredTiger home directory of the running server."""
        if self._run is None:
            raise RuntimeError("MongoTestServer is not running; call start() or use it in a with block")
        return self._storage_path or self._run.dir / "data"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._run is not None and self._run.proc is not None and self._run.proc.poll() is None

    def client(self, **kwargs: Any) -> MongoClient:
        """Returns a new pymongo ``MongoClient`` for this server; the caller closes it.

        Args:
            **kwargs: passed to ``MongoClient``; ``serverSelectionTimeoutMS`` defaults to
                ``CLIENT_SELECTION_TIMEOUT_MS``.
        """
        from pymongo import MongoClient

        kwargs.setdefault("serverSelectionTimeoutMS", CLIENT_SELECTION_TIMEOUT_MS)
        return MongoClient(self.uri, **kwargs)

    def log_tail(self, max_chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``max_chars`` characters of the server's stdout and stderr."""
        return "" if self._run is None else self._run.log_tail(max_chars)

    def start(self) -> MongoTestServer:
        """Starts the server and returns once it answers a pymongo ``ping``.

        Raises:
            RuntimeError: pymongo or SecantusDB is not installed, the server exited during startup,
                or it did not answer within ``startup_timeout_s``; the message carries its log tail.
        """
        if self._run is not None:
            raise RuntimeError(f"MongoTestServer is already started (port {self._port})")
        if not (HAVE_PYMONGO and HAVE_SECANTUS):
            raise RuntimeError(
                "MongoTestServer needs pymongo and SecantusDB: pip install pymongo 'SecantusDB>=0.7.0b3'"
            )
        self._run = _Run(Path(tempfile.mkdtemp(prefix="flora-mongo-")))
        # Stops the server even if this object is dropped or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, self._run.close)
        # An explicit, empty config file turns off SecantusDB's discovery of ./secantusd.toml and
        # ~/.secantus/secantusd.toml, so a stray file on a developer's machine cannot change the server.
        config_path = self._run.dir / "secantusd.toml"
        config_path.write_text("", encoding="utf-8")
        try:
            self._port = self._start_attempts(config_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminates the server (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``); idempotent.

        Removes the temporary directory holding the log and, if no ``storage_path`` was given, the data.
        """
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._run = None
        self._port = None

    def __enter__(self) -> MongoTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self.running else "stopped"
        return f"MongoTestServer({state})"

    def _start_attempts(self, config_path: Path) -> int:
        """Launches the server, on a fresh port after a clash; returns the port it answers on."""
        assert self._run is not None
        storage = self.storage_path
        storage.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._requested_port is not None else START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port()
            self._run.proc, self._run.port = self._launch(port, config_path, storage), port
            outcome = self._await_ready(port, self._run.proc)
            if outcome == "ready":
                return port
            tail = self.log_tail()
            self._run.terminate()
            if outcome == "clash" and attempt < attempts:
                continue
            reason = {
                "clash": f"port {port} was taken by another process ({attempts} attempt(s))",
                "exited": "the server exited during startup",
                "timeout": f"the server did not answer ping within {self._startup_timeout_s:g} s",
            }[outcome]
            raise RuntimeError(f"SecantusDB failed to start on {LOOPBACK_HOST}:{port}: {reason}.\n{tail}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self, port: int, config_path: Path, storage: Path) -> subprocess.Popen[bytes]:
        assert self._run is not None
        command = [
            sys.executable,
            "-c",
            _LAUNCHER,
            "--config",
            str(config_path),
            "--host",
            LOOPBACK_HOST,
            "--port",
            str(port),
            "--storage-path",
            str(storage),
            "--cache-size",
            self._cache_size,
            "--log-level",
            "INFO",
        ]
        if self._standalone:
            command.append("--standalone")
        # Truncated per launch, so a retry's clash check does not read the previous attempt's log.
        with open(self._run.log_path, "wb") as log:
            # A file, not a pipe: nobody reads a pipe while the server runs, and a full one would
            # block it. The child keeps its own handle to the file after this one closes.
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _await_ready(self, port: int, proc: subprocess.Popen[bytes]) -> str:
        """Polls until ``proc`` answers on ``port``.

        Returns:
            ``"ready"``, ``"clash"`` (the port is someone else's), ``"exited"`` or ``"timeout"``.
        """
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "clash" if ADDRESS_IN_USE in self.log_tail() else "exited"
            pid = _probe_pid(port)
            if pid == proc.pid:
                return "ready"
            if pid is not None:
                # Another server answers on this port, so ours will fail to bind it.
                return "clash"
            time.sleep(POLL_INTERVAL_S)
        return "timeout"


class _Run:
    """One started server: its process and its run directory (config file, log, default data)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.log_path = run_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def log_tail(self, max_chars: int) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-max_chars:]

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL if the server has not exited after ``STOP_TIMEOUT_S``.

        SecantusDB's shutdown closes its listening socket and then joins its accept thread for up to
        2 s, but on Linux closing a socket does not wake a thread blocked in ``accept()``. Connecting
        once does, which cuts a clean stop from about 2.1 s to about 0.1 s.
        """
        proc, port, self.proc, self.port = self.proc, self.port, None, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=STOP_POLL_S)
                return
            except subprocess.TimeoutExpired:
                if port is not None:
                    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK_HOST, port), 1.0):
                        pass
        proc.kill()
        proc.wait()

    def close(self) -> None:
        self.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


def _probe_pid(port: int) -> int | None:
    """The pid in ``serverStatus`` of the server answering ``ping`` on ``port``; None if none answers."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    # A refused TCP connect is the common case while the server boots; it is answered at once, where
    # pymongo would wait out its whole server-selection timeout.
    try:
        socket.create_connection((LOOPBACK_HOST, port), timeout=PROBE_TIMEOUT_MS / 1000).close()
    except OSError:
        return None
    client: MongoClient = MongoClient(
        f"mongodb://{LOOPBACK_HOST}:{port}",
        directConnection=True,
        serverSelectionTimeoutMS=PROBE_TIMEOUT_MS,
        connectTimeoutMS=PROBE_TIMEOUT_MS,
    )
    try:
        client.admin.command("ping")
        return int(client.admin.command("serverStatus").get("pid", -1))
    except PyMongoError:
        return None
    finally:
        client.close()


def _batches(items: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Yields lists of up to ``size`` shallow copies of ``items`` (pymongo adds ``_id`` in place)."""
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(dict(item))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_records(
    uri: str,
    database: str,
    collection: str,
    records: Iterable[Mapping[str, Any]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    drop: bool = True,
) -> int:
    """Inserts ``records`` into ``database.collection`` in unordered batches and indexes ``latin_name``.

    The caller's dicts are not modified: each is copied before pymongo adds an ``_id``.

    Args:
        uri: MongoDB connection string, e.g. ``MongoTestServer.uri``.
        database: database name.
        collection: collection name.
        records: documents to insert; any iterable, consumed once.
        batch_size: documents per ``insert_many`` call.
        drop: drop the collection first, so the load replaces rather than appends.

    Returns:
        The number of documents inserted.

    Raises:
        ValueError: ``batch_size`` is not positive.
        pymongo.errors.BulkWriteError: some documents were rejected (the rest of that batch is kept).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    from pymongo import ASCENDING, MongoClient

    inserted = 0
    with MongoClient(uri, serverSelectionTimeoutMS=CLIENT_SELECTION_TIMEOUT_MS) as client:
        coll = client[database][collection]
        if drop:
            coll.drop()
        for batch in _batches(records, batch_size):
            inserted += len(coll.insert_many(batch, ordered=False).inserted_ids)
        coll.create_index([("latin_name", ASCENDING)])
    return inserted
