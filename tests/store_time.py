"""Make an object look older on the store's own clock, where the backend lets a test do so.

Liveness ages are store times (S3 LastModified, file mtime, the memory store's stamp), so a test that
needs "a record last written 30 minutes ago" must move that stamp, not a host's wall clock. S3
servers stamp writes themselves: there a test cannot backdate, and says so by getting ``False``.
"""

from __future__ import annotations

import os
from typing import Any

from flwr_serverless.stores.local import LocalStore
from flwr_serverless.stores.memory import MemoryStore


def backdate(store: Any, key: str, seconds: float) -> bool:
    """Move ``key``'s store stamp ``seconds`` into the past; False when the backend cannot."""
    if isinstance(store, MemoryStore):
        space = store._space
        with space.lock:
            data, tag, stamp = space.objects[store._base + key]
            space.objects[store._base + key] = (data, tag + "-b", stamp - seconds)
        return True
    if isinstance(store, LocalStore):
        path = store._path(key)
        stamp = os.stat(path).st_mtime - seconds
        os.utime(path, (stamp, stamp))
        return True
    return False


def can_backdate(store: Any) -> bool:
    return isinstance(store, (MemoryStore, LocalStore))
