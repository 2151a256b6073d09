"""Heterogeneous nodes: 4 nodes on digits (skew 0.9), two of them 4x slower, same wall-clock budget per mode.

Modes: Sync, Async (FedAvgAsync), Async+FedRec (step-based staleness), FedAsync
(version staleness + mixing), FedBuff (buffer of K updates) and SemiSync. Each
node tests its model on the test set right after each federation; the mean over
nodes of each node's latest value gives accuracy vs wall time, and its value at
the end of the budget is the final accuracy. We report the
time to reach target accuracies, the final accuracy and store requests, and
write JSON and a PNG to benchmarks/results/.

    python benchmarks/heterogeneous.py [--budget 60] [--targets 0.8,0.9] [--modes sync,async,...]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flwr_serverless.simulation.options import AsyncOptions, Evaluation, Heterogeneity, SemiSyncOptions
from flwr_serverless.simulation.runner import SimulationConfig, SimulationResult, run_simulation

RESULTS = Path(__file__).parent / "results"
SLOWDOWN = [1.0, 1.0, 4.0, 4.0]
# Every batch is padded to factor x BATCH_SECONDS of wall time. A digits batch computes in ~2 ms, so
# unpadded, per-epoch costs and four threads' contention for 2 cores would hide the 4x; padded, the
# normal nodes run ~20 ms batches and the slow ones ~80 ms, as on machines of two speeds.
BATCH_SECONDS = 0.02

MODES: dict[str, dict[str, Any]] = {
    "sync": {"mode": "sync"},
    "async": {"mode": "async"},
    "async+fedrec": {"mode": "async", "async_options": AsyncOptions(staleness="poly:0.5", staleness_unit="steps")},
    "fedasync": {
        "mode": "async",
        "async_options": AsyncOptions(staleness="poly:0.5", staleness_unit="versions", alpha=0.6),
    },
    # Hinge variants: no discount up to about one slow epoch of staleness, then a steep one. Under strong
    # label skew the slow nodes hold classes nobody else has, so discounting their ordinary staleness
    # (poly:0.5 above) costs those classes; the hinge only discounts pathological staleness.
    "async+fedrec-hinge": {
        "mode": "async",
        "async_options": AsyncOptions(staleness="hinge:0.05,100", staleness_unit="steps"),
    },
    "fedasync-hinge": {
        "mode": "async",
        "async_options": AsyncOptions(staleness="hinge:0.5,8", staleness_unit="versions", alpha=0.9),
    },
    "fedbuff": {"mode": "async", "async_options": AsyncOptions(buffer_size=2)},
    "semisync": {"mode": "semisync", "semisync": SemiSyncOptions(lambda_=1.0, reestimate=True)},
}


def curve(result: SimulationResult, budget: float, step: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Mean over nodes of each node's latest test accuracy, on a time grid (NaN until every node reported)."""
    grid = np.arange(0.0, budget + 5.0, step)
    per_node = []
    for node in result.nodes:
        points = [(h["time"], h["test_accuracy"]) for h in node.history if "time" in h and "test_accuracy" in h]
        values = np.full(len(grid), np.nan)
        for t, acc in points:
            values[grid >= t] = acc
        per_node.append(values)
    return grid, np.mean(per_node, axis=0)


def last_seconds_mean(grid: np.ndarray, mean: np.ndarray, budget: float, seconds: float = 5.0) -> float | None:
    """Mean of the accuracy curve over the budget's last ``seconds``: final accuracy without one point's noise."""
    window = mean[(grid > budget - seconds) & (grid <= budget) & ~np.isnan(mean)]
    return float(window.mean()) if len(window) else None


def run_mode(name: str, budget: float, seed: int) -> tuple[SimulationResult, float]:
    spec = dict(MODES[name])
    if spec["mode"] != "async":
        spec.update(sync_timeout=5.0, min_nodes=1)  # past the budget, the survivors go on alone
    config = SimulationConfig(
        num_nodes=4,
        dataset="digits",
        skew=0.9,
        epochs=100000,
        seed=seed,
        baselines=False,
        store_url=None,
        evaluation=Evaluation(eval_each_epoch=True),
        heterogeneity=Heterogeneity(slowdown=tuple(SLOWDOWN), batch_seconds=BATCH_SECONDS, time_budget=budget),
        **spec,
    )
    started = time.monotonic()
    # A mode that overruns its budget by a minute dumps every thread's stack: a hang is diagnosed, not guessed.
    faulthandler.dump_traceback_later(budget + 60, exit=False, file=sys.stderr)
    try:
        result = run_simulation(config)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return result, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="wall-clock seconds of training per mode")
    parser.add_argument("--targets", default="0.8,0.9", help="test accuracies to time")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in args.modes.split(","):
        result, elapsed = run_mode(name, args.budget, args.seed)
        grid, mean = curve(result, args.budget)
        curves[name] = (grid, mean)
        errors = [n.error for n in result.nodes if n.error]
        reached = {}
        for target in targets:
            hits = np.nonzero(np.nan_to_num(mean) >= target)[0]
            reached[str(target)] = float(grid[hits[0]]) if len(hits) else None
        final = mean[~np.isnan(mean)]
        rows[name] = {
            "final_accuracy": float(final[-1]) if len(final) else None,
            "last_5s_accuracy": last_seconds_mean(grid, mean, args.budget),  # less noisy than one point
            "final_local_model_accuracy": result.federated_mean_accuracy,  # after the budget's last local steps
            "per_node_accuracy": [n.test_accuracy for n in result.nodes],
            "epochs": [n.epochs_completed for n in result.nodes],
            "federations": [n.federations for n in result.nodes],
            "requests": sum(n.requests for n in result.nodes),
            "time_to_target": reached,
            "run_seconds": elapsed,
            "errors": errors,
        }
        times = "  ".join(f"t({t})={'-' if v is None else f'{v:.1f}s'}" for t, v in reached.items())
        print(
            f"{name:<13} final acc {rows[name]['final_accuracy'] or float('nan'):.3f}  "
            f"(last 5 s {rows[name]['last_5s_accuracy'] or float('nan'):.3f})  {times}  "
            f"requests {rows[name]['requests']}  epochs {rows[name]['epochs']}  run {elapsed:.0f}s"
            + (f"  ERRORS {errors}" if errors else ""),
            flush=True,
        )

    out = {
        "budget_seconds": args.budget,
        "slowdown": SLOWDOWN,
        "batch_seconds": BATCH_SECONDS,
        "targets": targets,
        "modes": rows,
        "curves": {
            k: {"time": g.tolist(), "accuracy": [None if np.isnan(v) else v for v in m]} for k, (g, m) in curves.items()
        },
    }
    (RESULTS / "heterogeneous.json").write_text(json.dumps(out, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (grid, mean) in curves.items():
        ax.plot(grid, mean, label=name)
    for target in targets:
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("mean test accuracy over nodes")
    ax.set_title("4 nodes on digits (skew 0.9), nodes 2 and 3 slowed 4x")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "heterogeneous.png", dpi=120)
    print(f"results written to {RESULTS / 'heterogeneous.json'} and heterogeneous.png")


if __name__ == "__main__":
    main()
