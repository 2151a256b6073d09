"""The node's door to the store for its data: publish, list, fetch many; each call under an explicit deadline.

It owns every read and write of the objects a mode federates with (``nodes/``,
``rounds/``, the aggregate mode's objects, top-k keyframes and logs), and what
every mode needs around them: spooling peer objects to disk, validating them
(codec), remembering objects already rejected, counting, and the one retry
policy for waits that outlast a store outage. Fetches answer with facts (an
update, a ``KeyframeMiss``, a ``StoreError``), not with counters to compare.

It does not own the member records: ``Membership`` and ``Roster``
(``node/membership.py``) read and write ``members/`` on the store directly,
with their own compare-and-swap rules; they share the store and its stats.
"""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from flwr_serverless.errors import InvalidObjectError, KeyframeRequiredError, ObjectNotFoundError, StoreError
from flwr_serverless.node.deadline import NO_DEADLINE, Deadline
from flwr_serverless.node.spool import PeerSpool
from flwr_serverless.stores import ObjectInfo, Store
from flwr_serverless.stores.base import Payload
from flwr_serverless.stores.retry import RetryPolicy, call_with_retries, is_transient
from flwr_serverless.validation import check_positive
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import DecodedUpdate, KeyframeRef, UpdateHeader, decode

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
    keyframe_downloads: int = 0  # top-k: keyframes fetched because a delta named a chain we were not on
    delta_log_downloads: int = 0  # top-k: logged deltas fetched to catch up with a peer's chain
    keyframe_misses: int = 0  # top-k: peers skipped because their chain changed or a link was missing meanwhile
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
            "delta_log_downloads": self.delta_log_downloads,
            "keyframe_misses": self.keyframe_misses,
            "cas_conflicts": self.cas_conflicts,
            "cas_giveups": self.cas_giveups,
            "repairs": self.repairs,
        }


@dataclass(frozen=True)
class KeyframeMiss:
    """A top-k peer object skipped this time: a link of its chain is gone or newer (counted and logged)."""

    key: str
    chain: int


Outcome = DecodedUpdate | KeyframeMiss | StoreError | None  # None: gone, or rejected (already logged and counted)


