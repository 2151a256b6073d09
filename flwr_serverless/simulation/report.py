"""What the ``simulate`` command prints: live per-epoch lines and the end-of-run tables."""

from __future__ import annotations

from typing import Any, TextIO

from flwr_serverless.simulation.runner import NodeResult, SimulationConfig, SimulationResult


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def epoch_line(event: dict[str, Any]) -> str:
    """One live line per federated epoch, saying what each accuracy is.

    ``train acc`` is this node's training accuracy over the epoch; ``nodes' mean`` is the
    example-weighted mean of the nodes' training accuracies that came with the aggregate
    (a training figure, not a test of the federated model); ``test acc (federated model)``
    is the aggregate tested on the test set, measured with ``--eval-each-epoch``.
    """
    line = (
        f"[{event['node']}] epoch {event['epoch']}/{event['epochs']}  loss {_fmt(event.get('loss'), '.2f')}  "
        f"train acc {_fmt(event.get('accuracy'), '.2f')}"
    )
    if event.get("accuracy_fed") is not None:
        line += f" (nodes' mean {_fmt(event.get('accuracy_fed'), '.2f')})"
    if event.get("test_accuracy") is not None:
        line += f"  test acc {_fmt(event.get('test_accuracy'), '.3f')} (federated model)"
    return line


class ProgressPrinter:
    """Prints one line per federated epoch as nodes finish them (called under the runner's lock)."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "error":
            print(f"[{event.get('node')}] {event.get('role')} run failed: {event.get('error')}", file=self.out)
        elif kind == "phase" and event.get("phase") == "federated":
            sizes = ", ".join(str(n) for n in event.get("partition_sizes", []))
            print(f"store: {event.get('run_url')}\npartition sizes: {sizes}", file=self.out)
        elif kind == "phase" and event.get("phase") == "baselines":
            print("training baselines (standalone nodes, centralized)...", file=self.out)
        elif kind == "phase" and event.get("phase") == "baselines_cached":
            print(f"  from the cache in {event.get('cache')}: {', '.join(event.get('cached', []))}", file=self.out)
        elif kind == "phase" and event.get("phase") == "seed":
            print(f"\n== seed {event.get('seed')} ==", file=self.out)
        elif kind == "epoch_end" and event.get("role") == "federated" and not self.quiet:
            print(epoch_line(event), file=self.out)
        else:
            return
        self.out.flush()


def execution_label(config: Any) -> str:
    """Where the nodes ran: ``threads``, ``processes (pool of K)`` or ``ray``."""
    if config.engine == "ray":
        return f"ray ({config.ray_address or 'RAY_ADDRESS or local'})"
    if config.use_processes:
        from flwr_serverless.simulation.execution import pool_size

        return f"processes (pool of {pool_size(config.num_nodes, config.workers)})"
    return "threads"


def totals_line(result: SimulationResult) -> str:
    """The experiment's store traffic summed over nodes, and how many nodes finished every epoch."""
    t = result.totals
    return (
        f"Totals over {t['nodes']} nodes ({t['completed']} completed every epoch): {t['requests']} requests "
        f"({t['puts']} PUT, {t['gets']} GET, {t['lists']} LIST, {t['deletes']} DELETE), "
        f"{_mb(t['bytes_up'])} MB up, {_mb(t['bytes_down'])} MB down"
    )


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f}"


def partition_label(config: SimulationConfig) -> str:
    """``skew 0.9`` for the paper's split, else the partitioner as given (``dirichlet:0.5``)."""
    if config.partitioning.kind == "skew":
        return f"skew {config.skew}"
    options = "".join(f", {k}={v}" for k, v in config.partitioning.options.items())
    return f"partitioner {config.partitioning.spec}{options}"


def format_report(result: SimulationResult) -> str:
    """The end-of-run tables: federated nodes, baselines and the accuracy summary."""
    config = result.config
    lines = [
        "",
        f"Federated nodes ({config.mode}, {config.strategy}, {config.dataset}, {partition_label(config)}, "
        f"{config.epochs} epochs, {execution_label(config)}; "
        "test acc of each node's final, federated model):",
        f"{'node':<12} {'test acc':>8} {'epochs':>7} {'wall s':>7} {'MB up':>7} {'MB down':>8} "
        f"{'requests':>8} {'rejected':>8}",
    ]
    for row in result.nodes:
        if row.error:
            lines.append(f"{row.node_id:<12} FAILED: {row.error}")
            continue
        lines.append(
            f"{row.node_id:<12} {_fmt(row.test_accuracy):>8} {f'{row.epochs_completed}/{config.epochs}':>7} "
            f"{row.wall_time:>7.1f} {_mb(row.bytes_up):>7} {_mb(row.bytes_down):>8} {row.requests:>8} "
            f"{row.rejected:>8}"
        )
    lines += counters_lines(result)
    if result.standalone or result.centralized:
        lines += ["", "Baselines (same partitions, same epochs):", f"{'model':<24} {'test acc':>8} {'wall s':>7}"]
        baseline_rows: list[tuple[str, NodeResult]] = [(f"standalone {r.node_id}", r) for r in result.standalone]
        if result.centralized:
            baseline_rows.append(("centralized (all data)", result.centralized))
        for label, row in baseline_rows:
            if row.error:
                lines.append(f"{label:<24} FAILED: {row.error}")
            else:
                lines.append(f"{label:<24} {_fmt(row.test_accuracy):>8} {row.wall_time:>7.1f}")
    fed, alone = result.federated_mean_accuracy, result.standalone_mean_accuracy
    summary = f"Summary: federated mean accuracy {_fmt(fed)}"
    if alone is not None:
        summary += f" vs standalone mean {_fmt(alone)}"
        if fed is not None:
            summary += f" ({fed - alone:+.3f})"
    if result.centralized_accuracy is not None:
        summary += f"; centralized {_fmt(result.centralized_accuracy)}"
    lines += ["", summary + f"  [{result.wall_time:.1f}s]", totals_line(result)]
    lag = observed_peer_lag(result.nodes)
    if lag is not None:
        lines.append(
            f"Peer lag in the async aggregates (epochs a peer's update was behind the reader's): "
            f"max {lag['max']:.0f}, mean {lag['mean']:.2f} over {lag['aggregations']} aggregations"
        )
    return "\n".join(lines)


def _counters_text(counters: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in counters.items() if value)


def counters_lines(result: SimulationResult) -> list[str]:
    """Each node's non-zero counters (every one its ``NodeStats`` reports: cas_conflicts, repairs,
    keyframe_downloads...) and their sum over the nodes; nothing when every counter is zero."""
    rows = [(row.node_id, _counters_text(row.counters)) for row in result.nodes if row.error is None]
    if not any(text for _, text in rows):
        return []
    lines = ["", "Node counters (non-zero):"]
    lines += [f"{node:<12} {text or '-'}" for node, text in rows]
    lines.append(f"{'all nodes':<12} {_counters_text(result.totals['counters'])}")
    return lines


def observed_peer_lag(rows: list[NodeResult]) -> dict[str, float] | None:
    """Max and mean of the ``peer_lag_*`` that ``--eval-each-epoch`` records after each async aggregation."""
    points = [h for row in rows for h in row.history if "peer_lag_max" in h]
    if not points:
        return None
    return {
        "max": max(h["peer_lag_max"] for h in points),
        "mean": sum(h["peer_lag_mean"] for h in points) / len(points),
        "aggregations": len(points),
    }
