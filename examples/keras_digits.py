"""Federate 2-3 Keras nodes (threads) on label-skewed digits through any store URL.

    python examples/keras_digits.py --store /tmp/x --nodes 2 --epochs 15
    python examples/keras_digits.py --store s3://bucket/exp1 --mode sync

On real machines each node runs this same training code on its own data; only
the store URL is shared.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.keras import FlwrFederatedCallback
from flwr_serverless.simulation.data import load_dataset, partition_label_skew


def build_model() -> keras.Model:
    keras.utils.set_random_seed(0)  # every node starts from the same weights
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="store URL (default: a new temp folder)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--mode", choices=["async", "sync"], default="async")
    parser.add_argument("--mu", type=float, default=0.0, help="FedProx proximal_mu (0: plain FedAvg)")
    args = parser.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="flwr-keras-")

    x_train, y_train, x_test, y_test = load_dataset("digits")
    parts = partition_label_skew(y_train, args.nodes, skew=0.9, seed=0)
    models = [build_model() for _ in range(args.nodes)]  # built up front: Keras' seeding is global
    accuracy: dict[int, float] = {}

    def run(i: int) -> None:
        if args.mode == "sync":
            node = SyncFederatedNode(store, num_nodes=args.nodes, node_id=f"node-{i}")
        else:
            node = AsyncFederatedNode(store, node_id=f"node-{i}")
        model = models[i]
        model.fit(
            x_train[parts[i]],
            y_train[parts[i]],
            epochs=args.epochs,
            batch_size=32,
            verbose=0,
            callbacks=[FlwrFederatedCallback(node, proximal_mu=args.mu)],
        )  # the one line
        accuracy[i] = float(model.evaluate(x_test, y_test, verbose=0)[1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"store: {store}")
    for i in sorted(accuracy):
        print(f"node-{i}: test accuracy {accuracy[i]:.3f}")


if __name__ == "__main__":
    main()