class Exchange:
    """I/O of one node: every store call goes through here with the caller's deadline."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        *,
        secret: bytes | None = None,
        max_object_bytes: int | None = None,
        peer_cache: str = "disk",
        cache_dir: str | None = None,
        stats: NodeStats | None = None,
    ) -> None:
        check_positive("max_object_bytes", max_object_bytes, unit="bytes", none=True)
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
        self.states: dict[str, DecodedUpdate] = {}  # peer -> its last top-k chain state we decoded

    # -- calls --------------------------------------------------------------------------
    def put(self, key: str, data: Payload, deadline: Deadline = NO_DEADLINE) -> str:
        with deadline.applied():
            return self.store.put(key, data)

    def publish(self, key: str, data: Payload, deadline: Deadline) -> str:
        """PUT through a store outage, retrying transient faults until ``deadline`` (a barrier's publish)."""
        return self.persist(lambda: self.put(key, data, deadline), deadline, "put", key)

    def copy(self, source: str, target: str, deadline: Deadline = NO_DEADLINE) -> str:
        with deadline.applied():
            return self.store.copy(source, target)

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
        policy = RetryPolicy(  # on the deadline's clock, so an injected clock bounds these retries too
            attempts=1_000_000,
            max_time=min(deadline.remaining(), 1e9),
            base_delay=0.05,
            max_delay=1.0,
            clock=deadline.clock,
        )

        def count(exc: BaseException) -> None:
            self.stats.store_failures += 1
            logger.warning(
                "node %s: store unavailable (%s %s), retrying until the deadline: %s", self.node_id, operation, key, exc
            )

        return call_with_retries(policy, operation, key, call, on_retry=count)

    # -- peers ----------------------------------------------------------------------------
    def fetch(
        self, info: ObjectInfo, deadline: Deadline = NO_DEADLINE, node_id: str | None = None
    ) -> DecodedUpdate | KeyframeMiss | None:
        """GET and validate one peer object; a bad object is logged, counted, remembered and skipped (None).

        A top-k delta is decoded onto the peer's state we hold. If that is not the
        state it follows, we catch up first (``_catch_up``); if the chain changed
        meanwhile, the peer is skipped this time (``KeyframeMiss``) and its next object is usable.
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
                update = self._decode(data, key, self.states.get(peer))
            except KeyframeRequiredError as required:
                base = self._catch_up(peer, required, deadline)
                if base is None:
                    return self._keyframe_miss(info, required)
                update = self._decode(data, key, base)
            if update.header.node_id != peer:
                raise InvalidObjectError(key, f"header says node {update.header.node_id!r}, key says {peer!r}")
            if update.chain is not None:
                self.states[peer] = update
            return update
        except ObjectNotFoundError:
            return None  # deleted between LIST and GET: the peer simply is not there now
        except InvalidObjectError as exc:
            self.reject(exc, info.tag, key)  # a bad keyframe or log entry makes its delta unusable too
            return None

    def rebase(self, peers: Sequence[str], arrays: builtins.list[np.ndarray], ref: KeyframeRef) -> None:
        """After a sync round, ``peers`` hold ``arrays`` as we do: their next top-k deltas apply to it."""
        frozen = []  # our own read-only copy: the caller may change the arrays it trains on in place
        for array in arrays:
            copy = np.array(array, copy=True)
            copy.flags.writeable = False
            frozen.append(copy)
        for peer in peers:
            self.states[peer] = DecodedUpdate(UpdateHeader(peer, seq=ref.seq), [], frozen, keyframe=ref, chain=0)

    def _decode(self, data: Any, key: str, base: DecodedUpdate | None) -> DecodedUpdate:
        names = self.expected_names if self.framework == "torch" else None  # Keras auto-names vary by process
        return decode(
            data,
            key,
            expected=self.expected,
            secret=self.secret,
            expected_names=names,
            framework=self.framework,
            base=base,
        )

    def _check_size(self, key: str, size: int) -> None:
        if self.max_object_bytes is not None and size > self.max_object_bytes:
            raise InvalidObjectError(key, f"object is {size} bytes, over the limit of {self.max_object_bytes}")

    def _catch_up(self, peer: str, required: KeyframeRequiredError, deadline: Deadline) -> DecodedUpdate | None:
        """The peer's state just before ``required.chain``: from the one we hold if it is on that chain, else
        from its keyframe, through its logged deltas (GET in parallel, applied in order). None when a link is
        missing or belongs to another chain (the writer started a new one meanwhile)."""
        ref, target = required.ref, max(required.chain - 1, 0)
        held = self.states.get(peer)
        state: DecodedUpdate | None
        position = held.position() if held is not None else None
        if held is not None and position is not None and position[0] == ref and position[1] <= target:
            state = held
        else:
            self.stats.keyframe_downloads += 1
            state = self._fetch_keyframe(peer, deadline)
            if state is None or state.position() != (ref, 0):
                return None
        start = state.position()[1]  # type: ignore[index]
        keys = [layout.delta_key(peer, index) for index in range(start + 1, target + 1)]
        self.stats.delta_log_downloads += len(keys)
        datas: list[Any] = []
        if keys:
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_GETS, len(keys))) as pool:
                datas = list(pool.map(lambda k: self._get_link(k, deadline), keys))
        for index, (key, data) in enumerate(zip(keys, datas), start + 1):
            if data is None:
                return None
            try:
                state = self._decode(data, key, state)
            except KeyframeRequiredError:
                return None  # a log entry of another chain (or out of place): the writer moved on
            if state.header.node_id != peer or state.position() != (ref, index):
                return None
        return state

    def _get_link(self, key: str, deadline: Deadline) -> Any:
        """One keyframe or log entry's bytes (its size checked), or None when absent."""
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
        return data

    def _fetch_keyframe(self, peer: str, deadline: Deadline) -> DecodedUpdate | None:
        """GET and validate a peer's keyframe: a whole model (a delta cannot decode without a base), of that
        peer. A bad one raises naming its key."""
        key = layout.keyframe_key(peer)
        data = self._get_link(key, deadline)
        if data is None:
            return None
        try:
            state = self._decode(data, key, None)
        except KeyframeRequiredError:
            raise InvalidObjectError(key, "a keyframe must be a whole model, this object is a top-k delta") from None
        if state.header.node_id != peer:
            raise InvalidObjectError(key, f"header says node {state.header.node_id!r}, key says {peer!r}")
        return state

    def _keyframe_miss(self, info: ObjectInfo, required: KeyframeRequiredError) -> KeyframeMiss:
        """A link of the delta's chain is gone (a new chain began, or it is missing): skip the peer this time."""
        self.stats.keyframe_misses += 1
        self.bad_tags[info.key] = info.tag  # not a rejection: a protocol writer's next object is usable
        logger.info(
            "node %s skips %s this time: it is top-k delta %d after keyframe seq %d, and the keyframe or "
            "a logged delta before it is missing or of a newer chain",
            self.node_id,
            info.key,
            required.chain,
            getattr(required.ref, "seq", "?"),
        )
        return KeyframeMiss(info.key, required.chain)

    def fetch_many(
        self, infos: Sequence[ObjectInfo], deadline: Deadline = NO_DEADLINE, node_ids: Sequence[str] | None = None
    ) -> builtins.list[Outcome]:
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
    def list_page(
        self, prefix: str, start_after: str, max_keys: int, deadline: Deadline = NO_DEADLINE
    ) -> dict[str, ObjectInfo]:
        """One page of ``prefix`` (``Store.list_page``): at most ``max_keys`` keys after ``start_after``."""
        with deadline.applied():
            return self.store.list_page(prefix, start_after, max_keys)


__all__ = ["Exchange", "KeyframeMiss", "NodeStats", "Outcome", "is_transient"]
