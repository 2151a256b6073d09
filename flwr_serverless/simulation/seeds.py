"""Repeat a simulation over seeds (``simulate --seeds``) and summarize: mean and a 95% confidence interval; CSV rows.

The interval is Student's t (the seeds are few): ``mean +- t(0.975, n-1) * sd / sqrt(n)``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr_serverless.simulation.results import TRAFFIC
from flwr_serverless.simulation.runner import SimulationConfig, SimulationResult, run_simulation

# t(0.975, df) for df = 1..30; beyond, scipy when installed, else the df=30 value (slightly wide).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
FIGURES = ("federated", "standalone", "centralized")


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    if df <= len(_T975):
        return _T975[df - 1]
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975[-1]


def mean_ci(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "ci95", "sd", "n", "values"}``; ``ci95`` is the half-width (None with fewer than 2 values)."""
    numbers = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(numbers)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0, "values": []}
    mean = sum(numbers) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1, "values": numbers}
    sd = math.sqrt(sum((v - mean) ** 2 for v in numbers) / (n - 1))
    return {"mean": mean, "ci95": t975(n - 1) * sd / math.sqrt(n), "sd": sd, "n": n, "values": numbers}


def run_seeds(
    config: SimulationConfig, seeds: Sequence[int], progress: Callable[[dict[str, Any]], None] | None = None
) -> list[SimulationResult]:
    """One run per seed; everything else as in ``config`` (set ``baseline_cache`` to train baselines once)."""
    results = []
    for seed in seeds:
        if progress is not None and len(seeds) > 1:
            progress({"event": "phase", "phase": "seed", "seed": seed})
        results.append(run_simulation(replace(config, seed=seed), progress))
    return results


def figures(result: SimulationResult) -> dict[str, float | None]:
    return {
        "federated": result.federated_mean_accuracy,
        "standalone": result.standalone_mean_accuracy,
        "centralized": result.centralized_accuracy,
    }


def seed_summary(results: Sequence[SimulationResult]) -> dict[str, dict[str, Any]]:
    """Mean and 95% CI over the runs of each figure: federated, standalone and centralized mean accuracy."""
    per_run = [figures(r) for r in results]
    return {name: mean_ci([row[name] for row in per_run]) for name in FIGURES}


def format_seed_summary(results: Sequence[SimulationResult]) -> str:
    summary = seed_summary(results)
    lines = [
        f"Over {len(results)} seeds ({', '.join(str(r.config.seed) for r in results)}): "
        "mean test accuracy +- 95% CI (Student's t)"
    ]
    for name in FIGURES:
        s = summary[name]
        if s["mean"] is None:
            continue
        ci = "" if s["ci95"] is None else f" +- {s['ci95']:.3f}"
        lines.append(f"  {name:<12} {s['mean']:.3f}{ci}   (runs: {', '.join(f'{v:.3f}' for v in s['values'])})")
    return "\n".join(lines)


def _counter_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every counter name in ``rows``, in first-seen order (runs of other versions may add or lack some)."""
    return list(dict.fromkeys(name for counters in rows for name in counters))


def write_csv(path: str | Path, results: Sequence[SimulationResult]) -> None:
    """One row per run: its settings, the three accuracy figures, the wall time, the store traffic and every
    node counter summed over the federated nodes."""
    totals = [result.totals for result in results]
    counters = _counter_names(t["counters"] for t in totals)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "seed",
                "mode",
                "strategy",
                "nodes",
                "dataset",
                "skew",
                "epochs",
                *FIGURES,
                "wall_time",
                *TRAFFIC,
                *counters,
            ]
        )
        for result, total in zip(results, totals):
            c = result.config
            values = figures(result)
            writer.writerow(
                [
                    c.seed,
                    c.mode,
                    c.strategy,
                    c.num_nodes,
                    c.dataset,
                    c.skew,
                    c.epochs,
                    *("" if values[f] is None else f"{values[f]:.4f}" for f in FIGURES),
                    f"{result.wall_time:.1f}",
                    *(total[k] for k in TRAFFIC),
                    *(total["counters"].get(k, "") for k in counters),
                ]
            )


def write_nodes_csv(path: str | Path, results: Sequence[SimulationResult]) -> None:
    """One row per federated node and run: accuracy, epochs, the node's store traffic and every counter."""
    counters = _counter_names(row.counters for result in results for row in result.nodes)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["seed", "mode", "node_id", "test_accuracy", "epochs_completed", "wall_time", *TRAFFIC, *counters, "error"]
        )
        for result in results:
            for row in result.nodes:
                writer.writerow(
                    [
                        result.config.seed,
                        result.config.mode,
                        row.node_id,
                        "" if row.test_accuracy is None else f"{row.test_accuracy:.4f}",
                        row.epochs_completed,
                        f"{row.wall_time:.1f}",
                        *(getattr(row, k) for k in TRAFFIC),
                        *(row.counters.get(k, "") for k in counters),
                        row.error or "",
                    ]
                )
