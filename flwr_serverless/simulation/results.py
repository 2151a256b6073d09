"""The rows of a simulation's results: one ``NodeResult`` per trained model, a ``SimulationResult`` per run.

Rows are plain data (they cross process boundaries and go to JSON). Node
counters are carried as a dict, whatever counters the installed
``NodeStats.as_dict()`` reports, so new counters reach the report untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import SimulationConfig


@dataclass
class NodeResult:
    """One row of the results table."""

    node_id: str
    role: str = "federated"
    test_accuracy: float | None = None
    test_loss: float | None = None
    epochs_completed: int = 0
    wall_time: float = 0.0
    num_train_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    puts: int = 0
    gets: int = 0
    lists: int = 0
    deletes: int = 0
    federations: int = 0
    peers_used: int = 0
    rejected: int = 0
    partial_rounds: int = 0  # sync rounds that went on without every node (after the timeout, with min_nodes)
    #: every counter of the node's ``NodeStats.as_dict()`` as the node reported it (cas_conflicts, repairs,
    #: keyframe_downloads...), whatever counters the installed version has
    counters: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: the store traffic fields of a row (the store's own counters)
TRAFFIC = ("requests", "puts", "gets", "lists", "deletes", "bytes_up", "bytes_down")


def sum_counters(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Counter dicts added up key by key, in the order the keys first appear."""
    total: dict[str, float] = {}
    for counters in rows:
        for name, value in counters.items():
            total[name] = total.get(name, 0) + value
    return total


@dataclass
class SimulationResult:
    """Federated rows, baselines and where the run's objects are."""

    config: SimulationConfig
    run_url: str
    nodes: list[NodeResult]
    standalone: list[NodeResult] = field(default_factory=list)
    centralized: NodeResult | None = None
    wall_time: float = 0.0

    @property
    def ok(self) -> bool:
        rows = [*self.nodes, *self.standalone, *([self.centralized] if self.centralized else [])]
        return all(row.error is None for row in rows)

    @staticmethod
    def _mean(rows: list[NodeResult]) -> float | None:
        values = [r.test_accuracy for r in rows if r.test_accuracy is not None]
        return float(np.mean(values)) if values else None

    @property
    def federated_mean_accuracy(self) -> float | None:
        return self._mean(self.nodes)

    @property
    def standalone_mean_accuracy(self) -> float | None:
        return self._mean(self.standalone)

    @property
    def centralized_accuracy(self) -> float | None:
        return self.centralized.test_accuracy if self.centralized else None

    @property
    def totals(self) -> dict[str, Any]:
        """Store traffic summed over the federated nodes (the whole experiment's requests and bytes), and
        every node counter summed under ``counters``."""
        return {key: sum(getattr(row, key) for row in self.nodes) for key in TRAFFIC} | {
            "nodes": len(self.nodes),
            "completed": sum(1 for r in self.nodes if r.error is None and r.epochs_completed == self.config.epochs),
            "counters": sum_counters(row.counters for row in self.nodes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.public_dict(),
            "run_url": self.run_url,
            "wall_time": self.wall_time,
            "nodes": [asdict(r) for r in self.nodes],
            "standalone": [asdict(r) for r in self.standalone],
            "centralized": asdict(self.centralized) if self.centralized else None,
            "summary": {
                "federated_mean_accuracy": self.federated_mean_accuracy,
                "standalone_mean_accuracy": self.standalone_mean_accuracy,
                "centralized_accuracy": self.centralized_accuracy,
                "totals": self.totals,
            },
        }
