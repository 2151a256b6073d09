"""PNG plots of the paper grid: accuracy by skew with CI bars, strategies by node count, accuracy vs wall time.

matplotlib is a dev dependency: without it the tables are still written, the plots are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.paper.tables import PAPER_TABLE1, curve


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _bars(ax: Any, groups: list[str], series: dict[str, list[dict[str, Any]]]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, stats) in enumerate(series.items()):
        means = [np.nan if s.get("mean") is None else s["mean"] for s in stats]
        errors = [0.0 if s.get("ci95") is None else s["ci95"] for s in stats]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(x, groups)


def plot_all(grid: Any, tables: dict[str, Any], records: list[dict[str, Any]], stem: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    if "table1" in tables:
        t = tables["table1"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        skews = [str(s) for s in t["skews"]]
        _bars(
            ax,
            [f"skew {s}" for s in skews],
            {row: [t["rows"][row][s] for s in skews] for row in ("sync", "async", "standalone", "centralized")},
        )
        for i, (mode, marker) in enumerate((("sync", "^"), ("async", "v"))):
            paper = [PAPER_TABLE1.get((mode, float(s)), np.nan) for s in skews]
            offset = (i - 1.5) * 0.2  # over the mode's own bar (4 series, width 0.2)
            ax.plot(np.arange(len(skews)) + offset, paper, marker, color="black", label=f"paper {mode} (MNIST)")
        ax.set_ylabel("test accuracy (mean, 95% CI over seeds)")
        ax.set_title(f"Table 1: 2 nodes, FedAvg, {grid.dataset}, {grid.epochs} epochs, {len(grid.seeds)} seeds")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, ncol=3, loc="lower left")
        written.append(_save(fig, plt, stem, "accuracy_by_skew"))
    if "table2" in tables:
        t = tables["table2"]
        nodes = [str(n) for n in t["nodes"]]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        _bars(ax, [f"{n} nodes" for n in nodes], {label: [row[n] for n in nodes] for label, row in t["rows"].items()})
        ax.set_ylabel("test accuracy (mean, 95% CI over seeds)")
        ax.set_title(f"Table 2: strategies at skew 0.9, {grid.dataset}")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, ncol=4, loc="lower left")
        written.append(_save(fig, plt, stem, "strategies"))
    written += _time_plots(grid, tables, records, stem, plt)
    return written


def _mean_curve(runs: list[dict[str, Any]], end: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean over runs (seeds) of the per-run curves; NaN where no run has every node reporting yet."""
    curves = np.array([curve(r["points"], end)[1] for r in runs])
    counts = np.sum(~np.isnan(curves), axis=0)
    sums = np.nansum(curves, axis=0)
    return curve([], end)[0], np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _time_plots(grid: Any, tables: dict[str, Any], records: list[dict[str, Any]], stem: Path, plt: Any) -> list[Path]:
    panels = []
    if "table1" in tables:
        skew = 0.9 if 0.9 in tables["table1"]["skews"] else tables["table1"]["skews"][-1]
        runs = [r for r in records if r["table"] == "table1" and r["skew"] == skew]
        panels.append((f"Table 1 runs, skew {skew} (2 equal nodes)", runs, None))
    if "hetero" in tables:
        h = grid.hetero
        runs = [r for r in records if r["table"] == "hetero"]
        panels.append((f"{h.num_nodes} nodes slowed {list(h.slowdown)}, skew {h.skew}", runs, h.targets))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, runs, targets) in zip(axes[0], panels):
        end = max((max((p[0] for node in r["points"] for p in node), default=0.0) for r in runs), default=0.0)
        for label in dict.fromkeys(r["label"] for r in runs):
            grid_t, mean = _mean_curve([r for r in runs if r["label"] == label], end)
            ax.plot(grid_t, mean, label=label)
        for target in targets or ():
            ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("wall time since the node started (s); mean over nodes and seeds")
        ax.set_ylabel("federated model's test accuracy")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    return [_save(fig, plt, stem, "accuracy_vs_time")]


def _save(fig: Any, plt: Any, stem: Path, name: str) -> Path:
    path = stem.with_name(f"{stem.name}_{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
