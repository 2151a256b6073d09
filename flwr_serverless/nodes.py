"""The federation protocol: what a node publishes, what it pulls, and when it waits.

Layout under the experiment prefix (see README, "Store layout")::

    members/<node_id>           tiny JSON, written once when a node joins
    nodes/<node_id>             async: the node's latest weights (overwritten atomically)
    rounds/<round>/<node_id>    sync: what the node published for that round
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg, Strategy

from flwr_serverless.aggregation import Contribution, aggregate, mean_metrics
from flwr_serverless.codec import DecodedUpdate, UpdateHeader, decode, encode, is_valid_node_id
from flwr_serverless.errors import InvalidObjectError, ObjectNotFoundError, StoreError, SyncTimeoutError
from flwr_serverless.stores import ObjectInfo, Store, open_store

logger = logging.getLogger("flwr_serverless")

SECRET_ENV = "FLWR_SERVERLESS_SECRET"
NODES_PREFIX = "nodes/"
ROUNDS_PREFIX = "rounds/"
MEMBERS_PREFIX = "members/"
MAX_PARALLEL_GETS = 8

TensorSpec = tuple[tuple[int, ...], np.dtype]


@dataclass
class NodeStats:
    """Federation counters of one node (the store keeps its own request counters)."""

    federations: int = 0
    peers_used: int = 0
    peer_downloads: int = 0
    rejected: int = 0
    partial_rounds: int = 0
    store_failures: int = 0
    rejections: dict[str, str] = field(default_factory=dict)  # key -> last reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "federations": self.federations,
            "peers_used": self.peers_used,
            "peer_downloads": self.peer_downloads,
            "rejected": self.rejected,
            "partial_rounds": self.partial_rounds,
            "store_failures": self.store_failures,
        }


@dataclass
class _CachedPeer:
    tag: str
    update: DecodedUpdate


def _to_arrays(parameters: Parameters | Sequence[np.ndarray]) -> tuple[list[np.ndarray], Callable[[list], Any]]:
    """Accept Flower ``Parameters`` or a list of arrays; return arrays and a converter back."""
    if isinstance(parameters, Parameters):
        return parameters_to_ndarrays(parameters), ndarrays_to_parameters
    return [np.asarray(p) for p in parameters], list


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    if isinstance(secret, str):
        return secret.encode()
    return secret


class FederatedNode:
    """What async and sync nodes share: identity, codec, validation, peer decoding, aggregation."""

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | None = None,
        node_id: str | None = None,
        *,
        shared_folder: Store | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        secret: str | bytes | None = None,
        max_object_bytes: int | None = None,
    ) -> None:
        store = store if store is not None else shared_folder  # `shared_folder` is the original's name
        if store is None:
            raise TypeError("a store (or shared_folder) is required: a Store or a URL such as s3://bucket/prefix")
        self.store: Store = open_store(store, **dict(storage_options or {}))
        self.strategy: Strategy = strategy if strategy is not None else FedAvg()
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
        if not is_valid_node_id(self.node_id):
            raise ValueError(f"node id {self.node_id!r} is not a plain name (letters, digits, '_', '-', '.')")
        self.secret = _secret_bytes(secret)
        self.max_object_bytes = max_object_bytes
        self.stats = NodeStats()
        self._spec: list[TensorSpec] | None = None
        self.local_steps = 0  # cumulative optimizer steps this node has published
        self._joined = False
        self._lock = threading.Lock()

    # -- public API ---------------------------------------------------------
    def update_parameters(
        self,
        parameters: Parameters | Sequence[np.ndarray],
        num_examples: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        num_steps: int | None = None,
    ) -> tuple[Any, dict[str, float]]:
        """Publish local weights, federate, and return (aggregated weights, aggregated metrics).

        The weights come back in the type they were given (Flower ``Parameters`` or a list of arrays).
        ``num_steps`` (optimizer steps since the last call) feeds the cumulative ``local_steps``
        provenance that step-based staleness reads.
        """
        arrays, convert = _to_arrays(parameters)
        self._check_local_spec(arrays)
        self.local_steps += int(num_steps) if num_steps is not None else 0
        header = UpdateHeader(
            node_id=self.node_id,
            epoch=int(epoch) if epoch is not None else self.stats.federations,
            num_examples=int(num_examples) if num_examples is not None else 1,
            local_steps=self.local_steps,
            metrics=dict(metrics or {}),
        )
        with self._lock:
            if not self._joined:
                self._join()
            result, agg_metrics = self._federate(arrays, header)
        return convert(result), agg_metrics

    # -- shared machinery ---------------------------------------------------
    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        raise NotImplementedError

    def _join(self) -> None:
        """Announce this node once (lets a sync barrier name nodes that went missing)."""
        info = {"node_id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(), "joined": time.time()}
        self.store.put(f"{MEMBERS_PREFIX}{self.node_id}", json.dumps(info).encode())
        self._joined = True

    def _check_local_spec(self, arrays: list[np.ndarray]) -> None:
        spec = [(tuple(a.shape), a.dtype) for a in arrays]
        if self._spec is None:
            self._spec = spec
        elif spec != self._spec:
            raise ValueError(f"node {self.node_id}: the model's tensor shapes/dtypes changed between federations")

    def _encode(self, arrays: list[np.ndarray], header: UpdateHeader) -> bytes:
        return encode(arrays, header, secret=self.secret)

    def _fetch(self, key: str, size: int | None = None) -> DecodedUpdate | None:
        """GET and validate one peer object; a bad object is logged, counted and skipped."""
        try:
            if self.max_object_bytes is not None and size is not None and size > self.max_object_bytes:
                raise InvalidObjectError(key, f"object is {size} bytes, over the limit of {self.max_object_bytes}")
            data = self.store.get(key)
            update = decode(data, key, expected=self._spec, secret=self.secret)
            expected_id = key.rsplit("/", 1)[-1]
            if update.header.node_id != expected_id:
                raise InvalidObjectError(key, f"header says node {update.header.node_id!r}, key says {expected_id!r}")
            return update
        except ObjectNotFoundError:
            return None  # deleted between LIST and GET: the peer simply is not there now
        except InvalidObjectError as exc:
            self._reject(exc)
            return None

    def _fetch_many(self, objects: list[ObjectInfo]) -> list[DecodedUpdate | StoreError | None]:
        """Fetch several peers concurrently: downloads overlap, and hashing releases the GIL."""
        def one(info: ObjectInfo) -> DecodedUpdate | StoreError | None:
            try:
                return self._fetch(info.key, info.size)
            except StoreError as exc:
                return exc

        self.stats.peer_downloads += len(objects)
        if len(objects) <= 1:
            return [one(info) for info in objects]
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_GETS, len(objects))) as pool:
            return list(pool.map(one, objects))

    def _reject(self, exc: InvalidObjectError) -> None:
        self.stats.rejected += 1
        self.stats.rejections[exc.key] = exc.reason
        logger.warning("node %s skips %s: %s", self.node_id, exc.key, exc.reason)

    def _aggregate(
        self, own: Contribution, peers: list[Contribution], server_round: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Aggregate own + peers in node-id order, so every node computing the same set gets the same bits."""
        participants = sorted([own, *peers], key=lambda c: c.node_id)
        self.stats.federations += 1
        self.stats.peers_used += len(peers)
        if not peers:
            return list(own.arrays), mean_metrics([own])
        return aggregate(self.strategy, server_round, participants), mean_metrics(participants)

    def _contribution(self, header: UpdateHeader, arrays: Sequence[np.ndarray]) -> Contribution:
        return Contribution(
            node_id=header.node_id,
            arrays=arrays,
            weight=float(self._weight(header)),
            num_examples=header.num_examples,
            metrics=header.metrics,
        )

    def _weight(self, header: UpdateHeader) -> float:
        """How much a participant counts: its examples (FedAvg)."""
        return float(header.num_examples)


