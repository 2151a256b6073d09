"""Keras callbacks of the simulation: thin wrappers over the framework-neutral cores in ``heterogeneity.py``.

Imported by the Keras worker only (importing this module imports Keras).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from flwr_serverless.simulation.heterogeneity import (
    BatchPadder,
    FederationProbe,
    TimeBudget,
    epoch_event,
    slowdown_factor,
)

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

ProgressFn = Callable[[dict[str, Any]], None]
TEST_CHUNK = 1000  # examples per forward pass when testing (a CNN on 10k images at once needs ~0.5 GB)


def keras_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of ``model`` on ``(x, y)``, in chunks."""
    correct = 0
    for start in range(0, len(x), TEST_CHUNK):
        predictions = np.asarray(model(x[start : start + TEST_CHUNK], training=False))
        correct += int(np.sum(predictions.argmax(axis=-1) == y[start : start + TEST_CHUNK]))
    return correct / max(len(x), 1)


class Slowdown(keras.callbacks.Callback):
    """Pads every batch with ``BatchPadder`` (list it before ``FlwrFederatedCallback``)."""

    def __init__(self, factor: float, batch_seconds: float | None = None) -> None:
        super().__init__()
        self.factor, self.batch_seconds = factor, batch_seconds
        self.padder = BatchPadder(factor, batch_seconds)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.padder = BatchPadder(self.factor, self.batch_seconds)  # each fit warms up unscaled, as it traces

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.padder.begin()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.padder.end()


def make_slowdown_callback(factor: float, batch_seconds: float | None = None) -> Slowdown:
    """A Keras callback padding batches with ``BatchPadder``; list it before ``FlwrFederatedCallback``
    so the batch times a semi-sync node measures include the sleep.
    """
    return Slowdown(factor, batch_seconds)


class StopAtBudget(keras.callbacks.Callback):
    """Stops training after the batch that spends the wall-clock budget."""

    def __init__(self, budget: TimeBudget) -> None:
        super().__init__()
        self.budget = budget

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.budget.spent():
            self.model.stop_training = True


class FederatedEvaluator(keras.callbacks.Callback):
    """Writes ``FederationProbe``'s measurements (``test_accuracy``, ``time``, ``peer_lag_*``) into the epoch logs."""

    def __init__(self, probe: FederationProbe) -> None:
        super().__init__()
        self.probe = probe

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.probe.after_batch()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        measured = self.probe.epoch_end()
        if logs is not None:
            logs.update(measured)


class Progress(keras.callbacks.Callback):
    """Reports each finished epoch (listed last, so the ``_fed`` metrics and test accuracy are in)."""

    def __init__(self, task: NodeTask, progress: ProgressFn, started: float) -> None:
        super().__init__()
        self.task, self.progress, self.started = task, progress, started
        self.epochs_completed = 0
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epochs_completed = epoch + 1
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.history.append(numbers)
        self.progress(epoch_event(self.task, self.epochs_completed, numbers, self.started))


def worker_callbacks(
    task: NodeTask, federated: Any, reporter: Progress, probe: FederationProbe | None, started: float
) -> list[Any]:
    """In order: slowdown (so semi-sync batch timings include it), federation, evaluation, budget, reporter."""
    options = task.config.heterogeneity
    factor = slowdown_factor(task)
    callbacks: list[Any] = []
    if factor > 1 or options.batch_seconds:
        callbacks.append(Slowdown(factor, options.batch_seconds))
    if federated is not None:
        callbacks.append(federated)
    if probe is not None:
        callbacks.append(FederatedEvaluator(probe))
    if options.time_budget is not None:
        callbacks.append(StopAtBudget(TimeBudget(options.time_budget, started)))
    callbacks.append(reporter)
    return callbacks
