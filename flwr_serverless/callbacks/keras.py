"""Keras 3 (TensorFlow backend) glue: federate a model's weights at the end of every epoch.

The callback only moves weights and metrics between ``model.fit`` and a
federated node; storing, encoding and aggregating are the node's job.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flwr_serverless.semisync import record_batch_time, step_budget

__all__ = ["FlwrFederatedCallback"]

_COUNTING_MARK = "_flwr_serverless_counter"


def _numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """Keep the finite numbers from Keras' logs: only those can be averaged across nodes."""
    metrics: dict[str, float] = {}
    for key, value in (logs or {}).items():
        if isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            metrics[str(key)] = number
    return metrics


class FlwrFederatedCallback(keras.callbacks.Callback):
    """After each epoch: push local weights, pull and aggregate peers' weights, continue from the result.

    ``node`` is an ``AsyncFederatedNode`` or ``SyncFederatedNode`` (anything with
    ``update_parameters(weights, num_examples, epoch, metrics=...)``).

    ``num_examples_per_epoch`` weights this node in the aggregation. When it is
    ``None`` the callback counts the examples actually trained in each epoch
    (Keras 3 does not tell callbacks the batch size, and the last batch may be
    short), which needs the TensorFlow backend.

    Aggregated metrics are added to the epoch logs with a ``_fed`` suffix (e.g.
    ``accuracy_fed``) so ``History`` and later callbacks see them.

    ``proximal_mu > 0`` adds FedProx's proximal term as a step after each
    optimizer step: ``w <- w - lr * mu * (w - w_fed)``, with ``w_fed`` the
    last federated weights. To resume after a restart, construct the node with
    the same ``node_id``, or pass ``state_path`` (a JSON file next to your
    checkpoint): it is written after every federation and read at the start of
    ``fit``, so the node rejoins with its id, step count and sync round.
    """

    #: Options reserved for later versions; accepted so calling code keeps working.
    KNOWN_OPTIONS: frozenset[str] = frozenset()

    def __init__(self, node: Any, num_examples_per_epoch: int | None = None, *, proximal_mu: float = 0.0,
                 state_path: str | os.PathLike[str] | None = None, **future_options: Any) -> None:
        super().__init__()
        if num_examples_per_epoch is not None and int(num_examples_per_epoch) <= 0:
            raise ValueError(f"num_examples_per_epoch must be positive, got {num_examples_per_epoch}")
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        #: FedProx: after every optimizer step, w <- w - lr * mu * (w - w_fed). 0 disables it (no extra work).
        self.proximal_mu = float(proximal_mu)
        #: JSON file keeping the node's identity and round across restarts (next to the model checkpoint).
        self.state_path = None if state_path is None else Path(state_path)
        self._anchor: list[Any] = []  # FedProx: last federated values of model.trainable_weights
        self._state_loaded = False
        unknown = sorted(set(future_options) - self.KNOWN_OPTIONS)
        if unknown:
            warnings.warn(f"FlwrFederatedCallback ignores unknown options: {', '.join(unknown)}", stacklevel=2)
        self.node = node
        self.num_examples_per_epoch = None if num_examples_per_epoch is None else int(num_examples_per_epoch)
        self.options = dict(future_options)
        self._counter: Any = None  # tf.Variable, created when the model is known
        self._steps = 0  # optimizer steps (batches) since the last federation
        self._epoch = 0
        self._batch_started: float | None = None
        self._budget_due = False  # a step budget (semi-sync) triggered this federation
        #: Aggregated metrics of the most recent federation (without the ``_fed`` suffix).
        self.last_federated_metrics: dict[str, float] = {}

    # -- example counting ---------------------------------------------------
    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        if self.num_examples_per_epoch is None:
            self._install_counter(model)

    def _install_counter(self, model: keras.Model) -> None:
        """Wrap ``model.train_step`` so every step adds its batch size to a TF counter.

        Idempotent: ``fit`` calls ``set_model`` each time, and a model already
        wrapped (by this or another callback) keeps its one counter.
        """
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "FlwrFederatedCallback counts examples only on the TensorFlow backend; "
                "pass num_examples_per_epoch explicitly on other backends"
            )
        import tensorflow as tf

        existing = getattr(model.train_step, _COUNTING_MARK, None)
        if existing is not None:
            self._counter = existing
            return
        with model.distribute_strategy.scope():
            counter = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="flwr_examples_seen",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,  # replicas each add their share
            )
        original: Callable[[Any], Any] = model.train_step

        def counting_train_step(data: Any) -> Any:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            first = keras.tree.flatten(x)[0]
            counter.assign_add(tf.cast(tf.shape(first)[0], tf.int64))
            return original(data)

        setattr(counting_train_step, _COUNTING_MARK, counter)
        # An instance attribute shadows the class method; Keras builds its train
        # function from ``self.train_step``, so drop any function built before.
        model.train_step = counting_train_step
        model.train_function = None
        self._counter = counter

    def _take_count(self) -> int:
        if self._counter is None:
            return 0
        count = int(self._counter.numpy())
        self._counter.assign(0)
        return count

    # -- Keras hooks ------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._take_count()  # forget steps from evaluate()/an interrupted fit
        self._steps = 0
        self._load_state()
        self._set_anchor()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps += 1
        if self.proximal_mu > 0:
            self._proximal_step()
        # Semi-sync nodes time batches and may federate after a step budget instead of at epoch end.
        if self._batch_started is not None:
            record_batch_time(self.node, time.perf_counter() - self._batch_started)
        budget = step_budget(self.node)
        if budget is not None and self._steps >= budget:
            self._budget_due = True
            self.on_epoch_end(self._epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if step_budget(self.node) is not None and not self._budget_due:
            return  # semi-sync: this node federates after its step budget, not at epoch end
        self._budget_due = False
        counted = self._take_count()
        num_examples = self.num_examples_per_epoch if self.num_examples_per_epoch is not None else counted
        if num_examples == 0:
            # Weight 0 drops this node's training from the aggregate; say why instead of failing quietly.
            warnings.warn(
                f"FlwrFederatedCallback counted no training examples in epoch {epoch}; if the model did train, "
                "its train function bypasses model.train_step: pass num_examples_per_epoch",
                stacklevel=2,
            )
        weights = self.model.get_weights()
        steps, self._steps = self._steps, 0
        new_weights, aggregated = self.node.update_parameters(
            weights, num_examples, epoch=epoch, metrics=_numeric_logs(logs), num_steps=steps
        )
        if new_weights is not None:
            self.model.set_weights([np.asarray(w) for w in new_weights])
        self._set_anchor()
        self._save_state()
        self.last_federated_metrics = dict(aggregated or {})
        if logs is not None:
            for key, value in self.last_federated_metrics.items():
                logs[f"{key}_fed"] = value

    # -- FedProx ------------------------------------------------------------------
    def _set_anchor(self) -> None:
        if self.proximal_mu > 0 and self.model is not None:
            self._anchor = [np.array(v.numpy()) for v in self.model.trainable_weights]  # a copy, not a view

    def _proximal_step(self) -> None:
        """Pull the weights towards the last federated ones, scaled by the optimizer's current learning rate."""
        optimizer = self.model.optimizer
        lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        factor = lr * self.proximal_mu
        for variable, anchor in zip(self.model.trainable_weights, self._anchor):
            variable.assign(variable.value - factor * (variable.value - anchor))

    # -- resume -------------------------------------------------------------------
    def _load_state(self) -> None:
        """Rejoin as the node of an earlier run when ``state_path`` holds its state."""
        load = getattr(self.node, "load_state_dict", None)
        if self._state_loaded or self.state_path is None or not self.state_path.exists() or not callable(load):
            return
        load(json.loads(self.state_path.read_text(encoding="utf-8")))
        self._state_loaded = True  # once: a second fit() continues this node, it does not restart it

    def _save_state(self) -> None:
        """Write the node's state after each federation (temp file + rename: never half-written)."""
        state = getattr(self.node, "state_dict", None)
        if self.state_path is None or not callable(state):
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.state_path.with_name(self.state_path.name + ".tmp")
        temp.write_text(json.dumps(state()), encoding="utf-8")
        os.replace(temp, self.state_path)
