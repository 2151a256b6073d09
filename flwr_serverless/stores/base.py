"""The store interface: bytes in, bytes out, under one experiment prefix.

Every backend implements five small primitives (``_put``, ``_get``, ``_list``,
``_delete`` and, where the backend can, ``_put_conditional``). The public
methods add what all backends share: key checks and request/byte accounting.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from flwr_serverless.errors import ConditionalWritesUnsupportedError, StoreError


@dataclass(frozen=True)
class ObjectInfo:
    """What a LIST says about one object: enough to decide whether to GET it again."""

    key: str  # relative to the store's prefix, '/'-separated
    tag: str  # ETag, or inode-mtime-size: changes whenever the content changes
    size: int


@dataclass
class StoreStats:
    """Requests and bytes one store handle has moved (thread-safe counters)."""

    puts: int = 0
    gets: int = 0
    lists: int = 0
    deletes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def requests(self) -> int:
        return self.puts + self.gets + self.lists + self.deletes

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


class Store(ABC):
    """A flat namespace of byte objects under one prefix (one experiment)."""

    #: True when ``put_if_absent``/``put_if_match`` are atomic on this backend.
    supports_conditional_writes: bool = False

    def __init__(self) -> None:
        self.stats = StoreStats()

    # -- public API -------------------------------------------------------
    def put(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically (readers see the old or the new object); return its tag."""
        tag = self._put(check_key(key), data)
        self.stats.add(puts=1, bytes_up=len(data))
        return tag

    def get(self, key: str) -> bytes:
        """Read one object; raises ``ObjectNotFoundError`` naming the key if absent."""
        data = self._get(check_key(key))
        self.stats.add(gets=1, bytes_down=len(data))
        return data

    def list(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """All objects whose key starts with ``prefix``, keyed by key (one request)."""
        found = self._list(prefix)
        self.stats.add(lists=1)
        return found

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""
        self._delete(check_key(key))
        self.stats.add(deletes=1)

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create-only write; raises ``PreconditionFailedError`` if the key exists."""
        self._require_conditional("put_if_absent", key)
        tag = self._put_conditional(check_key(key), data, if_match=None)
        self.stats.add(puts=1, bytes_up=len(data))
        return tag

    def put_if_match(self, key: str, data: bytes, tag: str) -> str:
        """Compare-and-swap write; raises ``PreconditionFailedError`` if the tag changed."""
        self._require_conditional("put_if_match", key)
        new_tag = self._put_conditional(check_key(key), data, if_match=tag)
        self.stats.add(puts=1, bytes_up=len(data))
        return new_tag

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

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _list(self, prefix: str) -> dict[str, ObjectInfo]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        """``if_match=None`` means create-only. Backends with conditional writes override this."""
        raise ConditionalWritesUnsupportedError(
            "put_if_absent" if if_match is None else "put_if_match", key, "backend has no conditional writes"
        )

    def _require_conditional(self, operation: str, key: str) -> None:
        if not self.supports_conditional_writes:
            raise ConditionalWritesUnsupportedError(
                operation, key, f"{type(self).__name__} has no atomic conditional writes"
            )
