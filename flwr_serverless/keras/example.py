"""0.2's experiment helpers: FederatedLearningTestRun, MnistModelBuilder, split_training_data_into_paritions.

A run splits MNIST by class over N nodes (node 0 gets digits 0-4, node 1 digits 5-9
for two nodes), trains each node alone and then federated, and returns the test
accuracies of both, so one sees what federation buys on skewed data.

Data never comes from the network unless nothing local exists: MNIST from Keras'
cache (``~/.keras/datasets/mnist.npz``, written by one ``keras.datasets.mnist.load_data()``),
else scikit-learn's 8x8 digits scaled to 28x28 (a warning says so), else the Keras
download. ``FederatedLearningTestRun(data_loader=...)`` overrides the choice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from flwr.server.strategy import FedAvg, Strategy

from flwr_serverless.federated_node.async_federated_node import AsyncFederatedNode
from flwr_serverless.federated_node.sync_federated_node import SyncFederatedNode
from flwr_serverless.keras.federated_learning_callback import FlwrFederatedCallback
from flwr_serverless.shared_folder.in_memory_folder import InMemoryFolder
from flwr_serverless.shared_folder.local_folder import LocalFolder

__all__ = [
    "FederatedLearningTestRun",
    "MnistModelBuilder",
    "digits_as_mnist",
    "load_mnist",
    "split_training_data_into_paritions",
]

logger = logging.getLogger(__name__)

Split = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _keras_mnist_cache() -> Path | None:
    homes = [Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")), Path("/tmp/.keras")]
    return next(
        (home / "datasets" / "mnist.npz" for home in homes if (home / "datasets" / "mnist.npz").is_file()), None
    )


def digits_as_mnist(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's digits (1797 images) in ``mnist.load_data()``'s format: uint8 28x28, shuffled split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    images = np.pad(images.repeat(3, axis=1).repeat(3, axis=2), ((0, 0), (2, 2), (2, 2)))  # 8x8 -> 24x24 -> 28x28
    labels = bunch.target.astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = round(len(order) * (1.0 - test_fraction))
    train, test = order[:cut], order[cut:]
    return (images[train], labels[train]), (images[test], labels[test])


def load_mnist() -> Split:
    """``keras.datasets.mnist.load_data()``'s result from local data first (see the module docstring)."""
    cached = _keras_mnist_cache()
    if cached is not None:
        with np.load(cached, allow_pickle=False) as arrays:
            return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
    try:
        split = digits_as_mnist()
    except ImportError:
        return keras.datasets.mnist.load_data()  # downloads, as 0.2 did
    logger.warning(
        "MNIST is not in Keras' cache: using scikit-learn's digits scaled to 28x28 "
        "(run keras.datasets.mnist.load_data() once to use MNIST)"
    )
    return split


