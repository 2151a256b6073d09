"""Semi-synchronous node: a sync barrier per round of equal wall time, with per-node step budgets."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from flwr_serverless.errors import StoreError
from flwr_serverless.modes.semisync import BatchClock, check_lambda, dataset_weight, plan_budgets, valid_profile
from flwr_serverless.modes.synchronous import current_members
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.node.sync_node import SyncFederatedNode
from flwr_serverless.stores import Store
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader

logger = logging.getLogger("flwr_serverless")


class SemiSyncFederatedNode(SyncFederatedNode):
    """A sync node whose rounds last ``t_max`` seconds of training rather than one epoch.

    ``lambda_`` stretches a round beyond the slowest node's epoch (the paper uses
    2). With ``reestimate=True`` (default) every node republishes its profile
    each round and all replan after the barrier; ``False`` plans once, after the
    cold start. Callbacks time batches (``record_batch_time``) and federate after
    ``steps_until_federation()`` batches once a plan exists.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | str | None = None,
        *,
        lambda_: float = 2.0,
        reestimate: bool = True,
        **options: Any,
    ) -> None:
        self.lambda_ = check_lambda(lambda_)
        super().__init__(store, strategy, **options)
        self.reestimate = bool(reestimate)
        self.budget: int | None = None  # steps per round once planned
        self.t_max: float | None = None
        self.profiles: dict[str, dict[str, Any]] = {}
        self.arrivals: list[tuple[int, float]] = []  # (round, wall time when we reached its barrier)
        self.waits: list[float] = []  # seconds spent at each barrier
        self.batch_clock = BatchClock()
        self._own_profile: dict[str, Any] | None = None
        self._last_steps = 0

    # -- hooks for callbacks ----------------------------------------------------------
    def steps_until_federation(self) -> int | None:
        return self.budget

    def record_batch_time(self, seconds: float, ended_at: float | None = None) -> None:
        """One batch took ``seconds``; it ended at ``ended_at`` (``time.perf_counter()``, default now)."""
        self.batch_clock.record(seconds, ended_at)

    @property
    def seconds_per_batch(self) -> float | None:
        return self.batch_clock.seconds_per_batch()

    # -- federation ---------------------------------------------------------------------
    def _weight(self, header: UpdateHeader) -> float:
        return dataset_weight(header)

    def _federate(
        self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        steps = header.local_steps - self._last_steps
        self._last_steps = header.local_steps
        profiling = self.round == 0 or self.reestimate
        if self._own_profile is None:
            # |D_k| and beta_k come from the cold-start epoch: examples and steps of one full epoch.
            size = max(int(header.num_examples), 1)
            self._own_profile = {"dataset_size": size, "batch_size": -(-size // max(steps, 1))}
        header.dataset_size = self._own_profile["dataset_size"]  # our aggregation weight, read by every peer
        t_k = self.batch_clock.close_round()
        if profiling:
            self._publish_profile(t_k, deadline)
        arrived = self.wall_clock()
        self.arrivals.append((self.round, arrived))
        try:
            result = super()._federate(arrays, header, deadline)
        finally:
            self.waits.append(self.wall_clock() - arrived)
        if profiling:
            self._plan(deadline)
        return result

    def _publish_profile(self, t_k: float | None, deadline: Deadline) -> None:
        if t_k is None:  # no batch timings (callback without the hook)
            t_k = 1.0
            logger.warning("node %s: no batch times recorded; semi-sync planning assumes 1 s per batch", self.node_id)
        profile = {"node_id": self.node_id, "round": self.round, "seconds_per_batch": t_k, **(self._own_profile or {})}
        try:
            self.exchange.put(layout.profile_key(self.node_id), json.dumps(profile).encode(), deadline)
        except StoreError as exc:
            logger.warning("node %s could not publish its profile (plans without it): %s", self.node_id, exc)

    def _plan(self, deadline: Deadline) -> None:
        """Read the profiles of the experiment's current members and set this node's step budget."""
        try:
            listing = self.exchange.list(layout.PROFILES, deadline)
            records = self.roster.read(deadline)
        except StoreError as exc:
            logger.warning("node %s could not read profiles, keeps its plan: %s", self.node_id, exc)
            return
        current = set(current_members(records, self.roster.now(), self.run)) | {self.node_id}
        profiles: dict[str, dict[str, Any]] = {}
        for key in sorted(listing):
            node = layout.parse_profile_key(key)
            if node is None or (node not in current and node in records):
                continue  # a profile of an earlier run's node
            data = self.exchange.get_json(key, deadline)
            if valid_profile(data) and data["node_id"] == node:
                profiles[node] = data
        if self.node_id not in profiles:
            return
        self.profiles = profiles
        self.t_max, budgets = plan_budgets(profiles, self.lambda_)
        self.budget = budgets[self.node_id]
        logger.info("node %s: t_max %.3fs, %d steps per round", self.node_id, self.t_max, self.budget)
