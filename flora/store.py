"""Object storage: ``s3://bucket/prefix`` locations for shards, through one boto3 client per process.

Owns:

* ``is_remote(location)`` and ``S3Url`` (``s3://bucket/key``: parsed and checked; ``join`` adds parts);
* ``client()``: a boto3 S3 client configured from the standard AWS environment and config files
  (``AWS_ENDPOINT_URL`` for an S3-compatible store, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  or a profile, ``AWS_DEFAULT_REGION``), with botocore's ``standard`` retry mode for the store's
  answers: 5xx and throttling (``503 SlowDown``, ``Throttling``) are retried with jittered
  exponential backoff, ``MAX_ATTEMPTS`` times in all. Credentials are never printed;
* outages (``outlast``, outage.py): a connection refused, reset or timed out is not botocore's to retry (it
  counts attempts, not time, from one retry quota that a client's parallel uploads spend in seconds)
  but Flora's, around every request: tried again with jittered exponential backoff
  for up to ``outage_budget_s()`` (``FLORA_STORE_OUTAGE_S``, default ``OUTAGE_BUDGET_S``) from the
  first failure, so a store that restarts within that time costs a build or a loader a pause, not the
  run; then one line naming the store, the request and how long it was tried. Answers that will not
  change (403, 404, a missing bucket) are never retried;
* ``read_range``: a byte range of an object (a loader's jpg) by a presigned URL through a plain
  urllib3 pool, its 5xx answers retried like the client's (a third of boto3's CPU per request);
* transfers: ``upload_file`` (multipart above ``MULTIPART_BYTES``, parts in parallel),
  ``download_file`` (to a temporary name, then renamed), ``read_bytes``/``write_bytes`` for small
  objects, ``open_stream`` (a streaming body for readers), ``copy`` (server-side), ``delete``,
  ``list_objects``, ``exists``;
* ``check_bucket``: the anticipated failures (a missing bucket, refused credentials, an unreachable
  endpoint) as one ``StoreError`` line each, raised before anything is written. Every other call maps
  botocore's errors the same way (``store_error``). The first request to an endpoint
  (``first_contact``: ``check_bucket``, ``read_bytes``) is a probe until the store has answered once
  in this process: tried ``PROBE_ATTEMPTS`` times when nothing answers, so a wrong or dead endpoint
  is one line in about a second, not after the outage budget.

Leaves out: what is stored where (the sharder's publish step, sharding/build/remote.py; the loaders).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flora.outage import (
    OUTAGE_BUDGET_S,
    OUTAGE_ENV,
    PROBE_ATTEMPTS,
    StoreError,
    _code,
    _endpoint,
    outage_budget_s,
    outlast,
)

__all__ = ["OUTAGE_BUDGET_S", "OUTAGE_ENV", "PROBE_ATTEMPTS", "S3Url", "StoreError", "client", "is_remote",
           "outage_budget_s", "outlast"]  # fmt: skip

T = TypeVar("T")

SCHEME = "s3://"
#: Attempts per request in all (botocore ``standard`` mode: 5xx and throttling answers).
MAX_ATTEMPTS = 10
#: Objects at least this large are uploaded in parts of ``PART_BYTES`` (S3's minimum part is 5 MiB).
MULTIPART_BYTES = 64 << 20
PART_BYTES = 16 << 20
#: Parallel part uploads per file.
TRANSFER_THREADS = 4


def is_remote(location: object) -> bool:
    """True for an ``s3://`` location (a str; ``Path`` would squash the double slash)."""
    return isinstance(location, str) and location.startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str = ""  # no leading slash; "" is the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Url:
        if not is_remote(url):
            raise StoreError(f"not an object-store location: {url!r} (expected s3://bucket/prefix)")
        bucket, _, key = url[len(SCHEME) :].partition("/")
        if not bucket or any(c in bucket for c in " \\:?#"):
            raise StoreError(f"no bucket name in {url!r} (expected s3://bucket/prefix)")
        return cls(bucket, key.strip("/"))

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def join(self, *parts: str) -> S3Url:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p and p.strip("/"))
        return S3Url(self.bucket, key)

    def relative(self, key: str) -> str:
        """``key`` relative to this prefix."""
        prefix = f"{self.key}/" if self.key else ""
        return key[len(prefix) :] if key.startswith(prefix) else key

    def __str__(self) -> str:
        return self.url


