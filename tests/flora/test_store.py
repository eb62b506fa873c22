"""flora/store.py's ranged reads (``read_range``: presigned URL, urllib3 pool) against the real S3
server on 127.0.0.1: the bytes asked for, short at the object's end, empty past it; an expired
signature signed again; a missing object and refused credentials are one StoreError line each."""

from __future__ import annotations

import os
import time

import pytest

from flora import store
from flora.store import S3Url, StoreError

pytestmark = pytest.mark.s3
DATA = os.urandom(100_000)


@pytest.fixture
def blob(s3_bucket) -> S3Url:
    url = S3Url.parse(f"s3://{s3_bucket}/dir/blob.bin")
    store.write_bytes(url, DATA)
    return url


def test_a_range_is_the_bytes_asked_for_short_at_the_end_and_empty_past_it(blob):
    assert store.read_range(blob, 0, 10) == DATA[:10]
    assert store.read_range(blob, 12_345, 20_000) == DATA[12_345:32_345]
    assert store.read_range(blob, 99_990, 100) == DATA[99_990:]
    assert store.read_range(blob, 100_000, 10) == b""
    assert store.read_range(blob, 5, 0) == b""


def test_an_expired_signature_is_signed_again(blob, monkeypatch):
    expired = store.client().generate_presigned_url(
        "get_object", Params={"Bucket": blob.bucket, "Key": blob.key}, ExpiresIn=1
    )
    time.sleep(2)
    key = (
        os.getpid(),
        store._endpoint(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        store._secret_hash(),
        blob.bucket,
        blob.key,
    )
    monkeypatch.setitem(store._signed, key, (expired, time.monotonic()))
    assert store.read_range(blob, 100, 50) == DATA[100:150]
    assert store._signed[key][0] != expired


def test_a_missing_object_is_one_store_error(blob):
    with pytest.raises(StoreError, match=r"reading s3://.*/dir/nothing\.bin: NoSuchKey"):
        store.read_range(S3Url(blob.bucket, "dir/nothing.bin"), 0, 10)


def test_refused_credentials_are_one_line_without_the_secret(blob, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    with pytest.raises(StoreError) as err:
        store.read_range(blob, 0, 10)
    assert "refused the credentials" in str(err.value) and "not-the-secret" not in str(err.value)
    assert "\n" not in str(err.value)
