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
from flwr_serverless.errors import InvalidObjectError, KeyframeRequiredError, ObjectNotFoundError, StoreError
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
    keyframe_downloads: int = 0  # top-k: keyframes fetched because a delta named one we did not hold
    keyframe_misses: int = 0  # top-k: peers skipped because their keyframe changed or was missing meanwhile
    cas_conflicts: int = 0  # aggregate mode: compare-and-swap writes that lost to another member's (412 each)
    cas_giveups: int = 0  # aggregate mode: epochs whose contribution waits for the next (attempts used up)
    repairs: int = 0  # aggregate mode: aggregates rebuilt from the contributions (invalid, or naming a lost one)
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
            "keyframe_downloads": self.keyframe_downloads,
            "keyframe_misses": self.keyframe_misses,
            "cas_conflicts": self.cas_conflicts,
            "cas_giveups": self.cas_giveups,
            "repairs": self.repairs,
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
        self.keyframes: dict[str, DecodedUpdate] = {}  # peer -> the last keyframe of theirs we decoded (top-k)

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
    def fetch(self, info: ObjectInfo, deadline: Deadline = NO_DEADLINE,
              node_id: str | None = None) -> DecodedUpdate | None:
        """GET and validate one peer object; a bad object is logged, counted, remembered and skipped.

        A top-k delta is decoded against the peer's keyframe: the cached one, else
        ``keyframes/<peer>`` is fetched (and cached). If that is not the keyframe the
        delta names (the peer republished between our two GETs), the peer is skipped
        this time; its next object names the keyframe we now hold.
        """
        key = info.key
        try:
            peer = node_id if node_id is not None else key.rsplit("/", 1)[-1]
            if not layout.is_valid_node_id(peer):
                raise InvalidObjectError(key, "node id is not a plain name")
            self._check_size(key, info.size)
            with deadline.applied():
                data = self.spool.fetch(self.store, key)
            try:
                update = self._decode(data, key, self.keyframes.get(peer))
            except KeyframeRequiredError as required:
                keyframe = self._fetch_keyframe(peer, deadline)
                if keyframe is None or (keyframe.header.seq, keyframe.payload_hash) != (
                        required.ref.seq, required.ref.payload_hash):
                    self._keyframe_miss(info, required, keyframe)
                    return None
                update = self._decode(data, key, keyframe)
            if update.header.node_id != peer:
                raise InvalidObjectError(key, f"header says node {update.header.node_id!r}, key says {peer!r}")
            return update
        except ObjectNotFoundError:
            return None  # deleted between LIST and GET: the peer simply is not there now
        except InvalidObjectError as exc:
            self.reject(exc, info.tag, key)  # a bad keyframe makes its delta unusable too, until it changes
            return None

    def _decode(self, data: Any, key: str, keyframe: DecodedUpdate | None) -> DecodedUpdate:
        names = self.expected_names if self.framework == "torch" else None  # Keras auto-names vary by process
        return decode(data, key, expected=self.expected, secret=self.secret, expected_names=names,
                      framework=self.framework, keyframe=keyframe)

    def _check_size(self, key: str, size: int) -> None:
        if self.max_object_bytes is not None and size > self.max_object_bytes:
            raise InvalidObjectError(key, f"object is {size} bytes, over the limit of {self.max_object_bytes}")

    def _fetch_keyframe(self, peer: str, deadline: Deadline) -> DecodedUpdate | None:
        """GET, validate and cache ``keyframes/<peer>``; None when absent. A bad one raises naming its key."""
        key = layout.keyframe_key(peer)
        self.stats.keyframe_downloads += 1
        try:
            with deadline.applied():
                if self.max_object_bytes is not None:  # its size before the GET, as for any peer object
                    listed = self.store.list(key).get(key)
                    if listed is None:
                        return None
                    self._check_size(key, listed.size)
                data = self.spool.fetch(self.store, key)
        except ObjectNotFoundError:
            return None
        self._check_size(key, len(data))
        try:
            keyframe = self._decode(data, key, None)
        except KeyframeRequiredError:
            raise InvalidObjectError(key, "a keyframe must be lossless, this object is a top-k delta") from None
        if keyframe.header.node_id != peer:
            raise InvalidObjectError(key, f"header says node {keyframe.header.node_id!r}, key says {peer!r}")
        if not keyframe.lossless:
            raise InvalidObjectError(key, f"a keyframe must be lossless, this one stores {keyframe.encodings}")
        self.keyframes[peer] = keyframe  # the peer's current keyframe: its next deltas name it
        return keyframe

    def _keyframe_miss(self, info: ObjectInfo, required: KeyframeRequiredError,
                       keyframe: DecodedUpdate | None) -> None:
        """The delta's keyframe is gone (republished or missing): skip the peer until it publishes again."""
        self.stats.keyframe_misses += 1
        self.bad_tags[info.key] = info.tag  # not a rejection: a protocol writer's next object is usable
        held = "none" if keyframe is None else f"seq {keyframe.header.seq}"
        logger.info("node %s skips %s this time: it is a top-k delta against keyframe seq %d, but %s holds %s",
                    self.node_id, info.key, required.ref.seq, layout.keyframe_key(info.key.rsplit("/", 1)[-1]), held)

    def fetch_many(self, infos: Sequence[ObjectInfo], deadline: Deadline = NO_DEADLINE,
                   node_ids: Sequence[str] | None = None) -> list[Outcome]:
        """Fetch peers concurrently (downloads overlap, hashing releases the GIL), each under ``deadline``.

        ``node_ids``: the writer each object must come from, when the key's last part is not it.
        """
        def one(info: ObjectInfo, node_id: str | None) -> Outcome:
            if deadline.expired:
                return StoreError("get", info.key, "the federation's deadline passed before this download")
            try:
                return self.fetch(info, deadline, node_id)
            except StoreError as exc:
                return exc

        ids: Sequence[str | None] = node_ids if node_ids is not None else [None] * len(infos)
        self.stats.peer_downloads += len(infos)
        if len(infos) <= 1:
            return [one(info, node) for info, node in zip(infos, ids)]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_GETS, len(infos))) as pool:
            return list(pool.map(one, infos, ids))

    # -- shared objects (aggregate mode) ---------------------------------------------------
    def get_tagged(self, key: str, deadline: Deadline = NO_DEADLINE) -> tuple[Any, str] | None:
        """``key``'s bytes and a tag for a later ``put_if_match``; None when absent.

        LIST then GET: if the object changes in between, the bytes are newer than the
        tag and the compare-and-swap based on them fails (412), as it must.
        """
        with deadline.applied():
            if type(self.store).get_with_tag is not Store.get_with_tag:  # the backend does it in one request
                try:
                    data, tag = self.store.get_with_tag(key)
                except ObjectNotFoundError:
                    return None
                self._check_size(key, len(data))
                return data, tag
            info = self.store.list(key).get(key)
            if info is None:
                return None
            self._check_size(key, info.size)
            try:
                return self.spool.fetch(self.store, key), info.tag
            except ObjectNotFoundError:
                return None

    def put_if_match(self, key: str, data: bytes, tag: str, deadline: Deadline = NO_DEADLINE) -> str:
        with deadline.applied():
            return self.store.put_if_match(key, data, tag)

    def put_if_absent(self, key: str, data: bytes, deadline: Deadline = NO_DEADLINE) -> str:
        with deadline.applied():
            return self.store.put_if_absent(key, data)

    def already_rejected(self, info: ObjectInfo) -> bool:
        return self.bad_tags.get(info.key) == info.tag

    def reject(self, exc: InvalidObjectError, tag: str | None = None, key: str | None = None) -> None:
        """Count and log ``exc``; with ``tag``, remember ``key`` (default ``exc.key``) at that tag as bad."""
        if tag is not None:
            self.bad_tags[key or exc.key] = tag
        self.stats.rejected += 1
        self.stats.rejections[exc.key] = exc.reason
        logger.warning("node %s skips %s: %s", self.node_id, exc.key, exc.reason)

    def store_failure(self, key: str, exc: StoreError, what: str) -> None:
        self.stats.store_failures += 1
        logger.warning("node %s skips %s %s, could not pull it: %s", self.node_id, key, what, exc)

    # -- added for the aggregate mode's helping (kept at the end of the class) --------------------------
    def list_page(self, prefix: str, start_after: str, max_keys: int,
                  deadline: Deadline = NO_DEADLINE) -> dict[str, ObjectInfo]:
        """One page of ``prefix`` (``Store.list_page``): at most ``max_keys`` keys after ``start_after``."""
        with deadline.applied():
            return self.store.list_page(prefix, start_after, max_keys)


__all__ = ["Exchange", "NodeStats", "Outcome", "is_transient"]
