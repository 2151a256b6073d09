"""Tables and plots of ``benchmarks/language_model.py`` results, free of torch (the docs build renders them)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flwr_serverless.simulation.seeds import mean_ci

#: The paper's Table 7 (WikiText, Pythia-14M): only its centralized figure is quoted in our sources.
PAPER = {"centralized": 0.279}
RUN_FIELDS = ["kind", "partition", "seed", "nodes", "mode", "accuracy", "loss", "per_node", "seconds"]


def summary(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per (kind, partition, nodes, mode): accuracy mean, 95% CI half-width, seconds."""
    keys: dict[tuple[Any, ...], list[Any]] = {}
    for run in runs:
        keys.setdefault((run.kind, run.partition, run.nodes, run.mode), []).append(run)
    rows = []
    for (kind, partition, nodes, mode), group in keys.items():
        accuracy = mean_ci([run.accuracy for run in group])
        rows.append(
            {
                "kind": kind,
                "partition": partition,
                "nodes": nodes,
                "mode": mode,
                "accuracy": accuracy["mean"],
                "ci95": accuracy["ci95"],
                "seeds": accuracy["n"],
                "loss": float(np.mean([run.loss for run in group])),
                "seconds": float(np.mean([run.seconds for run in group])),
                "paper": PAPER.get(kind),
            }
        )
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None or row["accuracy"] is None:
        return "-"
    ci = f" ± {row['ci95']:.3f}" if row["ci95"] is not None else ""
    return f"{row['accuracy']:.3f}{ci}"


def markdown_table(results: dict[str, Any]) -> str:
    """The table from a results file: held-out next-byte accuracy, mean ± 95% CI over seeds."""
    rows = results["summary"]
    find = {(r["kind"], r["partition"], r["nodes"], r["mode"]): r for r in rows}
    grid = results["grid"]
    lines = [
        "| partition | nodes | sync FedAvg | async FedAvg | standalone (mean of nodes) |",
        "|---|---:|---:|---:|---:|",
    ]
    for partition in grid["partitions"]:
        for nodes in grid["nodes"]:
            lines.append(
                f"| {partition} | {nodes} | {_cell(find.get(('federated', partition, nodes, 'sync')))} "
                f"| {_cell(find.get(('federated', partition, nodes, 'async')))} "
                f"| {_cell(find.get(('standalone', partition, nodes, None)))} |"
            )
    centralized = find.get(("centralized", "all", 1, None))
    lines.append("")
    lines.append(
        f"Centralized (one model, all training text, same steps): {_cell(centralized)}; "
        f"the paper's centralized figure (WikiText, Pythia-14M with its tokenizer): {PAPER['centralized']:.3f}. "
        f"Seeds: {len(grid['seeds'])}; {grid['epochs']} epochs of {grid['steps']} steps, batch {grid['batch']}, "
        f"context {grid['context']}."
    )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    grid = results["grid"]
    find = {(r["kind"], r["partition"], r["nodes"], r["mode"]): r for r in rows}
    figure, axes = plt.subplots(1, len(grid["partitions"]), figsize=(5 * len(grid["partitions"]), 4), squeeze=False)
    width = 0.27
    for axis, partition in zip(axes[0], grid["partitions"]):
        x = np.arange(len(grid["nodes"]))
        for offset, (label, key) in zip(
            (-width, 0.0, width),
            (("sync", ("federated", "sync")), ("async", ("federated", "async")), ("standalone", ("standalone", None))),
        ):
            cells = [find.get((key[0], partition, n, key[1])) for n in grid["nodes"]]
            means = [c["accuracy"] if c else np.nan for c in cells]
            errors = [c["ci95"] or 0.0 if c else 0.0 for c in cells]
            axis.bar(x + offset, means, width, yerr=errors, capsize=3, label=label)
        centralized = find.get(("centralized", "all", 1, None))
        if centralized:
            axis.axhline(centralized["accuracy"], color="black", linestyle="--", label="centralized")
        axis.set_xticks(x, [f"{n} nodes" for n in grid["nodes"]])
        axis.set_title(f"split by {partition}")
        axis.set_ylabel("held-out next-byte accuracy")
        axis.legend(fontsize=8)
    figure.suptitle("Pythia-14M shape on Shakespeare: FedAvg sync vs async (mean, 95% CI)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_FIELDS)
        writer.writeheader()
        for run in results["runs"]:
            writer.writerow({**run, "per_node": " ".join(f"{v:.4f}" for v in run["per_node"])})
    stem.with_suffix(".md").write_text(markdown_table(results) + "\n")
    plot(results, stem.with_suffix(".png"))
