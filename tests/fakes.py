"""A node implementing ``Federating`` that records what the callbacks call, for the callback tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flwr_serverless.nodes import AsyncFederatedNode


class FakeClock:
    """An injected monotonic clock: sleeping advances it at once."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.0)


class RecordingNode:
    """Records every call in ``events``; returns the weights shifted by ``shift`` and fixed or echoed metrics.

    ``budget``: the step budget it announces after its first federation (a semi-sync node plans after
    its cold-start epoch); ``None`` federates at every epoch end.
    """

    def __init__(
        self,
        shift: float = 0.0,
        metrics: dict[str, float] | None = None,
        budget: int | None = None,
        node_id: str = "fake",
    ) -> None:
        self.node_id = node_id
        self.shift = shift
        self.metrics = metrics
        self.budget = budget
        self.calls: list[dict[str, Any]] = []
        self.events: list[str] = []  # "update" / "leave", in order
        self.batch_times: list[float] = []
        self.state: dict[str, Any] = {"node_id": node_id}

    def update_parameters(
        self,
        parameters: Any,
        num_examples: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        *,
        num_steps: int | None = None,
        tensor_names: Sequence[str] | None = None,
        framework: str | None = None,
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        self.calls.append(
            {
                "weights": [np.array(w) for w in parameters],
                "num_examples": num_examples,
                "metrics": dict(metrics or {}),
                "epoch": epoch,
                "num_steps": num_steps,
                "tensor_names": list(tensor_names or []),
                "framework": framework,
            }
        )
        self.events.append("update")
        fed = self.metrics if self.metrics is not None else {k: v + 1.0 for k, v in (metrics or {}).items()}
        return [np.asarray(w) + self.shift for w in parameters], dict(fed)

    def steps_until_federation(self) -> int | None:
        return self.budget if self.calls else None

    def record_batch_time(self, seconds: float, ended_at: float | None = None) -> None:
        self.batch_times.append(seconds)

    def leave(self) -> None:
        self.events.append("leave")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)


class PlannedNode(AsyncFederatedNode):
    """A real async node with a semi-sync style budget (5 batches after its first federation) and a
    ``leave()`` that records how many federations came before it."""

    left_after: int | None = None

    def steps_until_federation(self) -> int | None:
        return 5 if self.stats.federations else None

    def leave(self) -> None:
        self.left_after = self.stats.federations
