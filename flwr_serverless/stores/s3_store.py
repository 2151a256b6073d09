"""A store on S3 (or any S3-compatible service) through plain boto3.

Each write is a single ``put_object``, which S3 makes visible atomically, and
conditional writes use S3's ``If-None-Match: *`` / ``If-Match: <etag>``. The
bucket is checked once at construction so that a typo, a missing bucket or
missing credentials fail before any training starts, with a message that says
which one it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from flwr_serverless.errors import (
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreConfigurationError,
    StoreError,
)
from flwr_serverless.stores.base import ObjectInfo, Store, s3_listing_objects
from flwr_serverless.stores.fsspec_store import check_prefix

T = TypeVar("T")
STREAM_CHUNK_BYTES = 1 << 20  # a streamed GET holds at most this much in memory at a time


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _error_info(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Store(Store):
    """Objects under ``s3://bucket/prefix/``; one boto3 client shared by all threads."""

    supports_conditional_writes = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: Any = None,
        max_attempts: int = 5,
        session: Any = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        try:
            import botocore.exceptions
        except ImportError as exc:
            raise StoreConfigurationError(
                f"S3Store for bucket {bucket!r} needs boto3: pip install 'flwr-serverless[s3]'"
            ) from exc
        if not bucket or "/" in bucket:
            raise StoreConfigurationError(f"S3Store: invalid bucket name {bucket!r} (put the path into prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._exceptions = botocore.exceptions
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else self._make_client(session, endpoint_url, region_name, max_attempts, client_kwargs)
        )
        # Streaming a body can fail after the response headers arrived; botocore does not retry that.
        self._max_attempts = max(1, max_attempts)
        self._close_lock = threading.Lock()
        self._check_bucket()

    @staticmethod
    def _make_client(
        session: Any, endpoint_url: str | None, region_name: str | None, max_attempts: int, kwargs: dict[str, Any]
    ) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, max_pool_connections=32)
        user_config = kwargs.pop("config", None)
        if user_config is not None:
            config = config.merge(user_config)
        # A fresh session per store: boto3's default session is shared global state and not thread-safe.
        session = session if session is not None else boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.bucket!r}, prefix={self.prefix!r})"

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (for callers that need an operation we do not wrap)."""
        return self._client

    def _check_bucket(self) -> None:
        exceptions = self._exceptions
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (exceptions.NoCredentialsError, exceptions.PartialCredentialsError) as exc:
            raise StoreConfigurationError(
                f"store {where!r}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or AWS_PROFILE / a profile in ~/.aws/credentials): {exc}"
            ) from exc
        except exceptions.ClientError as exc:
            code, status = _error_info(exc)
            if status == 404 or code in ("404", "NoSuchBucket"):
                reason = f"bucket {self.bucket!r} does not exist"
            elif status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                reason = f"access denied to bucket {self.bucket!r} (check credentials): {exc}"
            elif status == 301 or code in ("301", "PermanentRedirect"):
                reason = f"bucket {self.bucket!r} is in another region (set region_name): {exc}"
            else:
                reason = f"cannot use bucket {self.bucket!r}: {exc}"
            raise StoreConfigurationError(f"store {where!r}: {reason}") from exc
        except exceptions.BotoCoreError as exc:
            raise StoreConfigurationError(f"store {where!r}: cannot reach S3: {_describe(exc)}") from exc

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, operation: str, key: str, exc: Exception) -> StoreError:
        if isinstance(exc, (self._exceptions.NoCredentialsError, self._exceptions.PartialCredentialsError)):
            return StoreError(operation, key, f"no usable AWS credentials: {exc}")
        if _error_info(exc)[1] == 403:
            return StoreError(operation, key, f"access denied (check credentials and permissions): {exc}")
        return StoreError(operation, key, _describe(exc))

    # -- primitives ---------------------------------------------------------------
    def _put(self, key: str, data: bytes) -> str:
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._fail("put", key, exc) from exc
        return str(response["ETag"]).strip('"')

    def _get(self, key: str) -> bytes:
        return self._read(key, lambda body: body.read())

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        def stream(body: Any) -> int:
            size = 0
            for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                sink.write(chunk)
                size += len(chunk)
            return size

        def restart() -> None:
            sink.seek(0)
            sink.truncate()

        return self._read(key, stream, restart)

    def _read(self, key: str, consume: Callable[[Any], T], restart: Callable[[], None] | None = None) -> T:
        """One GET whose body ``consume`` reads; a broken stream is read again from the start."""
        exceptions = self._exceptions
        streaming_errors = tuple(
            getattr(exceptions, name)
            for name in ("ResponseStreamingError", "IncompleteReadError", "ReadTimeoutError", "ConnectionClosedError")
            if hasattr(exceptions, name)
        )
        for attempt in range(1, self._max_attempts + 1):
            try:
                if restart is not None and attempt > 1:
                    restart()
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
                body = response["Body"]
                try:
                    return consume(body)
                finally:
                    body.close()
            except exceptions.ClientError as exc:
                code, status = _error_info(exc)
                if status == 404 and code != "NoSuchBucket":
                    raise ObjectNotFoundError(key) from exc
                raise self._fail("get", key, exc) from exc
            except streaming_errors as exc:
                if attempt == self._max_attempts:
                    raise self._fail("get", key, exc) from exc
            except exceptions.BotoCoreError as exc:
                raise self._fail("get", key, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        check_prefix(prefix)  # harmless on S3, but every backend should accept the same prefixes
        base = f"{self.prefix}/" if self.prefix else ""
        found: dict[str, ObjectInfo] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                found.update((info.key, info) for info in s3_listing_objects(page.get("Contents", []), base))
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc
        return found

    def _delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._exceptions.ClientError as exc:
            if _error_info(exc)[1] != 404:
                raise self._fail("delete", key, exc) from exc
        except self._exceptions.BotoCoreError as exc:
            raise self._fail("delete", key, exc) from exc

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        operation = "put_if_absent" if if_match is None else "put_if_match"
        if if_match is None:
            condition = {"IfNoneMatch": "*"}
        else:
            condition = {"IfMatch": if_match if if_match.startswith('"') else f'"{if_match}"'}
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except self._exceptions.ClientError as exc:
            code, status = _error_info(exc)
            # 412: the condition did not hold; 409: a concurrent conditional write won; 404 on If-Match: deleted.
            lost_race = status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
            vanished = if_match is not None and (status == 404 or code == "NoSuchKey")
            if lost_race or vanished:
                raise PreconditionFailedError(operation, key) from exc
            raise self._fail(operation, key, exc) from exc
        except self._exceptions.BotoCoreError as exc:
            raise self._fail(operation, key, exc) from exc
        return str(response["ETag"]).strip('"')

    def close(self) -> None:
        """Close the HTTP connection pool if this store created the client."""
        with self._close_lock:
            if self._owns_client and hasattr(self._client, "close"):
                self._client.close()
                self._owns_client = False
