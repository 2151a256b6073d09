"""The store interface: bytes in, bytes out, under one experiment prefix.

Every backend implements five small primitives (``_put``, ``_get``, ``_list``,
``_delete`` and, where the backend can, ``_put_conditional``). The public
methods add what all backends share: key checks and request/byte accounting.
Two optional primitives let a backend skip copies: ``_put_parts`` (write a list
of buffers without joining them first) and ``_open_mapped`` (hand out the
stored object as a read-only memory map).
"""

from __future__ import annotations

import mmap
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    ObjectNotFoundError,
    StoreConfigurationError,
    StoreError,
)
from flwr_serverless.stores.retry import DEFAULT_POLICY, RetryPolicy, call_with_retries
from flwr_serverless.validation import check_positive_int

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
#: What ``Store.put`` writes: one buffer, or a sequence of buffers stored back to back (``codec.encode_parts``).
Payload = Buffer | Sequence[Buffer]


def payload_size(data: Payload) -> int:
    """Bytes in ``data``, one buffer or several."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).nbytes
    return sum(memoryview(part).nbytes for part in data)


@dataclass(frozen=True)
class ObjectInfo:
    """What a LIST says about one object: enough to decide whether to GET it again."""

    key: str  # relative to the store's prefix, '/'-separated
    tag: str  # ETag, or inode-mtime-size: changes whenever the content changes
    size: int
    #: When the store last wrote it, on the store's own clock (S3 LastModified, file mtime), if it says.
    #: Liveness ages are differences of these store times, never of two hosts' clocks.
    modified: float | None = field(default=None, compare=False)


@dataclass
class StoreStats:
    """Requests and bytes one store handle has moved (thread-safe counters)."""

    puts: int = 0
    gets: int = 0
    lists: int = 0
    deletes: int = 0
    copies: int = 0  # copies inside the store (no bytes through this process)
    bytes_up: int = 0
    bytes_down: int = 0
    retries: int = 0  # failed attempts that were retried (not requests: not in ``requests``/``as_dict``)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def requests(self) -> int:
        return self.puts + self.gets + self.lists + self.deletes + self.copies

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {
            "puts": self.puts,
            "gets": self.gets,
            "lists": self.lists,
            "deletes": self.deletes,
            "copies": self.copies,
            "requests": self.requests,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


def check_key(key: str) -> str:
    """Reject keys that could escape the prefix or confuse a backend."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise StoreError("access", key, "keys are non-empty relative paths")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError("access", key, "keys may not contain empty, '.' or '..' parts")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in key):
        raise StoreError("access", key, "keys may not contain control characters")
    return key


def check_prefix(prefix: str) -> str:
    """Reject list prefixes that could leave the store's folder (the twin of ``check_key``)."""
    if prefix and (prefix.startswith("/") or any(part in (".", "..") for part in prefix.split("/"))):
        raise StoreError("list", prefix, "list prefixes are relative and may not contain '.' or '..' parts")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in prefix):
        raise StoreError("list", prefix, "list prefixes may not contain control characters")
    return prefix


