"""Weight stores: bytes in, bytes out, under one experiment prefix.

``open_store(url)`` picks a backend from the URL: ``s3://`` goes to boto3
(:class:`S3Store`) when it is installed, everything else (local paths,
``file://``, ``memory://``, ``gs://``...) to fsspec (:class:`FsspecStore`).
boto3 and s3fs are imported only when an S3 store is actually opened.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from flwr_serverless.errors import StoreConfigurationError
from flwr_serverless.stores.base import ObjectInfo, Store, StoreStats
from flwr_serverless.stores.fsspec_store import FsspecStore
from flwr_serverless.stores.legacy import InMemoryFolder, LocalFolder, S3Folder
from flwr_serverless.stores.retry import RetryPolicy, as_policy, with_retries
from flwr_serverless.stores.s3_store import S3Store

__all__ = [
    "FsspecStore",
    "InMemoryFolder",
    "LocalFolder",
    "ObjectInfo",
    "RetryPolicy",
    "S3Folder",
    "S3Store",
    "Store",
    "StoreStats",
    "open_store",
    "with_retries",
]

_BACKENDS = ("auto", "boto3", "fsspec")
# s3fs options that mean nothing to a boto3 client; dropped so one option dict fits both backends.
_FSSPEC_ONLY = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size"}


def open_store(url: str | Store, **storage_options: Any) -> Store:
    """Open the store at ``url``; a Store instance is returned unchanged.

    ``backend="boto3"`` or ``backend="fsspec"`` overrides the choice for ``s3://`` URLs;
    the remaining options go to the backend (s3fs spellings are translated for boto3).
    ``retry`` (default on: 5 attempts / 30 s, see ``RetryPolicy``) retries transient faults;
    ``retry=False`` disables it, a ``RetryPolicy`` or a dict of its fields tunes it.
    """
    retry = storage_options.pop("retry", None)
    policy = as_policy(retry)
    backend = storage_options.pop("backend", "auto") or "auto"
    if backend not in _BACKENDS:
        raise StoreConfigurationError(f"store {url!r}: unknown backend {backend!r} (use one of {', '.join(_BACKENDS)})")
    if isinstance(url, Store):
        return url if retry is None else with_retries(url, policy)
    return with_retries(_open(url, backend, storage_options, retrying=policy.attempts > 1), policy)


def _open(url: str, backend: str, storage_options: dict[str, Any], retrying: bool) -> Store:
    """Pick and construct the backend for ``url``."""
    url = str(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("s3", "s3a") and backend != "fsspec":
        if importlib.util.find_spec("boto3") is not None:
            bucket, _, prefix = url.split("://", 1)[1].strip("/").partition("/")
            options = _boto3_options(url, storage_options)
            if retrying:  # our retries are the bounded layer: botocore gets one quick retry, not five
                options.setdefault("max_attempts", 2)
            return S3Store(bucket, prefix, **options)
        if backend == "boto3":
            raise StoreConfigurationError(
                f"store {url!r}: backend='boto3' needs boto3: pip install 'flwr-serverless[s3]'"
            )
    elif backend == "boto3":
        raise StoreConfigurationError(f"store {url!r}: backend='boto3' only serves s3:// URLs")
    return FsspecStore(url, **storage_options)


def _boto3_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Translate s3fs-style storage options into S3Store keyword arguments."""
    options = {key: value for key, value in options.items() if key not in _FSSPEC_ONLY}
    out: dict[str, Any] = {}
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    out.update(client_kwargs)
    for s3fs_name, boto_name in (
        ("key", "aws_access_key_id"),
        ("secret", "aws_secret_access_key"),
        ("token", "aws_session_token"),
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
    unsupported = sorted(
        set(options)
        - {
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
    )
    if unsupported:
        raise StoreConfigurationError(
            f"store {url!r}: option(s) {', '.join(unsupported)} are not understood by the boto3 backend; "
            "pass backend='fsspec' to use s3fs"
        )
    out.update(options)
    return out
