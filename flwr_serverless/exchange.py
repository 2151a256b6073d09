"""The node's only door to the store: publish, list, fetch many; each call under an explicit deadline.

It owns what every mode needs around I/O: spooling peer objects to disk,
validating them (codec), remembering objects already rejected, counting, and
the one retry policy for waits that outlast a store outage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from flwr_serverless import layout
from flwr_serverless.codec import DecodedUpdate, decode
from flwr_serverless.deadline import NO_DEADLINE, Deadline
from flwr_serverless.errors import InvalidObjectError, ObjectNotFoundError, StoreError
from flwr_serverless.spool import PeerSpool
from flwr_serverless.stores import ObjectInfo, Store
from flwr_serverless.stores.base import Payload
from flwr_serverless.stores.retry import RetryPolicy, call_with_retries, is_transient

logger = logging.getLogger("flwr_serverless")

MAX_PARALLEL_GETS = 8
TensorSpec = tuple[tuple[int, ...], np.dtype]
T = TypeVar("T")


@dataclass
class NodeStats:
    """Federation counters of one node (the store keeps its own request counters)."""

    federations: int = 0
    peers_used: int = 0
    peer_downloads: int = 0
    rejected: int = 0
    partial_rounds: int = 0
    store_failures: int = 0
    leftovers_skipped: int = 0
    dropped_members: int = 0
    rejections: dict[str, str] = field(default_factory=dict)  # key -> last reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "federations": self.federations,
            "peers_used": self.peers_used,
            "peer_downloads": self.peer_downloads,
            "rejected": self.rejected,
            "partial_rounds": self.partial_rounds,
            "store_failures": self.store_failures,
            "leftovers_skipped": self.leftovers_skipped,
            "dropped_members": self.dropped_members,
        }


Outcome = DecodedUpdate | StoreError | None  # None: gone, or rejected (already logged and counted)


class Exchange:
    """I/O of one node: every store call goes through here with the caller's deadline."""

    def __init__(self, store: Store, node_id: str, *, secret: bytes | None = None,
                 max_object_bytes: int | None = None, peer_cache: str = "disk", cache_dir: str | None = None,
                 stats: NodeStats | None = None) -> None:
        if max_object_bytes is not None and (isinstance(max_object_bytes, bool) or max_object_bytes <= 0):
            raise ValueError(f"max_object_bytes must be a positive number of bytes, got {max_object_bytes!r}")
        self.store = store
        self.node_id = node_id
        self.secret = secret
        self.max_object_bytes = max_object_bytes
        self.spool = PeerSpool(peer_cache, cache_dir)
        self.stats = stats if stats is not None else NodeStats()
        self.expected: list[TensorSpec] | None = None  # the local model's tensors, once known
        self.expected_names: list[str] | None = None  # compared only where names are stable (torch keys)
        self.framework: str | None = None  # "keras" / "torch": objects of the other layout are refused
        self.bad_tags: dict[str, str] = {}  # key -> tag of an object already rejected (not downloaded again)

    # -- calls --------------------------------------------------------------------------
    def put(self, key: str, data: Payload, deadline: Deadline = NO_DEADLINE) -> str:
        with deadline.applied():
            return self.store.put(key, data)

    def publish(self, key: str, data: Payload, deadline: Deadline) -> str:
        """PUT through a store outage, retrying transient faults until ``deadline`` (a barrier's publish)."""
        return self.persist(lambda: self.put(key, data, deadline), deadline, "put", key)

    def list(self, prefix: str, deadline: Deadline = NO_DEADLINE) -> dict[str, ObjectInfo]:
        with deadline.applied():
            return self.store.list(prefix)

    def delete_quietly(self, key: str, deadline: Deadline = NO_DEADLINE) -> None:
        try:
            with deadline.applied():
                self.store.delete(key)
        except StoreError as exc:
            logger.info("node %s could not delete %s: %s", self.node_id, key, exc)

    def get_json(self, key: str, deadline: Deadline = NO_DEADLINE) -> dict[str, Any] | None:
        """A small JSON object, or None when absent or unreadable."""
        try:
            with deadline.applied():
                data = json.loads(self.store.get(key))
        except (ObjectNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def persist(self, call: Callable[[], T], deadline: Deadline, operation: str, key: str) -> T:
        """Retry ``call`` on transient store faults until ``deadline``, then raise one error naming op and key."""
        policy = RetryPolicy(attempts=1_000_000, max_time=min(deadline.remaining(), 1e9), base_delay=0.05,
                             max_delay=1.0)

        def count(exc: BaseException) -> None:
            self.stats.store_failures += 1
            logger.warning("node %s: store unavailable (%s %s), retrying until the deadline: %s",
                           self.node_id, operation, key, exc)

        return call_with_retries(policy, operation, key, call, on_retry=count)

    # -- peers ----------------------------------------------------------------------------
    def fetch(self, info: ObjectInfo, deadline: Deadline = NO_DEADLINE) -> DecodedUpdate | None:
        """GET and validate one peer object; a bad object is logged, counted, remembered and skipped."""
        key = info.key
        try:
            expected_id = key.rsplit("/", 1)[-1]
            if not layout.is_valid_node_id(expected_id):
                raise InvalidObjectError(key, "node id is not a plain name")
            if self.max_object_bytes is not None and info.size > self.max_object_bytes:
                raise InvalidObjectError(key, f"object is {info.size} bytes, over the limit of {self.max_object_bytes}")
            with deadline.applied():
                data = self.spool.fetch(self.store, key)
            names = self.expected_names if self.framework == "torch" else None  # Keras auto-names vary by process
            update = decode(data, key, expected=self.expected, secret=self.secret, expected_names=names,
                            framework=self.framework)
            if update.header.node_id != expected_id:
                raise InvalidObjectError(key, f"header says node {update.header.node_id!r}, key says {expected_id!r}")
            return update
        except ObjectNotFoundError:
            return None  # deleted between LIST and GET: the peer simply is not there now
        except InvalidObjectError as exc:
            self.reject(exc, info.tag)
            return None

    def fetch_many(self, infos: Sequence[ObjectInfo], deadline: Deadline = NO_DEADLINE) -> list[Outcome]:
        """Fetch peers concurrently (downloads overlap, hashing releases the GIL), each under ``deadline``."""
        def one(info: ObjectInfo) -> Outcome:
            if deadline.expired:
                return StoreError("get", info.key, "the federation's deadline passed before this download")
            try:
                return self.fetch(info, deadline)
            except StoreError as exc:
                return exc

        self.stats.peer_downloads += len(infos)
        if len(infos) <= 1:
            return [one(info) for info in infos]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_GETS, len(infos))) as pool:
            return list(pool.map(one, infos))

    def already_rejected(self, info: ObjectInfo) -> bool:
        return self.bad_tags.get(info.key) == info.tag

    def reject(self, exc: InvalidObjectError, tag: str | None = None) -> None:
        if tag is not None:
            self.bad_tags[exc.key] = tag
        self.stats.rejected += 1
        self.stats.rejections[exc.key] = exc.reason
        logger.warning("node %s skips %s: %s", self.node_id, exc.key, exc.reason)

    def store_failure(self, key: str, exc: StoreError, what: str) -> None:
        self.stats.store_failures += 1
        logger.warning("node %s skips %s %s, could not pull it: %s", self.node_id, key, what, exc)


__all__ = ["Exchange", "NodeStats", "Outcome", "is_transient"]
