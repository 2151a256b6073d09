"""Semi-synchronous mode (Stripelis & Ambite, SemiSync): equal wall time per round, unequal steps.

Round 0 is a cold start: every node trains one epoch and publishes a profile
(seconds per batch ``t_k``, dataset size ``|D_k|``, batch size ``beta_k``).
Then every node plans

    t_max = lambda * max_k(|D_k| / beta_k * t_k)    (the slowest node's epoch, stretched by lambda)
    B_k   = t_max / t_k                             (this node's steps per round)

so fast nodes do more steps and all reach each barrier at about the same time.
Aggregation weighs each node by its dataset size |D_k|, not by the examples it
processed (a fast node goes through its data several times per round).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any, TypeGuard

from flwr_serverless.validation import check_positive
from flwr_serverless.wire.codec import UpdateHeader


def check_lambda(lambda_: object) -> float:
    return check_positive("lambda_", lambda_)


def plan_budgets(profiles: Mapping[str, Mapping[str, Any]], lambda_: float) -> tuple[float, dict[str, int]]:
    """t_max = lambda * max_k(|D_k| / beta_k * t_k); B_k = t_max / t_k rounded, at least 1 step."""
    epoch_seconds = [math.ceil(p["dataset_size"] / p["batch_size"]) * p["seconds_per_batch"] for p in profiles.values()]
    t_max = lambda_ * max(epoch_seconds)
    return t_max, {node: max(1, round(t_max / p["seconds_per_batch"])) for node, p in profiles.items()}


def valid_profile(data: object) -> TypeGuard[dict[str, Any]]:
    """A profile a planner may use: positive sizes and a positive, finite batch time."""
    if not isinstance(data, dict):
        return False
    try:
        return (
            float(data["dataset_size"]) > 0
            and float(data["batch_size"]) > 0
            and 0 < float(data["seconds_per_batch"]) < math.inf
            and isinstance(data["node_id"], str)
        )
    except (KeyError, TypeError, ValueError):
        return False


def dataset_weight(header: UpdateHeader) -> float:
    """|D_k| from the header (every reader weighs a node alike: bit-identical rounds); else examples."""
    size = header.dataset_size
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0:
        return float(size)
    return float(header.num_examples)


class BatchClock:
    """This round's effective seconds per batch, from batch end times (first to last end over the batches between).

    That counts everything a step costs in wall time (callbacks, input pipeline, epoch
    boundaries) but not the first batch (graph tracing in the cold start). Re-estimates
    are smoothed with the previous one: batch times jitter with contention.
    """

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.ends: list[float] = []
        self.estimate: float | None = None

    def record(self, seconds: float, ended_at: float | None = None) -> None:
        self.durations.append(float(seconds))
        self.ends.append(time.perf_counter() if ended_at is None else float(ended_at))

    def seconds_per_batch(self) -> float | None:
        if len(self.ends) >= 3:
            return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)
        return statistics.median(self.durations) if self.durations else None

    def close_round(self) -> float | None:
        """The smoothed estimate for the round just ended; starts the next round's timing."""
        t_k = self.seconds_per_batch()
        if t_k is not None and self.estimate is not None:
            t_k = 0.5 * self.estimate + 0.5 * t_k
        if t_k is not None:
            self.estimate = t_k
        self.durations, self.ends = [], []
        return t_k
