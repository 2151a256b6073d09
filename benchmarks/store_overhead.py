"""Federation overhead of an async node against raw boto3, on a local S3 server (moto or SeaweedFS).

Five async nodes share one experiment on a moto server on 127.0.0.1; each
"epoch" every node perturbs its 10M-parameter float32 model and federates.
For node 0 we time the whole federation step (encode + PUT + LIST + GET of the
changed peers + validation + aggregation) and, in the same run, the floor:
boto3 ``put_object`` of the same number of bytes plus ``get_object`` of each
changed peer's object, one after the other, and a parallel floor (the PUT
beside the GETs, 8 at a time, as the node does; the fair floor behind a
per-stream bandwidth cap). We print the ratios, requests per node-epoch, and
peak memory (tracemalloc) per step relative to the model size; JSON and a PNG
go to benchmarks/results/. ``--latency-ms``/``--bandwidth-mbps`` put the
shaping proxy between every client (nodes and floor) and the server.

    python benchmarks/store_overhead.py [--params 10000000] [--nodes 5] [--epochs 6] [--backend boto3|fsspec]
        [--server moto|seaweedfs] [--latency-ms 20 --bandwidth-mbps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))

from s3_setup import add_server_arguments, load_average, s3_endpoint, shaped  # noqa: E402

MAX_PARALLEL_GETS = 8  # as the node's exchange: the parallel floor uses the same concurrency


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
    add_server_arguments(parser)
    parser.add_argument("--out", default=None, help="results name (default store_overhead_<backend>[_shaped])")
    args = parser.parse_args()

    from flwr_serverless import AsyncFederatedNode, open_store

    load_start = load_average()
    with s3_endpoint(args) as (endpoint, setup_client, store_description, proxy):
        raw = _raw_client(endpoint)  # the floor's client talks through the same proxy as the nodes
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        setup_client.create_bucket(Bucket=bucket)
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
        parallel_floor_times: list[float] = []
        requests: list[int] = []
        changed: list[int] = []
        peaks: list[float] = []
        payload = bytes(model_bytes + 4096)  # same size as one object (header is < 4 KiB)
        peer_keys = [f"overhead/nodes/node-{peer}" for peer in range(1, args.nodes)]
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
                for key in peer_keys:
                    raw.get_object(Bucket=bucket, Key=key)["Body"].read()
                floor_times.append(time.perf_counter() - start)
                parallel_floor_times.append(_parallel_floor(raw, bucket, payload, peer_keys))
        floor_times = floor_times[: len(fed_times)]
        parallel_floor_times = parallel_floor_times[: len(fed_times)]
        proxy_stats = proxy.stats() if proxy is not None else None

    fed = statistics.median(fed_times)
    floor = statistics.median(floor_times)
    parallel_floor = statistics.median(parallel_floor_times)
    result: dict[str, Any] = {
        "backend": args.backend,
        "peer_cache": args.peer_cache,
        "params": args.params,
        "model_mb": model_bytes / 1e6,
        "nodes": args.nodes,
        "epochs_timed": len(fed_times),
        "federation_s_median": fed,
        "floor_s_median": floor,
        "ratio": fed / floor,
        "parallel_floor_s_median": parallel_floor,
        "ratio_vs_parallel_floor": fed / parallel_floor,
        "store": f"{store_description}, {args.backend}",
        "server": args.server,
        "latency_ms": args.latency_ms,
        "bandwidth_mbps_per_stream": args.bandwidth_mbps,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "cpu": f"{os.cpu_count()} cores shared with other jobs",
        "proxy_stats": proxy_stats,
        "requests_per_node_epoch": statistics.median(requests),
        "changed_peers_per_epoch": statistics.median(changed),
        "request_budget": 2 + statistics.median(changed),
        "peak_memory_x_model": max(peaks) if peaks else None,
        "federation_s_all": fed_times,
        "floor_s_all": floor_times,
        "parallel_floor_s_all": parallel_floor_times,
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.out or (
        f"store_overhead_{args.backend}"
        + ("" if args.peer_cache == "disk" else f"_{args.peer_cache}_cache")
        + ("_shaped" if shaped(args) else "")
    )
    result["name"] = name
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(
        f"model {result['model_mb']:.0f} MB, {args.nodes} async nodes, backend {args.backend}, "
        f"peer cache {args.peer_cache}, {store_description}"
    )
    print(f"federation step (median of {len(fed_times)}): {fed:.3f} s")
    print(f"floor, raw boto3 PUT + {args.nodes - 1} GETs:     {floor:.3f} s")
    print(f"floor, raw boto3 PUT beside {args.nodes - 1} GETs, {MAX_PARALLEL_GETS} at a time: {parallel_floor:.3f} s")
    print(f"ratio: {fed / floor:.2f} (vs parallel floor {fed / parallel_floor:.2f}; target <= 1.5)")
    print(
        f"store requests per node-epoch: {result['requests_per_node_epoch']:.0f} "
        f"(budget 2 + {result['changed_peers_per_epoch']:.0f} changed peers)"
    )
    print(f"peak traced memory during a step: {result['peak_memory_x_model']:.2f} x model size (target < 4)")
    plot(result)


def _raw_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _parallel_floor(raw: Any, bucket: str, payload: bytes, keys: list[str]) -> float:
    """The floor with the node's concurrency: the PUT beside the GETs, ``MAX_PARALLEL_GETS`` GETs at a time.

    Behind a per-stream bandwidth cap a sequential floor is slower than a node that
    overlaps its requests, so the ratio that matters there is against this one.
    """
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as uploader, ThreadPoolExecutor(max_workers=MAX_PARALLEL_GETS) as pool:
        put = uploader.submit(raw.put_object, Bucket=bucket, Key="floor/object", Body=payload)
        raw.list_objects_v2(Bucket=bucket, Prefix="overhead/nodes/")
        for body in pool.map(lambda key: raw.get_object(Bucket=bucket, Key=key)["Body"].read(), keys):
            assert len(body) > 0
        put.result()
    return time.perf_counter() - start


def markdown_table(results: dict[str, Any] | list[dict[str, Any]]) -> str:
    """One row per results file (a dict, or a list of them): the docs' tables are generated from this."""
    rows = results if isinstance(results, list) else [results]
    lines = [
        "| server | shaping | backend | model MB | nodes | federation s (median) | sequential floor s | ratio | "
        "parallel floor s | ratio vs parallel floor | requests / node-epoch | load average (1, 5, 15 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        parallel = r.get("parallel_floor_s_median")
        load = r.get("load_average_end")
        shaping = (
            f"{r['latency_ms']:g} ms/request, {r['bandwidth_mbps_per_stream']:g} MB/s/stream"
            if r.get("latency_ms") or r.get("bandwidth_mbps_per_stream")
            else "none"
        )
        lines.append(
            f"| {r.get('server', 'moto')} | {shaping} | {r['backend']} | {r['model_mb']:.0f} | {r['nodes']} | "
            f"{r['federation_s_median']:.3f} | {r['floor_s_median']:.3f} | {r['ratio']:.2f} | "
            + (f"{parallel:.3f} | {r['ratio_vs_parallel_floor']:.2f} | " if parallel is not None else "- | - | ")
            + f"{r['requests_per_node_epoch']:g} | {', '.join(f'{x:g}' for x in load) if load else '-'} |"
        )
    return "\n".join(lines)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    series = [result["floor_s_all"], result["federation_s_all"]]
    labels = ["raw boto3 floor", f"flwr-serverless ({result['backend']})"]
    if result.get("parallel_floor_s_all"):
        series.insert(1, result["parallel_floor_s_all"])
        labels.insert(1, "raw boto3, parallel")
    ax.boxplot(series)
    ax.set_xticks(list(range(1, len(series) + 1)), labels)
    ax.set_ylabel("seconds per node-epoch")
    shaping = (
        f", {result['latency_ms']:g} ms/request, {result['bandwidth_mbps_per_stream']:g} MB/s/stream"
        if result.get("latency_ms") or result.get("bandwidth_mbps_per_stream")
        else ""
    )
    ax.set_title(
        f"{result['model_mb']:.0f} MB model, {result['nodes']} nodes{shaping}: ratio {result['ratio']:.2f}"
        + (f" (parallel floor {result['ratio_vs_parallel_floor']:.2f})" if "ratio_vs_parallel_floor" in result else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(RESULTS / f"{result['name']}.png", dpi=120)


if __name__ == "__main__":
    main()
