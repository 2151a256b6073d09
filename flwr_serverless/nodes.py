"""The federation protocol: what a node publishes, what it pulls, and when it waits.

Layout under the experiment prefix (see README, "Store layout")::

    members/<node_id>           tiny JSON, written once when a node joins
    nodes/<node_id>             async: the node's latest weights (overwritten atomically)
    rounds/<round>/<node_id>    sync: what the node published for that round
"""

from __future__ import annotations

import logging
import os
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
from flwr_serverless.membership import DEFAULT_LEASE, Membership, new_owner_token
from flwr_serverless.spool import PeerSpool
from flwr_serverless.staleness import AsyncPolicy, CommunityView, Provenance
from flwr_serverless.stores import ObjectInfo, Store, open_store
from flwr_serverless.stores.retry import is_transient, retry_deadline

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
        member_lease: float = DEFAULT_LEASE,
        owner_token: str | None = None,
        peer_cache: str = "disk",
        cache_dir: str | None = None,
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
        self.member_lease = member_lease  # see membership.py: when a restarted node may take its id back
        self.owner_token = owner_token or new_owner_token()
        self._spool = PeerSpool(peer_cache, cache_dir)  # where downloaded peer objects live (spool.py)
        self._membership: Membership | None = None
        self.stats = NodeStats()
        self._spec: list[TensorSpec] | None = None
        self.local_steps = 0  # cumulative optimizer steps this node has published
        self._joined = False
        self._lock = threading.Lock()
        self._deadline: float | None = None  # of the federation under way (see _call_deadline)
        self.provenance = Provenance()  # base_version/base_steps of the next object (staleness.py)
        self._headers: dict[str, UpdateHeader] = {}  # node id -> header of its latest contribution

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
            if not self._participates():
                return convert(arrays), mean_metrics([Contribution(self.node_id, arrays, 1.0, header.num_examples,
                                                                   header.metrics)])
            self.provenance.stamp(header)
            self._deadline = self._call_deadline()
            with retry_deadline(self._deadline):  # a sync node's timeout covers joining too
                if not self._joined:
                    self._join()
                elif self._membership is not None:
                    self._membership.heartbeat()
            result, agg_metrics = self._federate(arrays, header)
        return convert(result), agg_metrics

    def state_dict(self) -> dict[str, Any]:
        """What a restarted job needs to rejoin as the same node (saved by the callbacks with checkpoints)."""
        return {"node_id": self.node_id, "local_steps": self.local_steps, "federations": self.stats.federations,
                "owner_token": self.owner_token}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; call before the first federation so the node publishes under the old id."""
        node_id = str(state.get("node_id", self.node_id))
        if not is_valid_node_id(node_id):
            raise ValueError(f"node id {node_id!r} is not a plain name (letters, digits, '_', '-', '.')")
        if node_id != self.node_id and self._joined:
            raise RuntimeError(f"node {self.node_id} already federated; restore its state before training")
        self.node_id = node_id
        self.local_steps = int(state.get("local_steps", self.local_steps))
        self.stats.federations = int(state.get("federations", self.stats.federations))
        self.owner_token = str(state.get("owner_token") or self.owner_token)  # same owner: rejoin at once

    # -- shared machinery ---------------------------------------------------
    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        raise NotImplementedError

    def _join(self) -> None:
        """Claim ``members/<id>`` once: refuses a second live node with our id (``DuplicateNodeIdError``).

        It also lets a sync barrier name nodes that went missing. If the store is
        down, training goes on and the claim is tried again at the next federation.
        """
        membership = Membership(self.store, self.node_id, self.owner_token, self.member_lease)
        try:
            membership.join()
        except StoreError as exc:
            self.stats.store_failures += 1
            logger.warning("node %s could not join yet (will retry next federation): %s", self.node_id, exc)
            return
        self._membership = membership
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
            expected_id = key.rsplit("/", 1)[-1]
            if not is_valid_node_id(expected_id):
                raise InvalidObjectError(key, "node id is not a plain name")
            if self.max_object_bytes is not None and size is not None and size > self.max_object_bytes:
                raise InvalidObjectError(key, f"object is {size} bytes, over the limit of {self.max_object_bytes}")
            data = self._spool.fetch(self.store, key)
            update = decode(data, key, expected=self._spec, secret=self.secret)
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
        self.provenance.advance(self._headers[own.node_id], [self._headers[c.node_id] for c in participants])
        self.stats.federations += 1
        self.stats.peers_used += len(peers)
        if not peers:
            return list(own.arrays), mean_metrics([own])
        return aggregate(self.strategy, server_round, participants), mean_metrics(participants)

    def _contribution(self, header: UpdateHeader, arrays: Sequence[np.ndarray]) -> Contribution:
        self._headers[header.node_id] = header
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

    def _participates(self) -> bool:
        """Whether this call federates at all (client sampling); a skipped call touches no store."""
        return True

    def _call_deadline(self) -> float | None:
        """When this federation must be over (``time.monotonic()``); None: no bound beyond store retries."""
        return None


class AsyncFederatedNode(FederatedNode):
    """FedAvgAsync: publish, pull every peer's latest weights, aggregate; never wait.

    A LIST of ``nodes/`` gives each peer's tag; only peers whose tag changed are
    downloaded again, the rest come from a cache of decoded weights. An epoch
    therefore costs one PUT, one LIST and one GET per changed peer.
    """

    def __init__(self, store: Store | str | None = None, strategy: Strategy | None = None,
                 node_id: str | None = None, *, staleness: Any = None, staleness_unit: str = "steps",
                 alpha: float | None = None, buffer_size: int | None = None, participation: float = 1.0,
                 seed: int | None = None, **options: Any) -> None:
        super().__init__(store, strategy, node_id, **options)
        # Staleness weighting, FedAsync mixing, FedBuff and client sampling (all off by default).
        self.policy = AsyncPolicy(staleness, staleness_unit, alpha, buffer_size, participation, seed)
        self._peers: dict[str, _CachedPeer] = {}
        self._bad_tags: dict[str, str] = {}  # key -> tag of an object already rejected

    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        own = self._contribution(header, arrays)
        # The upload and the pull are independent: the PUT runs beside the LIST and the peer GETs.
        with ThreadPoolExecutor(max_workers=1) as uploader:
            upload = uploader.submit(self.store.put, f"{NODES_PREFIX}{self.node_id}", self._encode(arrays, header))
            try:
                updates = self._pull_peers()
            except StoreError as exc:
                upload.cancel()
                return self._keep_local(arrays, own, exc)
            try:
                upload.result()
            except StoreError as exc:
                return self._keep_local(arrays, own, exc)
        return self._combine(arrays, header, updates)

    def _keep_local(self, arrays: list[np.ndarray], own: Contribution,
                    exc: StoreError) -> tuple[list[np.ndarray], dict[str, float]]:
        """The store is away: keep the local training, federate again next epoch."""
        self.stats.store_failures += 1
        logger.warning("node %s could not federate this epoch, keeping local weights: %s", self.node_id, exc)
        return arrays, mean_metrics([own])

    def _pull_peers(self) -> list[DecodedUpdate]:
        """LIST ``nodes/``, GET the peers whose tag changed, return every usable peer's latest update."""
        listing = self.store.list(NODES_PREFIX)

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
        return [self._peers[p].update for p in sorted(wanted) if p in self._peers]

    def _combine(self, arrays: list[np.ndarray], header: UpdateHeader,
                 updates: list[DecodedUpdate]) -> tuple[list[np.ndarray], dict[str, float]]:
        """FedBuff gate, then staleness-weighted aggregation, then FedAsync mixing (see staleness.py)."""
        policy = self.policy
        fresh = policy.count_new(updates)
        if not policy.ready(fresh):
            return arrays, mean_metrics([self._contribution(header, arrays)])  # keep training locally
        policy.view = CommunityView.of([header, *(u.header for u in updates)])
        own = self._contribution(header, arrays)
        peers = [self._contribution(u.header, u.arrays) for u in updates]
        result, metrics = self._aggregate(own, peers, server_round=self.stats.federations + 1)
        policy.aggregated(updates, fresh)
        if peers:
            result = policy.mix(arrays, result, [u.header for u in updates], [c.weight for c in peers])
        return result, metrics

    def _weight(self, header: UpdateHeader) -> float:
        """Examples times s(u): stale peers count less."""
        return float(header.num_examples) * self.policy.factor(header)

    def _participates(self) -> bool:
        return self.policy.participates()


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
        self._round_checked = False  # first federation: look up the experiment's current round

    def _call_deadline(self) -> float:
        """The whole call (join, publish, barrier, outages included) ends within ``timeout``."""
        return time.monotonic() + self.timeout

    @staticmethod
    def round_prefix(round_number: int) -> str:
        return f"{ROUNDS_PREFIX}{round_number:08d}/"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.round = int(state.get("round", self.round))
        self._round_checked = False

    def _rejoin_round(self) -> None:
        """Start at the experiment's current round, so a restarted or late node does not wait alone.

        The latest round holding other nodes' objects decides: if it already
        has ``num_nodes`` objects it is complete and the peers are on to the
        next round; otherwise they wait there for us. Our own objects of rounds
        nobody reads any more (below that round minus one) are deleted, as the
        regular r-2 cleanup would have done.
        """
        self._round_checked = True
        rounds: dict[int, set[str]] = {}
        for key in self.store.list(ROUNDS_PREFIX):
            number, _, node = key[len(ROUNDS_PREFIX):].partition("/")
            if number.isdigit() and node and "/" not in node:
                rounds.setdefault(int(number), set()).add(node)
        target = self.round
        for number in sorted(rounds, reverse=True):
            if rounds[number] - {self.node_id}:
                target = max(target, number + 1 if len(rounds[number]) >= self.num_nodes else number)
                break
        if target != self.round:
            logger.info("node %s joins the experiment at round %d (had round %d)", self.node_id, target, self.round)
            self.round = target
        for number, nodes in rounds.items():
            if number < target - 1 and self.node_id in nodes:
                self._cleanup(number)

    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        deadline = self._deadline if self._deadline is not None else self._call_deadline()
        if not self._round_checked:
            try:
                with retry_deadline(deadline):
                    self._rejoin_round()
            except StoreError as exc:  # store away: stay at our round, the barrier wait copes with the outage
                self._round_checked = False
                logger.warning("node %s could not look up the current round (will retry): %s", self.node_id, exc)
        header.round = self.round
        data = self._encode(arrays, header)
        prefix = self.round_prefix(self.round)
        self._publish_round(prefix + self.node_id, data, deadline)
        del data
        # Our own weights as peers decode them (little-endian, contiguous), without hashing them twice.
        own_arrays = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for a in arrays]
        listing = self._wait_for_round(prefix, deadline)

        others = [listing[k] for k in sorted(listing) if k != prefix + self.node_id and "/" not in k[len(prefix):]]
        peers: list[Contribution] = []
        for info, outcome in zip(others, self._fetch_many(others)):
            if isinstance(outcome, StoreError):
                self.stats.store_failures += 1
                logger.warning("node %s could not pull %s for round %d: %s",
                               self.node_id, info.key, self.round, outcome)
            elif outcome is not None:
                peers.append(self._contribution(outcome.header, outcome.arrays))
        own = self._contribution(header, own_arrays)
        result = self._aggregate(own, peers, server_round=self.round + 1)
        self._cleanup(self.round - 2)
        self.round += 1
        return result

    def _publish_round(self, key: str, data: bytes, deadline: float) -> None:
        """PUT our round object; through a store outage keep trying until the round's deadline."""
        delay = 0.05
        while True:
            try:
                with retry_deadline(deadline):
                    self.store.put(key, data)
                return
            except StoreError as exc:
                now = time.monotonic()
                if not is_transient(exc) or now >= deadline:
                    raise
                self.stats.store_failures += 1
                logger.warning("node %s: store unavailable while publishing %s, retrying: %s", self.node_id, key, exc)
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)

    def _wait_for_round(self, prefix: str, deadline: float | None = None) -> dict:
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        delay = 0.05
        listing: dict = {}
        while True:
            try:
                with retry_deadline(deadline):
                    listing = self.store.list(prefix)
            except StoreError as exc:  # an outage: keep waiting (up to the timeout) for the store to return
                if not is_transient(exc):
                    raise
                self.stats.store_failures += 1
                logger.warning("node %s: store unavailable during round %d barrier: %s", self.node_id, self.round, exc)
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
        try:
            members = sorted(key[len(MEMBERS_PREFIX):] for key in self.store.list(MEMBERS_PREFIX))
        except StoreError:  # still down: the error names what we know
            members = []
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
