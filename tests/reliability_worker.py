"""Subprocess bodies for tests/test_reliability.py (run with ``python tests/reliability_worker.py MODE ...``).

``train``: one async node doing numpy-only "training" for N epochs, writing a JSON result.
``write``: rewrite one large object forever (the parent kills it with SIGKILL mid-write).
``join``: claim a node id and exit (a crashed owner that left its member object behind).
"""

from __future__ import annotations

import json
import sys
import traceback

import numpy as np


def _arrays(params: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    first = params // 2
    return [rng.standard_normal(first).astype(np.float32), rng.standard_normal((params - first,)).astype(np.float32)]


def train(url: str, options: str, node_id: str, epochs: int, params: int, out: str) -> None:
    from flwr_serverless import AsyncFederatedNode

    result: dict = {"node_id": node_id, "epochs": 0, "error": None}
    try:
        node = AsyncFederatedNode(url, node_id=node_id, storage_options=json.loads(options))
        weights = _arrays(params, seed=sum(node_id.encode()))
        target = _arrays(params, seed=7)
        for epoch in range(epochs):
            weights = [w - 0.1 * (w - t) for w, t in zip(weights, target)]  # one "epoch" of local training
            weights, _ = node.update_parameters(weights, num_examples=10, epoch=epoch)
            if any(not np.isfinite(w).all() for w in weights):
                raise AssertionError("non-finite weights after aggregation")
            result["epochs"] = epoch + 1
        result.update(
            rejected=node.stats.rejected,
            rejections=node.stats.rejections,
            store_failures=node.stats.store_failures,
            peers_used=node.stats.peers_used,
        )
    except BaseException:  # the parent asserts nothing escaped
        result["error"] = traceback.format_exc()
    with open(out, "w") as handle:
        json.dump(result, handle)


def write(url: str, options: str, key: str, params: int) -> None:
    from flwr_serverless.stores import open_store
    from flwr_serverless.wire.codec import UpdateHeader, encode, encode_parts

    store = open_store(url, **json.loads(options))
    epoch = 0
    while True:
        arrays = _arrays(params, seed=epoch)
        header = UpdateHeader(node_id=key.rsplit("/", 1)[-1], epoch=epoch)
        # Alternately one joined object and the list of buffers nodes write (both are temp + rename).
        store.put(key, encode(arrays, header) if epoch % 2 else encode_parts(arrays, header))
        print(epoch, flush=True)
        epoch += 1


def join(url: str, node_id: str) -> None:
    from flwr_serverless import AsyncFederatedNode

    node = AsyncFederatedNode(url, node_id=node_id)
    node.update_parameters([np.zeros(3, np.float32)], num_examples=1)
    print(node.owner_token, flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "train":
        train(args[0], args[1], args[2], int(args[3]), int(args[4]), args[5])
    elif mode == "write":
        write(args[0], args[1], args[2], int(args[3]))
    elif mode == "join":
        join(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
