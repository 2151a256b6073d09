"""O(1) reads per node-epoch: the aggregate mode against all-peers FedAvgAsync, N = 5, 20, 50, 100 nodes.

Every node is a thread with its own boto3 store handle on an S3 server
running as a separate process on 127.0.0.1 (moto, or SeaweedFS with
``--server seaweedfs``; conditional writes decided atomically, as on S3),
optionally through the shaping proxy (``--latency-ms``, ``--bandwidth-mbps``).
Each node "trains" for ``--epoch-seconds`` (+-20%, a sleep), then federates
a ``--params`` float32 model; ``--epochs`` times.
Per mode and N it reports, over the steady-state epochs (the first, which
also claims ``members/<id>``, is reported apart): HTTP requests (412s included) and bytes down per
node-epoch (mean and max; bytes in model sizes, so the floor is 1 for the
aggregate mode, one GET of one model, and N-1 for all-peers), the seconds of a
federation call, and for the aggregate mode the compare-and-swap conflict rate
(412s per write attempt), the epochs deferred after ``max_attempts``, and the
largest relative difference between the final aggregate and an exact FedAvg of
the contributions its table names. A contention sweep runs the aggregate mode
at the largest N with shorter epochs. JSON and a PNG go to benchmarks/results/
(``--append`` merges a run into an existing results file, one N at a time).

    python benchmarks/aggregate_mode.py [--nodes 5,20,50,100] [--params 10000] [--epochs 4] [--epoch-seconds 5]
        [--server moto|seaweedfs] [--latency-ms 20 --bandwidth-mbps 100] [--out NAME] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))

from s3_setup import add_server_arguments, load_average, s3_endpoint, shaped  # noqa: E402


def run(
    mode: str, n: int, args: argparse.Namespace, epoch_seconds: float, endpoint: str, client: Any
) -> dict[str, Any]:
    from flwr_serverless import AggregateFederatedNode, AsyncFederatedNode, open_store

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/{mode}-{n}"

    listed: dict[str, int] = {}  # bytes of LIST answers per node (the store counts GET bytes only)

    def make(i: int) -> Any:
        store = open_store(url, endpoint_url=endpoint, backend="boto3")
        node_id = f"n{i:03d}"
        listed[node_id] = 0

        def count(http_response: Any, **_: Any) -> None:
            listed[node_id] += len(http_response.content or b"")

        store.client.meta.events.register("after-call.s3.ListObjectsV2", count)
        if mode == "aggregate":
            return AggregateFederatedNode(store, node_id=node_id, seed=i, helping=args.helping == "on")
        return AsyncFederatedNode(store, node_id=node_id)

    nodes = [make(i) for i in range(n)]
    model_bytes = 4 * args.params
    rows: list[dict[str, Any]] = []
    last: dict[str, tuple[list[np.ndarray], int]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(index: int, node: Any) -> None:
        rng = np.random.default_rng(index)
        pace = random.Random(index)
        weights = [rng.standard_normal(args.params - 100).astype(np.float32), np.zeros(100, np.float32)]
        count = 50 + index
        try:
            for epoch in range(args.epochs):
                time.sleep(epoch_seconds * pace.uniform(0.8, 1.2))
                weights = [w + rng.standard_normal(w.shape).astype(np.float32) * 0.01 for w in weights]
                before, stats = node.store.stats.as_dict(), node.stats.as_dict()
                helping, list_bytes = _helping(node), listed[node.node_id]
                started = time.perf_counter()
                node.update_parameters(weights, count, epoch=epoch)
                seconds = time.perf_counter() - started
                after, later = node.store.stats.as_dict(), node.stats.as_dict()
                helped = _helping(node)
                with lock:
                    rows.append(
                        {
                            "epoch": epoch,
                            "seconds": seconds,
                            **{k: after[k] - before[k] for k in ("requests", "gets", "puts", "lists")},
                            "bytes_down": after["bytes_down"]
                            - before["bytes_down"]
                            + listed[node.node_id]
                            - list_bytes,
                            **{k: later[k] - stats[k] for k in ("cas_conflicts", "cas_giveups", "repairs")},
                            **{k: helped[k] - helping[k] for k in helped},
                        }
                    )
                    last[node.node_id] = ([np.array(w) for w in weights], count)
        except BaseException as exc:  # reported below
            errors.append(exc)

    load_before = load_average()
    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i, node), daemon=True) for i, node in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.epochs * (epoch_seconds * 1.2 + 600))
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"{mode} N={n}: {errors[:1] or 'a node thread did not finish'}")
    steady = [r for r in rows if r["epoch"] > 0]
    first = [r for r in rows if r["epoch"] == 0]
    result: dict[str, Any] = {
        "mode": mode,
        "nodes": n,
        "epoch_seconds": epoch_seconds,
        "epochs": args.epochs,
        "model_bytes": model_bytes,
        "load_average_before": load_before,
        "wall_time": time.monotonic() - started,
        # HTTP requests: the store counts those that succeeded; each lost compare-and-swap (412) is one more.
        "requests_mean": statistics.fmean(r["requests"] + r["cas_conflicts"] for r in steady),
        "requests_max": max(r["requests"] + r["cas_conflicts"] for r in steady),
        "first_epoch_requests_mean": statistics.fmean(r["requests"] + r["cas_conflicts"] for r in first),
        "models_down_mean": statistics.fmean(r["bytes_down"] for r in steady) / model_bytes,
        "models_down_max": max(r["bytes_down"] for r in steady) / model_bytes,
        "seconds_median": statistics.median(r["seconds"] for r in steady),
        "seconds_p95": float(np.percentile([r["seconds"] for r in steady], 95)),
        "node_epochs": len(steady),
        "load_average_after": load_average(),
    }
    if mode == "aggregate":
        conflicts = sum(r["cas_conflicts"] for r in rows)
        writes = len(rows) - sum(r["cas_giveups"] for r in rows) + conflicts
        checked = check_aggregate(nodes[0], last)
        # Changes still pending when the run ends: folded by a helper if the final table names them.
        final = checked.pop("table")
        ends = [
            final.get(node.node_id) is not None and final[node.node_id].payload_hash == ref.new
            for node in nodes
            for ref in node.helper.own.values()
        ]
        result.update(
            conflict_rate=conflicts / writes,
            lost_all_attempts=sum(r["cas_giveups"] for r in rows),
            folded_by_helper=sum(r.get("folded_by_helper", 0) for r in rows) + sum(ends),
            folded_for_others=sum(r.get("folded_for_others", 0) for r in rows),
            deferred_epochs=sum(r.get("deferred", 0) for r in rows) + len(ends) - sum(ends),
            list_bytes_mean=statistics.fmean(listed.values()) / args.epochs,
            repairs=sum(r["repairs"] for r in rows),
            node_epochs_all=len(rows),
            **checked,
        )
    for node in nodes:
        node.store.close()
    return result


def _helping(node: Any) -> dict[str, int]:
    stats = getattr(node, "helping_stats", None)
    return {} if stats is None else dict(vars(stats))


def check_aggregate(node: Any, last: dict[str, tuple[list[np.ndarray], int]]) -> dict[str, Any]:
    """The final aggregate against exact FedAvg of what its table names, and how many of those are the latest."""
    from flwr_serverless.modes.aggregate import TABLE, parse_table, rebuild, stored_specs
    from flwr_serverless.wire.codec import decode

    store = node.store
    decoded = decode(store.get("aggregate"), "aggregate", expected=stored_specs(node.exchange.expected))
    table = parse_table(decoded.header.extra[TABLE], "aggregate")
    named = {}
    latest = 0
    for member, entry in table.items():
        contribution = decode(store.get(f"contributions/{member}/{entry.slot}"), member)
        named[member] = (entry, list(contribution.arrays))
        arrays, _ = last[member]
        latest += all(np.array_equal(a, b) for a, b in zip(contribution.arrays, arrays))
    exact, _ = rebuild(named)
    error = max(
        float(np.max(np.abs(m - e)) / max(float(np.max(np.abs(e))), 1e-30)) for m, e in zip(decoded.arrays, exact)
    )
    return {
        "max_relative_error_vs_exact_fedavg": error,
        "members_in_table": len(table),
        "members_latest_folded": latest,
        "table": table,
    }


def plot(out: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, style in (("all-peers", "o-"), ("aggregate", "s-")):
        rows = [r for r in out["sweep"] if r["mode"] == mode]
        ns = [r["nodes"] for r in rows]
        axes[0].plot(ns, [r["requests_mean"] for r in rows], style, label=mode)
        axes[1].plot(ns, [r["models_down_mean"] for r in rows], style, label=mode)
        axes[2].plot(ns, [r["seconds_median"] for r in rows], style, label=mode)
    axes[0].axhline(10, color="gray", linestyle=":", label="10 requests")
    axes[1].axhline(3, color="gray", linestyle=":", label="3 models")
    for axis, label in zip(
        axes, ("requests per node-epoch", "models down per node-epoch", "seconds per federation (median)")
    ):
        axis.set_xlabel("nodes")
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    lengths = "/".join(f"{x:g}" for x in sorted({r["epoch_seconds"] for r in out["sweep"]}))
    fig.suptitle(
        f"Aggregate mode vs all-peers FedAvgAsync: {out['setup']['params']} params, "
        f"{lengths} s epochs (per N: see JSON), {out['setup'].get('store', 'moto S3')}, threads",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_table(results: dict[str, Any]) -> str:
    """The results file as a Markdown table (docs pages are generated from this, never typed)."""
    lines = [
        "| mode | N | epochs | requests / node-epoch (max) | models down / node-epoch (max) | s per federation "
        "(median, p95) | conflict rate | lost all attempts | folded by a helper | deferred | members in the final "
        "aggregate (with their latest) | load average before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [*results["sweep"], *results.get("contention", [])]:
        aggregate = r["mode"] == "aggregate"
        load = r.get("load_average_before")
        lines.append(
            f"| {r['mode']} ({r['epoch_seconds']:g} s epochs) | {r['nodes']} | "
            f"{r.get('epochs', results['setup']['epochs'])} | {r['requests_mean']:.2f} ({r['requests_max']}) | "
            f"{r['models_down_mean']:.2f} ({r['models_down_max']:.2f}) | "
            f"{r['seconds_median']:.3f}, {r['seconds_p95']:.3f} | {r.get('conflict_rate', 0):.2f} | "
            f"{r.get('lost_all_attempts', '-')} | {r.get('folded_by_helper', '-')} | "
            + (f"{r['deferred_epochs']} of {r['node_epochs_all']} | " if "node_epochs_all" in r else "- | ")
            + (
                f"{r['members_in_table']} of {r['nodes']} ({r['members_latest_folded']}) | "
                if aggregate and "members_in_table" in r
                else "- | "
            )
            + (f"{load[0]:g} |" if load else "- |")
        )
    return "\n".join(lines)


def _merge(path: Path, out: dict[str, Any]) -> dict[str, Any]:
    """``--append``: keep the rows of an earlier run in ``path`` that this run did not redo (same mode, N, epochs)."""
    if not path.exists():
        return out
    earlier = json.loads(path.read_text())

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["mode"], row["nodes"], row["epoch_seconds"]

    for part in ("sweep", "contention"):
        redone = {key(r) for r in out[part]}
        kept = [r for r in earlier.get(part, []) if key(r) not in redone]
        out[part] = sorted(
            [*kept, *out[part]], key=lambda r: (r["nodes"], r["mode"] != "all-peers", -r["epoch_seconds"])
        )
    out["runs"] = [*earlier.get("runs", [earlier["setup"]]), out["setup"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="5,20,50,100")
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--epoch-seconds", type=float, default=5.0)
    parser.add_argument("--contention", default="2,1,0.5", help="epoch seconds of the sweep at the largest N")
    parser.add_argument("--modes", default="all-peers,aggregate")
    parser.add_argument(
        "--helping",
        choices=("on", "off"),
        default="on",
        help="aggregate mode: fold one pending change of another member into each write",
    )
    add_server_arguments(parser)
    parser.add_argument("--out", default=None, help="results name (default aggregate_mode, _shaped when shaped)")
    parser.add_argument("--append", action="store_true", help="merge into the results file (rows redone replace)")
    parser.add_argument("--note", default="", help="recorded in the setup (e.g. why epochs are short)")
    args = parser.parse_args()
    name = args.out or ("aggregate_mode_shaped" if shaped(args) else "aggregate_mode")
    sizes = [int(x) for x in args.nodes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on kill too
    out: dict[str, Any] = {
        "setup": {
            "params": args.params,
            "epochs": args.epochs,
            "helping": args.helping,
            "epoch_seconds": args.epoch_seconds,
            "server": args.server,
            "latency_ms": args.latency_ms,
            "bandwidth_mbps_per_stream": args.bandwidth_mbps,
            "steady_state": "epochs after the first",
            "cpu": f"{os.cpu_count()} cores shared with other jobs; load averages recorded per row",
            "load_average_start": load_average(),
            **({"note": args.note} if args.note else {}),
        },
        "sweep": [],
        "contention": [],
    }
    path = RESULTS / f"{name}.json"
    with s3_endpoint(args) as (endpoint, client, store, proxy):
        out["setup"]["store"] = f"{store}, boto3"
        for n in sizes:
            for mode in modes:
                row = run(mode, n, args, args.epoch_seconds, endpoint, client)
                out["sweep"].append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if "aggregate" in modes:
            for seconds in [float(x) for x in args.contention.split(",") if x]:
                row = run("aggregate", max(sizes), args, seconds, endpoint, client)
                out["contention"].append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if proxy is not None:
            out["setup"]["proxy_stats"] = proxy.stats()
    out["setup"]["load_average_end"] = load_average()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.append:
        out = _merge(path, out)
    path.write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / f"{name}.png")
    print()
    print(markdown_table(out))


if __name__ == "__main__":
    main()
