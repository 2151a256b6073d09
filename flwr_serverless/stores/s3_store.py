"""A store on S3 (or any S3-compatible service) through plain boto3.

Each write is a single ``put_object`` (a multipart upload for large objects,
see ``s3_multipart``), which S3 makes visible atomically, and
conditional writes use S3's ``If-None-Match: *`` / ``If-Match: <etag>`` (the
requests themselves are shared with the s3fs backend, see ``s3_common``). The
bucket is checked once at construction so that a typo, a missing bucket or
missing credentials fail before any training starts, saying which one it is.
"""

from __future__ import annotations

import threading
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

# s3fs options that mean nothing to a boto3 client; dropped so one option dict fits both backends.
_FSSPEC_ONLY = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size"}
_BOTO3_OPTIONS = {
    "endpoint_url",
    "region_name",
    "max_attempts",
    "client",
    "session",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "use_ssl",
    "verify",
    "config",
    "api_version",
}


class S3Store(S3ObjectStore):
    """Objects under ``s3://bucket/prefix/``; one boto3 client shared by all threads.

    ``max_attempts`` is botocore's total attempts per request (its ``total_max_attempts``;
    botocore's own ``max_attempts`` counts retries). The default (2) assumes our own
    retries are on, as they are for every store unless turned off. ``multipart_threshold``,
    ``multipart_chunksize`` and ``max_concurrency`` size large transfers (``s3_multipart``).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: Any = None,
        max_attempts: int = ATTEMPTS_UNDER_OUR_RETRIES,
        session: Any = None,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
        max_concurrency: int | None = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        self.transfer = TransferOptions.pop_from(
            f"s3://{bucket}/{prefix}".rstrip("/"),
            {
                "multipart_threshold": multipart_threshold,
                "multipart_chunksize": multipart_chunksize,
                "max_concurrency": max_concurrency,
            },
        )
        try:
            import botocore  # noqa: F401
        except ImportError as exc:
            raise StoreConfigurationError(
                f"S3Store for bucket {bucket!r} needs boto3: pip install 'flwr-serverless[s3]'"
            ) from exc
        if not bucket or "/" in bucket:
            raise StoreConfigurationError(f"S3Store: invalid bucket name {bucket!r} (put the path into prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else self._make_client(session, endpoint_url, region_name, max_attempts, client_kwargs, self.transfer)
        )
        self._close_lock = threading.Lock()
        self._check_bucket()

    @classmethod
    def from_url(cls, url: str, *, retry_policy: RetryPolicy = DEFAULT_POLICY, **options: Any) -> S3Store:
        """``s3://bucket/prefix`` with s3fs-style or boto3-style options (``open_store``'s entry)."""
        bucket, prefix = split_s3_url(url)
        transfer = TransferOptions.pop_from(url, options)
        options = {**boto3_options(url, options), **vars(transfer)}
        options.setdefault("max_attempts", botocore_attempts(retry_policy))
        return cls(bucket, prefix, **options)

    @staticmethod
    def _make_client(
        session: Any,
        endpoint_url: str | None,
        region_name: str | None,
        max_attempts: int,
        kwargs: dict[str, Any],
        transfer: TransferOptions,
    ) -> Any:
        import boto3
        from botocore.config import Config

        pool = max(32, 2 * transfer.max_concurrency)  # room for parallel parts beside the node's own threads
        config = Config(retries={"total_max_attempts": max_attempts, "mode": "standard"}, max_pool_connections=pool)
        user_config = kwargs.pop("config", None)
        if user_config is not None:
            config = config.merge(user_config)
        # A fresh session per store: boto3's default session is shared global state and not thread-safe.
        session = session if session is not None else boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config, **kwargs)

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (for callers that need an operation we do not wrap)."""
        return self._client

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        return getattr(self._client, method)(**params)

    def _read_object(self, key: str) -> bytes:
        return self._read_object_tagged(key)[0]

    def _read_object_tagged(self, key: str) -> tuple[bytes, str]:
        response = self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        body = response["Body"]
        try:
            return body.read(), str(response.get("ETag", ""))
        finally:
            body.close()

    def _stream_object(self, key: str, sink: BinaryIO) -> int:
        body = self._call("get_object", Bucket=self.bucket, Key=self._key(key))["Body"]
        size = 0
        try:
            for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                sink.write(chunk)
                size += len(chunk)
        finally:
            body.close()
        return size

    def _read_range(
        self, key: str, begin: int, end: int, if_match: str | None, write: Callable[[int, bytes], None]
    ) -> RangeRead:
        condition = {"IfMatch": if_match} if if_match else {}
        response = self._call(
            "get_object", Bucket=self.bucket, Key=self._key(key), Range=f"bytes={begin}-{end - 1}", **condition
        )
        body, offset = response["Body"], begin
        try:
            for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                write(offset, chunk)
                offset += len(chunk)
        finally:
            body.close()
        return response.get("ContentRange"), str(response.get("ETag", "")), offset - begin

    def close(self) -> None:
        """Close the HTTP connection pool if this store created the client."""
        with self._close_lock:
            if self._owns_client and hasattr(self._client, "close"):
                self._client.close()
                self._owns_client = False


def boto3_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Translate s3fs-style storage options into S3Store keyword arguments (unknown ones are an error)."""
    options = {key: value for key, value in options.items() if key not in _FSSPEC_ONLY}
    out: dict[str, Any] = dict(options.pop("client_kwargs", None) or {})
    for s3fs_name, boto_name in (
        *S3FS_TO_BOTO3.items(),
        ("username", "aws_access_key_id"),
        ("password", "aws_secret_access_key"),
    ):
        if s3fs_name in options:
            out[boto_name] = options.pop(s3fs_name)
    config_kwargs = dict(options.pop("config_kwargs", None) or {})
    if options.pop("anon", False):
        from botocore import UNSIGNED

        config_kwargs["signature_version"] = UNSIGNED
    if config_kwargs:
        from botocore.config import Config

        out["config"] = Config(**config_kwargs)
    profile = options.pop("profile", None)
    if profile is not None:
        import boto3

        out["session"] = boto3.session.Session(profile_name=profile)
    unsupported = sorted(set(options) - _BOTO3_OPTIONS)
    if unsupported:
        raise StoreConfigurationError(
            f"store {url!r}: option(s) {', '.join(unsupported)} are not understood by the boto3 backend; "
            "pass backend='fsspec' to use s3fs"
        )
    out.update(options)
    return out
