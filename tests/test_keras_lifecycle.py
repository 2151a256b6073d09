"""The Keras callback's end of training (flush, leave), evaluation, checkpoints, options and other backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

from fakes import PlannedNode, RecordingNode  # noqa: E402

from flwr_serverless.callbacks.keras import FlwrFederatedCallback, _install_python_counter  # noqa: E402
from flwr_serverless.stores import open_store  # noqa: E402

RNG = np.random.default_rng(0)
X, Y = RNG.random((103, 4), dtype=np.float32), RNG.integers(0, 3, 103)
X_TEST, Y_TEST = RNG.random((50, 4), dtype=np.float32), RNG.integers(0, 3, 50)


def _model() -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _fit(callback: Any, epochs: int = 3, model: Any = None, extra: list[Any] | None = None) -> tuple[Any, Any]:
    model = model if model is not None else _model()
    history = model.fit(
        X, Y, batch_size=10, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback, *(extra or [])]
    )
    return model, history


# -- the node contract ------------------------------------------------------------------
def test_sends_tensor_names_and_framework_with_keywords() -> None:
    node = RecordingNode()
    model, _ = _fit(FlwrFederatedCallback(node), epochs=1)
    call = node.calls[0]
    assert call["tensor_names"] == [w.path for w in model.weights]
    assert [name.rsplit("/", 1)[-1] for name in call["tensor_names"]] == ["kernel", "bias"]
    assert call["framework"] == "keras" and call["epoch"] == 0 and call["num_examples"] == 103


# -- end of training ---------------------------------------------------------------------
def test_leaves_once_after_the_last_epoch_without_an_extra_federation() -> None:
    node = RecordingNode()
    _fit(FlwrFederatedCallback(node), epochs=3)
    assert node.events == ["update"] * 3 + ["leave"]  # epoch-end federation leaves nothing pending


def test_early_stopping_still_leaves() -> None:
    node = RecordingNode()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)  # stops after epoch 1
    _, history = _fit(FlwrFederatedCallback(node), epochs=20, extra=[stop])
    assert len(history.history["loss"]) == 2
    assert node.events == ["update", "update", "leave"]


def test_stop_training_mid_epoch_federates_the_partial_epoch_then_leaves() -> None:
    class StopAtBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 2:
                self.model.stop_training = True

    node = RecordingNode()
    _fit(FlwrFederatedCallback(node), epochs=5, extra=[StopAtBatch()])
    assert node.events == ["update", "leave"]  # Keras still ends the epoch: that federation takes the 3 batches
    assert node.calls[0]["num_steps"] == 3 and node.calls[0]["num_examples"] == 30


def test_semisync_budget_and_the_partial_budget_flushed_at_the_end() -> None:
    node = RecordingNode(budget=4)  # plans 4 batches after its cold-start epoch
    callback = FlwrFederatedCallback(node)
    _, history = _fit(callback, epochs=3)  # 33 batches: 11 (cold start), then 5 budgets of 4, then 2 left
    assert [c["num_steps"] for c in node.calls] == [11, 4, 4, 4, 4, 4, 2]
    assert sum(c["num_examples"] for c in node.calls) == 3 * 103
    assert node.events[-2:] == ["update", "leave"] and callback.pending_batches == 0
    assert len(history.history["accuracy_fed"]) == 3  # every epoch reports its latest federated figures
    assert len(node.batch_times) == 33


def test_leave_on_train_end_false_keeps_the_node_for_the_next_fit() -> None:
    node = RecordingNode()
    callback = FlwrFederatedCallback(node, leave_on_train_end=False)
    model, _ = _fit(callback, epochs=1)
    _fit(callback, epochs=1, model=model)
    assert node.events == ["update", "update"]


def test_real_async_node_on_memory_flushes_and_leaves_after_its_last_federation() -> None:
    node = PlannedNode(open_store(f"memory://keras-leave-{uuid.uuid4().hex[:8]}"), node_id="k")
    _fit(FlwrFederatedCallback(node), epochs=2)  # 22 batches: 11, then 5 + 5, then 1 flushed
    assert node.stats.federations == 4 and node.left_after == 4
    assert node.local_steps == 22  # every trained batch was published
    assert node.store.list("nodes/") and "nodes/k" in node.store.list("nodes/")


# -- evaluation of the federated model -----------------------------------------------------
def test_x_test_figures_are_the_federated_models_test_figures() -> None:
    node = RecordingNode(shift=0.01)
    callback = FlwrFederatedCallback(
        node, num_examples_per_epoch=None, x_test=X_TEST, y_test=Y_TEST, test_batch_size=8, test_steps=None
    )
    model, history = _fit(callback, epochs=2)
    expected = model.evaluate(X_TEST, Y_TEST, verbose=0, return_dict=True)  # the last federation's model
    assert history.history["accuracy_fed"][-1] == pytest.approx(expected["accuracy"])
    assert history.history["loss_fed"][-1] == pytest.approx(expected["loss"], rel=1e-5)
    assert callback.last_evaluation == pytest.approx(expected, rel=1e-5)
    assert callback.federated_metrics == {k: v + 1.0 for k, v in node.calls[-1]["metrics"].items()}  # the node's
    assert callback.logs is not None and callback.logs["accuracy_fed"] == history.history["accuracy_fed"][-1]


def test_test_steps_limits_the_evaluated_batches() -> None:
    callback = FlwrFederatedCallback(RecordingNode(), x_test=X_TEST, y_test=Y_TEST, test_batch_size=8, test_steps=2)
    model, _ = _fit(callback, epochs=1)
    expected = model.evaluate(X_TEST[:16], Y_TEST[:16], verbose=0, return_dict=True)
    assert callback.last_evaluation == pytest.approx(expected, rel=1e-5)


def test_mid_epoch_evaluation_leaves_the_training_figures_alone() -> None:
    _, plain = _fit(FlwrFederatedCallback(RecordingNode(budget=4)), epochs=2)
    _, evaluated = _fit(FlwrFederatedCallback(RecordingNode(budget=4), x_test=X_TEST, y_test=Y_TEST), epochs=2)
    assert evaluated.history["accuracy"] == plain.history["accuracy"]
    assert evaluated.history["loss"] == plain.history["loss"]


def test_postfix_and_override() -> None:
    node = RecordingNode(metrics={"accuracy": 0.75, "loss": 0.5})
    _, history = _fit(FlwrFederatedCallback(node, postfix_for_federated_metrics="_global"), epochs=1)
    assert history.history["accuracy_global"] == [0.75] and "accuracy_fed" not in history.history

    _, history = _fit(FlwrFederatedCallback(node, override_metrics_with_aggregated_metrics=True), epochs=2)
    assert history.history["accuracy"] == [0.75, 0.75] and history.history["loss"] == [0.5, 0.5]
    assert node.calls[-1]["metrics"]["accuracy"] != 0.75  # the node is still sent the local figures
    assert not any(k.endswith("_fed") for k in history.history)


# -- checkpoints ------------------------------------------------------------------------------
def test_models_and_metrics_before_and_after_aggregation(tmp_path: Path) -> None:
    node = RecordingNode(shift=1.0, metrics={"accuracy": 0.5}, node_id="n1")
    callback = FlwrFederatedCallback(
        node, save_model_before_aggregation=True, save_model_after_aggregation=True, checkpoint_dir=tmp_path / "ckpt"
    )
    _fit(callback, epochs=2)
    folder = tmp_path / "ckpt" / "n1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{kind}_{stage}_aggregation_{epoch:05d}.{ext}"
        for kind, ext in (("model", "keras"), ("metrics", "json"))
        for stage in ("before", "after")
        for epoch in (0, 1)
    )
    for epoch, call in enumerate(node.calls):
        before = keras.models.load_model(folder / f"model_before_aggregation_{epoch:05d}.keras")
        after = keras.models.load_model(folder / f"model_after_aggregation_{epoch:05d}.keras")
        for b, a, sent in zip(before.get_weights(), after.get_weights(), call["weights"]):
            np.testing.assert_array_equal(b, sent)
            np.testing.assert_allclose(a, sent + 1.0, rtol=1e-6)
        local = json.loads((folder / f"metrics_before_aggregation_{epoch:05d}.json").read_text())
        assert local == pytest.approx(call["metrics"]) and set(local) == {"accuracy", "loss"}
        assert json.loads((folder / f"metrics_after_aggregation_{epoch:05d}.json").read_text()) == {"accuracy": 0.5}


def test_nothing_is_written_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fit(FlwrFederatedCallback(RecordingNode()), epochs=1)
    assert list(tmp_path.iterdir()) == []


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"test_batch_size": 0}, "test_batch_size"),
        ({"test_steps": 0}, "test_steps"),
        ({"y_test": Y_TEST}, "y_test"),
        ({"postfix_for_federated_metrics": ""}, "postfix_for_federated_metrics"),
        ({"proximal_mu": float("nan")}, "proximal_mu"),
        ({"num_examples_per_epoch": 2.5}, "num_examples_per_epoch"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlwrFederatedCallback(RecordingNode(), **options)


def test_a_node_without_update_parameters_is_refused() -> None:
    with pytest.raises(TypeError, match="update_parameters"):
        FlwrFederatedCallback(object())


def test_original_positional_order() -> None:
    callback = FlwrFederatedCallback(RecordingNode(), 64, X_TEST, Y_TEST, 16, 3, "_f", True, True, False)
    assert (callback.num_examples_per_epoch, callback.test_batch_size, callback.test_steps) == (64, 16, 3)
    assert callback.x_test is X_TEST and callback.y_test is Y_TEST
    assert callback.postfix_for_federated_metrics == "_f" and callback.override_metrics_with_aggregated_metrics
    assert callback.save_model_before_aggregation and not callback.save_model_after_aggregation


# -- other backends ---------------------------------------------------------------------------
def test_python_counter_counts_batches_drawn_from_an_iterator_as_on_jax() -> None:
    """The JAX train function takes (state, iterator) and draws its batches itself (JAX is not installed)."""

    class FakeJaxModel:
        train_function: Any = None

        def make_train_function(self, force: bool = False) -> None:
            def train_function(state: Any, iterator: Any) -> tuple[dict, Any]:
                for _ in range(2):  # steps_per_execution = 2
                    next(iterator)
                return {}, state

            self.train_function = train_function

    model = FakeJaxModel()
    count = _install_python_counter(model)  # type: ignore[arg-type]
    model.make_train_function()
    batches = iter([(np.zeros((8, 4)), np.zeros(8)), (np.zeros((3, 4)), np.zeros(3))])
    model.train_function("state", batches)
    assert count.take() == 11 and count.take() == 0


_BACKEND_SCRIPT = """
import json, os, numpy as np, keras
from fakes import PlannedNode, RecordingNode
from flwr_serverless.callbacks.keras import FlwrFederatedCallback
assert keras.backend.backend() == os.environ["KERAS_BACKEND"]
rng = np.random.default_rng(0)
x, y = rng.random((103, 4), dtype=np.float32), rng.integers(0, 3, 103)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
node = RecordingNode(shift=0.5, budget=4)
callback = FlwrFederatedCallback(node, x_test=x[:40], y_test=y[:40], proximal_mu=0.1)
history = model.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
final = model.evaluate(x[:40], y[:40], verbose=0, return_dict=True)
from test_fedprox import MU, _expected, _keras_fit
prox_error = max(float(np.abs(got - want).max()) for got, want in zip(_keras_fit(MU), _expected(MU)))
print(json.dumps({"examples": [c["num_examples"] for c in node.calls], "steps": [c["num_steps"] for c in node.calls],
                  "names": node.calls[0]["tensor_names"], "events": node.events, "fed": history.history["accuracy_fed"],
                  "final": final["accuracy"], "last": callback.last_evaluation["accuracy"],
                  "shifted": bool(np.allclose(model.get_weights()[1], node.calls[-1]["weights"][1] + 0.5)),
                  "prox_error": prox_error}))
