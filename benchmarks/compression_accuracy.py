"""What compressed updates cost in accuracy: 4 async nodes on digits (skew 0.9), same seeds, per encoding.

Every variant runs ``run_simulation`` with ``node_options={"compression": ...}``
(the nodes publish and read compressed objects exactly as a user's would) on
the same seeds and partitions. Per variant it reports the bytes each node
moved per epoch (up and down, from the nodes' store counters, member records
included; down also per GET, since how many peers changed between two
pulls varies with thread timing), their ratio to the uncompressed run of the same invocation (the
floor), and the final test accuracy (mean over nodes; mean and spread over
seeds). The uncompressed runs
also train standalone nodes and a centralized model for context. JSON and a
PNG go to benchmarks/results/.

    python benchmarks/compression_accuracy.py [--epochs 30] [--seeds 0,1,2] [--variants none,int8,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from flwr_serverless.simulation.runner import SimulationConfig, SimulationResult, run_simulation

RESULTS = Path(__file__).parent / "results"

#: name -> node options. Top-k variants use the defaults: a chain of deltas with error feedback, a new int8
#: keyframe every 50 deltas (or when the readers' error passes 50%).
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"compression": None},
    "fp16": {"compression": "fp16"},
    "bf16": {"compression": "bf16"},
    "int8": {"compression": "int8"},
    "topk:0.1": {"compression": "topk:0.1"},
    "topk:0.05": {"compression": "topk:0.05"},
    "topk:0.02": {"compression": "topk:0.02"},
    "topk:0.01": {"compression": "topk:0.01"},
    "topk:0.01-lossless-keyframe": {"compression": "topk:0.01", "topk_keyframe": "lossless"},
}


def run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    config = SimulationConfig(
        num_nodes=args.nodes,
        mode=args.mode,
        epochs=args.epochs,
        dataset=args.dataset,
        skew=0.9,
        seed=seed,
        baselines=(name == "none"),
        store_url=f"memory://compression-{name}",
        node_options=dict(VARIANTS[name]),
        max_train_examples=args.max_train_examples,
    )
    started = time.monotonic()
    result: SimulationResult = run_simulation(config)
    errors = [n.error for n in result.nodes if n.error]
    if errors:
        raise RuntimeError(f"{name} seed {seed}: {errors[0]}")
    per_node = [(n.bytes_up / n.epochs_completed, n.bytes_down / n.epochs_completed) for n in result.nodes]
    return {
        "variant": name,
        "seed": seed,
        "accuracy": result.federated_mean_accuracy,
        "standalone_accuracy": result.standalone_mean_accuracy,
        "centralized_accuracy": result.centralized_accuracy,
        "bytes_up_per_node_epoch": statistics.fmean(up for up, _ in per_node),
        "bytes_down_per_node_epoch": statistics.fmean(down for _, down in per_node),
        "bytes_down_per_get": sum(n.bytes_down for n in result.nodes) / max(1, sum(n.gets for n in result.nodes)),
        "peers_used": sum(n.peers_used for n in result.nodes),
        "federations": sum(n.federations for n in result.nodes),
        "wall_time": time.monotonic() - started,
    }


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    def mean(rows: list[dict[str, Any]], field: str) -> float:
        return statistics.fmean(r[field] for r in rows)

    floor = [r for r in runs if r["variant"] == "none"]
    up0, down0, acc0 = (
        mean(floor, "bytes_up_per_node_epoch"),
        mean(floor, "bytes_down_per_node_epoch"),
        mean(floor, "accuracy"),
    )
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [r for r in runs if r["variant"] == name]
        accuracies = [r["accuracy"] for r in rows]
        summary[name] = {
            "options": VARIANTS[name],
            "bytes_up_per_node_epoch": mean(rows, "bytes_up_per_node_epoch"),
            "bytes_down_per_node_epoch": mean(rows, "bytes_down_per_node_epoch"),
            "bytes_up_cut": 1 - mean(rows, "bytes_up_per_node_epoch") / up0,
            "bytes_down_cut": 1 - mean(rows, "bytes_down_per_node_epoch") / down0,
            "bytes_down_per_get": mean(rows, "bytes_down_per_get"),
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_per_seed": accuracies,
            "accuracy_delta": statistics.fmean(accuracies) - acc0,
        }
    return summary


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    names = list(summary)
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.4
    left.bar([i - width / 2 for i in x], [100 * summary[n]["bytes_up_cut"] for n in names], width, label="up")
    left.bar([i + width / 2 for i in x], [100 * summary[n]["bytes_down_cut"] for n in names], width, label="down")
    left.axhline(65, color="gray", linestyle=":", label="65% (int8 target)")
    left.axhline(90, color="black", linestyle=":", label="90% (top-k target)")
    left.set_ylabel("bytes cut per node-epoch vs uncompressed (%)")
    right.bar(
        list(x),
        [summary[n]["accuracy_mean"] for n in names],
        yerr=[summary[n]["accuracy_stdev"] for n in names],
        capsize=3,
        color="tab:green",
    )
    right.set_ylabel("final test accuracy (mean over nodes and seeds)")
    for axis in (left, right):
        axis.set_xticks(list(x))
        axis.set_xticklabels(names, rotation=30, ha="right")
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--mode", choices=("async", "sync"), default="async")
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--out", default="compression_accuracy", help="results file stem under benchmarks/results")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown or "none" not in names:
        raise SystemExit(f"variants must include 'none' (the floor) and come from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: list[dict[str, Any]] = []
    for seed in seeds:  # interleaved: every variant sees the same machine load, seed by seed
        for name in names:
            row = run(name, seed, args)
            runs.append(row)
            print(
                f"seed {seed} {name:18s} acc {row['accuracy']:.3f} up {row['bytes_up_per_node_epoch']:8.0f} B "
                f"down {row['bytes_down_per_node_epoch']:8.0f} B ({row['wall_time']:.0f} s)",
                flush=True,
            )
    summary = summarize(runs, names)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "setup": {
            "dataset": args.dataset,
            "nodes": args.nodes,
            "skew": 0.9,
            "mode": args.mode,
            "epochs": args.epochs,
            "max_train_examples": args.max_train_examples,
            "seeds": seeds,
            "store": "memory:// (threads)",
        },
        "summary": summary,
        "runs": runs,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2))
    plot(
        summary,
        RESULTS / f"{args.out}.png",
        f"Compressed updates: {args.nodes} {args.mode} nodes, {args.dataset}, skew 0.9, {args.epochs} epochs, "
        f"seeds {seeds}",
    )
    print("\n| encoding | bytes up / node-epoch | cut | bytes down / node-epoch | cut | accuracy (mean +- sd) |")
    for name, s in summary.items():
        print(
            f"| {name} | {s['bytes_up_per_node_epoch']:.0f} | {100 * s['bytes_up_cut']:.0f}% | "
            f"{s['bytes_down_per_node_epoch']:.0f} | {100 * s['bytes_down_cut']:.0f}% | "
            f"{s['accuracy_mean']:.3f} +- {s['accuracy_stdev']:.3f} ({s['accuracy_delta']:+.3f}) |"
        )


if __name__ == "__main__":
    main()
