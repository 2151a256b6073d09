"""Keras 3 glue (TensorFlow, torch and JAX backends): federate a model's weights as it trains.

The callback only moves weights and metrics between ``model.fit`` and a
federated node; storing, encoding and aggregating are the node's job, and
everything not Keras-specific lives in ``callbacks/core.py``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flwr_serverless.callbacks.core import FederatedCallbackCore
from flwr_serverless.callbacks.parts import check_given_with, leading_dim, numeric_metrics
from flwr_serverless.validation import check_positive_int

__all__ = ["FlwrFederatedCallback"]

_COUNTING_MARK = "_flwr_serverless_counter"


class _ExampleCount:
    """Examples counted in Python, by the wrapped train function (torch and JAX backends)."""

    def __init__(self) -> None:
        self.value = 0

    def add_batch(self, batch: Any) -> None:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        self.value += leading_dim(x)

    def take(self) -> int:
        value, self.value = self.value, 0
        return value


class _TFExampleCount:
    """Examples counted inside the TF graph: a replica-summed variable the wrapped train_step adds to."""

    def __init__(self, variable: Any) -> None:
        self.variable = variable

    def take(self) -> int:
        value = int(self.variable.numpy())
        self.variable.assign(0)
        return value


class _CountingIterator:
    """JAX: the train function draws its batches from an iterator; count them as they are drawn."""

    def __init__(self, source: Iterator[Any], count: _ExampleCount) -> None:
        self._source = source
        self._count = count

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._source)
        self._count.add_batch(batch)
        return batch


def _install_tf_counter(model: keras.Model) -> _TFExampleCount:
    """Wrap ``model.train_step`` so every step adds its batch size to a TF variable (works in graph mode)."""
    import tensorflow as tf

    with model.distribute_strategy.scope():
        variable = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="flwr_examples_seen",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )  # replicas each add their share
    original: Callable[[Any], Any] = model.train_step

    def counting_train_step(data: Any) -> Any:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        variable.assign_add(tf.cast(tf.shape(keras.tree.flatten(x)[0])[0], tf.int64))
        return original(data)

    count = _TFExampleCount(variable)
    setattr(counting_train_step, _COUNTING_MARK, count)
    model.train_step = counting_train_step  # an instance attribute shadows the class method
    return count


def _install_python_counter(model: keras.Model) -> _ExampleCount:
    """Wrap the train function Keras builds, counting the batches it is given (torch: a list of batches;
    JAX: an iterator). Python-level, so neither ``torch.compile`` nor ``jax.jit`` sees the counting.
    """
    count = _ExampleCount()
    build: Callable[..., Any] = model.make_train_function

    def make_counting_train_function(force: bool = False) -> Any:
        result = build(force)
        function = model.train_function
        if function is not None and getattr(function, _COUNTING_MARK, None) is None:

            def counting_train_function(*args: Any) -> Any:
                *head, data = args
                if isinstance(data, (list, tuple)):
                    for batch in data:
                        count.add_batch(batch)
                else:
                    data = _CountingIterator(data, count)
                return function(*head, data)

            setattr(counting_train_function, _COUNTING_MARK, count)
            model.train_function = counting_train_function
        return result

    setattr(make_counting_train_function, _COUNTING_MARK, count)
    model.make_train_function = make_counting_train_function
    return count


def _install_counter(model: keras.Model) -> _ExampleCount | _TFExampleCount:
    """One counter per model, whichever backend: ``fit`` calls ``set_model`` every time, and a model already
    wrapped (by this or another callback) keeps its counter. Any train function built before is dropped.
    """
    hook = model.train_step if keras.backend.backend() == "tensorflow" else model.make_train_function
    existing = getattr(hook, _COUNTING_MARK, None)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    if keras.backend.backend() == "tensorflow":
        count: _ExampleCount | _TFExampleCount = _install_tf_counter(model)
    elif keras.backend.backend() in ("torch", "jax"):
        count = _install_python_counter(model)
    else:
        raise RuntimeError(
            f"FlwrFederatedCallback cannot count examples on the {keras.backend.backend()} "
            "backend; pass num_examples_per_epoch"
        )
    model.train_function = None
    return count


class FlwrFederatedCallback(keras.callbacks.Callback, FederatedCallbackCore):
    """After each epoch: push local weights, pull and aggregate peers' weights, continue from the result.

    Arguments as in the original flwr-serverless callback, same order:

    - ``node``: a federated node (``AsyncFederatedNode``, ``SyncFederatedNode``, ``SemiSyncFederatedNode``).
    - ``num_examples_per_epoch``: this node's weight in the aggregation. ``None`` counts the examples
      actually trained since the last federation (any backend; the last batch may be short).
    - ``x_test``, ``y_test``, ``test_batch_size``, ``test_steps``: after every federation the federated
      model is evaluated on them (``test_steps`` batches at most; ``None``: all of ``x_test``) and the
      results are logged with the suffix: ``accuracy_fed`` is then the federated model's test accuracy.
      Without ``x_test``, ``<name>_fed`` is the mean of ``<name>`` over the nodes that were aggregated
      (their training figures, weighted by examples). Evaluation results replace such means of the same name.
    - ``postfix_for_federated_metrics``: the suffix (``"_fed"``).
    - ``override_metrics_with_aggregated_metrics``: write the federated figures under the plain names
      (``accuracy`` becomes the federated figure) instead of adding suffixed ones.
    - ``save_model_before_aggregation`` / ``save_model_after_aggregation``: write
      ``<checkpoint_dir>/<node_id>/model_{before,after}_aggregation_<epoch:05d>.keras`` and a
      ``metrics_{before,after}_aggregation_<epoch:05d>.json`` (local figures before, federated after).

    Keyword-only: ``proximal_mu > 0`` adds FedProx's proximal step after every optimizer step,
    ``w <- w - lr * mu * (w - w_fed)``. ``state_path``, a JSON file next to your checkpoint, is written
    after every federation and read when ``fit`` starts, so a restarted job rejoins as the same node.
    ``checkpoint_dir`` holds the saved models; ``None`` (default) puts them into the node's store under
    ``keras/<node_id>/`` (``.h5``), where the original wrote them.

    When ``fit`` ends (last epoch, ``EarlyStopping`` or ``stop_training``) the callback federates once
    more if batches were trained since its last federation (a semi-sync node's partial budget), then
    calls ``node.leave()``. Pass ``leave_on_train_end=False`` to call ``fit`` several times with one
    node, and call ``node.leave()`` yourself after the last. Callbacks listed before this one see the
    weights before aggregation and no federated figures; list ``ModelCheckpoint`` or ``CSVLogger`` after it.
    """

    framework = "keras"
    model_suffix = ".keras"
    store_model_suffix = ".h5"  # checkpoint_dir=None: HDF5 into the store, as the original wrote
    #: Options reserved for later versions; accepted so calling code keeps working.
    KNOWN_OPTIONS: frozenset[str] = frozenset()

    def __init__(
        self,
        node: Any,
        num_examples_per_epoch: int | None = None,
        x_test: Any = None,
        y_test: Any = None,
        test_batch_size: int = 32,
        test_steps: int | None = 10,
        postfix_for_federated_metrics: str = "_fed",
        override_metrics_with_aggregated_metrics: bool = False,
        save_model_before_aggregation: bool = False,
        save_model_after_aggregation: bool = False,
        *,
        proximal_mu: float = 0.0,
        state_path: str | os.PathLike[str] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        leave_on_train_end: bool = True,
        **future_options: Any,
    ) -> None:
        super().__init__()
        self._init_core(
            node,
            num_examples_per_epoch,
            proximal_mu,
            postfix_for_federated_metrics,
            override_metrics_with_aggregated_metrics,
            save_model_before_aggregation,
            save_model_after_aggregation,
            checkpoint_dir,
            leave_on_train_end,
        )
        check_given_with("y_test", y_test, "x_test", x_test)
        self.x_test, self.y_test = x_test, y_test
        self.test_batch_size = check_positive_int("test_batch_size", test_batch_size)
        self.test_steps = check_positive_int("test_steps", test_steps, none=True)
        #: JSON file keeping the node's identity and round across restarts (next to the model checkpoint).
        self.state_path = None if state_path is None else Path(state_path)
        unknown = sorted(set(future_options) - self.KNOWN_OPTIONS)
        if unknown:
            warnings.warn(f"FlwrFederatedCallback ignores unknown options: {', '.join(unknown)}", stacklevel=2)
        self.options = dict(future_options)
        #: The logs of the most recent federation, federated figures included (as the original's ``logs``).
        self.logs: dict[str, Any] | None = None
        self._counter: _ExampleCount | _TFExampleCount | None = None
        self._latest_logged: dict[str, float] = {}  # federated figures of the latest federation, as logged
        self._epoch = 0
        self._state_loaded = False

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        if self.num_examples_per_epoch is None:
            self._counter = _install_counter(model)

    # -- Keras hooks ------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._count_examples()  # forget steps from evaluate()/an interrupted fit
        if not self._state_loaded:  # once: a second fit() continues this node, it does not restart it
            self._state_loaded = self._load_state_file(self.state_path)
        self._start_training()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_begin()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_end()
        if self._proximal.active:
            self._proximal_step()
        if self._budget_due:  # semi-sync: federate after the node's step budget, mid-epoch
            self._update_logs(logs, self._federate(self._epoch, logs))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._budget is None:
            self._update_logs(logs, self._federate(epoch, logs))
        elif logs is not None:  # semi-sync federated mid-epoch: History gets the latest federated figures
            logs.update(self._latest_logged)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        logged = self._finish_training(self._epoch, logs)
        if logged is not None:
            self._update_logs(logs, logged)
        self._leave()

    def _update_logs(self, logs: dict[str, Any] | None, logged: dict[str, float]) -> None:
        if logs is not None:
            logs.update(logged)
        self.logs = logs
        self._latest_logged = logged

    # -- the framework half of the core --------------------------------------------
    def _get_arrays(self) -> list[np.ndarray]:
        return list(self.model.get_weights())

    def _tensor_names(self) -> list[str]:
        return [weight.path for weight in self.model.weights]

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        self.model.set_weights(arrays)

    def _named_trainables(self) -> Iterable[tuple[str, Any]]:
        return [] if self.model is None else [(v.path, v.value) for v in self.model.trainable_weights]

    def _copy_tensor(self, value: Any) -> Any:
        return keras.ops.copy(value)

    def _count_examples(self) -> int:
        return 0 if self._counter is None else self._counter.take()

    def _save_model(self, path: Path) -> None:
        self.model.save(path)

    def _after_federation(self) -> None:
        self._save_state_file(self.state_path)

    def _evaluate(self) -> dict[str, float]:
        """``model.evaluate`` on the test data; the training metrics' running state is kept, so a
        mid-epoch (semi-sync) evaluation leaves the epoch's training figures intact."""
        if self.x_test is None:
            return {}
        examples = (
            leading_dim(self.x_test)
            if isinstance(self.x_test, (np.ndarray, list, tuple, dict)) or hasattr(self.x_test, "shape")
            else 0
        )
        batch_size = self.test_batch_size if examples else None
        steps = self.test_steps
        if examples and steps is not None:
            steps = min(steps, math.ceil(examples / self.test_batch_size))
        state = [keras.ops.copy(v.value) for v in self.model.metrics_variables]
        try:
            result = self.model.evaluate(
                self.x_test, self.y_test, batch_size=batch_size, steps=steps, verbose=0, return_dict=True
            )
        finally:
            for variable, value in zip(self.model.metrics_variables, state):
                variable.assign(value)
        return numeric_metrics(result, suffix=None)

    def _proximal_step(self) -> None:
        """Pull the weights towards the last federated ones, scaled by the optimizer's current learning rate."""
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        for variable in self.model.trainable_weights:
            pulled = self._proximal.pulled(variable.path, variable.value, lr)
            if pulled is not None:
                variable.assign(pulled)
