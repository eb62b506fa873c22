"""Store outages: a request to the object store tried again while its failure may pass.

Owns ``outlast`` (a request retried with jittered exponential backoff while it fails for a reason
that passes, a lost connection, a timeout, a 5xx or throttling answer, for up to ``outage_budget_s()``
from its first failure; a first request to an endpoint that never answered is a probe, tried
``PROBE_ATTEMPTS`` times only), the budget (``FLORA_STORE_OUTAGE_S``, default ``OUTAGE_BUDGET_S``), the
backoff, and which errors pass (``_transient``). botocore retries the store's answers by attempts from
one quota that a client's parallel uploads spend in seconds; an outage is counted in time here.

Also owns ``StoreError`` (store.py raises it, and re-exports it) and the two facts both modules read: the
endpoint (``AWS_ENDPOINT_URL[_S3]``) and an error's S3 code.

Leaves out: the client, the requests and the one-line errors (store.py, which calls ``outlast`` around
every request).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from flora.errors import FloraError

T = TypeVar("T")

#: Attempts of the first request to an endpoint (``first_contact``) when nothing answers.
PROBE_ATTEMPTS = 2
#: How long a store that answered before may stay unreachable (or keep failing 5xx) before a request
#: gives up, in seconds from its first failure; ``FLORA_STORE_OUTAGE_S`` sets another. A restarted
#: S3 gateway or a store behind a load balancer that fails over is back within seconds to tens of
#: seconds; a minute covers those without leaving a build hanging on a store that is gone.
OUTAGE_BUDGET_S = 60.0
OUTAGE_ENV = "FLORA_STORE_OUTAGE_S"
#: The waits between tries during an outage: the first retry at once (a keep-alive connection the
#: store dropped), then uniform in [0, min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * 2**n)] ("full
#: jitter": threads that failed together do not come back together). The cap bounds how late a
#: store that is back is noticed.
OUTAGE_BACKOFF_BASE_S = 0.5
OUTAGE_BACKOFF_MAX_S = 5.0

_reached: set[str | None] = set()  # endpoints that answered in this process (first_contact)


class StoreError(FloraError, OSError):
    """An object-store request failed in a way a user can act on (bucket, credentials, endpoint)."""


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


#: Error codes of a store that answered but is busy or failing: retried with ``MAX_ATTEMPTS``.
_RETRYABLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "InternalError",
              "ServiceUnavailable", "RequestTimeout"}  # fmt: skip


def outage_budget_s() -> float:
    """Seconds an outage is retried: ``FLORA_STORE_OUTAGE_S`` if set, else ``OUTAGE_BUDGET_S``."""
    raw = os.environ.get(OUTAGE_ENV, "").strip()
    if not raw:
        return OUTAGE_BUDGET_S
    try:
        budget = float(raw)
    except ValueError:
        budget = -1.0
    if not budget >= 0:
        raise StoreError(f"{OUTAGE_ENV} must be a number of seconds >= 0, got {raw!r}")
    return budget


def _root(exc: BaseException) -> BaseException:
    """The request's own error under boto3's transfer wrappers (S3UploadFailedError and friends)."""
    for _ in range(4):
        inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
        if type(exc).__module__.split(".")[0] not in ("boto3", "s3transfer") or inner is None:
            break
        exc = inner
    return exc


def _transient(exc: BaseException) -> str | None:
    """Why ``exc`` may pass (a lost connection, a timeout, a 5xx or throttling answer), or None."""
    from botocore.exceptions import ConnectionError, HTTPClientError, SSLError
    from urllib3.exceptions import HTTPError
    from urllib3.exceptions import SSLError as Urllib3SSLError

    exc = _root(exc)
    if isinstance(exc, SSLError | Urllib3SSLError):
        return None  # a certificate does not mend itself
    if isinstance(exc, ConnectionError | HTTPClientError):
        return type(exc).__name__
    if isinstance(exc, HTTPError):  # read_range's urllib3: the reason under its MaxRetryError
        reason = getattr(exc, "reason", None) or exc
        return None if isinstance(reason, Urllib3SSLError) else type(reason).__name__
    code = _code(exc)
    return code if code in _RETRYABLE or code.startswith("5") else None


def _backoff_s(retry: int) -> float:
    """The wait before retry number ``retry`` (1, 2...) of an outage: see ``OUTAGE_BACKOFF_BASE_S``."""
    if retry <= 1:
        return 0.0
    return random.uniform(0, min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * 2 ** (retry - 2)))


def outlast(what: str, call: Callable[[], T], probe: bool = False) -> T:
    """``call()``, tried again while it fails for a reason that passes (``_transient``): for up to
    ``outage_budget_s()`` from its first failure, or, with ``probe`` and an endpoint that never
    answered in this process, ``PROBE_ATTEMPTS`` times in all (a wrong or dead endpoint is reported
    at once). Any other error is raised as it came; an outage past the budget is one StoreError line
    naming the store, ``what`` (the request) and how long it was tried."""
    endpoint = _endpoint()
    began = time.monotonic()
    first_failure: float | None = None
    tries = 0
    while True:
        try:
            out = call()
        except Exception as exc:
            if _code(_root(exc)):
                _reached.add(endpoint)  # it answered: reachable, whatever it said
            reason = _transient(exc)
            if reason is None:
                raise
            tries += 1
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if probe and endpoint not in _reached:
                if tries >= PROBE_ATTEMPTS:
                    raise
                left = OUTAGE_BACKOFF_MAX_S
            else:
                left = first_failure + outage_budget_s() - now
                if left <= 0:
                    raise _gave_up(what, reason, tries, now - first_failure, now - began) from None
            time.sleep(min(_backoff_s(tries), left))
            continue
        _reached.add(endpoint)
        return out


def _gave_up(what: str, reason: str, tries: int, down_s: float, took_s: float):
    return StoreError(
        f"{what}: the object store at {_endpoint() or 'AWS S3'} failed every try for {down_s:.0f} s "
        f"({reason}, {tries} tries); gave up after {took_s:.0f} s, past the outage budget of "
        f"{outage_budget_s():g} s ({OUTAGE_ENV})"
    )