"""


def _run_on_backend(backend: str, script: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter with ``KERAS_BACKEND`` set (it must be before keras is imported)."""
    pytest.importorskip(backend)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=240, cwd=root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_backend_counts_examples_federates_evaluates_applies_fedprox_and_leaves(backend: str) -> None:
    out = _run_on_backend(backend, _BACKEND_SCRIPT)
    assert out["examples"] == [103, 40, 40, 23] and out["steps"] == [11, 4, 4, 3]  # 22 batches, 3 flushed
    assert out["names"] == ["sequential/dense/kernel", "sequential/dense/bias"]
    assert out["events"] == ["update"] * 4 + ["leave"] and out["shifted"]
    assert len(out["fed"]) == 2 and out["last"] == pytest.approx(out["final"])
    assert out["prox_error"] < 1e-6  # FedProx's step on the backend's tensors matches the hand computation


_JAX_FEDERATION_SCRIPT = """
import json, sys, numpy as np, keras
from flwr_serverless import SyncFederatedNode
from flwr_serverless.callbacks.keras import FlwrFederatedCallback
from threads import run_in_threads
assert keras.backend.backend() == "jax"
store = sys.argv[1]


def train(seed):
    rng = np.random.default_rng(seed)
    x = rng.random((96, 4), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype("int32") if seed == 0 else (x[:, 1] > 0.5).astype("int32")  # different tasks
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    node = SyncFederatedNode(store, num_nodes=2, timeout=60, node_id=f"jax-{seed}")
    callback = FlwrFederatedCallback(node, x_test=x, y_test=y)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[callback])
    return model.get_weights(), history.history, node.round


(weights_a, history_a, round_a), (weights_b, history_b, round_b) = run_in_threads(lambda: train(0), lambda: train(1))
print(json.dumps({
    "same": all(bool(np.array_equal(a, b)) for a, b in zip(weights_a, weights_b)),
    "rounds": [round_a, round_b],
    "fed": [history_a["accuracy_fed"], history_b["accuracy_fed"]],
}))
"""


def test_keras_callback_federates_for_real_on_the_jax_backend(tmp_path: Path) -> None:
    """Two Keras 3 models on JAX, each with the callback and a sync node on a local folder store."""
    out = _run_on_backend("jax", _JAX_FEDERATION_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "store"))))
    assert out["rounds"] == [3, 3]  # a barrier after every epoch
    assert out["same"]  # both models end on the same FedAvg of the last round
    assert all(len(fed) == 3 for fed in out["fed"])
