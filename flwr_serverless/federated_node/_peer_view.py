"""The 0.2 node aliases' window on the shared folder: hide peers' objects on request, note their example counts.

0.2's ``upload_only`` (publish, do not aggregate) and ``ignore_seen_models`` (aggregate a
peer's object once) are choices about *which peer objects a node sees*. The aliases get
them through the store rather than through the node's internals: the real node is given a
``PeerView`` over the user's folder, and the view filters the two documented listings of
peers' weights (docs/protocol/layout.md): ``nodes/`` (async) and ``rounds/<r>/`` (sync).
Everything else (membership, the ``rounds/`` lookup, writes) passes through untouched, and
every call goes to the folder itself, so there is one set of stats and one retry policy.
"""

from __future__ import annotations

import io
import mmap
import struct
from collections.abc import Callable
from typing import BinaryIO

from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.stores import ObjectInfo, Store
from flwr_serverless.stores.base import Payload
from flwr_serverless.wire.codec import MAX_HEADER_BYTES, read_header

NODES_PREFIX = "nodes/"  # nodes/<node_id>: an async node's latest weights
ROUNDS_PREFIX = "rounds/"  # rounds/<round>/<node_id>: what a sync node published for a round


def _is_peer_listing(prefix: str) -> bool:
    return prefix == NODES_PREFIX or (
        prefix.startswith(ROUNDS_PREFIX) and prefix.endswith("/") and prefix.count("/") == 2
    )


def _peer_of(key: str) -> str | None:
    """The node id of a weights object's key, None for any other key."""
    if key.startswith(NODES_PREFIX) and key.count("/") == 1:
        return key[len(NODES_PREFIX) :]
    if key.startswith(ROUNDS_PREFIX) and key.count("/") == 2:
        return key.rsplit("/", 1)[1]
    return None


def seen_label(peer: str, tag: str) -> str:
    """How ``seen_models`` names one object of a peer (0.2 used ``<node_id>_<time>``)."""
    return f"{peer}_{tag}"


class PeerView(Store):
    """A Store that delegates to ``folder`` and filters peers' weights listings for one node."""

    def __init__(self, folder: Store, own_id: Callable[[], str]) -> None:
        super().__init__()
        self.folder = folder
        self.stats = folder.stats
        self.supports_conditional_writes = folder.supports_conditional_writes
        self.zero_copy_get = folder.zero_copy_get
        self._own_id = own_id
        #: Hide every peer object (``upload_only``); ``on_hidden_round`` runs when a round listing is so filtered.
        self.publish_only = False
        self.on_hidden_round: Callable[[], None] | None = None
        #: Labels (``seen_label``) of peer objects to hide (``ignore_seen_models``); None hides none.
        self.hide_seen: set[str] | None = None
        self.visible: dict[str, ObjectInfo] = {}  # peer id -> its object in the last peers listing
        self._examples: dict[str, tuple[str, int]] = {}  # peer id -> (tag, num_examples) of the object fetched

    def __repr__(self) -> str:
        return f"PeerView({self.folder!r})"

    # -- per federation -------------------------------------------------------------
    def begin(self, publish_only: bool) -> None:
        """Start one federation: forget the previous listing; hide every peer if ``publish_only``."""
        self.publish_only = publish_only
        self.visible = {}

    def participants(self) -> dict[str, tuple[str, int]]:
        """Peers of the last listing whose object (same tag) this view saw fetched: id -> (tag, num_examples)."""
        return {
            peer: self._examples[peer]
            for peer, info in self.visible.items()
            if peer in self._examples and self._examples[peer][0] == info.tag
        }

    def forget(self, peer: str) -> None:
        """The node rejected this peer's object: it is no participant until a new object is fetched."""
        self._examples.pop(peer, None)

    # -- Store API, delegated -------------------------------------------------------
    def put(self, key: str, data: Payload) -> str:
        return self.folder.put(key, data)

    def get(self, key: str) -> bytes:
        data = self.folder.get(key)
        if _peer_of(key) is not None:
            self._note(key, bytes(data[: 8 + _header_length(data)]))
        return data

    def get_into(self, key: str, sink: BinaryIO) -> int:
        size = self.folder.get_into(key, sink)
        if _peer_of(key) is not None:
            try:  # read the header back from the spool file (it is in the page cache)
                sink.seek(0)
                head = sink.read(8)
                rest = sink.read(_header_length(head))
                sink.seek(0, io.SEEK_END)
                self._note(key, head + rest)
            except (OSError, ValueError):  # a write-only sink: no example count for this peer
                pass
        return size

    def open_mapped(self, key: str) -> mmap.mmap | bytes | None:
        data = self.folder.open_mapped(key)
        if data is not None and _peer_of(key) is not None:
            self._note(key, bytes(data[: 8 + _header_length(data[:8])]))
        return data

    def list(self, prefix: str = "") -> dict[str, ObjectInfo]:
        listing = self.folder.list(prefix)
        if not _is_peer_listing(prefix):
            return listing
        own = self._own_id()
        shown: dict[str, ObjectInfo] = {}
        for key, info in listing.items():
            peer = _peer_of(key)
            if peer is not None and peer != own:
                if self.publish_only:
                    continue
                if self.hide_seen is not None and seen_label(peer, info.tag) in self.hide_seen:
                    continue
            shown[key] = info
        self.visible = {p: info for key, info in shown.items() if (p := _peer_of(key)) is not None and p != own}
        if self.publish_only and prefix != NODES_PREFIX and self.on_hidden_round is not None:
            self.on_hidden_round()
        return shown

    def delete(self, key: str) -> None:
        self.folder.delete(key)

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self.folder.put_if_absent(key, data)

    def put_if_match(self, key: str, data: bytes, tag: str) -> str:
        return self.folder.put_if_match(key, data, tag)

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        return self.folder.get_with_tag(key)

    def now(self) -> float | None:
        return self.folder.now()

    def close(self) -> None:
        self.folder.close()

    # -- primitives: unused (every public method delegates), required by Store ------------
    def _put(self, key: str, data: bytes) -> str:
        return self.folder.put(key, data)

    def _get(self, key: str) -> bytes:
        return self.folder.get(key)

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        return self.folder.list(prefix)

    def _delete(self, key: str) -> None:
        self.folder.delete(key)

    # -- helpers ------------------------------------------------------------------------
    def _note(self, key: str, head: bytes) -> None:
        """Remember a fetched peer object's example count (for 0.2's ``num_examples`` metric)."""
        peer = _peer_of(key)
        if peer is None or peer not in self.visible:
            return
        try:
            fields, _, _ = read_header(head, key)
            self._examples[peer] = (self.visible[peer].tag, int(fields.get("num_examples", 0)))
        except (InvalidObjectError, TypeError, ValueError):
            self._examples.pop(peer, None)  # the node rejects it too


def _header_length(head: bytes | mmap.mmap) -> int:
    """Length of the JSON header that follows the 8-byte prefix (0 if truncated; capped like the codec)."""
    if len(head) < 8:
        return 0
    return min(MAX_HEADER_BYTES, int(struct.unpack_from("<Q", head, 0)[0]))
