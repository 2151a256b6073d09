"""The store names of flwr-serverless 0.1 (``S3Folder``, ``LocalFolder``, ``InMemoryFolder``).

They keep the old constructors so existing scripts keep starting; underneath they
are ordinary stores (bytes in, bytes out, atomic writes). The old ``retry_sleep_time``,
``max_retry`` and ``check_at_init`` arguments are accepted and ignored with a warning:
retries now happen inside the store and the bucket is always checked up front.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

from flwr_serverless.stores.local import LocalStore
from flwr_serverless.stores.memory import MemoryStore
from flwr_serverless.stores.s3_store import S3Store

_OLD_ARGUMENTS = ("retry_sleep_time", "max_retry", "check_at_init")


def _drop_old_arguments(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove 0.1-only arguments, warning once per call so users know they no longer matter."""
    dropped = [arg for arg in _OLD_ARGUMENTS if arg in kwargs]
    if dropped:
        warnings.warn(
            f"{name}: {', '.join(dropped)} no longer have any effect (stores retry internally)",
            DeprecationWarning,
            stacklevel=3,
        )
    return {key: value for key, value in kwargs.items() if key not in _OLD_ARGUMENTS}


def split_s3_directory(directory: str) -> tuple[str, str]:
    """``"bucket/some/prefix"`` (optionally ``s3://``-prefixed) -> ``("bucket", "some/prefix")``."""
    path = directory.removeprefix("s3://").strip("/")
    bucket, _, prefix = path.partition("/")
    return bucket, prefix.strip("/")


class S3Folder(S3Store):
    """``S3Folder(directory="bucket/prefix")``: an S3Store on that bucket and prefix."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        bucket, prefix = split_s3_directory(directory)
        self.directory = directory
        super().__init__(bucket, prefix, **_drop_old_arguments("S3Folder", kwargs))


class LocalFolder(LocalStore):
    """``LocalFolder(directory="path")``: a store in a local folder (created if missing)."""

    def __init__(self, directory: str = "./", **kwargs: Any) -> None:
        self.directory = str(directory)
        super().__init__(self.directory, **_drop_old_arguments("LocalFolder", kwargs))


class InMemoryFolder(MemoryStore):
    """``InMemoryFolder()``: a private ``memory://`` store, shared only with handles opened on its ``url``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            f"memory://flwr-serverless-{uuid.uuid4().hex}", **_drop_old_arguments("InMemoryFolder", kwargs)
        )
