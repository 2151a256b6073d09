"""s3:// through s3fs: ``open_store(url, backend="fsspec")``, or any s3:// URL when boto3 is missing.

The requests are the ones the boto3 backend makes (``s3_common``), sent
through s3fs's aiobotocore client: one PUT per write (parts in parallel for
large objects, ranged GETs in parallel to read them back), ``If-None-Match`` /
``If-Match`` for conditional writes, and a GET whose body is streamed in
chunks. s3fs retries each request in a loop of its own on top of botocore's;
while our ``RetryPolicy`` is on, that loop gets one pass (``retries=1``) and
botocore two attempts, so one failing request costs at most our attempts x 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from flwr_serverless.errors import StoreConfigurationError
from flwr_serverless.stores.retry import DEFAULT_POLICY, RetryPolicy
from flwr_serverless.stores.s3_common import (
    ATTEMPTS_UNDER_OUR_RETRIES,
    S3FS_TO_BOTO3,
    STREAM_CHUNK_BYTES,
    RangeRead,
    S3ObjectStore,
    botocore_attempts,
    split_s3_url,
)
from flwr_serverless.stores.s3_multipart import TransferOptions

#: s3fs's own default for its request loop (``S3FileSystem.retries``), used while our retries are off.
S3FS_DEFAULT_RETRIES = 5


class S3FsStore(S3ObjectStore):
    """Objects under ``s3://bucket/prefix/`` through an ``s3fs.S3FileSystem`` (``.fs``).

    Options are s3fs's (boto3 spellings are accepted too), plus ``retries``: passes of
    s3fs's own retry loop (default 1), and ``max_attempts``: botocore's total attempts per
    request (default 2). Both defaults assume our own retries are on. ``multipart_threshold``,
    ``multipart_chunksize`` and ``max_concurrency`` size large transfers (``s3_multipart``).
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        super().__init__()
        self.bucket, self.prefix = split_s3_url(url)
        options = dict(storage_options)
        self.transfer = TransferOptions.pop_from(url, options)
        options = s3fs_options(options)
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("max_pool_connections", max(10, 2 * self.transfer.max_concurrency))
        options["config_kwargs"] = config_kwargs
        retries = options.pop("retries", 1)
        if not isinstance(retries, int) or retries < 1:
            raise StoreConfigurationError(f"store {url!r}: option retries must be an int >= 1, not {retries!r}")
        try:
            from s3fs import S3FileSystem
        except ImportError as exc:
            raise StoreConfigurationError(
                f"store {url!r}: s3:// through fsspec needs s3fs: pip install 'flwr-serverless[s3]'"
            ) from exc
        # Several nodes may share one process: every handle needs its own client.
        options.setdefault("skip_instance_cache", True)
        try:
            self.fs = S3FileSystem(**options)
            self.fs.retries = retries
            self.fs.connect()  # options s3fs hands on to aiobotocore fail here, not at the first request
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreConfigurationError(f"store {url!r}: cannot configure s3fs with these options: {exc}") from exc
        self._check_bucket()

    @classmethod
    def from_url(cls, url: str, *, retry_policy: RetryPolicy = DEFAULT_POLICY, **options: Any) -> S3FsStore:
        """Size s3fs's and botocore's retry layers by whether ``retry_policy`` retries (explicit options win)."""
        options.setdefault("retries", 1 if retry_policy.attempts > 1 else S3FS_DEFAULT_RETRIES)
        options.setdefault("max_attempts", botocore_attempts(retry_policy))
        return cls(url, **options)

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.fs.call_s3(method, **params)

    def _read_object(self, key: str) -> bytes:
        chunks: list[bytes] = []
        self._consume(key, chunks.append)
        return b"".join(chunks)

    def _stream_object(self, key: str, sink: BinaryIO) -> int:
        return self._consume(key, sink.write)[0]

    def _read_object_tagged(self, key: str) -> tuple[bytes, str]:
        chunks: list[bytes] = []
        _, etag = self._consume(key, chunks.append)
        return b"".join(chunks), etag

    def _read_range(
        self, key: str, begin: int, end: int, if_match: str | None, write: Callable[[int, bytes], None]
    ) -> RangeRead:
        offset = [begin]

        def at_offset(chunk: bytes) -> None:
            write(offset[0], chunk)
            offset[0] += len(chunk)

        condition = {"IfMatch": if_match} if if_match else {}
        size, etag, content_range = self._get_object(key, at_offset, Range=f"bytes={begin}-{end - 1}", **condition)
        return content_range, etag, size

    def _consume(self, key: str, write: Callable[[bytes], Any]) -> tuple[int, str]:
        """One GET, its body read in chunks by one coroutine on s3fs's event loop; the size and ETag."""
        return self._get_object(key, write)[:2]

    def _get_object(self, key: str, write: Callable[[bytes], Any], **params: Any) -> tuple[int, str, str | None]:
        """One GET (ranged or conditional by ``params``) streamed to ``write``; size, ETag and Content-Range."""
        from fsspec.asyn import sync

        async def stream() -> tuple[int, str, str | None]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key), **params)
            body = response["Body"]
            size = 0
            try:
                while chunk := await body.read(STREAM_CHUNK_BYTES):
                    write(chunk)  # a list or the local page cache: brief enough to do on the loop
                    size += len(chunk)
            finally:
                body.close()
            return size, str(response.get("ETag", "")), response.get("ContentRange")

        return sync(self.fs.loop, stream)


def s3fs_options(options: dict[str, Any]) -> dict[str, Any]:
    """Accept boto3-style names too, so one set of options works with both S3 backends."""
    options = dict(options)
    for s3fs_name, boto_name in S3FS_TO_BOTO3.items():
        if boto_name in options:
            options.setdefault(s3fs_name, options.pop(boto_name))
    if "region_name" in options:  # s3fs would hand it to AioSession, which rejects it
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("region_name", options.pop("region_name"))
        options["client_kwargs"] = client_kwargs
    attempts = options.pop("max_attempts", ATTEMPTS_UNDER_OUR_RETRIES)
    if attempts is not None:  # a ``retries`` entry of the user's own config_kwargs wins
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", {"total_max_attempts": attempts, "mode": "standard"})
        options["config_kwargs"] = config_kwargs
    return options
