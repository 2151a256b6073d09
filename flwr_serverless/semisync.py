"""The 0.2.0 module of semi-sync: the node is in ``flwr_serverless.node``, the plan in ``modes.semisync``."""

from __future__ import annotations

from typing import Any

from flwr_serverless.layout import PROFILES as PROFILES_PREFIX
from flwr_serverless.modes.semisync import plan_budgets
from flwr_serverless.node.semisync_node import SemiSyncFederatedNode

__all__ = ["PROFILES_PREFIX", "SemiSyncFederatedNode", "plan_budgets", "record_batch_time", "step_budget"]


def step_budget(node: Any) -> int | None:
    """Batches between federations for nodes that plan them (semi-sync), else ``None`` (epoch end)."""
    budget = getattr(node, "steps_until_federation", None)
    return budget() if callable(budget) else None


def record_batch_time(node: Any, seconds: float) -> None:
    """Tell a node that times its batches how long the last one took (no-op for other nodes)."""
    record = getattr(node, "record_batch_time", None)
    if callable(record):
        record(seconds)
