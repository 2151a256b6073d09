"""What a backend's exception means: the one place that reads botocore, s3fs, aiohttp and OS errors.

Every backend and the retry layer ask the same questions of a failure: is it
transient, a missing object, a denied request, missing credentials, a lost
conditional write? botocore keeps the answer in ``exc.response`` and s3fs
re-raises it as ``FileNotFoundError``/``PermissionError`` with the ClientError
as the cause, so every question walks the exception chain. botocore and aiohttp
are optional: nothing here imports them unless they are already installed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreError,
)

#: S3 error codes that mean "try again" (throttling, server-side hiccups).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: botocore / aiohttp / http.client exception class names that are connection-level faults.
TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProxyConnectionError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientPayloadError",
        "FSTimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        # the body does not match the checksum the server sent: torn on the way (or by a non-atomic server,
        # as moto under a concurrent overwrite); a retry reads a whole object
        "FlexibleChecksumError",
    }
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
DENIED_CODES = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"})
# 412: the condition did not hold; 409: a concurrent conditional write to the same key won.
LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
WRONG_REGION_CODES = frozenset({"PermanentRedirect", "301"})
_NEVER_TRANSIENT = (ObjectNotFoundError, PreconditionFailedError, ConditionalWritesUnsupportedError)
_CREDENTIALS_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError"})


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes/contexts (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def error_info(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of the first service response in the chain; ("", 0) if none."""
    for cause in chain(exc):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)
            return code, status
    return "", 0


def _named(exc: BaseException, names: frozenset[str]) -> bool:
    return any(klass.__name__ in names for klass in type(exc).__mro__)


def is_transient(exc: BaseException) -> bool:
    """True for faults a later attempt may not see: connection errors, timeouts, 5xx, throttling."""
    for cause in chain(exc):
        if isinstance(cause, _NEVER_TRANSIENT):
            return False
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code, status = error_info(cause)
            return code in TRANSIENT_CODES or status in TRANSIENT_STATUS
        if isinstance(cause, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return True
        if _named(cause, TRANSIENT_NAMES):
            return True
    return False


def is_missing_bucket(exc: BaseException) -> bool:
    return error_info(exc)[0] in MISSING_BUCKET_CODES


def is_not_found(exc: BaseException) -> bool:
    """The object (not the bucket) is missing: a 404, or a filesystem's FileNotFoundError."""
    if is_missing_bucket(exc):
        return False
    code, status = error_info(exc)
    return (
        status == 404
        or code in NOT_FOUND_CODES
        or isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
    )


def is_denied(exc: BaseException) -> bool:
    code, status = error_info(exc)
    return status == 403 or code in DENIED_CODES or isinstance(exc, PermissionError)


def is_credentials_error(exc: BaseException) -> bool:
    """botocore found no (or only partial) credentials anywhere in its chain."""
    return any(_named(cause, _CREDENTIALS_ERRORS) for cause in chain(exc))


def is_lost_race(exc: BaseException, compare_and_swap: bool) -> bool:
    """A conditional PUT lost: 412/409, s3fs's FileExistsError, or (for If-Match) the object was deleted."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of a failed If-None-Match
        return True
    code, status = error_info(exc)
    if status in (409, 412) or code in LOST_RACE_CODES:
        return True
    return compare_and_swap and (status == 404 or code in NOT_FOUND_CODES) and not is_missing_bucket(exc)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc) or repr(exc)}"


@cache
def backend_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the backend failed", as opposed to a bug in our code."""
    errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
    try:
        from aiohttp import ClientError as HttpClientError  # a body stream cut mid-read (s3fs)

        errors = (*errors, HttpClientError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return (*errors, BotoCoreError, ClientError)


def explain_bucket_error(bucket: str, exc: BaseException) -> str:
    """One sentence saying why ``bucket`` cannot be used (for StoreConfigurationError)."""
    if is_credentials_error(exc):
        return (
            f"no AWS credentials found for bucket {bucket!r} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or AWS_PROFILE / a profile in ~/.aws/credentials): {exc}"
        )
    code, status = error_info(exc)
    if isinstance(exc, FileNotFoundError) or status == 404 or code in NOT_FOUND_CODES | MISSING_BUCKET_CODES:
        return f"bucket {bucket!r} does not exist"
    if is_denied(exc):
        return f"access denied to bucket {bucket!r} (check credentials): {exc}"
    if status == 301 or code in WRONG_REGION_CODES:
        return f"bucket {bucket!r} is in another region (set region_name): {exc}"
    return f"cannot reach bucket {bucket!r}: {describe(exc)}"


def as_store_error(operation: str, key: str, exc: BaseException) -> StoreError:
    """The StoreError subclass a backend failure stands for, naming operation and key."""
    if operation in ("get", "copy") and is_not_found(exc):  # a copy names its source
        return ObjectNotFoundError(key)
    if is_credentials_error(exc):
        return StoreError(operation, key, f"no usable credentials: {exc}")
    if is_denied(exc):
        return StoreError(operation, key, f"access denied (check credentials and permissions): {exc}")
    return StoreError(operation, key, describe(exc))


@contextmanager
def translated(operation: str, key: str) -> Iterator[None]:
    """Re-raise backend exceptions as StoreErrors (cause kept, so retries can classify them); bugs pass."""
    try:
        yield
    except StoreError:
        raise
    except backend_error_types() as exc:
        raise as_store_error(operation, key, exc) from exc
