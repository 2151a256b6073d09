"""What the two S3 backends (boto3 and s3fs) share: one class that speaks the S3 API.

Both backends issue the same requests (``put_object`` for a write below the
multipart threshold and a multipart upload above it, ``If-None-Match: *`` /
``If-Match`` for conditional writes, ranged ``get_object`` for downloads,
``list_objects_v2`` pages, ``delete_object``, ``head_bucket`` once at
construction), so all of that lives in :class:`S3ObjectStore`; when to split an
object and how is :mod:`~flwr_serverless.stores.s3_multipart`. A backend only
says how to make a request (``_call``) and how to read an object's body
(``_read_object``/``_stream_object``/``_read_range``); errors are read by
:mod:`~flwr_serverless.stores.backend_errors`.

Retry layers: botocore retries each request (``max_attempts``) and s3fs loops
on top of that. While our own bounded ``RetryPolicy`` is on, botocore gets
``ATTEMPTS_UNDER_OUR_RETRIES`` attempts and s3fs's loop one, so the layers do not multiply.
"""

from __future__ import annotations

import contextlib
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO

from flwr_serverless.errors import PreconditionFailedError, StoreConfigurationError, StoreError
from flwr_serverless.stores import s3_multipart as limits
from flwr_serverless.stores.backend_errors import (
    backend_error_types,
    error_info,
    explain_bucket_error,
    is_lost_race,
    is_not_found,
    translated,
)
from flwr_serverless.stores.base import Buffer, ObjectInfo, Store, check_key, check_prefix, payload_size
from flwr_serverless.stores.retry import RetryPolicy
from flwr_serverless.stores.s3_multipart import (
    BufferChain,
    OffsetWriter,
    TransferOptions,
    parse_content_range,
    part_ranges,
    run_parallel,
)

S3_SCHEMES = ("s3", "s3a")
#: botocore attempts per request while our retries are on (one quick retry) and while they are off.
ATTEMPTS_UNDER_OUR_RETRIES = 2
ATTEMPTS_ALONE = 5
STREAM_CHUNK_BYTES = 1 << 20  # a streamed GET holds at most this much in memory at a time
#: Credential option names: s3fs's -> boto3's (each backend accepts both spellings).
S3FS_TO_BOTO3 = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token"}
#: Times a download restarts because the object was replaced between its ranged GETs.
MAX_VERSION_CHANGES = 5
#: What one ranged GET reports: (Content-Range, ETag, bytes written).
RangeRead = tuple[str | None, str, int]


