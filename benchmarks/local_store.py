"""Federation overhead on a local-folder store against raw file I/O of the same bytes, in the same run.

The local store is what the demo, the threaded simulation and HPC shared
filesystems (NFS, Lustre) use. Two cases, 10M float32 parameters x 5 nodes by
default, all nodes in this process:

* async: each "epoch" every node perturbs its model and federates; node 0's
  federation step is timed. Floor, right after it: write the same number of
  bytes to a temp file in the store's folder and ``os.replace`` it, then read
  each changed peer's object file. Run twice: unsigned (peers are mapped where
  they lie) and signed (``secret=``: peers are validated in a private copy).
* sync: the nodes federate one round in threads (a barrier per round); the
  round is timed from release to the last node's return. Floor, right after
  it: the same threads each write their bytes (temp + rename), meet at a
  barrier, and read every other node's file.

Medians over the timed epochs/rounds; ratios are taken against the floor of the
same run. JSON and a PNG go to benchmarks/results/local_store.json|png.

    python benchmarks/local_store.py [--params 10000000] [--nodes 5] [--epochs 6] [--rounds 5] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def make_model(num_params: int, seed: int) -> list[np.ndarray]:
    """A few large tensors and a few small ones, like a real network."""
    rng = np.random.default_rng(seed)
    big = num_params // 4
    sizes = [big, big, big, num_params - 3 * big - 3000, 1000, 1000, 1000]
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


def raw_write(folder: str, name: str, payload: bytes) -> None:
    """The floor of a publish: one temp file, one rename (what any atomic writer must do)."""
    tmp = os.path.join(folder, f".raw-{name}-{threading.get_ident()}")
    with open(tmp, "wb", buffering=0) as handle:
        handle.write(payload)
    os.replace(tmp, os.path.join(folder, name))


def raw_read(path: str) -> int:
    with open(path, "rb", buffering=0) as handle:
        return len(handle.read())


def object_size(root: str, key: str) -> int:
    return os.path.getsize(os.path.join(root, *key.split("/")))


def run_async(root: str, params: int, nodes: int, epochs: int, secret: str | None = None) -> dict:
    from flwr_serverless import AsyncFederatedNode

    case = "async" if secret is None else "async-signed"
    store_dir = os.path.join(root, case)
    floor_dir = os.path.join(root, f"{case}-floor")
    os.makedirs(floor_dir)
    fleet = [AsyncFederatedNode(store_dir, node_id=f"node-{i}", secret=secret) for i in range(nodes)]
    models = [make_model(params, seed=i) for i in range(nodes)]
    for node, model in zip(fleet, models):  # everyone has published once
        node.update_parameters(model, 100, 0)
    payload = bytes(object_size(store_dir, "nodes/node-0"))
    peer_paths = [os.path.join(store_dir, "nodes", f"node-{i}") for i in range(1, nodes)]
    fed: list[float] = []
    floor: list[float] = []
    for epoch in range(1, epochs + 1):
        for i, node in enumerate(fleet):
            models[i] = [a + np.float32(1e-3) for a in models[i]]
            if i != 0:
                node.update_parameters(models[i], 100, epoch)
                continue
            start = time.perf_counter()
            models[0], _ = node.update_parameters(models[0], 100, epoch)
            fed.append(time.perf_counter() - start)
            start = time.perf_counter()
            raw_write(floor_dir, "object", payload)
            for path in peer_paths:
                raw_read(path)
            floor.append(time.perf_counter() - start)
    return summarise(case, fed, floor, params, nodes)


def threaded(count: int, work: Callable[[int], None]) -> float:
    """Run ``work(i)`` in ``count`` threads released together; seconds until the last one returns."""
    start_line = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        start_line.wait()
        try:
            work(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def run_sync(root: str, params: int, nodes: int, rounds: int) -> dict:
    from flwr_serverless import SyncFederatedNode

    store_dir = os.path.join(root, "sync")
    floor_dir = os.path.join(root, "sync-floor")
    os.makedirs(floor_dir)
    fleet = [SyncFederatedNode(store_dir, node_id=f"node-{i}", num_nodes=nodes, timeout=300) for i in range(nodes)]
    models = [make_model(params, seed=i) for i in range(nodes)]

    def federate(i: int) -> None:
        models[i] = [a + np.float32(1e-3) for a in models[i]]
        models[i], _ = fleet[i].update_parameters(models[i], 100, fleet[i].round)

    threaded(nodes, federate)  # round 0: joining, first objects
    from flwr_serverless.wire import layout

    size = object_size(store_dir, layout.round_key(0, "node-0"))
    payloads = [bytes(size) for _ in range(nodes)]
    floor_barrier = threading.Barrier(nodes)

    def raw_round(i: int) -> None:
        raw_write(floor_dir, f"node-{i}", payloads[i])
        floor_barrier.wait()
        for j in range(nodes):
            if j != i:
                raw_read(os.path.join(floor_dir, f"node-{j}"))

    fed: list[float] = []
    floor: list[float] = []
    per_node: list[float] = []
    for _ in range(rounds):
        fed.append(threaded(nodes, federate))
        floor.append(threaded(nodes, raw_round))
        start = time.perf_counter()  # one node alone: what the issue quoted as "per node"
        raw_write(floor_dir, "node-0", payloads[0])
        for j in range(1, nodes):
            raw_read(os.path.join(floor_dir, f"node-{j}"))
        per_node.append(time.perf_counter() - start)
    result = summarise("sync", fed, floor, params, nodes)
    result["floor_one_node_s_median"] = statistics.median(per_node)
    return result


def summarise(case: str, fed: list[float], floor: list[float], params: int, nodes: int) -> dict:
    return {
        "case": case,
        "params": params,
        "model_mb": params * 4 / 1e6,
        "nodes": nodes,
        "federation_s_median": statistics.median(fed),
        "floor_s_median": statistics.median(floor),
        "ratio": statistics.median(fed) / statistics.median(floor),
        "federation_s_all": fed,
        "floor_s_all": floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6, help="timed async epochs")
    parser.add_argument("--rounds", type=int, default=5, help="timed sync rounds")
    parser.add_argument("--dir", default=None, help="folder for the stores (default: the system temp dir)")
    parser.add_argument("--case", choices=["all", "async", "async-signed", "sync"], default="all")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="flwr-local-bench-") as root:
        if args.case in ("all", "async"):
            results.append(run_async(root, args.params, args.nodes, args.epochs))
        if args.case in ("all", "async-signed"):
            results.append(run_async(root, args.params, args.nodes, args.epochs, secret="benchmark-secret"))
        if args.case in ("all", "sync"):
            results.append(run_sync(root, args.params, args.nodes, args.rounds))
    targets = {"async": 1.5, "async-signed": 1.5, "sync": 2.0}
    for r in results:
        extra = (
            f"; one node's write + reads alone {r['floor_one_node_s_median']:.3f} s"
            if "floor_one_node_s_median" in r
            else ""
        )
        print(
            f"{r['case']:12}  {r['model_mb']:.0f} MB x {r['nodes']} nodes: "
            f"federation {r['federation_s_median']:.3f} s, "
            f"raw floor {r['floor_s_median']:.3f} s, ratio {r['ratio']:.2f} (target <= {targets[r['case']]})"
            f"{extra}"
        )
    if args.case == "all":
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "local_store.json").write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2))
        plot(results)


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5))
    for ax, r in zip(np.atleast_1d(axes), results):
        ax.boxplot([r["floor_s_all"], r["federation_s_all"]])
        ax.set_xticks([1, 2], ["raw write + reads", "flwr-serverless"])
        ax.set_ylabel("seconds per round" if r["case"] == "sync" else "seconds per epoch")
        ax.set_title(f"{r['case']}, {r['model_mb']:.0f} MB x {r['nodes']}: ratio {r['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / "local_store.png", dpi=120)


if __name__ == "__main__":
    main()