class AsyncFederatedNode(FederatedNode):
    """FedAvgAsync: publish, pull every peer's latest weights, aggregate; never wait.

    A LIST of ``nodes/`` gives each peer's tag; only peers whose tag changed are
    downloaded again, the rest come from a cache of decoded weights. An epoch
    therefore costs one PUT, one LIST and one GET per changed peer.
    """

    def __init__(self, store: Store | str | None = None, strategy: Strategy | None = None,
                 node_id: str | None = None, **options: Any) -> None:
        super().__init__(store, strategy, node_id, **options)
        self._peers: dict[str, _CachedPeer] = {}
        self._bad_tags: dict[str, str] = {}  # key -> tag of an object already rejected

    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        own = self._contribution(header, arrays)
        try:
            self.store.put(f"{NODES_PREFIX}{self.node_id}", self._encode(arrays, header))
            listing = self.store.list(NODES_PREFIX)
        except StoreError as exc:
            # The store is away: keep the local training, federate again next epoch.
            self.stats.store_failures += 1
            logger.warning("node %s could not federate this epoch, keeping local weights: %s", self.node_id, exc)
            return arrays, mean_metrics([own])

        wanted: dict[str, ObjectInfo] = {}
        for key, info in sorted(listing.items()):
            peer_id = key[len(NODES_PREFIX):]
            if peer_id == self.node_id or self._bad_tags.get(key) == info.tag:
                continue  # ourselves, or the same bad object as before (already reported)
            if not is_valid_node_id(peer_id):
                self._bad_tags[key] = info.tag
                self._reject(InvalidObjectError(key, "node id is not a plain name"))
                continue
            wanted[peer_id] = info
        for gone in set(self._peers) - set(wanted):
            del self._peers[gone]  # peer left, or its latest object is bad: drop what we held
        changed = [p for p, info in wanted.items() if p not in self._peers or self._peers[p].tag != info.tag]
        for peer_id in changed:
            self._peers.pop(peer_id, None)  # free the old weights before downloading the new ones
        for peer_id, outcome in zip(changed, self._fetch_many([wanted[p] for p in changed])):
            key = NODES_PREFIX + peer_id
            if isinstance(outcome, StoreError):
                self.stats.store_failures += 1
                logger.warning("node %s skips %s this epoch, could not pull it: %s", self.node_id, key, outcome)
            elif outcome is None:
                self._bad_tags[key] = wanted[peer_id].tag
            else:
                self._peers[peer_id] = _CachedPeer(wanted[peer_id].tag, outcome)
        peers = [self._contribution(self._peers[p].update.header, self._peers[p].update.arrays)
                 for p in sorted(wanted) if p in self._peers]
        return self._aggregate(own, peers, server_round=self.stats.federations + 1)