@dataclass(frozen=True)
class UploadInfo:
    """An unfinished multipart upload under the store's prefix (``list_uploads``)."""

    key: str
    upload_id: str
    initiated: float  # seconds since the epoch (0.0 when the server does not say)


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
    """Objects under ``s3://bucket/prefix/``, spoken through an S3 API client (see the subclasses).

    Large objects go in parallel parts both ways (``transfer``, see ``s3_multipart``). Conditional
    writes stay one ``put_object`` up to S3's 5 GiB single-PUT limit, since that is atomic on every
    server (moto ignores ``If-Match`` on ``CompleteMultipartUpload``); above it they complete a
    multipart upload with the condition, which AWS S3 and SeaweedFS honour.
    """

    supports_conditional_writes = True
    transfer: TransferOptions = TransferOptions()
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

    @abstractmethod
    def _read_range(
        self, key: str, begin: int, end: int, if_match: str | None, write: Callable[[int, bytes], None]
    ) -> RangeRead:
        """One GET of bytes ``[begin, end)`` (of version ``if_match`` only), each chunk given to
        ``write(offset, chunk)``; returns the response's Content-Range and ETag and the bytes written."""

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
        if self.transfer.use_multipart(payload_size(data)):
            return self._put_multipart(key, [data], {}, "put")
        with translated("put", key):
            return self._tag_of(self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data), key)

    def _put_parts(self, key: str, parts: Sequence[Buffer]) -> str:
        """Below the threshold one joined PUT; above it the parts are sliced out of the buffers as they go."""
        if self.transfer.use_multipart(payload_size(parts)):
            return self._put_multipart(key, parts, {}, "put")
        return self._put(key, b"".join(parts))

    def _put_multipart(self, key: str, buffers: Sequence[Buffer], condition: dict[str, str], operation: str) -> str:
        """Create, upload parts (``max_concurrency`` at a time), complete; abort whatever fails."""
        chain = BufferChain(buffers)
        ranges = part_ranges(chain.size, self.transfer.part_size(chain.size))
        target = {"Bucket": self.bucket, "Key": self._key(key)}
        with translated(operation, key):
            upload_id = self._call("create_multipart_upload", **target)["UploadId"]
        try:

            def send(index: int) -> dict[str, Any]:
                begin, end = ranges[index]
                with translated(operation, key):
                    sent = self._call(
                        "upload_part", **target, UploadId=upload_id, PartNumber=index + 1, Body=chain.read(begin, end)
                    )
                return {"PartNumber": index + 1, "ETag": sent["ETag"]}

            in_flight = self.transfer.upload_concurrency(chain.size, ranges[0][1])
            done = run_parallel(send, len(ranges), in_flight)
            with translated(operation, key):
                try:
                    parts = {"UploadId": upload_id, "MultipartUpload": {"Parts": done}}
                    response = self._call("complete_multipart_upload", **target, **parts, **condition)
                except backend_error_types() as exc:
                    if condition and is_lost_race(exc, compare_and_swap="IfMatch" in condition):
                        raise PreconditionFailedError(operation, key) from exc
                    raise
        except BaseException:
            self._abort_quietly(key, upload_id)
            raise
        return self._tag_of(response, key)

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Best effort: the upload failed already, and ``clean`` removes what an abort could not."""
        with contextlib.suppress(StoreError):
            self.abort_upload(key, upload_id)

    def _get(self, key: str) -> bytes:
        with translated("get", key):
            return self._read_object(key)

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        """Ranged GETs in parallel into ``sink``; restarted if the object is replaced between them."""
        with translated("get", key):
            for _ in range(MAX_VERSION_CHANGES):
                sink.seek(0)
                sink.truncate()
                try:
                    return self._download(key, sink)
                except backend_error_types() as exc:
                    code, status = error_info(exc)
                    if status == 416 or code == "InvalidRange":  # an empty object has no byte 0
                        sink.seek(0)
                        sink.truncate()
                        return self._stream_object(key, sink)
                    if status != 412:
                        raise
            raise StoreError("get", key, f"object replaced {MAX_VERSION_CHANGES} times while being read")

    def _download(self, key: str, sink: BinaryIO) -> int:
        chunk = self.transfer.multipart_chunksize
        writer = OffsetWriter(sink)
        content_range, etag, got = self._read_range(key, 0, chunk, None, writer.write)
        if content_range is None:  # a server that ignores Range sent the whole object
            sink.seek(got)
            return got
        _, last, total = parse_content_range(content_range, key)
        rest = part_ranges(total, chunk, start=last + 1)
        if rest and total < self.transfer.multipart_threshold:
            rest = [(last + 1, total)]  # below the threshold: the remainder in one GET

        def fetch(index: int) -> None:
            begin, end = rest[index]
            _, _, size = self._read_range(key, begin, end, quote_etag(etag), writer.write)
            if size != end - begin:
                raise StoreError("get", key, f"range {begin}-{end - 1}: {size} bytes instead of {end - begin}")

        run_parallel(fetch, len(rest), self.transfer.max_concurrency)
        sink.seek(total)
        return total

    def list_uploads(self, prefix: str = "") -> list[UploadInfo]:
        """Multipart uploads under the store's prefix that were never completed nor aborted."""
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
        found: list[UploadInfo] = []
        with translated("list", prefix):
            while True:
                page = self._call("list_multipart_uploads", **request)
                self.stats.add(lists=1)
                for item in page.get("Uploads") or []:
                    if item["Key"].startswith(base):
                        initiated = item.get("Initiated")
                        stamp = initiated.timestamp() if hasattr(initiated, "timestamp") else 0.0
                        found.append(UploadInfo(item["Key"][len(base) :], item["UploadId"], stamp))
                markers = {"KeyMarker": page.get("NextKeyMarker"), "UploadIdMarker": page.get("NextUploadIdMarker")}
                if not page.get("IsTruncated") or not markers["KeyMarker"]:
                    return found
                request.update({name: value for name, value in markers.items() if value})

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one multipart upload, dropping its parts; one already gone is not an error."""
        with translated("delete", key):
            try:
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
            except backend_error_types() as exc:
                if not is_not_found(exc):
                    raise
        self.stats.add(deletes=1)

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
        if payload_size(data) > limits.MAX_SINGLE_PUT_BYTES:  # see the class docstring
            return self._put_multipart(key, [data], condition, operation)
        with translated(operation, key):
            try:
                response = self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            except backend_error_types() as exc:
                if is_lost_race(exc, compare_and_swap=if_match is not None):
                    raise PreconditionFailedError(operation, key) from exc
                raise
            return self._tag_of(response, key)