def split_training_data_into_paritions(
    x_train: np.ndarray, y_train: np.ndarray, num_partitions: int = 2
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Partition by class: classes 0-9 in consecutive groups of ``10 // num_partitions`` (0.2's spelling kept).

    A node trained on one group alone cannot exceed that group's share of test accuracy,
    which is what makes the benefit of federation visible. With 3 partitions the groups
    are 0-2, 3-5, 6-8 and 9 (as in 0.2).
    """
    classes = list(range(10))
    size = len(classes) // num_partitions
    xs, ys = [], []
    for start in range(0, len(classes), size):
        mask = np.isin(y_train, classes[start : start + size])
        xs.append(x_train[mask])
        ys.append(y_train[mask])
    return xs, ys


class MnistModelBuilder:
    """A small CNN for 10-class digit images; ``run()`` returns it compiled (Adam, sparse cross-entropy).

    The input shape is taken from the first batch, so the same builder serves 28x28
    MNIST, 8x8 digits or 3-channel copies.
    """

    def __init__(self, lr: float = 0.001) -> None:
        self.lr = lr

    def run(self) -> keras.Model:
        return self._compile_model(self._build_model())

    def _build_model(self) -> keras.Model:
        layers = keras.layers
        return keras.Sequential(
            [
                layers.Conv2D(32, kernel_size=4, padding="same", activation="relu"),
                layers.MaxPooling2D(),
                layers.Conv2D(16, kernel_size=4, padding="same", activation="relu"),
                layers.Flatten(),
                layers.Dense(10, activation="softmax"),
            ]
        )

    def _compile_model(self, model: keras.Model) -> keras.Model:
        model.compile(
            optimizer=keras.optimizers.Adam(self.lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        return model


@dataclass
class FederatedLearningTestRun:
    """Train ``num_nodes`` nodes on class partitions, alone and federated; ``run()`` returns both accuracies.

    Federated training is sequential (node after node, each epoch), concurrent
    (``train_concurrently``: one thread per node; ``use_async_node=False`` for sync nodes)
    or pseudo-concurrent (``train_pseudo_concurrently``: one thread, node i's epochs
    shifted by ``i * lag`` epochs).
    """

    num_nodes: int = 2
    epochs: int = 8
    num_rounds: int = 8  # federated epochs
    batch_size: int = 32
    steps_per_epoch: int = 10
    lr: float = 0.001
    test_steps: int = 10

    strategy: Strategy = field(default_factory=FedAvg)
    storage_backend: Any = None
    use_async_node: bool = True
    train_concurrently: bool = False
    train_pseudo_concurrently: bool = False
    lag: float = 0.1

    model_builder_fn: Callable[[], keras.Model] | None = None
    replicate_num_channels: bool = False
    save_model_before_aggregation: bool = False
    save_model_after_aggregation: bool = False
    data_loader: Callable[[], Split] | None = None  # default: load_mnist
    verbose: int | str = 0  # passed to fit and evaluate

    def __post_init__(self) -> None:
        if self.model_builder_fn is None:
            self.model_builder_fn = MnistModelBuilder(lr=self.lr).run
        if self.storage_backend is None:
            self.storage_backend = InMemoryFolder()
        self.histories: dict[int, Any] = {}
        self.nodes: list[Any] = []
        self.callbacks_per_client: list[FlwrFederatedCallback] = []

    def run(self) -> tuple[list[float], list[float]]:
        self.partitioned_x_train, self.partitioned_y_train, self.x_test, self.y_test = (
            self.create_partitioned_datasets()
        )
        standalone = self.train_standalone_models(self.create_standalone_models())
        federated = self.train_federated_models(self.create_federated_models())
        accuracy_standalone = self.evaluate_models(standalone)
        accuracy_federated = self.evaluate_models(federated)
        logger.info("test accuracy: standalone %s, federated %s", accuracy_standalone, accuracy_federated)
        return accuracy_standalone, accuracy_federated

    # -- data and models ----------------------------------------------------------
    def create_partitioned_datasets(self) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
        (x_train, y_train), (x_test, y_test) = (self.data_loader or load_mnist)()
        x_train, x_test = self._as_images(x_train), self._as_images(x_test)
        xs, ys = split_training_data_into_paritions(x_train, y_train, num_partitions=self.num_nodes)
        return xs, ys, x_test, y_test

    def _as_images(self, x: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w) -> float32 (n, h, w, c) in [0, 1]; c = 3 with ``replicate_num_channels``."""
        images = x.reshape(len(x), x.shape[1], x.shape[2], 1).astype(np.float32) / 255.0
        return np.tile(images, (1, 1, 1, 3)) if self.replicate_num_channels else images

    def create_standalone_models(self) -> list[keras.Model]:
        return [self.model_builder_fn() for _ in range(self.num_nodes)]  # type: ignore[misc]

    def create_federated_models(self) -> list[keras.Model]:
        """One model per node, all starting from the same weights (FedAvg's common initial model).

        Averaging models that never shared a starting point mixes unrelated features; a
        node that trains alone before its peers publish would otherwise pay for that.
        """
        self.models = [self.model_builder_fn() for _ in range(self.num_nodes)]  # type: ignore[misc]
        if hasattr(self, "x_test"):
            for model in self.models:
                if not model.built:
                    model.build((None, *self.x_test.shape[1:]))
            for model in self.models[1:]:
                model.set_weights(self.models[0].get_weights())
        return self.models

    def get_train_dataloader_for_node(self, node_idx: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless full batches of node ``node_idx``'s partition; a generator resumes where the last fit stopped.

        The few examples past the last full batch are left out, so every batch has one
        shape and Keras traces the train step once (a short batch would trace it again).
        """
        x, y = self.partitioned_x_train[node_idx], self.partitioned_y_train[node_idx]
        usable = max(len(x) - len(x) % self.batch_size, min(len(x), self.batch_size))
        while True:
            for start in range(0, usable, self.batch_size):
                yield x[start : start + self.batch_size], y[start : start + self.batch_size]

    # -- training -----------------------------------------------------------------
    def train_standalone_models(self, model_standalone: list[keras.Model]) -> list[keras.Model]:
        for i, model in enumerate(model_standalone):
            self.histories[i] = model.fit(
                self.get_train_dataloader_for_node(i),
                epochs=self.epochs,
                steps_per_epoch=self.steps_per_epoch,
                verbose=self.verbose,
            )
        return model_standalone

    def train_federated_models(self, model_federated: list[keras.Model]) -> list[keras.Model]:
        if self.train_pseudo_concurrently:
            return self._train_federated_models_pseudo_concurrently(model_federated)
        if self.train_concurrently:
            return self._train_federated_models_concurrently(model_federated)
        return self._train_federated_models_sequentially(model_federated)

    def _make_nodes(self, separate_handles: bool) -> list[Any]:
        """One node per partition on the shared backend (a LocalFolder gets one handle per node when asked)."""
        if not self.use_async_node and (self.train_pseudo_concurrently or not self.train_concurrently):
            raise NotImplementedError("sync nodes wait for each other: use train_concurrently=True")
        nodes = []
        for _ in range(self.num_nodes):
            backend = self.storage_backend
            if separate_handles and isinstance(backend, LocalFolder):
                backend = LocalFolder(directory=backend.directory)
            if self.use_async_node:
                nodes.append(AsyncFederatedNode(shared_folder=backend, strategy=self.strategy))
            else:
                nodes.append(SyncFederatedNode(shared_folder=backend, strategy=self.strategy, num_nodes=self.num_nodes))
        self.nodes = nodes
        return nodes

    def _make_callbacks(
        self, nodes: list[Any], x_test: np.ndarray | None = None, y_test: np.ndarray | None = None, one_fit: bool = True
    ) -> list[FlwrFederatedCallback]:
        # Several fit() calls per node (one epoch each): the nodes stay members until the run ends.
        options: dict[str, Any] = {} if one_fit else {"leave_on_train_end": False}
        if x_test is not None:
            options.update(x_test=x_test, y_test=y_test, test_batch_size=self.batch_size, test_steps=self.test_steps)
        if self.save_model_before_aggregation:
            options["save_model_before_aggregation"] = True
        if self.save_model_after_aggregation:
            options["save_model_after_aggregation"] = True
        self.callbacks_per_client = [
            FlwrFederatedCallback(node, num_examples_per_epoch=self.steps_per_epoch * self.batch_size, **options)
            for node in nodes
        ]
        return self.callbacks_per_client

    def _fit_federated(self, model: keras.Model, i: int, loader: Iterator[Any], epochs: int) -> Any:
        held_out = self.test_steps * self.batch_size
        self.histories[i] = model.fit(
            loader,
            epochs=epochs,
            steps_per_epoch=self.steps_per_epoch,
            callbacks=[self.callbacks_per_client[i]],
            validation_data=(self.x_test[:held_out], self.y_test[:held_out]),
            validation_steps=self.test_steps,
            validation_batch_size=self.batch_size,
            verbose=self.verbose,
        )
        return self.histories[i]

    def _train_federated_models_sequentially(self, models: list[keras.Model]) -> list[keras.Model]:
        nodes = self._make_nodes(separate_handles=False)
        self._make_callbacks(nodes, one_fit=False)
        loaders = [self.get_train_dataloader_for_node(i) for i in range(self.num_nodes)]
        for _ in range(self.num_rounds):
            for i, model in enumerate(models):
                self._fit_federated(model, i, loaders[i], epochs=1)
        for node in nodes:
            node.leave()
        return models

    def _train_federated_models_concurrently(self, models: list[keras.Model]) -> list[keras.Model]:
        self._make_callbacks(self._make_nodes(separate_handles=True), self.x_test, self.y_test)
        loaders = [self.get_train_dataloader_for_node(i) for i in range(self.num_nodes)]
        with ThreadPoolExecutor(max_workers=self.num_nodes) as pool:
            futures = [
                pool.submit(self._fit_federated, model, i, loaders[i], self.num_rounds)
                for i, model in enumerate(models)
            ]
            for future in futures:
                future.result()
        return models

    def _train_federated_models_pseudo_concurrently(self, models: list[keras.Model]) -> list[keras.Model]:
        held_out = self.test_steps * self.batch_size
        nodes = self._make_nodes(separate_handles=False)
        self._make_callbacks(nodes, self.x_test[:held_out], self.y_test[:held_out], one_fit=False)
        loaders = [self.get_train_dataloader_for_node(i) for i in range(self.num_nodes)]
        # Node i's j-th epoch "starts" at j + i * lag; run them in that order, one epoch at a time.
        schedule = sorted((j + i * self.lag, i) for i in range(self.num_nodes) for j in range(self.num_rounds))
        for _, i in schedule:
            self._fit_federated(models[i], i, loaders[i], epochs=1)
        for node in nodes:
            node.leave()
        return models

    def evaluate_models(self, models: list[keras.Model]) -> list[float]:
        """Test accuracy of each model on the first ``test_steps`` batches of the (all-class) test set."""
        accuracies = []
        for model in models:
            results = model.evaluate(
                self.x_test,
                self.y_test,
                batch_size=self.batch_size,
                steps=self.test_steps,
                return_dict=True,
                verbose=self.verbose,
            )
            accuracies.append(float(results.get("accuracy", list(results.values())[-1])))
        return accuracies
