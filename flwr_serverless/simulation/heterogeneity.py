"""Framework-neutral cores of the simulation's callbacks: slow nodes, evaluation after federation, peer lag.

The options come from ``SimulationConfig.heterogeneity`` and ``.evaluation``
(see ``options.py``). The Keras classes wrapping these cores live in
``keras_callbacks.py``, the Lightning ones in ``lightning_worker.py``; neither
framework is imported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr_serverless.simulation.options import parse_factors

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

__all__ = [
    "BatchPadder",
    "FederationProbe",
    "TimeBudget",
    "epoch_event",
    "make_lightning_slowdown_callback",
    "parse_factors",
    "peer_lag",
    "slowdown_factor",
]


def slowdown_factor(task: NodeTask) -> float:
    return task.config.heterogeneity.factor(task.index, task.role)


class BatchPadder:
    """Makes each batch take ``factor`` times as long, as on a slower machine.

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
        self.overruns = 0  # padded batches whose compute alone took longer than their target

    def begin(self) -> None:
        self._began = time.perf_counter()

    def end(self) -> None:
        if self._warm:
            elapsed = time.perf_counter() - self._began
            target = self.factor * (elapsed if self.batch_seconds is None else self.batch_seconds)
            if elapsed > target:
                self.overruns += 1
            time.sleep(max(0.0, target - elapsed))
        self._warm = True


def make_lightning_slowdown_callback(package: Any, factor: float, batch_seconds: float | None = None) -> Any:
    """The Lightning twin of ``keras_callbacks.make_slowdown_callback`` (``package``: ``lightning.pytorch`` or
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


def peer_lag(node: Any) -> dict[str, float]:
    """How many publications the peers in this node's latest aggregate were behind its own (async nodes).

    A node publishes once per epoch, so this is staleness in epochs: 0 for a peer
    as far along as the reader, 9 for a peer still on its 1st epoch when the
    reader publishes its 10th. Peers ahead of the reader count as 0. Empty for
    nodes that do not keep an async policy (sync rounds are never stale).
    """
    seen = getattr(getattr(node, "policy", None), "last_seen", None)
    own = getattr(getattr(node, "provenance", None), "seq", None)
    if not seen or not isinstance(own, int):
        return {}
    lags = [max(0, own - int(seq)) for seq in seen.values()]
    return {"peer_lag_max": float(max(lags)), "peer_lag_mean": float(sum(lags) / len(lags))}


class FederationProbe:
    """Tests the model right after each federation, so every mode is judged alike.

    Semi-sync nodes federate mid-epoch (after their step budget) and FedBuff
    nodes sometimes not at all: testing at each epoch end would measure a
    locally drifted model in one mode and a fresh aggregate in another. The
    latest measurement of an epoch (``test_accuracy``, ``time`` since start and
    the ``peer_lag_*`` of that aggregate) goes into that epoch's record. Without
    a node (baselines) every epoch's model is tested.
    """

    def __init__(
        self, node: Any, test: Callable[[], float], started: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.node = node
        self.test = test
        self.started = started
        self.clock = clock
        self._federations = 0
        self._pending: dict[str, float] = {}
        self.seconds_testing = 0.0

    def _measure(self) -> None:
        began = self.clock()
        accuracy = float(self.test())
        self.seconds_testing += self.clock() - began
        self._pending = {"test_accuracy": accuracy, "time": began - self.started}
        if self.node is not None:
            self._pending.update(peer_lag(self.node))

    def _measure_if_federated(self) -> None:
        federations = self.node.stats.federations
        if federations != self._federations:
            self._federations = federations
            self._measure()

    def after_batch(self) -> None:
        if self.node is not None:
            self._measure_if_federated()  # semi-sync: a step budget may have just federated

    def epoch_end(self) -> dict[str, float]:
        """The measurements to add to this epoch's record (empty if nothing federated in it)."""
        if self.node is None:
            self._measure()
        else:
            self._measure_if_federated()
        pending, self._pending = self._pending, {}
        return pending


class TimeBudget:
    """True once ``budget`` seconds have passed since ``started`` (None: never)."""

    def __init__(self, budget: float | None, started: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.started = started
        self.clock = clock

    def spent(self) -> bool:
        return self.budget is not None and self.clock() - self.started >= self.budget


def epoch_event(task: NodeTask, epoch: int, numbers: dict[str, float], started: float) -> dict[str, Any]:
    """The ``epoch_end`` progress event (both frameworks)."""
    return {
        "event": "epoch_end",
        "role": task.role,
        "node": task.name,
        "epoch": epoch,
        "epochs": task.config.epochs,
        "loss": numbers.get("loss"),
        "accuracy": numbers.get("accuracy"),
        "loss_fed": numbers.get("loss_fed"),
        "accuracy_fed": numbers.get("accuracy_fed"),
        "test_accuracy": numbers.get("test_accuracy"),
        "elapsed": time.monotonic() - started,
    }
