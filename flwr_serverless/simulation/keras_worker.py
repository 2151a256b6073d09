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
from flwr_serverless.simulation.federation import callback_kwargs, make_node

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

ProgressFn = Callable[[dict[str, Any]], None]


def _quiet_tensorflow() -> None:
    """Cut TF's start-up log noise; only effective before TensorFlow is first imported."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_node_data(task: Any) -> tuple[Any, Any, Any, Any, int]:
    """The node's training partition, the shared test set and the class count (every framework's worker)."""
    x_train, y_train, x_test, y_test = load_dataset(task.config.dataset, task.config.data_dir)
    x, y = x_train[task.train_indices], y_train[task.train_indices]
    if len(x) == 0:
        raise ValueError(f"{task.name} has no training examples (too many nodes for the labels at this skew?)")
    return x, y, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1


def node_result(
    task: Any,
    node: Any,
    reporter: Any,
    test_accuracy: float,
    test_loss: float,
    train_time: float,
    num_train_examples: int,
) -> dict[str, Any]:
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
        counters = node.stats.as_dict()
        result.update(counters)  # the named fields of NodeResult (federations, rejected...)
        result["counters"] = {
            k: v for k, v in counters.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return result


def eval_slice(task: Any, x_test: Any, y_test: Any) -> tuple[Any, Any]:
    """The test examples used for the per-federation tests (``eval_examples``; the final test uses all)."""
    limit = task.config.evaluation.eval_examples
    return (x_test, y_test) if limit is None else (x_test[:limit], y_test[:limit])


def train_node(task: NodeTask, progress: ProgressFn) -> dict[str, Any]:
    """Build the model, train ``task.config.epochs`` epochs (federating if ``task.role == 'federated'``), test it.

    Returns a plain dict (picklable, no framework objects) with the fields of ``NodeResult``.
    """
    _quiet_tensorflow()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one model per node and run: retracing warnings are expected

    from flwr_serverless.callbacks.keras import FlwrFederatedCallback
    from flwr_serverless.simulation import keras_callbacks as kc
    from flwr_serverless.simulation.heterogeneity import FederationProbe
    from flwr_serverless.simulation.models import build_keras_model

    config = task.config
    started = time.monotonic()
    x, y, x_test, y_test, num_classes = load_node_data(task)
    model = build_keras_model(
        config.dataset, x.shape[1:], num_classes, seed=config.seed, learning_rate=config.learning_rate
    )

    # tf.data with an op-level seed: shuffling is reproducible per node, in threads and processes alike.
    train_data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=task.shuffle_seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .prefetch(2)
    )
    reporter = kc.Progress(task, progress, started)
    node = None
    federated = None
    if task.role == "federated":
        node = make_node(task, model.get_weights())
        federated = FlwrFederatedCallback(node, **callback_kwargs(config))
    probe = None
    if config.evaluation.eval_each_epoch:
        x_eval, y_eval = eval_slice(task, x_test, y_test)
        probe = FederationProbe(node, lambda: kc.keras_accuracy(model, x_eval, y_eval), started)
    callbacks = kc.worker_callbacks(task, federated, reporter, probe, started)
    try:
        model.fit(train_data, epochs=config.epochs, callbacks=callbacks, shuffle=False, verbose=0)
        train_time = time.monotonic() - started
        test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    finally:
        if node is not None:
            node.store.close()

    return node_result(task, node, reporter, float(test_accuracy), float(test_loss), train_time, len(x))
