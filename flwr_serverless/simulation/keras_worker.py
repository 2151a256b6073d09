"""Train one simulated node with Keras: the per-framework half of ``run_simulation``.

Every framework worker module exposes ``train_node(task, progress) -> dict``
with the same contract (see ``runner.NodeTask`` and ``runner.NodeResult``), so
the runner can run it in a thread or in a spawned process alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr_serverless.simulation.data import load_dataset
from flwr_serverless.simulation.heterogeneity import async_options, make_semisync_node, worker_callbacks

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

ProgressFn = Callable[[dict[str, Any]], None]


def _quiet_tensorflow() -> None:
    """Cut TF's start-up log noise; only effective before TensorFlow is first imported."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _progress_callback(task: NodeTask, progress: ProgressFn, started: float) -> Any:
    """A Keras callback reporting each finished epoch (after federation, so ``_fed`` metrics are in)."""
    import keras

    class _Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs_completed = 0
            self.history: list[dict[str, float]] = []

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epochs_completed = epoch + 1
            numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            self.history.append(numbers)
            progress({
                "event": "epoch_end",
                "role": task.role,
                "node": task.name,
                "epoch": epoch + 1,
                "epochs": task.config.epochs,
                "loss": numbers.get("loss"),
                "accuracy": numbers.get("accuracy"),
                "loss_fed": numbers.get("loss_fed"),
                "accuracy_fed": numbers.get("accuracy_fed"),
                "elapsed": time.monotonic() - started,
            })

    return _Progress()


def load_node_data(task: Any) -> tuple[Any, Any, Any, Any, int]:
    """The node's training partition, the shared test set and the class count (every framework's worker)."""
    x_train, y_train, x_test, y_test = load_dataset(task.config.dataset, task.config.data_dir)
    x, y = x_train[task.train_indices], y_train[task.train_indices]
    if len(x) == 0:
        raise ValueError(f"{task.name} has no training examples (too many nodes for the labels at this skew?)")
    return x, y, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1


def node_result(task: Any, node: Any, reporter: Any, test_accuracy: float, test_loss: float,
                train_time: float, num_train_examples: int) -> dict[str, Any]:
    """One node's result row as plain data (shared by every framework's worker)."""
    result: dict[str, Any] = {
        "node_id": task.name,
        "role": task.role,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "epochs_completed": reporter.epochs_completed,
        "wall_time": train_time,
        "num_train_examples": num_train_examples,
        "history": reporter.history,
    }
    if node is not None:
        result.update(node.store.stats.as_dict())
        result.update(node.stats.as_dict())
    return result


def _make_node(task: NodeTask, initial_weights: list[Any]) -> Any:
    from flwr_serverless.nodes import AsyncFederatedNode, SyncFederatedNode
    from flwr_serverless.stores import open_store
    from flwr_serverless.strategies import make_strategy

    config = task.config
    if task.run_url is None:
        raise ValueError(f"{task.name}: a federated task needs a store URL")
    store = open_store(task.run_url, **config.storage_options)
    strategy = make_strategy(config.strategy, initial_parameters=initial_weights, **config.strategy_options)
    if config.mode == "semisync":
        return make_semisync_node(task, store, strategy)
    if config.mode == "sync":
        return SyncFederatedNode(
            store,
            strategy,
            num_nodes=config.num_nodes,
            timeout=config.sync_timeout,
            min_nodes=config.min_nodes,
            node_id=task.name,
            **config.node_options,
        )
    return AsyncFederatedNode(store, strategy, node_id=task.name, **async_options(task), **config.node_options)


def train_node(task: NodeTask, progress: ProgressFn) -> dict[str, Any]:
    """Build the model, train ``task.config.epochs`` epochs (federating if ``task.role == 'federated'``), test it.

    Returns a plain dict (picklable, no framework objects) with the fields of ``NodeResult``.
    """
    _quiet_tensorflow()
    import tensorflow as tf

    from flwr_serverless.callbacks.keras import FlwrFederatedCallback
    from flwr_serverless.simulation.models import build_keras_model

    config = task.config
    started = time.monotonic()
    x, y, x_test, y_test, num_classes = load_node_data(task)
    model = build_keras_model(config.dataset, x.shape[1:], num_classes, seed=config.seed,
                              learning_rate=config.learning_rate)

    # tf.data with an op-level seed: shuffling is reproducible per node, in threads and processes alike.
    train_data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=config.seed * 1009 + task.index, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .prefetch(2)
    )
    reporter = _progress_callback(task, progress, started)
    callbacks: list[Any] = [reporter]
    node = None
    if task.role == "federated":
        node = _make_node(task, model.get_weights())
        callbacks.insert(0, FlwrFederatedCallback(node))
    callbacks = worker_callbacks(task, callbacks, (x_test, y_test), started)  # slowdown, eval, time budget
    try:
        model.fit(train_data, epochs=config.epochs, callbacks=callbacks, shuffle=False, verbose=0)
        train_time = time.monotonic() - started
        test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    finally:
        if node is not None:
            node.store.close()

    return node_result(task, node, reporter, float(test_accuracy), float(test_loss), train_time, len(x))
