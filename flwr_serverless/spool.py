"""Peer objects spooled to local disk and memory-mapped, so a node's peer cache is page cache, not heap.

An async node keeps every peer's latest weights to download only the peers that
changed; held in memory that costs (peers x model) bytes. Instead each object is
streamed (1 MiB at a time) into an anonymous temporary file (unlinked from the
start, so nothing is left behind even after ``kill -9``) and mapped read-only;
decoded tensors are zero-copy views on the map and the kernel pages them in and
out as it needs. Stores that already hold objects in memory (``memory://``) are
read directly: spooling them would only add a copy.
"""

from __future__ import annotations

import logging
import mmap
import tempfile

from flwr_serverless.stores import Store

logger = logging.getLogger("flwr_serverless")

PEER_CACHES = ("disk", "memory")


class PeerSpool:
    """Fetches objects as read-only buffers: memory-mapped temp files (``"disk"``) or bytes (``"memory"``)."""

    def __init__(self, mode: str = "disk", directory: str | None = None) -> None:
        if mode not in PEER_CACHES:
            raise ValueError(f"peer_cache must be one of {PEER_CACHES}, got {mode!r}")
        self.mode = mode
        self.directory = directory  # None: the system's temp directory

    def fetch(self, store: Store, key: str) -> bytes | mmap.mmap:
        """One GET of ``key``; raises the store's errors (``ObjectNotFoundError``, ``StoreError``)."""
        if self.mode == "memory" or store.zero_copy_get:
            return store.get(key)
        try:
            with tempfile.TemporaryFile(dir=self.directory, prefix="flwr-serverless-peer-") as spool:
                size = store.get_into(key, spool)
                if size == 0:
                    return b""
                spool.flush()
                return _map_read_only(spool.fileno())  # the map keeps the file alive
        except OSError as exc:  # the local disk, not the store (store faults arrive as StoreError)
            return self._fall_back(store, key, exc)

    def _fall_back(self, store: Store, key: str, exc: OSError) -> bytes:
        """A full or unwritable spool directory must not stop training: keep peers in memory from now on."""
        logger.warning("cannot spool peer objects to %s (%s); keeping them in memory instead",
                       self.directory or tempfile.gettempdir(), exc)
        self.mode = "memory"
        return store.get(key)


def _map_read_only(fd: int) -> mmap.mmap:
    """Map the whole file read-only, prefaulted where the OS can (one call instead of a fault per page)."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
