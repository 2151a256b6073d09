"""What every node shares: identity, membership, the exchange with the store, and aggregation.

A node composes an ``Exchange`` (all I/O, under one deadline per call) with a
mode's pure decisions (``flwr_serverless.modes``). Subclasses implement one
method, ``_federate(arrays, header, deadline)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg, Strategy

from flwr_serverless.errors import StoreError
from flwr_serverless.modes.staleness import Provenance
from flwr_serverless.node.deadline import NO_DEADLINE, Deadline
from flwr_serverless.node.exchange import Exchange, NodeStats
from flwr_serverless.node.membership import (
    DEFAULT_LEASE,
    Membership,
    Roster,
    StoreClock,
    check_lease,
    check_run_id,
    choose_run,
    new_owner_token,
)
from flwr_serverless.node.publisher import Encoded, UpdateWriter
from flwr_serverless.stores import Store, open_store
from flwr_serverless.strategy.aggregate import Contribution, aggregate, mean_metrics
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader

logger = logging.getLogger("flwr_serverless")

SECRET_ENV = "FLWR_SERVERLESS_SECRET"
LEAVE_SECONDS = 10.0  # how long leaving may take (one small PUT, with retries) before it is given up


def _to_arrays(parameters: Parameters | Sequence[np.ndarray]) -> tuple[list[np.ndarray], Callable[[list], Any]]:
    """Accept Flower ``Parameters`` or a list of arrays; return arrays and a converter back."""
    if isinstance(parameters, Parameters):
        return parameters_to_ndarrays(parameters), ndarrays_to_parameters
    return [np.asarray(p) for p in parameters], list


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    return secret.encode() if isinstance(secret, str) else secret


def resolve_strategy(strategy: Strategy | str | None) -> Strategy:
    """A Flower strategy, or one named (``"fedavg"``...); refused here rather than at the first peer."""
    if strategy is None:
        return FedAvg()
    if isinstance(strategy, str):
        from flwr_serverless.strategy.factory import make_strategy

        return make_strategy(strategy)  # ValueError naming the strategy when unknown or incomplete
    if not callable(getattr(strategy, "aggregate_fit", None)) and not callable(
        getattr(strategy, "aggregate_train", None)
    ):
        raise TypeError(f"strategy must be a Flower strategy or a strategy name, got {type(strategy).__name__}")
    return strategy


def _check_metrics(metrics: Any) -> Mapping[str, Any] | None:
    if metrics is not None and not isinstance(metrics, Mapping):
        hint = ""
        if isinstance(metrics, (int, np.integer)) and not isinstance(metrics, bool):
            hint = " (0.2.0's order, an epoch in its place, is taken by the nodes of flwr_serverless and .nodes)"
        raise TypeError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}{hint}")
    return metrics


class FederatedNode(ABC):
    """Identity, membership and aggregation shared by the async, sync and semi-sync nodes."""

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | str | None = None,
        *,
        node_id: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        secret: str | bytes | None = None,
        max_object_bytes: int | None = None,
        member_lease: float = DEFAULT_LEASE,
        run_id: str | None = None,
        owner_token: str | None = None,
        peer_cache: str = "disk",
        cache_dir: str | None = None,
        compression: str | None = None,
        topk_keyframe_every: int | None = None,
        topk_max_error: float | None = None,
        topk_keyframe: str | None = None,
    ) -> None:
        if store is None:
            raise TypeError("a store is required: a Store or a URL such as s3://bucket/prefix")
        self.node_id = layout.check_node_id(node_id if node_id is not None else f"node-{uuid.uuid4().hex[:8]}")
        self.strategy: Strategy = resolve_strategy(strategy)
        # None | "fp16" | "bf16" | "int8" | "topk:<fraction>": what this node publishes (any reader decodes all).
        self.writer = UpdateWriter(
            compression,
            topk_keyframe_every=topk_keyframe_every,
            topk_max_error=topk_max_error,
            topk_keyframe=topk_keyframe,
        )
        self.member_lease = check_lease(member_lease)
        # The run this node belongs to: given (a launcher hands every node the same id; an old id continues
        # that run), or chosen when it joins (``choose_run``). Objects of other runs are never aggregated.
        self.run_id = None if run_id is None else check_run_id(run_id)
        self.run: str | None = self.run_id
        self.owner_token = owner_token or new_owner_token()
        self.stats = NodeStats()
        self.exchange = Exchange(
            open_store(store, **dict(storage_options or {})),
            self.node_id,
            secret=_secret_bytes(secret),
            max_object_bytes=max_object_bytes,
            peer_cache=peer_cache,
            cache_dir=cache_dir,
            stats=self.stats,
        )
        self.store_clock = StoreClock(self.store)  # liveness ages: the store's time, never this host's clock
        self.roster = Roster(self.store, self.store_clock, wall_clock=lambda: self.wall_clock())
        self.membership: Membership | None = None
        self.local_steps = 0  # cumulative optimizer steps this node has published
        self.strategy_rounds = 0  # aggregations that reached the strategy (its server_round)
        self.provenance = Provenance()  # base_version/base_steps of the next object (staleness.py)
        self.clock: Callable[[], float] = time.monotonic  # deadlines and waits (tests inject their own)
        self.wall_clock: Callable[[], float] = time.time  # times written for people (records, logs); never compared
        self._tensor_names: list[str] | None = None
        self._framework: str | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self.exchange.store

    @property
    def secret(self) -> bytes | None:
        return self.exchange.secret

    @property
    def max_object_bytes(self) -> int | None:
        return self.exchange.max_object_bytes

    @property
    def joined(self) -> bool:
        return self.membership is not None

    # -- public API ---------------------------------------------------------
    def update_parameters(
        self,
        parameters: Parameters | Sequence[np.ndarray],
        num_examples: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        *,
        num_steps: int | None = None,
        tensor_names: Sequence[str] | None = None,
        framework: str | None = None,
    ) -> tuple[Any, dict[str, float]]:
        """Publish local weights, federate, and return (aggregated weights, aggregated metrics).

        The weights come back in the type they were given (Flower ``Parameters`` or a list of
        arrays). ``num_steps`` (optimizer steps since the last call) feeds the cumulative
        ``local_steps`` that step-based staleness reads; ``tensor_names`` and ``framework``
        ("keras", "torch") name the tensors so mismatches are reported by layer.
        """
        metrics, epoch = _check_metrics(metrics), None if epoch is None else int(epoch)
        arrays, convert = _to_arrays(parameters)
        self._check_local_spec(arrays, tensor_names, framework)
        self.local_steps += int(num_steps) if num_steps is not None else 0
        header = UpdateHeader(
            node_id=self.node_id,
            epoch=epoch if epoch is not None else self.stats.federations,
            num_examples=int(num_examples) if num_examples is not None else 1,
            local_steps=self.local_steps,
            metrics=dict(metrics or {}),
        )
        with self._lock:
            if not self._participates():
                own = Contribution(self.node_id, arrays, 1.0, header.num_examples, header.metrics)
                return convert(arrays), self._metrics([own])
            self.provenance.stamp(header)
            deadline = self._deadline()
            self._ensure_joined(deadline)
            header.run = self.run
            result, agg_metrics = self._federate(arrays, header, deadline)
        return convert(result), agg_metrics

    def steps_until_federation(self) -> int | None:
        """Batches between federations when the node plans them (semi-sync); ``None``: at epoch end."""
        return None

    def record_batch_time(self, seconds: float, ended_at: float | None = None) -> None:
        """Semi-sync nodes time batches; the others ignore it."""
        return None

    def leave(self) -> None:
        """Record in ``members/<id>`` that this node has left, so no barrier waits for it. Never raises."""
        with self._lock:
            if self.membership is not None:
                self.membership.leave(Deadline.after(LEAVE_SECONDS))

    def __enter__(self) -> FederatedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def state_dict(self) -> dict[str, Any]:
        """What a restarted job needs to rejoin as the same node (saved by the callbacks with checkpoints)."""
        return {
            "node_id": self.node_id,
            "local_steps": self.local_steps,
            "federations": self.stats.federations,
            "owner_token": self.owner_token,
            "run": self.run,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; call before the first federation so the node publishes under the old id."""
        node_id = layout.check_node_id(state.get("node_id", self.node_id))
        if node_id != self.node_id and self.joined:
            raise RuntimeError(f"node {self.node_id} already federated; restore its state before training")
        self.node_id = self.exchange.node_id = node_id
        self.local_steps = int(state.get("local_steps", self.local_steps))
        self.stats.federations = int(state.get("federations", self.stats.federations))
        self.owner_token = str(state.get("owner_token") or self.owner_token)  # same owner: rejoin at once
        if self.run_id is None and state.get("run") is not None and not self.joined:
            self.run = check_run_id(state["run"])  # a resumed node continues its run

    # -- for subclasses -----------------------------------------------------
    @abstractmethod
    def _federate(
        self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Publish ``arrays``, gather peers as the mode says, return the aggregate and its metrics."""

    def _deadline(self) -> Deadline:
        """When this federation call must be over; async calls are bounded by the store's retries alone."""
        return Deadline(None, self.clock)

    def _participates(self) -> bool:
        """Whether this call federates at all (client sampling); a skipped call touches no store."""
        return True

    def _before_takeover(self, deadline: Deadline) -> None:
        """Our id belonged to an earlier instance: clean what it left before our claim makes it count."""
        return None

    @property
    def compression(self) -> str | None:
        return self.writer.option

    def _encode(
        self,
        arrays: Sequence[np.ndarray],
        header: UpdateHeader,
        deadline: Deadline = NO_DEADLINE,
        *,
        persist: bool = False,
    ) -> Encoded:
        """The object to publish, compressed as configured; a due top-k keyframe is PUT first (``persist``:
        through store outages until ``deadline``, as a barrier's publish)."""
        header.framework = self._framework
        put = self.exchange.publish if persist else self.exchange.put
        return self.writer.encode(
            arrays, header, self._tensor_names, self.secret, lambda key, data: put(key, data, deadline)
        )

    def _publish(self, key: str, data: Encoded, deadline: Deadline = NO_DEADLINE, *, persist: bool = False) -> str:
        """PUT the encoded object at ``key`` (``persist``: through store outages until ``deadline``); then the
        writer logs a top-k delta with a copy inside the store."""
        exchange = self.exchange
        tag = (exchange.publish if persist else exchange.put)(key, data.parts, deadline)

        def copy(source: str, target: str) -> object:
            if persist:
                return exchange.persist(lambda: exchange.copy(source, target, deadline), deadline, "copy", target)
            return exchange.copy(source, target, deadline)

        self.writer.published(key, copy)
        return tag

    def _aggregate(
        self, own: Contribution, peers: list[Contribution], headers: Sequence[UpdateHeader]
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Aggregate own + peers in node-id order, so every node computing the same set gets the same bits.

        ``headers`` are those of own + peers: what the result was trained from (staleness provenance).
        The strategy's ``server_round`` counts the aggregations that reached it (1, 2, ...): a call
        without peers never does, and stateful strategies (FedAvgM's momentum) expect no gaps.
        """
        participants = sorted([own, *peers], key=lambda c: c.node_id)
        own_header = next(h for h in headers if h.node_id == own.node_id)
        self.provenance.advance(own_header, headers)
        self.stats.federations += 1
        self.stats.peers_used += len(peers)
        if not peers:
            return list(own.arrays), self._metrics([own])
        self.strategy_rounds += 1
        return aggregate(self.strategy, self.strategy_rounds, participants), self._metrics(participants)

    @staticmethod
    def _metrics(participants: Sequence[Contribution]) -> dict[str, float]:
        """Example-weighted means of the participants' metrics (the 0.2 aliases add 0.2's counts)."""
        return mean_metrics(participants)

    def _ensure_joined(self, deadline: Deadline) -> None:
        """Claim ``members/<id>`` on the first federation, then keep its lease fresh.

        A claim refused because the id is in use raises ``DuplicateNodeIdError``; if
        the store is down, training goes on and the claim is tried again next time.
        """
        if self.membership is not None:
            if self.membership.left:
                self.membership.rejoin(deadline)  # federating again after leave(): a member once more
            self.membership.heartbeat(deadline)
            return
        try:
            run = self.run if self.run is not None else self._choose_run(deadline)
            membership = Membership(
                self.store,
                self.node_id,
                self.owner_token,
                self.member_lease,
                self.wall_clock,
                run=run,
                store_clock=self.store_clock,
            )
            membership.join(deadline, before_takeover=lambda: self._before_takeover(deadline))
        except StoreError as exc:
            self.stats.store_failures += 1
            logger.warning("node %s could not join yet (will retry next federation): %s", self.node_id, exc)
            return
        self.membership = membership
        if self.run is None:
            self.run = run
            logger.info("node %s joins run %s", self.node_id, run)

    def _choose_run(self, deadline: Deadline) -> str:
        """No run id given: the live members' run, or a new generation when none is live (``choose_run``)."""
        records = self.roster.read(deadline)
        return choose_run(self.node_id, records, self.roster.now(), self.roster.listing)

    def _check_local_spec(self, arrays: list[np.ndarray], names: Sequence[str] | None, framework: str | None) -> None:
        spec = [(tuple(a.shape), a.dtype) for a in arrays]
        exchange = self.exchange
        if exchange.expected is None:
            exchange.expected = spec
        elif spec != exchange.expected:
            raise ValueError(f"node {self.node_id}: the model's tensor shapes/dtypes changed between federations")
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != len(arrays) or len(set(names)) != len(names):
                raise ValueError(f"node {self.node_id}: tensor_names must be unique, one per tensor")
            self._tensor_names = exchange.expected_names = names
        if framework is not None:
            self._framework = exchange.framework = str(framework)
