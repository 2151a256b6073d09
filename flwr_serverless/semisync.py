"""Semi-synchronous federation (Stripelis & Ambite, SemiSync): equal wall time per round, unequal steps.

Round 0 is a cold start: every node trains one epoch, publishes a profile
``profiles/<node_id>.json`` (measured seconds per batch ``t_k``, dataset size
``|D_k|``, batch size ``beta_k``) and meets the others at the sync barrier.
Then every node reads all profiles and plans

    t_max = lambda * max_k(|D_k| / beta_k * t_k)    (the slowest node's epoch, stretched by lambda)
    B_k   = t_max / t_k                             (this node's steps per round)

so fast nodes do proportionally more steps and all nodes reach each barrier at
about the same time. Aggregation weighs each node by its dataset size |D_k|.
Framework callbacks need two duck-typed hooks only:
``record_batch_time(node, seconds)`` after each batch and ``step_budget(node)``
(``None``: federate at epoch end; an int: federate after that many batches,
fractional epochs allowed).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from flwr_serverless.codec import UpdateHeader
from flwr_serverless.errors import ObjectNotFoundError, StoreError
from flwr_serverless.nodes import SyncFederatedNode
from flwr_serverless.stores import Store

logger = logging.getLogger("flwr_serverless")

PROFILES_PREFIX = "profiles/"


def step_budget(node: Any) -> int | None:
    """Batches between federations for nodes that plan them (semi-sync), else ``None`` (epoch end)."""
    budget = getattr(node, "steps_until_federation", None)
    return budget() if callable(budget) else None


def record_batch_time(node: Any, seconds: float) -> None:
    """Tell a node that times its batches how long the last one took (no-op for other nodes)."""
    record = getattr(node, "record_batch_time", None)
    if callable(record):
        record(seconds)


class SemiSyncFederatedNode(SyncFederatedNode):
    """A sync node whose rounds last ``t_max`` seconds of training rather than one epoch.

    ``lambda_`` stretches a round beyond the slowest node's epoch (the paper uses
    2). With ``reestimate=True`` (default) every node republishes its profile
    each round (effective batch time of that round) and all replan after the
    barrier: this follows nodes whose speed drifts, at the cost of one small
    PUT, one LIST and N small GETs per round. ``False`` plans once, after the
    cold start.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | None = None,
        lambda_: float = 2.0,
        num_nodes: int = 2,
        *,
        reestimate: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(store, strategy, num_nodes=num_nodes, **options)
        if not lambda_ > 0:
            raise ValueError(f"lambda_ must be positive, got {lambda_}")
        self.lambda_ = float(lambda_)
        self.reestimate = reestimate
        self.budget: int | None = None  # steps per round once planned
        self.t_max: float | None = None
        self.profiles: dict[str, dict[str, Any]] = {}
        self.arrivals: list[tuple[int, float]] = []  # (round, time.time() when we reached its barrier)
        self.waits: list[float] = []  # seconds spent at each barrier
        self._batch_times: list[float] = []
        self._batch_ends: list[float] = []  # perf_counter() at each recorded batch end
        self._t_estimate: float | None = None  # smoothed seconds per batch last published
        self._own_profile: dict[str, Any] | None = None
        self._last_steps = 0

    # -- hooks for callbacks ----------------------------------------------------------
    def steps_until_federation(self) -> int | None:
        return self.budget

    def record_batch_time(self, seconds: float, ended_at: float | None = None) -> None:
        """One batch took ``seconds``; it ended at ``ended_at`` (``time.perf_counter()``, default now)."""
        self._batch_times.append(float(seconds))
        self._batch_ends.append(time.perf_counter() if ended_at is None else float(ended_at))

    @property
    def seconds_per_batch(self) -> float | None:
        """This round's effective seconds per batch: first to last batch end over the batches in between.

        That counts everything a step costs in wall time (callbacks, input pipeline,
        epoch boundaries) but not the first batch (graph tracing in the cold start).
        """
        if len(self._batch_ends) >= 3:
            return (self._batch_ends[-1] - self._batch_ends[0]) / (len(self._batch_ends) - 1)
        return statistics.median(self._batch_times) if self._batch_times else None

    # -- federation ---------------------------------------------------------------------
    def _federate(self, arrays: list[np.ndarray], header: UpdateHeader) -> tuple[list[np.ndarray], dict[str, float]]:
        steps = header.local_steps - self._last_steps
        self._last_steps = header.local_steps
        profiling = self.round == 0 or self.reestimate
        if profiling:
            self._publish_profile(header, steps)
        if self._own_profile is not None:
            header.dataset_size = self._own_profile["dataset_size"]  # our aggregation weight
        self._batch_times, self._batch_ends = [], []
        result = super()._federate(arrays, header)
        if profiling:
            self._plan()
        return result

    def _weight(self, header: UpdateHeader) -> float:
        """|D_k|, as in the paper: a fast node processes more examples per round but holds no more data.

        Weighting by examples processed would let fast nodes drown out the slow nodes' data. The size
        travels in each object's header, so every reader weighs a node alike (bit-identical rounds).
        """
        if header.dataset_size is not None and header.dataset_size > 0:
            return float(header.dataset_size)
        return float(header.num_examples)

    def _wait_for_round(self, prefix: str, *args: Any, **kwargs: Any) -> dict:
        arrived = time.time()
        self.arrivals.append((self.round, arrived))
        try:
            return super()._wait_for_round(prefix, *args, **kwargs)
        finally:
            self.waits.append(time.time() - arrived)

    def _publish_profile(self, header: UpdateHeader, steps: int) -> None:
        t_k = self.seconds_per_batch
        if t_k is not None and self._t_estimate is not None:
            t_k = 0.5 * self._t_estimate + 0.5 * t_k  # smooth re-estimates: batch times jitter with contention
        self._t_estimate = t_k
        if self._own_profile is None:
            # |D_k| and beta_k come from the cold-start epoch: examples and steps of one full epoch.
            size = max(int(header.num_examples), 1)
            self._own_profile = {"dataset_size": size, "batch_size": math.ceil(size / max(steps, 1))}
        if t_k is None:  # no batch timings (callback without the hook): fall back to epoch time / steps
            t_k = 1.0
            logger.warning("node %s: no batch times recorded; semi-sync planning assumes 1 s per batch", self.node_id)
        profile = {"node_id": self.node_id, "round": self.round, "seconds_per_batch": t_k, **self._own_profile}
        self.store.put(f"{PROFILES_PREFIX}{self.node_id}.json", json.dumps(profile).encode())

    def _plan(self) -> None:
        """Read every profile and set this node's step budget for the following rounds."""
        try:
            listing = self.store.list(PROFILES_PREFIX)
            profiles = {}
            for key in sorted(listing):
                try:
                    data = json.loads(self.store.get(key))
                    profiles[str(data["node_id"])] = data
                except (ObjectNotFoundError, ValueError, KeyError, TypeError):
                    continue
        except StoreError as exc:
            logger.warning("node %s could not read profiles, keeps its plan: %s", self.node_id, exc)
            return
        if self.node_id not in profiles:
            return
        self.profiles = profiles
        self.t_max, budgets = plan_budgets(profiles, self.lambda_)
        self.budget = budgets[self.node_id]
        logger.info("node %s: t_max %.3fs, %d steps per round", self.node_id, self.t_max, self.budget)


def plan_budgets(profiles: dict[str, dict[str, Any]], lambda_: float) -> tuple[float, dict[str, int]]:
    """t_max = lambda * max_k(|D_k| / beta_k * t_k); B_k = t_max / t_k rounded, at least 1 step."""
    epoch_seconds = [math.ceil(p["dataset_size"] / p["batch_size"]) * p["seconds_per_batch"]
                     for p in profiles.values()]
    t_max = lambda_ * max(epoch_seconds)
    return t_max, {node: max(1, round(t_max / p["seconds_per_batch"])) for node, p in profiles.items()}
