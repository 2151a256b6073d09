"""``Aggregatable``: how 0.2 passed one participant's contribution around (weights, examples, metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.common import Parameters


@dataclass
class Aggregatable:
    """One participant's weights with the example count that weighs them and its metrics."""

    parameters: Parameters
    num_examples: int
    metrics: dict[str, Any] | None = field(default_factory=dict)
