"""The folder classes of flwr-serverless 0.2 (``S3Folder``, ``LocalFolder``, ``InMemoryFolder``), dict-like over bytes.

0.2 folders were mappings: ``folder[key] = value``, ``folder[key]``, ``del folder[key]``,
``len``, ``items()``, ``get(key, default)``, ``get_raw_folder()``. :class:`SharedFolder`
adds that interface to any :class:`Store` through its public ``put``/``get``/``list``/``delete``,
so scripts written for 0.2 keep working while the node underneath sees an ordinary store
(atomic writes, bounded retries). Two things differ on purpose, see docs/migrating.md
("Migrating from 0.2"): values are bytes (0.2 pickled everything else, and
unpickling a shared object runs whatever code its writer put in it), and a missing key
raises ``KeyError`` at once instead of polling for a success flag.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr_serverless.errors import FlwrServerlessError, ObjectNotFoundError, StoreConfigurationError
from flwr_serverless.stores.local import LocalStore
from flwr_serverless.stores.memory import MemoryStore
from flwr_serverless.stores.s3_store import S3Store

if TYPE_CHECKING:
    from flwr_serverless.stores.base import Store

    _MixinBase = Store
else:
    _MixinBase = object

_OLD_ARGUMENTS = ("retry_sleep_time", "max_retry")
_MISSING: Any = object()


class NotBytesError(FlwrServerlessError, TypeError):
    """A folder was given a value that is not bytes (0.2 would have pickled it)."""

    def __init__(self, folder: str, key: str, value: object) -> None:
        self.key = key
        super().__init__(
            f"{folder}[{key!r}] = <{type(value).__name__}>: folders hold bytes only. flwr-serverless 0.3 never "
            "pickles (unpickling an object read from a shared folder runs any code its writer put in it). "
            "Serialize the value yourself and store the bytes: json.dumps(value).encode(), numpy.save into an "
            "io.BytesIO, or flwr_serverless.wire.codec.encode for model weights."
        )


class SharedFolder(_MixinBase):
    """Mixin: the 0.2 mapping interface over a Store's public API. Values are bytes.

    ``get(key)`` without a default keeps the Store contract (``KeyError`` /
    ``ObjectNotFoundError`` if absent) because nodes rely on it; ``get(key, None)``
    returns the default instead, as in 0.2.
    """

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Read ``key``; a missing key raises ``ObjectNotFoundError`` (a ``KeyError``) unless a default is given."""
        try:
            return super().get(key)
        except ObjectNotFoundError:
            if default is _MISSING:
                raise
            return default

    def __getitem__(self, key: str) -> bytes:
        return self.get(key)

    def __setitem__(self, key: str, value: bytes | bytearray | memoryview) -> None:
        if value is None:
            raise ValueError(f"{type(self).__name__}[{key!r}] = None: a folder cannot store None; delete the key")
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if not isinstance(value, bytes):
            raise NotBytesError(type(self).__name__, key, value)
        self.put(key, value)

    def __delitem__(self, key: str) -> None:
        self.delete(key)  # as in 0.2, deleting a missing key is not an error

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.list(key)

    def __len__(self) -> int:
        return len(self.list())

    def __bool__(self) -> bool:  # a folder is a handle, truthy even when empty (unlike a mapping)
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        """All keys, sorted (one LIST)."""
        return sorted(self.list())

    def items(self) -> Iterator[tuple[str, bytes]]:
        """``(key, bytes)`` for every object; one LIST, then one GET per object as it is iterated."""
        for key in self.keys():
            value = self.get(key, None)
            if value is not None:  # deleted since the LIST
                yield key, value

    def values(self) -> Iterator[bytes]:
        return (value for _, value in self.items())

    def get_raw_folder(self) -> SharedFolder:
        """0.2 had a pickling folder and a "raw" bytes twin; here every folder is the raw one."""
        return self

    def _check(self) -> None:
        """0.2's check that the folder is usable; stores check themselves when they open."""