class Store(ABC):
    """A flat namespace of byte objects under one prefix (one experiment)."""

    #: True when ``put_if_absent``/``put_if_match`` are atomic on this backend.
    supports_conditional_writes: bool = False

    #: True when ``get`` hands out bytes the store already holds (memory://): nothing to gain by spooling.
    zero_copy_get: bool = False

    #: Transient faults (connection errors, timeouts, 5xx, throttling) are retried within this policy.
    retry_policy: RetryPolicy = DEFAULT_POLICY

    def __init__(self) -> None:
        self.stats = StoreStats()

    @classmethod
    def from_url(cls, url: str, *, retry_policy: RetryPolicy = DEFAULT_POLICY, **options: Any) -> Store:
        """Open the store at ``url``: what ``open_store`` calls for a class in the store registry.

        ``retry_policy`` is the policy ``open_store`` gives the store afterwards; a backend with a
        retry layer of its own (botocore, s3fs) sizes that layer by it, so the two never multiply.
        The default ignores it and calls ``cls(url, **options)``.
        """
        build: Callable[..., Store] = cls  # every concrete store takes the URL (Store itself takes nothing)
        return build(url, **options)

    # -- public API -------------------------------------------------------
    # Stats count requests that succeeded; retried failures go to ``stats.retries``.
    def put(self, key: str, data: Payload) -> str:
        """Write ``data`` atomically (readers see the old or the new object); return its tag.

        ``data`` may be a sequence of buffers (``codec.encode_parts``): they are stored
        back to back, joined only by backends that cannot write them one after another.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            # every backend's _put takes any bytes-like object (they write or send it as it is)
            tag = self._retrying("put", check_key(key), lambda: self._put(key, data))  # type: ignore[arg-type]
        else:
            parts = list(data)
            tag = self._retrying("put", check_key(key), lambda: self._put_parts(key, parts))
        self.stats.add(puts=1, bytes_up=payload_size(data))
        return tag

    def get(self, key: str) -> bytes:
        """Read one object; raises ``ObjectNotFoundError`` naming the key if absent."""
        data = self._retrying("get", check_key(key), lambda: self._get(key))
        self.stats.add(gets=1, bytes_down=len(data))
        return data

    def get_into(self, key: str, sink: BinaryIO) -> int:
        """Stream one object into a seekable binary file (one GET, bounded memory); return its size.

        A retried attempt rewinds and truncates ``sink`` first, so it never holds two partial reads.
        """

        def attempt() -> int:
            sink.seek(0)
            sink.truncate()
            return self._get_into(key, sink)

        size = self._retrying("get", check_key(key), attempt)
        self.stats.add(gets=1, bytes_down=size)
        return size

    def open_mapped(self, key: str) -> mmap.mmap | bytes | None:
        """The object as a read-only memory map of the backend's own copy (no download, no spool), or None.

        None means this backend cannot (or will not, for this object) map it: read with
        ``get``/``get_into`` instead. An empty object comes back as ``b""``.
        """
        data = self._retrying("get", check_key(key), lambda: self._open_mapped(key))
        if data is not None:
            self.stats.add(gets=1, bytes_down=len(data))
        return data

    def list(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """All objects whose key starts with ``prefix``, keyed by key (one request)."""
        found = self._retrying("list", check_prefix(prefix), lambda: self._list(prefix))
        self.stats.add(lists=1)
        return found

    def list_page(self, prefix: str, start_after: str = "", max_keys: int = 1000) -> dict[str, ObjectInfo]:
        """At most ``max_keys`` objects under ``prefix`` whose key sorts after ``start_after``, in one request.

        S3 sends only that page (its answer stays small however many objects there are); the
        default lists ``prefix`` and cuts the page out of it.
        """
        check_positive_int("max_keys", max_keys)
        found = self._retrying("list", check_prefix(prefix), lambda: self._list_page(prefix, start_after, max_keys))
        self.stats.add(lists=1)
        return found

    def _list_page(self, prefix: str, start_after: str, max_keys: int) -> dict[str, ObjectInfo]:
        listing = self._list(prefix)
        return {key: listing[key] for key in sorted(k for k in listing if k > start_after)[:max_keys]}

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""
        self._retrying("delete", check_key(key), lambda: self._delete(key))
        self.stats.add(deletes=1)

    def copy(self, source: str, destination: str) -> str:
        """Copy ``source`` to ``destination`` (atomically, like ``put``); return the new object's tag.

        Backends that can copy without the bytes passing through this process (S3
        CopyObject, a local hard link, a shared in-memory object) do; the default GETs
        and PUTs. ``ObjectNotFoundError`` names ``source`` when it is absent.
        """
        check_key(source)
        if type(self)._copy is Store._copy:
            return self.put(destination, self.get(source))
        tag = self._retrying("copy", check_key(destination), lambda: self._copy(source, destination))
        self.stats.add(copies=1)
        return tag

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create-only write; raises ``PreconditionFailedError`` if the key exists.

        A retried attempt whose first try did land reports ``PreconditionFailedError``:
        callers that must know read the object back (as node membership does).
        """
        self._require_conditional("put_if_absent", key)
        tag = self._retrying("put_if_absent", check_key(key), lambda: self._put_conditional(key, data, if_match=None))
        self.stats.add(puts=1, bytes_up=len(data))
        return tag

    def put_if_match(self, key: str, data: bytes, tag: str) -> str:
        """Compare-and-swap write; raises ``PreconditionFailedError`` if the tag changed."""
        self._require_conditional("put_if_match", key)
        new_tag = self._retrying("put_if_match", check_key(key), lambda: self._put_conditional(key, data, if_match=tag))
        self.stats.add(puts=1, bytes_up=len(data))
        return new_tag

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        """Read an object and the tag of exactly those bytes, for a safe read-modify-``put_if_match``.

        Generic version: LIST, GET, LIST again until the tag did not change around the GET.
        """
        for _ in range(10):
            before = self.list(key).get(key)
            if before is None:
                raise ObjectNotFoundError(key)
            data = self.get(key)
            after = self.list(key).get(key)
            if after is not None and after.tag == before.tag:
                return data, before.tag
        raise StoreError("get", key, "object kept changing while being read")

    def now(self) -> float | None:
        """The store's clock now, when this process can read it directly (one host: memory://, local folders).

        None for remote stores: their time is learnt from the ``modified`` stamps of our own writes.
        """
        return None

    def close(self) -> None:
        """Release connections; the default has nothing to release."""
        return None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend primitives -----------------------------------------------
    @abstractmethod
    def _put(self, key: str, data: bytes) -> str: ...

    def _put_parts(self, key: str, parts: Sequence[Buffer]) -> str:
        """Default: join the buffers and ``_put`` them; backends that can write them in turn override it."""
        return self._put(key, b"".join(parts))

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    def _open_mapped(self, key: str) -> mmap.mmap | bytes | None:
        """Default: no memory maps (objects are remote, or live in this process already)."""
        return None

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        """Default: one ``_get`` in memory; backends that can stream override it."""
        data = self._get(key)
        sink.write(data)
        return len(data)

    def _copy(self, source: str, destination: str) -> str:
        """A copy inside the store; the default has none (``copy`` GETs and PUTs), backends that can override it."""
        raise NotImplementedError

    @abstractmethod
    def _list(self, prefix: str) -> dict[str, ObjectInfo]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        """``if_match=None`` means create-only. Backends with conditional writes override this."""
        raise ConditionalWritesUnsupportedError(
            "put_if_absent" if if_match is None else "put_if_match", key, "backend has no conditional writes"
        )

    def _retrying(self, operation: str, key: str, call: Callable[[], T]) -> T:
        def count(_: BaseException) -> None:
            self.stats.add(retries=1)

        return call_with_retries(self.retry_policy, operation, key, call, on_retry=count)

    def _require_conditional(self, operation: str, key: str) -> None:
        if not self.supports_conditional_writes:
            raise ConditionalWritesUnsupportedError(
                operation, key, f"{type(self).__name__} has no atomic conditional writes"
            )


def refuse_options(url: str, options: dict[str, Any], backend: str) -> None:
    """Options a backend has no use for are a mistake worth naming, not something to ignore."""
    if options:
        names = ", ".join(sorted(options))
        raise StoreConfigurationError(f"store {url!r}: option(s) {names} mean nothing to {backend}")


def url_scheme(url: str) -> str:
    """``"s3"`` for ``s3://b/p``, ``""`` for a plain path; for a chained fsspec URL, the outermost scheme."""
    first, chained, _ = str(url).partition("::")
    if "://" in first:
        return first.split("://", 1)[0].lower()
    return first.lower() if chained else ""  # "simplecache::s3://..." names its outer protocol bare
