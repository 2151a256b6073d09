"""The Keras callback: exact example counts, ``_fed`` metrics in History, and real federation over moto S3.

End of training, evaluation, checkpoints and other backends: tests/test_keras_lifecycle.py.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode
from flwr_serverless.simulation import SimulationConfig, run_simulation

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from fakes import RecordingNode  # noqa: E402

from flwr_serverless.callbacks.keras import FlwrFederatedCallback  # noqa: E402  (imports keras)


class LogsSpy(keras.callbacks.Callback):
    """A later callback: must see the ``_fed`` keys the federated callback added."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seen.append(dict(logs or {}))


def _model() -> Any:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _data(n: int = 103) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 4), dtype=np.float32), rng.integers(0, 3, n)


def test_counts_examples_exactly_with_numpy_input_and_a_short_last_batch() -> None:
    x, y = _data(103)  # 103 % 10 != 0: the last batch has 3 examples
    node = RecordingNode()
    model = _model()
    model.fit(
        x,
        y,
        batch_size=10,
        epochs=3,
        validation_data=(x[:20], y[:20]),
        verbose=0,
        callbacks=[FlwrFederatedCallback(node)],
    )
    assert [c["num_examples"] for c in node.calls] == [103, 103, 103]  # validation steps are not counted
    assert [c["num_steps"] for c in node.calls] == [11, 11, 11]  # ceil(103 / 10) batches per epoch
    assert [c["epoch"] for c in node.calls] == [0, 1, 2]


def test_counts_examples_exactly_with_tf_data_and_repeated_fits() -> None:
    x, y = _data(103)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    node = RecordingNode()
    callback = FlwrFederatedCallback(node)
    model = _model()
    model.fit(dataset, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    model.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[callback])  # wrapper installed once, not twice
    assert [c["num_examples"] for c in node.calls] == [103, 103, 103]

    # steps_per_epoch over a repeated dataset: 4 batches of 7 per epoch.
    node = RecordingNode()
    _model().fit(
        dataset.repeat(), steps_per_epoch=4, epochs=2, shuffle=False, verbose=0, callbacks=[FlwrFederatedCallback(node)]
    )
    assert [c["num_examples"] for c in node.calls] == [28, 28]


def test_explicit_num_examples_is_passed_verbatim_and_leaves_train_step_alone() -> None:
    x, y = _data(50)
    node = RecordingNode()
    model = _model()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[FlwrFederatedCallback(node, 999)])
    assert [c["num_examples"] for c in node.calls] == [999, 999]
    assert "train_step" not in vars(model)
    with pytest.raises(ValueError):
        FlwrFederatedCallback(node, num_examples_per_epoch=0)


def test_model_continues_from_the_aggregated_weights() -> None:
    x, y = _data(40)
    node = RecordingNode(shift=100.0)
    model = _model()
    model.fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[FlwrFederatedCallback(node)])
    for got, sent in zip(model.get_weights(), node.calls[0]["weights"]):
        np.testing.assert_allclose(got, sent + 100.0, rtol=1e-6)


def test_fed_metrics_reach_history_and_later_callbacks() -> None:
    x, y = _data(60)
    node = RecordingNode(metrics={"accuracy": 0.75, "loss": 0.5})
    spy = LogsSpy()
    history = _model().fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[FlwrFederatedCallback(node), spy])
    assert history.history["accuracy_fed"] == [0.75, 0.75]
    assert history.history["loss_fed"] == [0.5, 0.5]
    assert all(s["accuracy_fed"] == 0.75 and "accuracy" in s for s in spy.seen)
    # the node got this node's own numeric metrics
    assert set(node.calls[0]["metrics"]) == {"accuracy", "loss"}


def test_an_epoch_without_counted_examples_warns() -> None:
    callback = FlwrFederatedCallback(RecordingNode())
    callback.set_model(_model())
    with pytest.warns(UserWarning, match="counted no training examples"):
        callback.on_epoch_end(0, {})


def test_unknown_options_warn() -> None:
    with pytest.warns(UserWarning, match="federate_every"):
        FlwrFederatedCallback(RecordingNode(), federate_every=2)


def test_two_skewed_nodes_federating_over_s3_beat_standalone_training(moto_endpoint: str, s3_bucket: str) -> None:
    # Each node sees mostly half of the digits (skew 0.9), so alone it tops out near 0.55-0.7 on the
    # full test set; federating after every epoch over S3 lets both nodes learn all ten digits.
    config = SimulationConfig(
        num_nodes=2,
        mode="async",
        strategy="fedavg",
        store_url=f"s3://{s3_bucket}/fed",
        storage_options={"endpoint_url": moto_endpoint},
        epochs=12,
        dataset="digits",
        skew=0.9,
        seed=0,
    )
    result = run_simulation(config)
    assert result.ok, [r.error for r in (*result.nodes, *result.standalone)]
    federated = [r.test_accuracy for r in result.nodes]
    standalone = [r.test_accuracy for r in result.standalone]
    assert all(acc is not None for acc in (*federated, *standalone))
    assert min(federated) > max(standalone) + 0.1, (federated, standalone)
    assert min(federated) > 0.8, federated
    for row in result.nodes:
        assert row.epochs_completed == 12 and row.bytes_up > 0 and row.rejected == 0
    assert sum(r.peers_used for r in result.nodes) > 0


@pytest.mark.filterwarnings("ignore:.*shuffle=True.*:UserWarning")  # the snippet keeps fit's default shuffle
def test_the_papers_snippet_runs_unchanged(moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    x, y = _data(96)
    batch_size, steps_per_epoch = 16, 6
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    nodes = []
    for _ in range(2):
        model = _model()
        # --- the snippet from the flwr-serverless paper, with the bucket name of this test ---
        from flwr.server.strategy import FedAvg

        from flwr_serverless import AsyncFederatedNode, S3Folder
        from flwr_serverless.keras import FlwrFederatedCallback

        strategy = FedAvg()
        shared_folder = S3Folder(directory=f"{s3_bucket}/experiment1")
        node = AsyncFederatedNode(shared_folder=shared_folder, strategy=strategy)
        callback = FlwrFederatedCallback(node, num_examples_per_epoch=batch_size * steps_per_epoch)
        model.fit(dataset, callbacks=[callback])
        # --- end of snippet ---
        nodes.append(node)
    assert nodes[0].node_id != nodes[1].node_id
    assert nodes[0].stats.federations == 1 and nodes[0].stats.peers_used == 0
    # The first node left when its fit ended, moments before the second joined: same run, averaged in.
    assert nodes[1].stats.federations == 1 and nodes[1].stats.peers_used == 1  # pulled the first node's weights
    assert nodes[1].store.stats.bytes_down > 0


def test_the_keras_extra_brings_what_tensorboard_needs(tmp_path) -> None:
    """``keras.callbacks.TensorBoard`` beside ours: the keras extra installs the tensorboard package it needs."""
    model = _model()
    x, y = _data(32)
    node = AsyncFederatedNode(f"memory://tb-{uuid.uuid4().hex[:8]}", node_id="tb")
    model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[FlwrFederatedCallback(node), keras.callbacks.TensorBoard(str(tmp_path / "logs"))],
    )
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))
