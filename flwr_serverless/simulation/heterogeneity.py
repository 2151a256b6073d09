"""Simulation options for heterogeneous nodes: staleness-aware async, semi-sync, slow nodes, time budgets.

All options live in ``SimulationConfig.extra`` so the runner's config stays
stable; the Keras worker asks this module for node kwargs and callbacks:

    staleness, staleness_unit, alpha, buffer_size, participation   async node policy
    lambda_, reestimate                                            semisync planning
    slowdown: [f_0, f_1, ...]    node k's batches take f_k times as long (it sleeps after each batch)
    batch_seconds: seconds       pad each batch to f_k x this wall time (stable under CPU contention)
    time_budget: seconds         stop training after this much wall time (same budget for every mode)
    eval_each_epoch: bool        add ``test_accuracy`` and ``time`` to each epoch's logs/history
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

ASYNC_OPTIONS = ("staleness", "staleness_unit", "alpha", "buffer_size", "participation")


def async_options(task: NodeTask) -> dict[str, Any]:
    """Policy kwargs of ``AsyncFederatedNode`` from the config (each node gets its own sampling seed)."""
    extra = task.config.extra
    options = {k: extra[k] for k in ASYNC_OPTIONS if extra.get(k) is not None}
    if "participation" in options:
        options["seed"] = task.config.seed * 7919 + task.index
    return options


def make_semisync_node(task: NodeTask, store: Any, strategy: Any) -> Any:
    from flwr_serverless.semisync import SemiSyncFederatedNode

    config = task.config
    return SemiSyncFederatedNode(
        store, strategy, lambda_=float(config.extra.get("lambda_", 2.0)), num_nodes=config.num_nodes,
        reestimate=bool(config.extra.get("reestimate", False)), timeout=config.sync_timeout,
        min_nodes=config.min_nodes, node_id=task.name, **config.node_options,
    )


def slowdown_factor(task: NodeTask) -> float:
    factors: Sequence[float] = task.config.extra.get("slowdown") or ()
    return float(factors[task.index]) if task.index < len(factors) and task.role != "centralized" else 1.0


def parse_factors(text: str) -> list[float]:
    """``"1,1,4"`` -> [1.0, 1.0, 4.0]; every factor must be >= 1."""
    factors = [float(v) for v in text.split(",") if v.strip()]
    if any(f < 1 for f in factors):
        raise ValueError(f"slowdown factors must be >= 1, got {text!r}")
    return factors


def make_slowdown_callback(factor: float, batch_seconds: float | None = None) -> Any:
    """A Keras callback that makes each batch take ``factor`` times as long, as on a slower machine.

    Without ``batch_seconds`` a batch sleeps ``(factor - 1)`` x its own compute time; that compute time
    inflates when threads share a few cores, so the emulated ratio drifts. With ``batch_seconds`` every
    batch is padded to ``factor * batch_seconds`` of wall time (compute included): a stable ratio for as
    long as the real compute fits in the padding. List it before ``FlwrFederatedCallback`` so the batch
    times a semi-sync node measures include the sleep.
    """
    import keras

    class _Slowdown(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self._warm = False  # the first batch traces the graph: not a batch time to scale

        def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._began = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if self._warm:
                elapsed = time.perf_counter() - self._began
                target = factor * (elapsed if batch_seconds is None else batch_seconds)
                time.sleep(max(0.0, target - elapsed))
            self._warm = True

    return _Slowdown()


def worker_callbacks(task: NodeTask, callbacks: list[Any], test_data: tuple[Any, Any], started: float) -> list[Any]:
    """Wrap the worker's callbacks: slowdown first (so batch timings include it), then the given ones
    (federation first), then evaluation and the time budget, then the progress reporter (last in ``callbacks``).
    """
    import keras
    import numpy as np

    extra = task.config.extra
    before: list[Any] = []
    after: list[Any] = []
    factor = slowdown_factor(task)

    if factor > 1 or extra.get("batch_seconds"):
        before.append(make_slowdown_callback(factor, extra.get("batch_seconds")))

    if extra.get("eval_each_epoch"):
        x_test, y_test = test_data

        class _Evaluate(keras.callbacks.Callback):
            """Test accuracy of the (just federated) model at each epoch end, with the wall time."""

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                if logs is None:
                    return
                predictions = np.asarray(self.model(x_test, training=False))
                logs["test_accuracy"] = float(np.mean(predictions.argmax(axis=-1) == y_test))
                logs["time"] = time.monotonic() - started

        after.append(_Evaluate())

    budget = extra.get("time_budget")
    if budget:
        class _TimeBudget(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                if time.monotonic() - started >= float(budget):
                    self.model.stop_training = True

        after.append(_TimeBudget())
    return [*before, *callbacks[:-1], *after, *callbacks[-1:]]
