"""Command line: ``flwr-serverless simulate ...`` runs a local federated simulation and prints a report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from flwr_serverless import __version__
from flwr_serverless.errors import FlwrServerlessError
from flwr_serverless.simulation.data import DATASETS
from flwr_serverless.simulation.heterogeneity import parse_factors
from flwr_serverless.simulation.runner import (
    MODES,
    WORKERS,
    NodeResult,
    SimulationConfig,
    SimulationResult,
    run_simulation,
)
from flwr_serverless.strategies import STRATEGY_NAMES


def _key_value(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE``; VALUE is JSON when it parses (numbers, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flwr-serverless", description="Federated learning without a server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate",
        help="train N federated nodes locally and compare with standalone and centralized training",
        description="Train N nodes on label-skewed partitions, federating through a shared store after "
                    "every epoch; then train the same partitions standalone and all data centralized.",
    )
    sim.add_argument("--nodes", type=int, default=2, help="number of federated nodes (default 2)")
    sim.add_argument("--mode", choices=MODES, default="async",
                     help="async never waits; sync has a barrier per epoch; semisync one per time budget")
    sim.add_argument("--strategy", choices=STRATEGY_NAMES, default="fedavg", help="Flower aggregation strategy")
    sim.add_argument("--strategy-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="extra strategy argument, e.g. proximal_mu=0.1 (repeatable)")
    sim.add_argument("--store", default=None, metavar="URL",
                     help="shared store: s3://bucket/prefix, file:///path, memory://name, ... "
                          "(default: a new folder under the temp dir); each run uses a fresh sub-prefix")
    sim.add_argument("--storage-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="fsspec/S3 storage option, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    sim.add_argument("--epochs", type=int, default=5)
    sim.add_argument("--dataset", choices=DATASETS, default="digits")
    sim.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files (fashion_mnist, mnist)")
    sim.add_argument("--max-train-examples", type=int, default=None, help="subsample the training set")
    sim.add_argument("--skew", type=float, default=0.9, help="label skew in [0, 1]; 0 is IID (default 0.9)")
    sim.add_argument("--batch-size", type=int, default=32)
    sim.add_argument("--learning-rate", type=float, default=1e-3)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--framework", choices=sorted(WORKERS), default="keras")
    sim.add_argument("--processes", action="store_true", help="one spawned process per node instead of threads")
    sim.add_argument("--timeout", type=float, default=120.0, help="sync mode: seconds to wait for the other nodes")
    sim.add_argument("--min-nodes", type=int, default=None, help="sync mode: continue with this many after timeout")
    sim.add_argument("--no-baselines", action="store_true", help="skip the standalone and centralized runs")
    sim.add_argument("--json", default=None, metavar="PATH", help="also write the full results as JSON")
    sim.add_argument("--quiet", action="store_true", help="no live per-epoch lines")
    het = sim.add_argument_group("staleness, semi-sync and slow nodes (see README, 'Staleness and semi-sync')")
    het.add_argument("--staleness", default=None, help="async: staleness function: constant, poly:A, hinge:A,B")
    het.add_argument("--staleness-unit", choices=("steps", "versions"), default="steps",
                     help="async: staleness in unseen community steps (FedRec) or updates (FedAsync)")
    het.add_argument("--alpha", type=float, default=None, help="async: FedAsync mixing weight in (0, 1]")
    het.add_argument("--buffer-size", type=int, default=None, help="async: FedBuff, aggregate after K new updates")
    het.add_argument("--participation", type=float, default=None, help="async: probability C of federating")
    het.add_argument("--lambda", dest="lambda_", type=float, default=2.0,
                     help="semisync: round length as a multiple of the slowest node's epoch (default 2)")
    het.add_argument("--slowdown", type=parse_factors, default=None, metavar="F0,F1,...",
                     help="per-node slowdown factors, e.g. 1,1,4: node 2's batches take 4x as long")
    het.add_argument("--batch-seconds", type=float, default=None, metavar="S",
                     help="pad every batch to (its node's factor x S) seconds, so the emulated speeds hold "
                          "even when threads compete for cores")
    _add_admin_commands(commands)
    return parser


def _add_admin_commands(commands: Any) -> None:
    """``inspect`` and ``clean``: see and reset an experiment prefix (see flwr_serverless/admin.py)."""
    for name, text in (("inspect", "show an experiment's members (status, last epoch/round, objects) and rounds"),
                       ("clean", "delete the objects of members that are no longer live (or everything)")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("url", help="the experiment prefix: s3://bucket/prefix, a folder, memory://name ...")
        command.add_argument("--storage-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
        if name == "clean":
            command.add_argument("--older-than", default=None, metavar="DURATION",
                                 help="only members whose newest object is older than this (90s, 15m, 2h, 1d)")
            command.add_argument("--all", action="store_true", help="delete every object under the prefix")
            command.add_argument("--dry-run", action="store_true", help="list what would be deleted")


def _admin(args: argparse.Namespace, out: TextIO) -> int:
    from flwr_serverless.admin import clean_experiment, format_view, inspect_experiment, parse_duration
    from flwr_serverless.stores import open_store

    store = open_store(args.url, **dict(args.storage_option))
    if args.command == "inspect":
        print(format_view(inspect_experiment(store)), file=out)
        return 0
    older = parse_duration(args.older_than) if args.older_than is not None else None
    deleted = clean_experiment(store, older_than=older, everything=args.all, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(deleted)} object(s)" + "".join(f"\n  {k}" for k in deleted), file=out)
    return 0


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


class _ProgressPrinter:
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
        elif kind == "epoch_end" and event.get("role") == "federated" and not self.quiet:
            print(
                f"[{event['node']}] epoch {event['epoch']}/{event['epochs']}  loss {_fmt(event.get('loss'), '.2f')}  "
                f"acc {_fmt(event.get('accuracy'), '.2f')}  acc_fed {_fmt(event.get('accuracy_fed'), '.2f')}",
                file=self.out,
            )
        else:
            return
        self.out.flush()


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f}"


def format_report(result: SimulationResult) -> str:
    """The end-of-run tables: federated nodes, baselines and the accuracy summary."""
    config = result.config
    lines = [
        "",
        f"Federated nodes ({config.mode}, {config.strategy}, {config.dataset}, skew {config.skew}, "
        f"{config.epochs} epochs, {'processes' if config.use_processes else 'threads'}):",
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
    lines += ["", summary + f"  [{result.wall_time:.1f}s]"]
    return "\n".join(lines)


def _simulate(args: argparse.Namespace, out: TextIO) -> int:
    config = SimulationConfig(
        num_nodes=args.nodes,
        mode=args.mode,
        strategy=args.strategy,
        strategy_options=dict(args.strategy_option),
        store_url=args.store,
        storage_options=dict(args.storage_option),
        epochs=args.epochs,
        dataset=args.dataset,
        data_dir=args.data_dir,
        skew=args.skew,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        use_processes=args.processes,
        framework=args.framework,
        sync_timeout=args.timeout,
        min_nodes=args.min_nodes,
        baselines=not args.no_baselines,
        max_train_examples=args.max_train_examples,
        extra={"staleness": args.staleness, "staleness_unit": args.staleness_unit, "alpha": args.alpha,
               "buffer_size": args.buffer_size, "participation": args.participation, "lambda_": args.lambda_,
               "slowdown": args.slowdown, "batch_seconds": args.batch_seconds},
    )
    print(
        f"flwr-serverless simulate: {config.num_nodes} {config.mode} nodes, {config.strategy}, {config.dataset} "
        f"(skew {config.skew}), {config.epochs} epochs, {'processes' if config.use_processes else 'threads'}",
        file=out,
    )
    result = run_simulation(config, progress=_ProgressPrinter(out, args.quiet))
    print(format_report(result), file=out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result.to_dict(), fh, indent=2)
        print(f"results written to {args.json}", file=out)
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``flwr-serverless`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    out = out if out is not None else sys.stdout
    try:
        if args.command == "simulate":
            return _simulate(args, out)
        if args.command in ("inspect", "clean"):
            return _admin(args, out)
    except (ValueError, RuntimeError, FileNotFoundError, FlwrServerlessError) as exc:
        print(f"flwr-serverless {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
