"""Does the aggregate mode learn like FedAvgAsync? 4 nodes on digits (skew 0.9), same seeds, final accuracy.

Both modes run through ``run_simulation`` (threads, ``memory://``), so data,
partitions, models and training loop are the same: ``mode="async"`` builds
FedAvgAsync nodes, ``mode="aggregate"`` builds ``AggregateFederatedNode``.
Reports the final test accuracy (mean over nodes) per seed, and requests and
bytes down per node-epoch. JSON goes to benchmarks/results/.

    python benchmarks/aggregate_accuracy.py [--epochs 30] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from flwr_serverless.simulation.runner import SimulationConfig, run_simulation

RESULTS = Path(__file__).parent / "results"
MODES = {"fedavg-async": "async", "aggregate": "aggregate"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in ("fedavg-async", "aggregate"):
            config = SimulationConfig(
                num_nodes=args.nodes,
                mode=MODES[mode],
                epochs=args.epochs,
                dataset="digits",
                skew=0.9,
                seed=seed,
                baselines=False,
                store_url=f"memory://agg-acc-{mode}",
            )
            result = run_simulation(config)
            errors = [n.error for n in result.nodes if n.error]
            if errors:
                raise RuntimeError(f"{mode} seed {seed}: {errors[0]}")
            epochs = sum(n.epochs_completed for n in result.nodes)
            row = {
                "mode": mode,
                "seed": seed,
                "accuracy": result.federated_mean_accuracy,
                "requests_per_node_epoch": sum(n.requests for n in result.nodes) / epochs,
                "bytes_down_per_node_epoch": sum(n.bytes_down for n in result.nodes) / epochs,
            }
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for mode in ("fedavg-async", "aggregate"):
        values = [r["accuracy"] for r in runs if r["mode"] == mode]
        summary[mode] = {
            "accuracy_mean": statistics.fmean(values),
            "accuracy_stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "requests_per_node_epoch": statistics.fmean(
                r["requests_per_node_epoch"] for r in runs if r["mode"] == mode
            ),
            "bytes_down_per_node_epoch": statistics.fmean(
                r["bytes_down_per_node_epoch"] for r in runs if r["mode"] == mode
            ),
        }
        print(mode, json.dumps(summary[mode]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "aggregate_accuracy.json").write_text(
        json.dumps(
            {
                "setup": {
                    "dataset": "digits",
                    "nodes": args.nodes,
                    "skew": 0.9,
                    "epochs": args.epochs,
                    "store": "memory:// (threads)",
                },
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
