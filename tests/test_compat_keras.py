"""0.2's Keras paths: ``flwr_serverless.keras`` as a package, its callback module and the experiment helpers."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flwr_serverless.keras as keras_package
from flwr_serverless.callbacks.keras import FlwrFederatedCallback
from flwr_serverless.federated_node.async_federated_node import AsyncFederatedNode
from flwr_serverless.federated_node.sync_federated_node import SyncFederatedNode
from flwr_serverless.keras import example
from flwr_serverless.keras.example import (
    FederatedLearningTestRun,
    MnistModelBuilder,
    digits_as_mnist,
    split_training_data_into_paritions,
)
from flwr_serverless.shared_folder.local_folder import LocalFolder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Keras' generator/shuffle notes


def test_keras_is_a_package_with_the_original_submodules() -> None:
    assert hasattr(keras_package, "__path__")
    assert keras_package.FlwrFederatedCallback is FlwrFederatedCallback
    module = importlib.import_module("flwr_serverless.keras.federated_learning_callback")
    assert module.FlwrFederatedCallback is FlwrFederatedCallback


def test_partitions_split_classes_as_the_original() -> None:
    y = np.repeat(np.arange(10), 3)
    x = y.astype(np.float32) * 10
    xs, ys = split_training_data_into_paritions(x, y, num_partitions=2)
    assert [sorted(set(part.tolist())) for part in ys] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(np.array_equal(px, py * 10) for px, py in zip(xs, ys))
    _, ys = split_training_data_into_paritions(x, y, num_partitions=3)
    assert [sorted(set(part.tolist())) for part in ys] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_digits_stand_in_for_mnist_in_its_format() -> None:
    (x_train, _), (x_test, y_test) = digits_as_mnist()
    assert x_train.dtype == np.uint8 and x_train.shape[1:] == (28, 28) and x_test.shape[1:] == (28, 28)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 449
    assert set(np.unique(y_test).tolist()) == set(range(10)) and x_train.max() == 255


def test_load_mnist_prefers_keras_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "datasets"
    cache.mkdir()
    arrays = {
        name: np.full((2, 28, 28) if name.startswith("x") else (2,), i, np.uint8)
        for i, name in enumerate(("x_train", "y_train", "x_test", "y_test"))
    }
    np.savez(cache / "mnist.npz", **arrays)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (x_train, _), (_, y_test) = example.load_mnist()
    assert np.array_equal(x_train, arrays["x_train"]) and np.array_equal(y_test, arrays["y_test"])
    monkeypatch.setattr(example, "_keras_mnist_cache", lambda: None)
    (x_train, _), _ = example.load_mnist()
    assert len(x_train) == 1348  # no cache: the digits, not a download


@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8, 1), (28, 28, 3)])
def test_mnist_model_builder_fits_any_image_size(shape: tuple[int, ...]) -> None:
    model = MnistModelBuilder(lr=0.01).run()
    x = np.random.default_rng(0).random((16, *shape), dtype=np.float32)
    model.fit(x, np.arange(16) % 10, epochs=1, verbose=0)
    assert model.predict(x[:2], verbose=0).shape == (2, 10)


def _tiny_digits() -> Any:
    (x_train, y_train), (x_test, y_test) = digits_as_mnist()
    return (x_train[:400], y_train[:400]), (x_test[:64], y_test[:64])


@pytest.mark.parametrize("mode", ["sequential", "pseudo", "concurrent_sync"])
def test_federated_learning_test_run_modes(mode: str, tmp_path: Path) -> None:
    run = FederatedLearningTestRun(
        num_nodes=2,
        epochs=2,
        num_rounds=2,
        steps_per_epoch=2,
        test_steps=2,
        batch_size=16,
        data_loader=_tiny_digits,
        lag=1.0,
        train_pseudo_concurrently=mode == "pseudo",
        train_concurrently=mode == "concurrent_sync",
        use_async_node=mode != "concurrent_sync",
        storage_backend=LocalFolder(tmp_path / "fed") if mode == "concurrent_sync" else None,
    )
    standalone, federated = run.run()
    assert len(standalone) == len(federated) == 2 and all(0.0 <= a <= 1.0 for a in standalone + federated)
    node_type = SyncFederatedNode if mode == "concurrent_sync" else AsyncFederatedNode
    assert all(type(node) is node_type for node in run.nodes) and len(run.callbacks_per_client) == 2
    # Federations with a peer: sync always; sequential 0 then 1 each round; lag 1 runs node 0's two epochs first.
    expected = {"sequential": [1, 2], "pseudo": [0, 2], "concurrent_sync": [2, 2]}[mode]
    assert [node.counter for node in run.nodes] == expected
    if mode == "concurrent_sync":  # one folder handle per node, on the same directory
        assert run.nodes[0].model_store is not run.nodes[1].model_store
        assert run.nodes[0].model_store.directory == run.nodes[1].model_store.directory


def test_train_batches_keep_one_shape_and_resume() -> None:
    run = FederatedLearningTestRun(num_nodes=2, batch_size=32, data_loader=_tiny_digits)
    run.partitioned_x_train, run.partitioned_y_train, run.x_test, run.y_test = run.create_partitioned_datasets()
    loader = run.get_train_dataloader_for_node(1)
    partition = run.partitioned_y_train[1]
    batches = [next(loader)[1] for _ in range(len(partition) // 32 + 2)]
    assert {len(batch) for batch in batches} == {32}  # the short tail batch is left out
    assert np.array_equal(batches[-2], partition[:32])  # then it starts over
    assert set(np.concatenate(batches).tolist()) <= {5, 6, 7, 8, 9}


def test_federated_models_start_from_common_weights() -> None:
    run = FederatedLearningTestRun(num_nodes=3, data_loader=_tiny_digits)
    run.partitioned_x_train, run.partitioned_y_train, run.x_test, run.y_test = run.create_partitioned_datasets()
    first, *others = run.create_federated_models()
    for model in others:
        for a, b in zip(first.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_sync_nodes_need_concurrent_training() -> None:
    run = FederatedLearningTestRun(use_async_node=False, data_loader=_tiny_digits)
    with pytest.raises(NotImplementedError, match="train_concurrently=True"):
        run._make_nodes(separate_handles=False)
