"""Peer objects spooled to local disk and memory-mapped, so a node's peer cache is page cache, not heap.

An async node keeps every peer's latest weights to download only the peers that
changed; held in memory that costs (peers x model) bytes. Instead each object is
streamed (1 MiB at a time) into an anonymous temporary file (unlinked from the
start, so nothing is left behind even after ``kill -9``) and mapped read-only;
decoded tensors are zero-copy views on the map and the kernel pages them in and
out as it needs. Stores that already hold objects in memory (``memory://``) are
read directly: spooling them would only add a copy. Objects a store can map
where they lie (a local folder's own files, ``Store.open_mapped``) are mapped
with no copy at all, unless ``map_store_files`` is off.
"""

from __future__ import annotations

import logging
import mmap
import tempfile

from flwr_serverless.stores import Store
from flwr_serverless.stores.local_mapping import map_read_only
from flwr_serverless.validation import check_choice

logger = logging.getLogger("flwr_serverless")

PEER_CACHES = ("disk", "memory")


class PeerSpool:
    """Fetches objects as read-only buffers: memory-mapped temp files (``"disk"``) or bytes (``"memory"``)."""

    def __init__(self, mode: str = "disk", directory: str | None = None, *, map_store_files: bool = True) -> None:
        check_choice("peer_cache", mode, PEER_CACHES)
        self.mode = mode
        self.directory = directory  # None: the system's temp directory
        self.map_store_files = map_store_files

    def fetch(self, store: Store, key: str) -> bytes | mmap.mmap:
        """One GET of ``key``; raises the store's errors (``ObjectNotFoundError``, ``StoreError``)."""
        if self.mode == "memory" or store.zero_copy_get:
            return store.get(key)
        if self.map_store_files:
            mapped = store.open_mapped(key)
            if mapped is not None:
                return mapped
        try:
            with tempfile.TemporaryFile(dir=self.directory, prefix="flwr-serverless-peer-") as spool:
                size = store.get_into(key, spool)
                if size == 0:
                    return b""
                spool.flush()
                return map_read_only(spool.fileno())  # the map keeps the file alive
        except OSError as exc:  # the local disk, not the store (store faults arrive as StoreError)
            return self._fall_back(store, key, exc)

    def _fall_back(self, store: Store, key: str, exc: OSError) -> bytes:
        """A full or unwritable spool directory must not stop training: keep peers in memory from now on."""
        logger.warning(
            "cannot spool peer objects to %s (%s); keeping them in memory instead",
            self.directory or tempfile.gettempdir(),
            exc,
        )
        self.mode = "memory"
        return store.get(key)
