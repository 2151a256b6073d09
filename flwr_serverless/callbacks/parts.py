"""Framework-neutral pieces of the callbacks: metric filtering, log names, batch sizes, FedProx math, files.

Pure functions and small classes without framework imports; ``core.py`` composes them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ProximalTerm",
    "RunningMean",
    "check_given_with",
    "federated_logs",
    "leading_dim",
    "numeric_metrics",
    "write_atomically",
]


def numeric_metrics(metrics: Mapping[str, Any] | None, suffix: str | None = "_fed") -> dict[str, float]:
    """The finite scalars of ``metrics``, minus our own ``suffix`` echoes: only those can be averaged."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if (suffix and str(key).endswith(suffix)) or isinstance(value, bool):
            continue
        try:
            number = float(value)  # numpy, torch and Keras scalars (one element) all convert
        except (TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def federated_logs(figures: Mapping[str, float], suffix: str, override: bool) -> dict[str, float]:
    """Log names of the federated figures: ``<name><suffix>``, or ``<name>`` itself when overriding."""
    return {key if override else f"{key}{suffix}": float(value) for key, value in figures.items()}


def leading_dim(batch: Any) -> int:
    """Examples in a batch: the leading dimension of its first array (numpy, torch, TF, JAX), any nesting."""
    shape = getattr(batch, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) > 0 and shape[0] is not None else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = leading_dim(item)
            if size:
                return size
    return 0


class RunningMean:
    """Per-name means of figures over evaluation batches, each batch weighted by its examples."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, figures: Mapping[str, Any], weight: float) -> None:
        for key, value in numeric_metrics(figures, suffix=None).items():
            self._sums[key] = self._sums.get(key, 0.0) + value * weight
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        return {key: total / self._weights[key] for key, total in self._sums.items() if self._weights[key] > 0}


class ProximalTerm:
    """FedProx's local solver: after an optimizer step, w <- w - lr * mu * (w - w_fed).

    The values are whatever tensors the framework holds (numpy, torch, Keras backend tensors): only
    subtraction and scaling are used, so the math is written once for both callbacks.
    """

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)
        self.anchor: dict[str, Any] = {}  # name -> last federated value (a copy)

    @property
    def active(self) -> bool:
        return self.mu > 0

    def set_anchor(self, named_values: Iterable[tuple[str, Any]], copy: Callable[[Any], Any]) -> None:
        if self.active:
            self.anchor = {name: copy(value) for name, value in named_values}

    def pulled(self, name: str, value: Any, lr: float) -> Any | None:
        """The value after the proximal step, or ``None`` for a tensor without an anchor."""
        anchor = self.anchor.get(name)
        return None if anchor is None else value - (lr * self.mu) * (value - anchor)


def check_given_with(option: str, value: Any, required: str, required_value: Any) -> None:
    """Refuse ``option`` without the option it only makes sense with (``y_test`` without ``x_test``)."""
    if value is not None and required_value is None:
        raise ValueError(f"{option} was given without {required}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temp file (same suffix, same folder), then rename it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(temp)
    os.replace(temp, path)
