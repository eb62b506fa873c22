"""One build per output folder (sharding/build/lock.py): the lock itself in-process (refusal line, waiting,
stale and foreign lock files, a file replaced under a waiter, a lock path that is not a file, the
--wait-lock flag's validation), then real `flora build` processes against a loopback
image server that can park one URL, so a build is held mid-download for as long as a test needs:
two builds started together on one output, --wait-lock, a SIGKILLed holder, and two builds sharing
one cache with different outputs."""

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from flora.config import ConfigError, load_config
from flora.sharding.__main__ import main
from flora.sharding.build.lock import LOCK_FILE, OutputLockedError, Owner, _is_current, output_lock
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from world import ImageServer, render_image

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 12
PARKED = "/0.jpg"
#: Upper bound for anything a test waits on; a healthy run needs a few seconds.
DEADLINE_S = 120
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
OVERRIDES = [
    "progress=false",
    "processes=1",
    "shards.max_samples=4",
    "download.threads=4",
    "download.retries=0",
    "download.read_timeout_s=60",  # longer than any park, so a parked download is never a timeout
    "cache.max_bytes=100000000",  # fits any disk: no cap warning on stderr
    "images.resize_shorter_side=64",
    "download.allow_networks=[127.0.0.1/32]",
]


class ParkingServer(ImageServer):
    """The world's image server, holding every request for one path while ``park`` is active."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._parked = threading.Condition()
        self._waiting = 0
        self._gate: threading.Event | None = None
        self._path: str | None = None

    @contextmanager
    def park(self, path: str):
        """Requests for ``path`` wait (the build stays mid-download) until the block ends."""
        self._gate, self._path, self._waiting = threading.Event(), path, 0
        try:
            yield self
        finally:
            self._gate.set()
            self._path = None

    def wait_parked(self, n: int) -> None:
        with self._parked:
            assert self._parked.wait_for(lambda: self._waiting >= n, DEADLINE_S), f"{n} requests never came"

    def _hit(self, path: str) -> dict | None:
        fault = super()._hit(path)
        gate = self._gate
        if path == self._path and gate is not None:
            with self._parked:
                self._waiting += 1
                self._parked.notify_all()
            gate.wait(DEADLINE_S)
        return fault


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``N_IMAGES`` photos of two species behind a parking server, their splits, and a reference build."""
    root = tmp_path_factory.mktemp("lock-world")
    (root / "images").mkdir()
    srv = ParkingServer(root / "images")
    rows = []
    for i in range(N_IMAGES):
        name = ("Pinus pinea", "Quercus ilex")[i % 2]
        (root / "images" / f"{i}.jpg").write_bytes(render_image(name, i, seed=3))
        rows.append({"plant_id": i, "latin_name": name, "image_url": srv.url(f"{i}.jpg"), "license": "cc-by"})
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_catalog(str(root / "c.jsonl"), root / "splits", CatalogConfig(progress=False))
    with srv:
        reference = build(root / "splits", root / "reference", load_config(BuildConfig, None, OVERRIDES))
        assert reference["accounting"]["sharded"] == N_IMAGES
        yield SimpleNamespace(server=srv, splits=root / "splits", reference=shard_bytes(root / "reference"))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*/*.tar"))}


def start(world, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flora.sharding", "build", "--splits", str(world.splits), "--out", str(out)]
    return subprocess.Popen(
        [*argv, "--cache", str(cache), *OVERRIDES, *extra],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def holder(out: Path) -> Owner | None:
    return Owner.parse((out / LOCK_FILE).read_bytes())


def assert_complete(world, out: Path) -> dict:
    """The output is the reference build, byte for byte, with nothing of the run left behind."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accounting"] == {
        "records_in": N_IMAGES,
        "sharded": N_IMAGES,
        "failed": 0,
        "content_duplicates": 0,
        "ok": True,
    }
    assert shard_bytes(out) == world.reference
    assert not (out / LOCK_FILE).exists(), "a build that ends removes its lock file"
    assert not list(out.rglob("*.tmp")), "no staged file is left"
    return manifest


@contextmanager
def killed_on_exit(procs: list[subprocess.Popen]):
    """Whatever a test asserts, no build it started (into ``procs``) outlives it."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------- in process
def test_a_held_output_is_refused_with_one_line_naming_the_holder(tmp_path):
    with output_lock(tmp_path / "out") as path:
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == sys.argv
        with pytest.raises(OutputLockedError) as info, output_lock(tmp_path / "out"):
            pytest.fail("a second holder got the lock")
    expected = (
        f"output {tmp_path / 'out'} is locked by pid {os.getpid()} on host {socket.gethostname()} "
        f"since {record['started']} (another build is running); use --wait-lock to wait"
    )
    assert str(info.value) == expected
    assert re.fullmatch(ISO_TIME, record["started"])
    assert not path.exists(), "released: the file is gone"


def test_waiting_gives_up_at_its_deadline(tmp_path):
    refused = pytest.raises(OutputLockedError, match=r"is still locked by pid \d+ .* after waiting 0.2 s")
    with output_lock(tmp_path), refused, output_lock(tmp_path, wait_s=0.2):
        pytest.fail("a second holder got the lock")


class _Seen(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_waiter_proceeds_once_the_holder_releases(tmp_path):
    seen = _Seen("waiting without limit")
    logging.getLogger("flora.sharding.build.lock").addHandler(seen)
    order: list[str] = []

    def waiter():
        with output_lock(tmp_path, wait_s=float("inf")):
            order.append("waiter locked")

    try:
        with output_lock(tmp_path):
            thread = threading.Thread(target=waiter)
            thread.start()
            assert seen.event.wait(DEADLINE_S), "the waiter never reported that it waits"
            order.append("holder released")
        thread.join(DEADLINE_S)
    finally:
        logging.getLogger("flora.sharding.build.lock").removeHandler(seen)
    assert order == ["holder released", "waiter locked"]


@pytest.mark.parametrize(
    ("body", "warning"),
    [
        (Owner("gone-host", 999_999, "2020-01-01T00:00:00+00:00").to_bytes(), "pid 999999 on host gone-host"),
        (b"locked by make deploy\n", "unknown format"),
        (b"", None),  # a crash between creating the file and writing the record
    ],
)
def test_a_lock_file_nobody_holds_is_taken_over(tmp_path, caplog, body, warning):
    (tmp_path / LOCK_FILE).write_bytes(body)
    with caplog.at_level(logging.WARNING, logger="flora.sharding.build.lock"), output_lock(tmp_path) as path:
        assert holder(tmp_path).pid == os.getpid(), "the old record is replaced by this build's"
    assert (warning in caplog.text) if warning else not caplog.text
    assert not path.exists()


def test_a_held_lock_without_a_record_is_refused_all_the_same(tmp_path):
    import fcntl

    (tmp_path / LOCK_FILE).write_text("written by another tool\n")
    with open(tmp_path / LOCK_FILE, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        refused = pytest.raises(OutputLockedError, match="locked by another process .* holds no owner record")
        with refused, output_lock(tmp_path):
            pytest.fail("the lock was held")
    assert (tmp_path / LOCK_FILE).read_text() == "written by another tool\n", "a refusal changes nothing"


def test_a_lock_file_replaced_after_it_was_opened_is_not_current(tmp_path):
    """The removal race: a waiter that locks a file its holder has just removed must try again."""
    path = tmp_path / LOCK_FILE
    path.write_text("")
    fd = os.open(path, os.O_RDWR)
    try:
        assert _is_current(fd, path)
        path.unlink()
        assert not _is_current(fd, path)
        path.write_text("")  # the next build's new file
        assert not _is_current(fd, path)
    finally:
        os.close(fd)


def test_a_lock_path_that_is_not_a_file_is_one_error_line(world, tmp_path, capsys):
    (tmp_path / "out" / LOCK_FILE).mkdir(parents=True)
    argv = ["build", "--splits", str(world.splits), "--out", str(tmp_path / "out"), *OVERRIDES]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flora build: error: cannot open the build lock"), err
    assert "expected a regular file there" in err[0]


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc", "wait_lock_s: expected a number, got str 'abc'"), ("-1", "wait_lock_s must be >= 0")],
)
def test_wait_lock_flag_is_validated_as_its_config_key(tmp_path, capsys, value, message):
    argv = ["build", "--splits", str(tmp_path), "--out", str(tmp_path / "o"), "--wait-lock", value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(BuildConfig, None, [f"wait_lock_s={value}"])


def test_wait_lock_without_seconds_waits_without_limit_and_keeps_a_following_override(tmp_path, capsys):
    """``--wait-lock processes=x``: argparse hands the override to the flag; it is applied as an override."""
    argv = ["build", "--splits", str(tmp_path), "--out", str(tmp_path / "o"), "--wait-lock", "processes=x"]
    assert main(argv) == 2
    assert "processes: expected an integer, got str 'x'" in capsys.readouterr().err
    assert main(argv[:-1]) == 2  # a valid config (no limit): the build itself refuses the missing splits
    assert "no dataset_splits.jsonl in" in capsys.readouterr().err
    assert load_config(BuildConfig, None, ["wait_lock_s=.inf"]).wait_lock_s == float("inf")


# ---------------------------------------------------------------------------------------- real builds
def test_two_builds_started_together_one_builds_the_other_refuses(world, tmp_path):
    out, procs = tmp_path / "shards", []
    with killed_on_exit(procs):
        with world.server.park(PARKED):
            procs += [start(world, out, tmp_path / "cache") for _ in range(2)]
            world.server.wait_parked(1)  # the winner is mid-download, holding the lock
            record = holder(out)
            (winner,) = [p for p in procs if p.pid == record.pid]
            (loser,) = [p for p in procs if p is not winner]
            _, err = loser.communicate(timeout=DEADLINE_S)
            assert loser.returncode == 2, err
            assert err.splitlines() == [
                f"flora build: error: output {out} is locked by pid {winner.pid} on host "
                f"{socket.gethostname()} since {record.started} (another build is running); "
                "use --wait-lock to wait"
            ]
            assert winner.poll() is None, "the winner is still parked"
        _, err = winner.communicate(timeout=DEADLINE_S)
    assert winner.returncode == 0, err
    assert_complete(world, out)


def test_wait_lock_waits_for_the_running_build_then_reuses_its_chunks(world, tmp_path):
    out, procs = tmp_path / "shards", []
    with killed_on_exit(procs):
        with world.server.park(PARKED):
            first = start(world, out, tmp_path / "cache")
            procs.append(first)
            world.server.wait_parked(1)
            assert holder(out).pid == first.pid
            second = start(world, out, tmp_path / "cache", "--wait-lock", "120")
            procs.append(second)
            line = second.stderr.readline()  # blocks until the second build says it waits
            assert f"is locked by pid {first.pid} on host" in line and "waiting up to 120 s" in line, line
            assert holder(out).pid == first.pid and first.poll() is None
        _, err = first.communicate(timeout=DEADLINE_S)
        assert first.returncode == 0, err
        _, err = second.communicate(timeout=DEADLINE_S)
        assert second.returncode == 0, err
    manifest = assert_complete(world, out)
    run = manifest["last_run"]
    assert run["chunks_run"] == 0 and run["chunks_reused"] > 0, run
    assert run["from_network"] == run["from_cache"] == 0, "the waiter fetched nothing again"
    paths = [s["path"] for s in manifest["shards"]]
    assert len(paths) == len(set(paths)) == len(world.reference), "no shard twice"


def test_the_lock_of_a_killed_build_is_broken_and_the_next_build_completes(world, tmp_path):
    out, procs = tmp_path / "shards", []
    with killed_on_exit(procs):
        with world.server.park(PARKED):
            killed = start(world, out, tmp_path / "cache")
            procs.append(killed)
            world.server.wait_parked(1)
            assert holder(out).pid == killed.pid
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait()
        assert holder(out).pid == killed.pid, "the dead build's lock file is left behind"
        assert not (out / "manifest.json").exists()
        nxt = start(world, out, tmp_path / "cache")
        procs.append(nxt)
        _, err = nxt.communicate(timeout=DEADLINE_S)
    assert nxt.returncode == 0, err
    assert f"taking over the lock of pid {killed.pid} on host {socket.gethostname()}" in err
    assert "Traceback" not in err
    assert_complete(world, out)


def test_two_builds_on_one_cache_with_different_outputs_run_together(world, tmp_path):
    """Both are parked mid-download at once, each holding its own output's lock; one uses worker processes."""
    outs, procs = [tmp_path / "one", tmp_path / "two"], []
    with killed_on_exit(procs):
        with world.server.park(PARKED):
            procs.append(start(world, outs[0], tmp_path / "shared-cache", "processes=2"))
            procs.append(start(world, outs[1], tmp_path / "shared-cache"))
            world.server.wait_parked(2)
            assert [holder(out).pid for out in outs] == [p.pid for p in procs]
        for proc in procs:
            _, err = proc.communicate(timeout=DEADLINE_S)
            assert proc.returncode == 0, err
    for out in outs:
        assert_complete(world, out)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_output_disk_at_lock_time_is_one_line_naming_the_lock_file(world, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        (disk / "out").mkdir()
        with open(disk / "filler", "wb", buffering=0) as fh:  # fill the disk to its last byte
            for size in (4096, 512, 1):
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"\0" * size)
        argv = ["build", "--splits", str(world.splits), "--out", str(disk / "out"), *OVERRIDES]
        assert main([*argv, f"cache.path={tmp_path / 'cache'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"flora build: error: build: taking the output lock: cannot write {disk / 'out' / LOCK_FILE}: "
            f"No space left on device [Errno {errno.ENOSPC}]; free space on that filesystem and run it again"
        ]
        assert not (disk / "out" / LOCK_FILE).exists(), "a failed start leaves no lock file"
        (disk / "filler").unlink()
        assert main([*argv, f"cache.path={tmp_path / 'cache'}"]) == 0
        assert_complete(world, disk / "out")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
