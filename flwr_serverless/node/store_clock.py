"""The store's time, as one host can know it without trusting its own wall clock.

Liveness (heartbeats, leases) compares times. Hosts' clocks disagree, by seconds or by hours; the
store's does not. So every age is a difference of store times: the stamps the store puts on writes
(S3 LastModified, file mtime), and "now" estimated from the stamp of this node's own latest write
plus this host's monotonic clock since that write returned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from flwr_serverless.stores.base import ObjectInfo, Store


class StoreClock:
    """The store's time seen from this host: the store's own stamps, carried forward by this host's monotonic clock.

    Every estimate is a lower bound of the store's time (a stamp is never later than the response that
    carried it), the tightest one being the stamp of our own latest write, taken when that write returned.
    A host's wall clock never enters: one that is hours off estimates the same store time as the others.
    """

    def __init__(self, store: Store, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.monotonic = monotonic
        self._offset: float | None = None  # store time minus monotonic time (the best lower bound seen)
        self._own: dict[str, tuple[str, float]] = {}  # key -> (tag, monotonic time our write of it returned)
        self._lock = threading.Lock()

    def wrote(self, key: str, tag: str) -> None:
        """Our write of ``key`` returned with ``tag``: its stamp in a later listing is the store's time about now."""
        with self._lock:
            self._own[key] = (tag, self.monotonic())

    def observe(self, listing: Mapping[str, ObjectInfo], listed_at: float | None = None) -> None:
        """Learn from a listing's stamps (``listed_at``: the monotonic time its answer arrived)."""
        at = self.monotonic() if listed_at is None else listed_at
        best = None
        for key, info in listing.items():
            if info.modified is None:
                continue
            own = self._own.get(key)
            offset = info.modified - (own[1] if own is not None and own[0] == info.tag else at)
            best = offset if best is None else max(best, offset)
        if best is not None:
            with self._lock:
                self._offset = best if self._offset is None else max(self._offset, best)

    def now(self) -> float | None:
        """The store's time now (None when neither the store nor any stamp has told us yet)."""
        direct = self.store.now()
        if direct is not None:
            return direct
        return None if self._offset is None else self._offset + self.monotonic()
