"""What the two S3 backends (boto3 and s3fs) share: one class that speaks the S3 API.

Both backends issue the same requests (a single ``put_object`` per write, with
``If-None-Match: *`` / ``If-Match`` for conditional writes, ``list_objects_v2``
pages, ``delete_object``, ``head_bucket`` once at construction), so all of that
lives in :class:`S3ObjectStore`. A backend only says how to make a request
(``_call``) and how to read an object's body (``_read_object``/``_stream_object``);
errors are read by :mod:`~flwr_serverless.stores.backend_errors`.

Retry layers: botocore retries each request (``max_attempts``) and s3fs loops
on top of that. While our own bounded ``RetryPolicy`` is on, botocore gets
``ATTEMPTS_UNDER_OUR_RETRIES`` attempts and s3fs's loop one, so the layers do not multiply.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO

from flwr_serverless.errors import PreconditionFailedError, StoreConfigurationError, StoreError
from flwr_serverless.stores.backend_errors import (
    backend_error_types,
    explain_bucket_error,
    is_lost_race,
    is_not_found,
    translated,
)
from flwr_serverless.stores.base import ObjectInfo, Store, check_key, check_prefix
from flwr_serverless.stores.retry import RetryPolicy

S3_SCHEMES = ("s3", "s3a")
#: botocore attempts per request while our retries are on (one quick retry) and while they are off.
ATTEMPTS_UNDER_OUR_RETRIES = 2
ATTEMPTS_ALONE = 5
STREAM_CHUNK_BYTES = 1 << 20  # a streamed GET holds at most this much in memory at a time
#: Credential option names: s3fs's -> boto3's (each backend accepts both spellings).
S3FS_TO_BOTO3 = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token"}


def botocore_attempts(retry_policy: RetryPolicy) -> int:
    """botocore's attempts per request for a store that ``retry_policy`` will retry."""
    return ATTEMPTS_UNDER_OUR_RETRIES if retry_policy.attempts > 1 else ATTEMPTS_ALONE


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme.lower() not in S3_SCHEMES:
        raise StoreConfigurationError(f"store {url!r}: not an s3:// URL")
    bucket, _, prefix = rest.strip("/").partition("/")
    if not bucket:
        raise StoreConfigurationError(f"store {url!r}: no bucket in the URL (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def quote_etag(tag: str) -> str:
    """The ETag as S3 wants it in ``If-Match`` (with quotes)."""
    return tag if tag.startswith('"') else f'"{tag}"'


def unquote_etag(etag: object) -> str:
    """The ETag as our tags carry it (without quotes)."""
    return str(etag).strip('"')


def listing_objects(contents: list[dict[str, Any]], base: str) -> Iterator[ObjectInfo]:
    """Turn a ``list_objects_v2`` page's ``Contents`` into ObjectInfos relative to ``base``."""
    for item in contents:
        name = item["Key"]
        if name.endswith("/") or not name.startswith(base):  # folder placeholders
            continue
        key = name[len(base) :]
        try:
            check_key(key)
        except StoreError:  # written by another tool under a name we could never GET
            continue
        yield ObjectInfo(key=key, tag=unquote_etag(item.get("ETag", "")), size=int(item["Size"]), modified=_stamp(item))


def _stamp(item: dict[str, Any]) -> float | None:
    """LastModified (a datetime from boto3/aiobotocore) as seconds since the epoch, on the server's clock."""
    moment = item.get("LastModified")
    return moment.timestamp() if isinstance(moment, datetime) else None


class S3ObjectStore(Store):
    """Objects under ``s3://bucket/prefix/``, spoken through an S3 API client (see the subclasses)."""

    supports_conditional_writes = True
    bucket: str
    prefix: str
    _server_time: tuple[float, float] | None = None  # (the Date of a LIST answer, monotonic time it arrived)

    def now(self) -> float | None:
        """The server's clock, from the Date of the latest LIST answer carried forward (a lower bound, 1 s steps)."""
        seen = self._server_time
        return None if seen is None else seen[0] + (time.monotonic() - seen[1])

    def _note_date(self, response: dict[str, Any]) -> None:
        arrived = time.monotonic()
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        try:
            date = parsedate_to_datetime(headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError, IndexError):
            return
        seen = self._server_time
        if seen is None or date - arrived > seen[0] - seen[1]:
            self._server_time = (date, arrived)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.bucket!r}, prefix={self.prefix!r})"

    # -- what a backend provides -----------------------------------------------------
    @abstractmethod
    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        """One S3 API request (``put_object``, ``list_objects_v2``...), its response as a dict."""

    @abstractmethod
    def _read_object(self, key: str) -> bytes:
        """One GET of the object's whole body."""

    @abstractmethod
    def _stream_object(self, key: str, sink: BinaryIO) -> int:
        """One GET, its body written to ``sink`` in chunks; return the size."""

    @abstractmethod
    def _read_object_tagged(self, key: str) -> tuple[bytes, str]:
        """One GET: the whole body and the ETag of exactly those bytes (S3 returns it with the body)."""

    # -- shared ------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _check_bucket(self) -> None:
        """Fail at construction, saying whether the bucket, the credentials or the region is wrong."""
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except backend_error_types() as exc:
            raise StoreConfigurationError(f"store {self.url!r}: {explain_bucket_error(self.bucket, exc)}") from exc

    def _tag_of(self, response: dict[str, Any], key: str) -> str:
        etag = response.get("ETag")
        if etag is None:  # some S3-compatible services omit it; ask once
            etag = self._call("head_object", Bucket=self.bucket, Key=self._key(key))["ETag"]
        return unquote_etag(etag)

    def _put(self, key: str, data: bytes) -> str:
        with translated("put", key):
            return self._tag_of(self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data), key)

    def _get(self, key: str) -> bytes:
        with translated("get", key):
            return self._read_object(key)

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        with translated("get", key):
            return self._stream_object(key, sink)

    def _copy(self, source: str, destination: str) -> str:
        with translated("copy", source):  # a missing source is a 404 naming it
            response = self._call(
                "copy_object",
                Bucket=self.bucket,
                Key=self._key(destination),
                CopySource={"Bucket": self.bucket, "Key": self._key(source)},
            )
        etag = response.get("CopyObjectResult", {}).get("ETag")
        return unquote_etag(etag) if etag is not None else self._tag_of({}, destination)

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        """One GET instead of LIST + GET: the response carries the ETag of the body it returns."""

        def attempt() -> tuple[bytes, str]:
            with translated("get", key):
                return self._read_object_tagged(key)

        data, tag = self._retrying("get", check_key(key), attempt)
        self.stats.add(gets=1, bytes_down=len(data))
        if not unquote_etag(tag):  # an S3-compatible service that omits it: the generic LIST, GET, LIST
            return super().get_with_tag(key)
        return data, unquote_etag(tag)

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        check_prefix(prefix)  # harmless on S3, but every backend should accept the same prefixes
        base = f"{self.prefix}/" if self.prefix else ""
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
        found: dict[str, ObjectInfo] = {}
        with translated("list", prefix):
            while True:
                page = self._call("list_objects_v2", **request)
                self._note_date(page)
                found.update((info.key, info) for info in listing_objects(page.get("Contents", []), base))
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    return found
                request["ContinuationToken"] = token

    def _list_page(self, prefix: str, start_after: str, max_keys: int) -> dict[str, ObjectInfo]:
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix, "MaxKeys": max_keys}
        if start_after:
            request["StartAfter"] = base + start_after
        with translated("list", prefix):
            page = self._call("list_objects_v2", **request)
        self._note_date(page)
        return {info.key: info for info in listing_objects(page.get("Contents", []), base)}

    def _delete(self, key: str) -> None:
        with translated("delete", key):
            try:
                self._call("delete_object", Bucket=self.bucket, Key=self._key(key))
            except backend_error_types() as exc:
                if not is_not_found(exc):
                    raise

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        operation = "put_if_absent" if if_match is None else "put_if_match"
        condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": quote_etag(if_match)}
        with translated(operation, key):
            try:
                response = self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            except backend_error_types() as exc:
                if is_lost_race(exc, compare_and_swap=if_match is not None):
                    raise PreconditionFailedError(operation, key) from exc
                raise
            return self._tag_of(response, key)
