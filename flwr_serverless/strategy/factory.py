"""Flower strategies by name, for the CLI and simulations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
_NEED_INITIAL = {"fedadam", "fedyogi", "fedadagrad"}
STRATEGY_NAMES = tuple(_STRATEGIES)


def _no_metrics(_: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    return {}


def make_strategy(name: str, initial_parameters: Sequence[np.ndarray] | None = None, **kwargs: Any) -> Strategy:
    """Build a Flower strategy by its lower-case name.

    FedAdam/FedYogi/FedAdagrad keep server-side optimizer state relative to the
    model they start from, so they need the model's initial weights.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    if key in _NEED_INITIAL and initial_parameters is None:
        raise ValueError(f"{name} needs initial_parameters (the model's initial weights)")
    if initial_parameters is not None:
        kwargs.setdefault("initial_parameters", ndarrays_to_parameters(list(initial_parameters)))
    if key == "fedprox":
        kwargs.setdefault("proximal_mu", 0.01)
    if key == "krum":
        kwargs.setdefault("num_malicious_clients", 0)
        kwargs.setdefault("num_clients_to_keep", 0)
    # A node aggregates whatever peers it has; Flower's client-count minimums do not apply.
    kwargs.setdefault("min_fit_clients", 1)
    kwargs.setdefault("min_evaluate_clients", 1)
    kwargs.setdefault("min_available_clients", 1)
    # Nodes aggregate metrics themselves (example-weighted); this silences Flower's warning.
    kwargs.setdefault("fit_metrics_aggregation_fn", _no_metrics)
    return _STRATEGIES[key](**kwargs)
