"""0.2's ``FederatedMNISTDataset``: how MNIST is split over nodes (0.2 declared it; nothing consumed it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class FederatedMNISTDataset:
    """A partitioning of MNIST: ``partition_method`` is ``"by_class"`` or ``"random"``."""

    partition_method: str = "by_class"
    num_partitions: int = 2
    images: Any = None  # (n, 28, 28)
    labels: Any = None  # (n,)
