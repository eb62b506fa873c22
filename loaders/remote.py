"""What the loaders need of an object store besides reading shards (``data.shards: s3://bucket/prefix``).

Reading a shard root in a store (the manifest and class mappings mirrored under the cache root,
``.idx`` files, sample tables, stamps, ranged reads and whole-tar streams) is the shard format's
reader's (sharding/format/reader.py), through flora/store.py's client. Owns what is particular to the
loaders' processes:

* **Worker processes**: the AWS settings of this process (``aws_env``), which a worker started from a
  fork server (whose environment is that of an earlier moment) applies before it reads.
* **DALI's S3 client** (``dali_s3_check``): it reads ``AWS_ENDPOINT_URL`` only (not the
  ``AWS_ENDPOINT_URL_S3`` that boto3 prefers) and, for an endpoint named by a host name, addresses
  buckets virtual-host style (``http://bucket.host/key``); with an IP address it uses path style.

Leaves out: reading shards (sharding/format/reader.py), which samples are read (index.py),
verification rules (index.py, recheck.py), and writing to the store (the sharder's publish step).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

from flora import store
from flora.store import S3Url, StoreError, is_remote

# is_remote, StoreError: the loaders' backends import them from here.
__all__ = ["StoreError", "aws_env", "dali_s3_check", "is_remote"]


def aws_env() -> dict[str, str]:
    """The ``AWS_*`` settings of this process (to apply in a worker process; never printed)."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def dali_s3_check(url: str) -> None:
    """Prepares DALI's S3 client for the shard root ``url``, or refuses one it cannot address.

    DALI reads ``AWS_ENDPOINT_URL`` alone, so an ``AWS_ENDPOINT_URL_S3`` (boto3's first choice) is
    copied there; its SDK's retries are set to flora/store.py's unless the environment sets them.
    For an endpoint named by a host name DALI asks for ``bucket.host``: unless that resolves (a store
    with virtual-host buckets), the endpoint must be given by IP address.
    """
    s3_only = os.environ.get("AWS_ENDPOINT_URL_S3")
    if s3_only:
        os.environ["AWS_ENDPOINT_URL"] = s3_only
    # The AWS SDK under DALI retries throttling and 5xx answers as botocore does here (standard mode),
    # as often as flora/store.py does, unless the environment says otherwise (boto3 ignores these:
    # store.client() passes its own retry settings).
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(store.MAX_ATTEMPTS))
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return  # AWS itself: virtual-host buckets resolve
    host = urlsplit(endpoint).hostname or ""
    try:
        ipaddress.ip_address(host)
        return  # path style
    except ValueError:
        pass
    bucket = S3Url.parse(url).bucket
    try:
        socket.getaddrinfo(f"{bucket}.{host}", None)
    except OSError:
        raise StoreError(
            f"backend dali: DALI's S3 client addresses bucket {bucket!r} as {bucket}.{host}, which does "
            f"not resolve; give AWS_ENDPOINT_URL with the store's IP address (e.g. http://"
            f"{_first_address(host)}:{urlsplit(endpoint).port or 80}) or use backend: torch"
        ) from None


def _first_address(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return "<ip>"
