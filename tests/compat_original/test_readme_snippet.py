"""The usage snippet of the original flwr-serverless README (v0.2.10) runs unchanged on this package.

``SNIPPET`` is copied verbatim from that README (MIT, Copyright (c) Kungfu AI; see NOTICE.md).
It leaves ``steps_per_epoch``, ``batch_size``, ``keras`` and ``dataset`` to the reader and
writes ``keras.Model(...)`` / ``model.compile(...)`` as placeholders; the test supplies
those names (a small model whose ``compile(...)`` fills in a loss) and nothing else.
Two nodes run it one after the other on the same S3 prefix, so the second federates: the first left
when its fit ended, moments before, well within its member lease (it belongs to the same run).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import boto3
import keras
import numpy as np
import pytest
import tensorflow as tf

from flwr_serverless.wire.codec import decode

SNIPPET = """
# Create a FL Node that has a strategy and a shared folder.
from flwr.server.strategy import FedAvg  # This is a flwr federated strategy.
from flwr_serverless import AsyncFederatedNode, S3Folder
from flwr_serverless.keras import FlwrFederatedCallback

strategy = FedAvg()
shared_folder = S3Folder(directory="mybucket/experiment1")
node = AsyncFederatedNode(strategy=strategy, shared_folder=shared_folder)

# Create a keras Callback with the FL node.
num_examples_per_epoch = steps_per_epoch * batch_size # number of examples used in each epoch
callback = FlwrFederatedCallback(
    node,
    num_examples_per_epoch=num_examples_per_epoch,
    save_model_before_aggregation=False,
    save_model_after_aggregation=False,
)

# Join the federated learning, by fitting the model with the federated callback.
model = keras.Model(...)
model.compile(...)
model.fit(dataset, callbacks=[callback])
"""


class PlaceholderModel(keras.Sequential):
    """What the README's ``keras.Model(...)`` stands for; ``compile(...)`` picks a loss for it."""

    def compile(self, *args: Any, **kwargs: Any) -> None:
        if args == (Ellipsis,):
            args, kwargs = (), {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
        super().compile(*args, **kwargs)


def _placeholders(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    batch_size, steps_per_epoch = 8, 4
    x = rng.normal(size=(batch_size * steps_per_epoch, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")

    def model_factory(*_: Any) -> keras.Model:
        return PlaceholderModel([keras.Input((6,)), keras.layers.Dense(2, activation="softmax")])

    return {
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size),
        "keras": SimpleNamespace(Model=model_factory),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # options the callback may announce, fit's shuffle note
def test_original_readme_snippet_runs_unchanged(moto_s3: Any) -> None:
    boto3.client("s3").create_bucket(Bucket="mybucket")
    runs = []
    for seed in range(2):
        namespace = _placeholders(seed)
        exec(compile(SNIPPET, "flwr_serverless-0.2.10-README.md", "exec"), namespace)
        runs.append(namespace)
    first, second = runs[0]["node"], runs[1]["node"]
    assert first.node_id != second.node_id
    assert first.stats.peers_used == 0 and second.stats.peers_used == 1  # the second pulled the first's weights
    stored = boto3.client("s3").list_objects_v2(Bucket="mybucket", Prefix="experiment1/nodes/")
    assert sorted(obj["Key"] for obj in stored["Contents"]) == sorted(
        f"experiment1/nodes/{node.node_id}" for node in (first, second)
    )
    # The second model continues from the mean of both published objects (equal example counts).
    folder = runs[1]["shared_folder"]
    published = [decode(folder[f"nodes/{node.node_id}"], node.node_id).arrays for node in (first, second)]
    for got, a, b in zip(runs[1]["model"].get_weights(), *published, strict=True):
        np.testing.assert_allclose(got, (a.astype("float64") + b) / 2, rtol=1e-6, atol=1e-7)
    assert not np.allclose(published[0][0], published[1][0])  # the two nodes did differ