_lock = threading.Lock()
_clients: dict[tuple, Any] = {}


def client(attempts: int | None = None) -> Any:
    """The process's S3 client for the current environment (endpoint, credentials, region), retrying
    each request ``attempts`` times in all (default ``MAX_ATTEMPTS``)."""
    attempts = attempts or MAX_ATTEMPTS
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - boto3 is a declared dependency of the s3 extra
        raise StoreError("s3:// locations need boto3: pip install 'flora[s3]'") from exc
    key = (
        attempts,
        os.getpid(),
        _endpoint(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        hash(os.environ.get("AWS_SECRET_ACCESS_KEY")),  # a changed secret needs a new client
        os.environ.get("AWS_SESSION_TOKEN") is not None,
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    with _lock:
        found = _clients.get(key)
        if found is None:
            config = Config(
                retries={"mode": "standard", "max_attempts": attempts},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
                s3={"addressing_style": "path"} if _endpoint() else None,
            )
            session = boto3.session.Session()
            region = session.region_name or "us-east-1"
            found = session.client("s3", endpoint_url=_endpoint(), region_name=region, config=config)
            _answers_only(found)
            _clients[key] = found
    return found


def _answers_only(s3: Any) -> None:
    """Leaves botocore's ``standard`` retries to the store's answers (5xx, throttling): a failed
    connection goes back to the caller at once, for ``outlast`` to retry within the outage budget.

    botocore's handler of the ``needs-retry`` event is replaced by one that declines connection
    errors and hands everything else to a handler of botocore's own (``register_retry_handler``),
    in the same place among the event's handlers."""
    from botocore.exceptions import ConnectionError, HTTPClientError
    from botocore.retries import standard

    events, event, unique_id = s3.meta.events, "needs-retry.s3", "retry-config-s3"
    events.unregister(event, unique_id=unique_id)
    answers = standard.register_retry_handler(s3, s3.meta.config.retries.get("total_max_attempts"))
    events.unregister(event, unique_id=unique_id)

    def needs_retry(caught_exception: BaseException | None = None, **kwargs: Any) -> Any:
        if isinstance(caught_exception, ConnectionError | HTTPClientError):
            return False  # not retried here (False, not None: no later handler retries it either)
        return answers.needs_retry(caught_exception=caught_exception, **kwargs)

    events.register_first(event, needs_retry, unique_id="flora-answers-only-s3")


_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError")


def unreachable(what: str, reason: str) -> StoreError:
    """The one line for an endpoint that did not answer (``reason``: the client's error name)."""
    return StoreError(
        f"{what}: cannot reach the object store at {_endpoint() or 'AWS S3'} ({reason}); "
        "check AWS_ENDPOINT_URL"
    )


def store_error(exc: BaseException, what: str) -> StoreError:
    """botocore's ``exc`` (while doing ``what``) as one line a user can act on."""
    if isinstance(exc, StoreError):
        return exc
    code = _code(exc)
    endpoint = _endpoint() or "AWS S3"
    if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and "bucket" in what):
        return StoreError(f"{what}: the bucket does not exist at {endpoint} (create it first)")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
        return StoreError(
            f"{what}: the store at {endpoint} refused the credentials ({code}); check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    name = type(exc).__name__
    if name in _UNREACHABLE:
        return unreachable(what, name)
    if name == "NoCredentialsError":
        return StoreError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return StoreError(f"{what}: {code or name}: {exc}")


def _errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, S3UploadFailedError, S3TransferFailedError)


def first_contact(call: Any, what: str = "a request") -> Any:
    """``call(client)``, the first time per endpoint in this process tried ``PROBE_ATTEMPTS`` times
    only when nothing answers: a wrong or dead endpoint is reported in about a second, not after an
    outage budget. A store that answered (even 5xx) is retried as any request is (``outlast``)."""
    return outlast(what, lambda: call(client()), probe=True)


def check_bucket(url: S3Url | str) -> None:
    """Raises ``StoreError`` (one line) unless the bucket exists and accepts these credentials."""
    url = S3Url.parse(url) if isinstance(url, str) else url
    try:
        first_contact(lambda c: c.head_bucket(Bucket=url.bucket), f"bucket {url.bucket}")
    except _errors() as exc:
        raise store_error(exc, f"bucket {url.bucket}") from None


def exists(url: S3Url) -> bool:
    try:
        outlast(f"reading {url}", lambda: client().head_object(Bucket=url.bucket, Key=url.key))
        return True
    except _errors() as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise store_error(exc, f"reading {url}") from None


def head(url: S3Url) -> dict | None:
    """The object's size and user metadata, or None when there is no such object."""
    try:
        got = outlast(f"reading {url}", lambda: client().head_object(Bucket=url.bucket, Key=url.key))
    except _errors() as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise store_error(exc, f"reading {url}") from None
    return {"size": got["ContentLength"], "metadata": got.get("Metadata", {}), "etag": got.get("ETag")}


def read_bytes(url: S3Url) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    try:
        return first_contact(
            lambda c: c.get_object(Bucket=url.bucket, Key=url.key)["Body"].read(), f"reading {url}"
        )
    except _errors() as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise store_error(exc, f"reading {url}") from None


def write_bytes(url: S3Url, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """One PUT: the object appears whole or not at all."""
    what = f"writing {url}"
    try:
        outlast(
            what,
            lambda: client().put_object(Bucket=url.bucket, Key=url.key, Body=data, Metadata=metadata or {}),
        )
    except _errors() as exc:
        raise store_error(exc, what) from None


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_BYTES,
        multipart_chunksize=PART_BYTES,
        max_concurrency=TRANSFER_THREADS,
        use_threads=True,
    )


def upload_file(path: str | Path, url: S3Url, metadata: dict[str, str] | None = None) -> None:
    """Uploads a file (multipart above ``MULTIPART_BYTES``; S3 shows the object only once complete)."""
    extra = {"Metadata": metadata} if metadata else None
    what = f"uploading {path} to {url}"
    try:
        outlast(
            what,
            lambda: client().upload_file(
                str(path), url.bucket, url.key, ExtraArgs=extra, Config=_transfer_config()
            ),
        )
    except _errors() as exc:
        raise store_error(exc, what) from None


def download_file(url: S3Url, path: str | Path) -> None:
    """Downloads to ``path`` through a temporary name (a crash never leaves half a file there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        outlast(
            f"downloading {url}",
            lambda: client().download_file(url.bucket, url.key, str(tmp), Config=_transfer_config()),
        )
        os.replace(tmp, path)
    except (*_errors(), StoreError) as exc:
        tmp.unlink(missing_ok=True)
        raise store_error(exc, f"downloading {url}") from None


def open_stream(url: S3Url) -> Any:
    """A streaming, file-like body of the object (``read(n)``, ``close()``)."""
    try:
        return outlast(f"reading {url}", lambda: client().get_object(Bucket=url.bucket, Key=url.key)["Body"])
    except _errors() as exc:
        raise store_error(exc, f"reading {url}") from None


#: A presigned URL is signed again after this many seconds (it is valid for twice as long).
SIGNED_TTL_S = 1800
_signed: dict[tuple, tuple[str, float]] = {}
_pools: dict[int, Any] = {}


def _secret_hash() -> int:
    return hash(os.environ.get("AWS_SECRET_ACCESS_KEY"))  # a changed secret: signed again


def _signed_url(url: S3Url, fresh: bool = False) -> str:
    """A presigned GET URL of ``url`` for the current environment (cached per process)."""
    key = (os.getpid(), _endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), _secret_hash(), url.bucket, url.key)
    now = time.monotonic()
    found = _signed.get(key)
    if found is None or fresh or now - found[1] > SIGNED_TTL_S:
        try:
            signed = client().generate_presigned_url(
                "get_object", Params={"Bucket": url.bucket, "Key": url.key}, ExpiresIn=2 * SIGNED_TTL_S
            )
        except _errors() as exc:
            raise store_error(exc, f"reading {url}") from None
        found = _signed[key] = (signed, now)
    return found[0]


def _pool() -> Any:
    """This process's urllib3 pool for ranged GETs, with botocore-like retries of the store's answers:
    5xx (throttling's 503 SlowDown too) ``MAX_ATTEMPTS`` times in all, jittered exponential backoff,
    ``Retry-After`` honoured. A failed connection is not retried here but by ``outlast``."""
    import urllib3

    with _lock:
        found = _pools.get(os.getpid())
        if found is None:
            retry = urllib3.Retry(
                total=MAX_ATTEMPTS - 1, connect=0, read=0, other=0,
                status_forcelist=(500, 502, 503, 504), allowed_methods={"GET"},
                backoff_factor=0.1, backoff_max=20, backoff_jitter=0.1, raise_on_status=False,
            )  # fmt: skip
            timeout = urllib3.Timeout(connect=5, read=60)
            found = _pools[os.getpid()] = urllib3.PoolManager(maxsize=32, retries=retry, timeout=timeout)
    return found


def read_range(url: S3Url, offset: int, size: int) -> bytes:
    """``size`` bytes of the object from ``offset`` (one ranged GET; fewer at the object's end).

    By a presigned URL through a plain urllib3 pool: a third of boto3's CPU per request (measured
    ~0.9 against ~2.8 ms here), which is most of what reading a jpg from the store costs a loader."""
    import urllib3

    if size <= 0:
        return b""
    headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
    what = f"reading {url}"
    for fresh in (False, True):  # a 403: the signature may have expired; signed again once
        signed = _signed_url(url, fresh)
        try:
            got = outlast(what, lambda u=signed: _pool().request("GET", u, headers=headers))
        except urllib3.exceptions.HTTPError as exc:
            raise unreachable(what, type(getattr(exc, "reason", None) or exc).__name__) from None
        if got.status == 206:
            return got.data
        if got.status == 200:  # a store that ignores Range: the whole object
            return got.data[offset : offset + size]
        if got.status == 416:  # the object ends before offset
            return b""
        if got.status != 403:
            break
    code = _xml_code(got.data) or str(got.status)
    if got.status in (403, 404):  # refused credentials, a missing bucket or object: store_error's lines
        raise store_error(_Answer(code), f"reading {url}")
    raise StoreError(f"reading {url}: the store answered {got.status} ({code}) after {MAX_ATTEMPTS} attempts")


class _Answer(Exception):
    """A store's error answer to a presigned GET, shaped like botocore's ClientError for store_error."""

    def __init__(self, code: str):
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


def _xml_code(body: bytes) -> str:
    start, end = body.find(b"<Code>"), body.find(b"</Code>")
    return body[start + 6 : end].decode("ascii", "replace") if 0 <= start < end else ""


def open_stream_at(url: S3Url, offset: int = 0) -> Any:
    """Like ``open_stream``, from byte ``offset`` on (to resume a stream that broke off)."""
    try:
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        return outlast(
            f"reading {url}", lambda: client().get_object(Bucket=url.bucket, Key=url.key, **extra)["Body"]
        )
    except _errors() as exc:
        raise store_error(exc, f"reading {url}") from None


def copy(src: S3Url, dst: S3Url) -> None:
    """A server-side copy (no bytes through this machine; multipart for large objects)."""
    what = f"copying {src} to {dst}"
    try:
        outlast(
            what,
            lambda: client().copy(
                {"Bucket": src.bucket, "Key": src.key}, dst.bucket, dst.key, Config=_transfer_config()
            ),
        )
    except _errors() as exc:
        raise store_error(exc, what) from None


def list_objects(prefix: S3Url) -> Iterator[tuple[str, int]]:
    """``(key relative to prefix, size)`` of every object under ``prefix/`` (a page of 1,000 per
    request, each request retried through an outage on its own)."""
    base = f"{prefix.key}/" if prefix.key else ""
    what = f"listing {prefix}"
    request: dict[str, str] = {"Bucket": prefix.bucket, "Prefix": base}
    while True:
        try:
            page = outlast(what, lambda: client().list_objects_v2(**request))
        except _errors() as exc:
            raise store_error(exc, what) from None
        for obj in page.get("Contents", []):
            yield obj["Key"][len(base) :], obj["Size"]
        if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def delete(urls: Iterable[S3Url]) -> int:
    """Deletes objects (1,000 per request); a missing one is not an error. Returns how many."""
    by_bucket: dict[str, list[str]] = {}
    for url in urls:
        by_bucket.setdefault(url.bucket, []).append(url.key)
    count = 0
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            what = f"deleting from s3://{bucket}"
            try:
                got = outlast(
                    what,
                    lambda b=bucket, objects=batch: client().delete_objects(
                        Bucket=b, Delete={"Objects": objects, "Quiet": True}
                    ),
                )
            except _errors() as exc:
                raise store_error(exc, what) from None
            if got.get("Errors"):
                first = got["Errors"][0]
                raise StoreError(f"deleting s3://{bucket}/{first.get('Key')}: {first.get('Code')}")
            count += len(batch)
    return count
