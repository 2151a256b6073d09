"""Simulation options for heterogeneous nodes: staleness-aware async, semi-sync, slow nodes, time budgets.

All options live in ``SimulationConfig.extra`` so the runner's config stays
stable; the Keras worker asks this module for node kwargs and callbacks:

    staleness, staleness_unit, alpha, buffer_size, participation   async node policy
    lambda_, reestimate                                            semisync planning
    slowdown: [f_0, f_1, ...]    node k's batches take f_k times as long (it sleeps after each batch)
    batch_seconds: seconds       pad each batch to f_k x this wall time (stable under CPU contention)
    time_budget: seconds         stop training after this much wall time (same budget for every mode)
    eval_each_epoch: bool        test each freshly federated model: ``test_accuracy`` and ``time`` in the logs
                                 of the epoch it happened in (every epoch end for a node that does not federate)
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
        reestimate=bool(config.extra.get("reestimate", True)), timeout=config.sync_timeout,
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


class BatchPadder:
    """Makes each batch take ``factor`` times as long, as on a slower machine (framework-neutral core).

    Without ``batch_seconds`` a batch sleeps ``(factor - 1)`` x its own compute time; that compute time
    inflates when threads share a few cores, so the emulated ratio drifts. With ``batch_seconds`` every
    batch is padded to ``factor * batch_seconds`` of wall time (compute included): a stable ratio for as
    long as the real compute fits in the padding. The first batch (graph tracing, warm-up) is not scaled.
    """

    def __init__(self, factor: float, batch_seconds: float | None = None) -> None:
        self.factor = float(factor)
        self.batch_seconds = batch_seconds
        self._warm = False
        self._began = 0.0

    def begin(self) -> None:
        self._began = time.perf_counter()

    def end(self) -> None:
        if self._warm:
            elapsed = time.perf_counter() - self._began
            target = self.factor * (elapsed if self.batch_seconds is None else self.batch_seconds)
            time.sleep(max(0.0, target - elapsed))
        self._warm = True


def make_slowdown_callback(factor: float, batch_seconds: float | None = None) -> Any:
    """A Keras callback padding batches with ``BatchPadder``; list it before ``FlwrFederatedCallback``
    so the batch times a semi-sync node measures include the sleep.
    """
    import keras

    class _Slowdown(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.padder = BatchPadder(factor, batch_seconds)

        def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.padder.begin()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.padder.end()

    return _Slowdown()


def make_lightning_slowdown_callback(package: Any, factor: float, batch_seconds: float | None = None) -> Any:
    """The Lightning twin of ``make_slowdown_callback`` (``package``: ``lightning.pytorch`` or
    ``pytorch_lightning``); list it before ``FlwrFederatedCallback``.
    """

    class _Slowdown(package.Callback):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.padder = BatchPadder(factor, batch_seconds)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.padder.begin()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.padder.end()

    return _Slowdown()


def worker_callbacks(task: NodeTask, callbacks: list[Any], test_data: tuple[Any, Any], started: float) -> list[Any]:
    """Wrap the worker's callbacks: slowdown first (so batch timings include it), then the given ones
    (federation first), then evaluation and the time budget, then the progress reporter (last in ``callbacks``).
    """
    import keras

    extra = task.config.extra
    before: list[Any] = []
    after: list[Any] = []
    factor = slowdown_factor(task)

    if factor > 1 or extra.get("batch_seconds"):
        before.append(make_slowdown_callback(factor, extra.get("batch_seconds")))

    if extra.get("eval_each_epoch"):
        after.append(_federated_model_evaluator(callbacks, test_data, started))

    budget = extra.get("time_budget")
    if budget:
        class _TimeBudget(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                if time.monotonic() - started >= float(budget):
                    self.model.stop_training = True

        after.append(_TimeBudget())
    return [*before, *callbacks[:-1], *after, *callbacks[-1:]]


def _federated_model_evaluator(callbacks: list[Any], test_data: tuple[Any, Any], started: float) -> Any:
    """A Keras callback testing the model right after each federation, so every mode is judged alike.

    Semi-sync nodes federate mid-epoch (after their step budget) and async FedBuff
    nodes sometimes not at all: testing at each epoch end would measure a
    locally drifted model in one mode and a fresh aggregate in another. The
    result of the latest federation in an epoch (and when it happened) goes into
    that epoch's logs, so it reaches the node's history.
    """
    import keras
    import numpy as np

    x_test, y_test = test_data
    node = next((c.node for c in callbacks if getattr(c, "node", None) is not None), None)

    class _Evaluate(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self._federations = 0
            self._pending: tuple[float, float] | None = None  # (accuracy, time) not yet in an epoch's logs

        def _test(self) -> None:
            predictions = np.asarray(self.model(x_test, training=False))
            accuracy = float(np.mean(predictions.argmax(axis=-1) == y_test))
            self._pending = (accuracy, time.monotonic() - started)

        def _test_if_federated(self) -> None:
            if node is not None and node.stats.federations != self._federations:
                self._federations = node.stats.federations
                self._test()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._test_if_federated()  # semi-sync: a step budget may have just federated

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if node is None:
                self._test()  # not federating: every epoch's model
            else:
                self._test_if_federated()
            if logs is not None and self._pending is not None:
                logs["test_accuracy"], logs["time"] = self._pending
                self._pending = None

    return _Evaluate()
