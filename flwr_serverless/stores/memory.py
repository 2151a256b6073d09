"""``memory://name/prefix``: objects in this process's memory, for tests and thread simulations.

Handles opened on the same name share objects (two nodes in two threads
federate through ``memory://exp``); other names never see them. The namespaces
live in a registry of this module, not in fsspec's memory filesystem, so that
listing one experiment never walks another's objects. Every write replaces one
dict entry under the namespace's lock, which also makes create-only and
compare-and-swap atomic. ``get`` hands out the stored ``bytes`` itself
(immutable, so sharing it is safe): nothing to gain by spooling it to disk.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from flwr_serverless.errors import ObjectNotFoundError, PreconditionFailedError, StoreConfigurationError, StoreError
from flwr_serverless.stores.base import ObjectInfo, Store, check_prefix, refuse_options

SCHEME = "memory"


class _Namespace:
    """One name's objects: key -> (bytes, tag, time written), guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, str, float]] = {}


_NAMESPACES: dict[str, _Namespace] = {}
_NAMESPACES_LOCK = threading.Lock()
_GENERATION = itertools.count(1)  # tags are unique in the process, so a rewrite never repeats one


def _namespace(name: str) -> _Namespace:
    with _NAMESPACES_LOCK:
        return _NAMESPACES.setdefault(name, _Namespace())


def split_memory_url(url: str) -> tuple[str, str]:
    """``memory://name/a/b/`` -> ``("name", "a/b/")``; the name is the first path part."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme.lower() != SCHEME:
        raise StoreConfigurationError(f"store {url!r}: not a memory:// URL")
    name, _, prefix = rest.strip("/").partition("/")
    prefix = prefix.strip("/")
    try:
        check_prefix(prefix)
    except StoreError as exc:
        raise StoreConfigurationError(f"store {url!r}: {exc}") from exc
    return name, f"{prefix}/" if prefix else ""


class MemoryStore(Store):
    """Objects under ``memory://name/prefix`` in a process-global namespace called ``name``."""

    supports_conditional_writes = True
    zero_copy_get = True

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__()
        refuse_options(url, options, "a memory:// store")
        self.url = str(url)
        self.name, self._base = split_memory_url(self.url)
        self._space = _namespace(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @classmethod
    def discard(cls, name: str) -> None:
        """Forget every object of namespace ``name`` (open handles then see it empty)."""
        space = _namespace(name)
        with space.lock:
            space.objects.clear()

    def _put(self, key: str, data: bytes) -> str:
        entry = self._entry(data)
        with self._space.lock:
            self._space.objects[self._base + key] = entry
        return entry[1]

    def _get(self, key: str) -> bytes:
        entry = self._space.objects.get(self._base + key)  # one dict read: atomic under the GIL
        if entry is None:
            raise ObjectNotFoundError(key)
        return entry[0]

    def _copy(self, source: str, destination: str) -> str:
        with self._space.lock:
            entry = self._space.objects.get(self._base + source)
            if entry is None:
                raise ObjectNotFoundError(source)
            data = entry[0]
            copied = (data, f"m{next(_GENERATION)}-{len(data)}", time.time())  # the same immutable bytes, a new tag
            self._space.objects[self._base + destination] = copied
        return copied[1]

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        wanted, start = self._base + prefix, len(self._base)
        with self._space.lock:
            items = [(path, entry) for path, entry in self._space.objects.items() if path.startswith(wanted)]
        found = {
            path[start:]: ObjectInfo(path[start:], tag, len(data), modified=stamp) for path, (data, tag, stamp) in items
        }
        return dict(sorted(found.items()))

    def _delete(self, key: str) -> None:
        with self._space.lock:
            self._space.objects.pop(self._base + key, None)

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        operation = "put_if_absent" if if_match is None else "put_if_match"
        entry = self._entry(data)
        path = self._base + key
        with self._space.lock:
            current = self._space.objects.get(path)
            if (current is not None) if if_match is None else (current is None or current[1] != if_match):
                raise PreconditionFailedError(operation, key)
            self._space.objects[path] = entry
        return entry[1]

    def now(self) -> float:
        """One process, one clock: the time stamped on writes."""
        return time.time()

    @staticmethod
    def _entry(data: bytes) -> tuple[bytes, str, float]:
        stored = bytes(data)  # no copy when ``data`` is already bytes
        return stored, f"m{next(_GENERATION)}-{len(stored)}", time.time()
