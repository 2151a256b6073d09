"""A store on any other fsspec URL (``gs://``, ``az://``, ``dir://``...), through plain fsspec calls.

fsspec gives neither compare-and-swap nor, in general, atomic replacement, so
this backend reports ``supports_conditional_writes = False`` and the base
class refuses conditional writes loudly instead of pretending they are atomic.
A write is as atomic as the filesystem's ``pipe_file`` (one PUT on object stores).

For backward compatibility, ``FsspecStore(url)`` still opens the URLs it used to
handle itself with the class that now serves them: local paths and ``file://``
give a :class:`LocalStore`, ``memory://`` a :class:`MemoryStore` and ``s3://``
an :class:`S3FsStore` (s3fs, not boto3).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import Any

from fsspec.core import url_to_fs

from flwr_serverless.errors import StoreConfigurationError
from flwr_serverless.stores.backend_errors import translated
from flwr_serverless.stores.base import ObjectInfo, Store, check_prefix, url_scheme
from flwr_serverless.stores.local import LOCAL_SCHEMES, TEMP_PREFIX, LocalStore
from flwr_serverless.stores.memory import MemoryStore
from flwr_serverless.stores.retry import DEFAULT_POLICY, RetryPolicy
from flwr_serverless.stores.s3_common import S3_SCHEMES
from flwr_serverless.stores.s3fs_store import S3FsStore

__all__ = ["TEMP_PREFIX", "FsspecStore"]  # TEMP_PREFIX: its old import path

_TAG_FIELDS = (
    "ETag",
    "etag",
    "md5Hash",
    "generation",
    "version_id",
    "mtime",
    "LastModified",
    "last_modified",
    "modified",
    "updated",
    "created",
)


def dedicated_class(url: str) -> type[Store] | None:
    """The class that serves ``url`` when ``FsspecStore`` is asked to open it, if not FsspecStore itself."""
    scheme = url_scheme(url)
    if scheme in ("", *LOCAL_SCHEMES):
        return LocalStore
    if scheme == "memory":
        return MemoryStore
    if scheme in S3_SCHEMES:
        return S3FsStore
    return None


def _info_tag(info: dict[str, Any]) -> str:
    for name in _TAG_FIELDS:
        value = info.get(name)
        if value in (None, ""):
            continue
        if isinstance(value, datetime):  # info() and find() may disagree on datetime vs timestamp
            value = value.timestamp()
        return f"{str(value).strip(chr(34))}-{info.get('size')}"
    return f"size-{info.get('size')}"  # nothing better: cannot see same-size rewrites


def _info_stamp(info: dict[str, Any]) -> float | None:
    """The backend's own time of the last write (mtime, LastModified...), if its listing says."""
    for name in ("LastModified", "last_modified", "mtime", "modified", "updated"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class FsspecStore(Store):
    """A weight store on any fsspec URL, through ``self.fs``; no conditional writes."""

    def __new__(cls, url: str, **storage_options: Any) -> Any:
        dedicated = dedicated_class(str(url)) if cls is FsspecStore else None
        if dedicated is not None:  # fully built here: Python skips __init__ for another class
            build: Callable[..., Store] = dedicated  # a concrete store takes the URL
            return build(str(url), **storage_options)
        return super().__new__(cls)

    @classmethod
    def from_url(cls, url: str, *, retry_policy: RetryPolicy = DEFAULT_POLICY, **options: Any) -> Store:
        dedicated = dedicated_class(str(url)) if cls is FsspecStore else None
        if dedicated is not None:
            return dedicated.from_url(str(url), retry_policy=retry_policy, **options)
        return cls(url, **options)

    def __init__(self, url: str, **storage_options: Any) -> None:
        super().__init__()
        self.url = str(url)
        options = dict(storage_options)
        # Several nodes may share one process: every handle needs its own client and fresh listings.
        options.setdefault("skip_instance_cache", True)
        options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = url_to_fs(self.url, **options)
        except ImportError as exc:
            raise StoreConfigurationError(
                f"store {self.url!r}: the package for this protocol is not installed ({exc})"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise StoreConfigurationError(f"store {self.url!r}: cannot open this URL with fsspec: {exc}") from exc
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def _put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with translated("put", key):
            try:
                self.fs.pipe_file(path, data)
            except FileNotFoundError:  # filesystems with real directories want the parent first
                self.fs.makedirs(self.fs._parent(path), exist_ok=True)
                self.fs.pipe_file(path, data)
            return _info_tag(self.fs.info(path))

    def _get(self, key: str) -> bytes:
        with translated("get", key):
            return self.fs.cat_file(self._path(key))

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        check_prefix(prefix)
        start = f"{self.root}/" if self.root else ""
        with translated("list", prefix):
            try:
                entries = self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                return {}
        found: dict[str, ObjectInfo] = {}
        for name, info in entries.items():
            name = self.fs._strip_protocol(name)
            if info.get("type") == "directory" or name.endswith("/") or not name.startswith(start):
                continue
            key = name[len(start) :]
            if not key.startswith(prefix) or key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                continue
            found[key] = ObjectInfo(
                key=key, tag=_info_tag(info), size=int(info.get("size") or 0), modified=_info_stamp(info)
            )
        return dict(sorted(found.items()))

    def _delete(self, key: str) -> None:
        with translated("delete", key), suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))
