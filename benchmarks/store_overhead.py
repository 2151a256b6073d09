"""Federation overhead of an async node against raw boto3, on a local S3 server (moto).

Five async nodes share one experiment on a moto server on 127.0.0.1; each
"epoch" every node perturbs its 10M-parameter float32 model and federates.
For node 0 we time the whole federation step (encode + PUT + LIST + GET of the
changed peers + validation + aggregation) and, in the same run, the floor:
boto3 ``put_object`` of the same number of bytes plus ``get_object`` of each
changed peer's object. We print the ratio, requests per node-epoch, and peak
memory (tracemalloc) per step relative to the model size; JSON and a PNG go
to benchmarks/results/.

    python benchmarks/store_overhead.py [--params 10000000] [--nodes 5] [--epochs 6] [--backend boto3|fsspec]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_model(num_params: int, seed: int) -> list[np.ndarray]:
    """A few large tensors and a few small ones, like a real network."""
    rng = np.random.default_rng(seed)
    big = num_params // 4
    sizes = [big, big, big, num_params - 3 * big - 3000, 1000, 1000, 1000]
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backend", choices=["boto3", "fsspec"], default="boto3")
    parser.add_argument(
        "--peer-cache",
        choices=["disk", "memory"],
        default="disk",
        help="where node 0 keeps its peers' weights (disk: memory-mapped temp files)",
    )
    args = parser.parse_args()

    import os

    import boto3

    from flwr_serverless import AsyncFederatedNode, open_store

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        raw = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        for _ in range(200):  # until the server answers
            try:
                raw.create_bucket(Bucket=bucket)
                break
            except Exception:
                time.sleep(0.05)
        url = f"s3://{bucket}/overhead"
        nodes = [
            AsyncFederatedNode(
                open_store(url, endpoint_url=endpoint, backend=args.backend),
                node_id=f"node-{i}",
                peer_cache=args.peer_cache,
            )
            for i in range(args.nodes)
        ]
        models = [make_model(args.params, seed=i) for i in range(args.nodes)]
        model_bytes = sum(a.nbytes for a in models[0])
        for node, model in zip(nodes, models):  # everyone has published once
            node.update_parameters(model, 100, 0)

        fed_times: list[float] = []
        floor_times: list[float] = []
        requests: list[int] = []
        changed: list[int] = []
        peaks: list[float] = []
        payload = bytes(model_bytes + 4096)  # same size as one object (header is < 4 KiB)
        for epoch in range(1, args.epochs + 1):
            for i, node in enumerate(nodes):
                models[i] = [a + np.float32(1e-3) for a in models[i]]
                if i != 0:
                    node.update_parameters(models[i], 100, epoch)
                    continue
                measure_memory = epoch == args.epochs
                before = node.store.stats.requests
                if measure_memory:
                    tracemalloc.start()
                start = time.perf_counter()
                models[0], _ = node.update_parameters(models[0], 100, epoch)
                elapsed = time.perf_counter() - start
                if measure_memory:
                    peaks.append(tracemalloc.get_traced_memory()[1] / model_bytes)
                    tracemalloc.stop()
                else:
                    fed_times.append(elapsed)
                requests.append(node.store.stats.requests - before)
                changed.append(args.nodes - 1)

                start = time.perf_counter()
                raw.put_object(Bucket=bucket, Key="floor/object", Body=payload)
                for peer in range(1, args.nodes):
                    raw.get_object(Bucket=bucket, Key=f"overhead/nodes/node-{peer}")["Body"].read()
                floor_times.append(time.perf_counter() - start)
        floor_times = floor_times[: len(fed_times)]
    finally:
        server.terminate()
        server.wait()

    fed = statistics.median(fed_times)
    floor = statistics.median(floor_times)
    result = {
        "backend": args.backend,
        "peer_cache": args.peer_cache,
        "params": args.params,
        "model_mb": model_bytes / 1e6,
        "nodes": args.nodes,
        "epochs_timed": len(fed_times),
        "federation_s_median": fed,
        "floor_s_median": floor,
        "ratio": fed / floor,
        "requests_per_node_epoch": statistics.median(requests),
        "changed_peers_per_epoch": statistics.median(changed),
        "request_budget": 2 + statistics.median(changed),
        "peak_memory_x_model": max(peaks) if peaks else None,
        "federation_s_all": fed_times,
        "floor_s_all": floor_times,
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"store_overhead_{args.backend}" + ("" if args.peer_cache == "disk" else f"_{args.peer_cache}_cache")
    result["name"] = name
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(
        f"model {result['model_mb']:.0f} MB, {args.nodes} async nodes, backend {args.backend}, "
        f"peer cache {args.peer_cache}, moto server process on 127.0.0.1"
    )
    print(f"federation step (median of {len(fed_times)}): {fed:.3f} s")
    print(f"floor, raw boto3 PUT + {args.nodes - 1} GETs:     {floor:.3f} s")
    print(f"ratio: {fed / floor:.2f}  (target <= 1.5)")
    print(
        f"store requests per node-epoch: {result['requests_per_node_epoch']:.0f} "
        f"(budget 2 + {result['changed_peers_per_epoch']:.0f} changed peers)"
    )
    print(f"peak traced memory during a step: {result['peak_memory_x_model']:.2f} x model size (target < 4)")
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([result["floor_s_all"], result["federation_s_all"]])
    ax.set_xticks([1, 2], ["raw boto3 floor", f"flwr-serverless ({result['backend']})"])
    ax.set_ylabel("seconds per node-epoch")
    ax.set_title(f"{result['model_mb']:.0f} MB model, {result['nodes']} nodes: ratio {result['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{result['name']}.png", dpi=120)


if __name__ == "__main__":
    main()