def _drop_old_arguments(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove 0.2-only polling arguments, warning so users know they no longer matter."""
    dropped = [arg for arg in _OLD_ARGUMENTS if arg in kwargs]
    if dropped:
        warnings.warn(
            f"{name}: {', '.join(dropped)} no longer have any effect (writes are atomic, nothing polls; "
            "transient faults are retried within the store's retry policy)",
            DeprecationWarning,
            stacklevel=3,
        )
    return {key: value for key, value in kwargs.items() if key not in _OLD_ARGUMENTS}


def split_s3_directory(directory: str) -> tuple[str, str]:
    """``"bucket/some/prefix"`` (optionally ``s3://``-prefixed) -> ``("bucket", "some/prefix")``."""
    path = directory.removeprefix("s3://").strip("/")
    bucket, _, prefix = path.partition("/")
    return bucket, prefix.strip("/")


class S3Folder(SharedFolder, S3Store):
    """``S3Folder(directory="bucket/prefix")``: an S3Store on that bucket and prefix, dict-like.

    ``check_at_init=True`` (the default) checks the bucket now and raises botocore's
    ``NoSuchBucket`` if it is missing, as 0.2 did; ``check_at_init=False`` skips the
    check (first use reports the problem instead). Other keywords go to ``S3Store``
    (``endpoint_url``, ``region_name``, ``client``...); the endpoint also comes from
    ``AWS_ENDPOINT_URL`` like any boto3 client.
    """

    def __init__(self, directory: str | None = None, check_at_init: bool = True, **kwargs: Any) -> None:
        if not directory:
            raise TypeError(f"{type(self).__name__} needs directory='bucket/prefix' (or 's3://bucket/prefix')")
        bucket, prefix = split_s3_directory(str(directory))
        self.directory = str(directory)
        self.check_at_init = bool(check_at_init)
        super().__init__(bucket, prefix, **_drop_old_arguments(type(self).__name__, kwargs))

    @property
    def s3(self) -> Any:
        """The boto3 client (0.2's attribute name)."""
        return self.client

    def _check_bucket(self) -> None:  # S3Store calls this once from its constructor
        if self.check_at_init:
            self._check()

    def _check(self) -> None:
        """Check the bucket; a missing one raises botocore's ``NoSuchBucket`` (0.2's exception) naming it."""
        try:
            S3Store._check_bucket(self)
        except StoreConfigurationError as exc:
            response = getattr(exc.__cause__, "response", None) or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                error = {"Error": {"Code": "NoSuchBucket", "Message": str(exc), "BucketName": self.bucket}}
                raise _no_such_bucket(self.client)(error, "HeadBucket") from exc
            raise


def _no_such_bucket(client: Any) -> type[Exception]:
    """botocore's ``NoSuchBucket`` as both this folder's client and a default ``boto3.client("s3")`` know it.

    botocore makes one exception class per session; 0.2's folders used the default
    session, so scripts catch ``boto3.client("s3").exceptions.NoSuchBucket``. Our
    client has its own session (the default one is not thread-safe), hence a class
    that is an instance of both.
    """
    import boto3

    own = client.exceptions.NoSuchBucket
    default = boto3.client("s3", region_name="us-east-1").exceptions.NoSuchBucket
    if default is own or issubclass(own, default):
        return own
    return type("NoSuchBucket", (own, default), {"__module__": own.__module__})


class LocalFolder(SharedFolder, LocalStore):
    """``LocalFolder(directory="path")``: a store in a local folder (created if missing), dict-like."""

    def __init__(self, directory: str | Path = "./", **kwargs: Any) -> None:
        self.directory = Path(directory)
        kwargs.pop("check_at_init", None)  # a local folder is always checked when it opens
        super().__init__(str(self.directory), **_drop_old_arguments(type(self).__name__, kwargs))


class InMemoryFolder(SharedFolder, MemoryStore):
    """``InMemoryFolder()``: a private ``memory://`` store, shared only with handles opened on its ``url``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("check_at_init", None)
        super().__init__(
            f"memory://flwr-serverless-{uuid.uuid4().hex}", **_drop_old_arguments(type(self).__name__, kwargs)
        )