class SyncFederatedNode(FederatedNode):
    """A barrier per round: wait until ``num_nodes`` have published round r, then all aggregate the same set.

    Waiting polls the round's listing with exponential backoff (50 ms to 1 s).
    At ``timeout`` the node continues with the nodes present if ``min_nodes``
    allows it (partial aggregation, logged), else raises ``SyncTimeoutError``
    naming the missing nodes.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | None = None,
        num_nodes: int = 2,
        timeout: float = 300.0,
        min_nodes: int | None = None,
        node_id: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(store, strategy, node_id, **options)
        if num_nodes < 1:
            raise ValueError("num_nodes must be at least 1")
        if min_nodes is not None and not 1 <= min_nodes <= num_nodes:
            raise ValueError("min_nodes must be between 1 and num_nodes")
        self.num_nodes = num_nodes
        self.timeout = timeout
        self.min_nodes = min_nodes
        self.round = 0

    @staticmethod
    def round_prefix(round_number: int) -> str:
        return f"{ROUNDS_PREFIX}{round_number:08d}/"

    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        header.round = self.round
        data = self._encode(arrays, header)
        prefix = self.round_prefix(self.round)
        self.store.put(prefix + self.node_id, data)
        # Aggregate our own weights exactly as peers will read them.
        own_update = decode(data, prefix + self.node_id, secret=self.secret, check_finite=False)
        del data
        listing = self._wait_for_round(prefix)

        others = [listing[k] for k in sorted(listing) if k != prefix + self.node_id and "/" not in k[len(prefix):]]
        peers: list[Contribution] = []
        for info, outcome in zip(others, self._fetch_many(others)):
            if isinstance(outcome, StoreError):
                self.stats.store_failures += 1
                logger.warning("node %s could not pull %s for round %d: %s",
                               self.node_id, info.key, self.round, outcome)
            elif outcome is not None:
                peers.append(self._contribution(outcome.header, outcome.arrays))
        own = self._contribution(own_update.header, own_update.arrays)
        result = self._aggregate(own, peers, server_round=self.round + 1)
        self._cleanup(self.round - 2)
        self.round += 1
        return result

    def _wait_for_round(self, prefix: str) -> dict:
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            listing = self.store.list(prefix)
            if len(listing) >= self.num_nodes:
                return listing
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 1.5, 1.0)
        present = sorted(key[len(prefix):] for key in listing)
        if self.min_nodes is not None and len(present) >= self.min_nodes:
            self.stats.partial_rounds += 1
            logger.warning("node %s: round %d continues with %d of %d nodes after %.1fs: %s",
                           self.node_id, self.round, len(present), self.num_nodes, self.timeout, ", ".join(present))
            return listing
        members = sorted(key[len(MEMBERS_PREFIX):] for key in self.store.list(MEMBERS_PREFIX))
        missing = [m for m in members if m not in present]
        unknown = self.num_nodes - len(present) - len(missing)
        if unknown > 0:
            missing.append(f"{unknown} node(s) that never joined")
        raise SyncTimeoutError(self.round, self.timeout, present, missing)

    def _cleanup(self, round_number: int) -> None:
        """Delete our object of an old round: once everyone published round r, nobody reads r-2."""
        if round_number < 0:
            return
        try:
            self.store.delete(self.round_prefix(round_number) + self.node_id)
        except StoreError as exc:
            logger.info("node %s could not delete round %d: %s", self.node_id, round_number, exc)
