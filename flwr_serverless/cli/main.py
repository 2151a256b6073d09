"""Command line: ``flwr-serverless simulate | inspect | clean``.

The simulation is imported only when ``simulate`` runs (or its flags are shown), so ``inspect`` and
``clean`` start fast and never import the simulation, TensorFlow or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from flwr_serverless import __version__
from flwr_serverless.cli.parsing import key_value
from flwr_serverless.errors import FlwrServerlessError

#: the commands that only touch a store: their parser is built without the simulation's flags
ADMIN_COMMANDS = ("inspect", "clean")
SIMULATE_HELP = "train N federated nodes locally and compare with standalone and centralized training"
PAPER_MOVED = (
    "the paper tables are no longer part of the package: from a source checkout run `make paper` "
    "(or python benchmarks/paper/run.py)"
)


def build_parser(simulate: bool = True) -> argparse.ArgumentParser:
    """The parser; ``simulate=False`` leaves the ``simulate`` flags out (they import the simulation)."""
    parser = argparse.ArgumentParser(prog="flwr-serverless", description="Federated learning without a server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate",
        help=SIMULATE_HELP,
        description="Train N nodes on label-skewed partitions, federating through a shared store after "
        "every epoch; then train the same partitions standalone and all data centralized.",
    )
    if simulate:
        from flwr_serverless.cli.simulate import add_simulate_arguments

        add_simulate_arguments(sim)
    moved = commands.add_parser("experiment", help="moved: use `make paper`", description=PAPER_MOVED)
    moved.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    _add_admin_commands(commands)
    return parser


def _add_admin_commands(commands: Any) -> None:
    """``inspect`` and ``clean``: see and reset an experiment prefix (see flwr_serverless/cli/admin.py)."""
    for name, text in (
        ("inspect", "show an experiment's members (status, last epoch/round, objects) and rounds"),
        ("clean", "delete the objects of members that are no longer live (or everything)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("url", help="the experiment prefix: s3://bucket/prefix, a folder, memory://name ...")
        command.add_argument("--storage-option", action="append", type=key_value, default=[], metavar="KEY=VALUE")
        if name == "clean":
            command.add_argument(
                "--older-than",
                default=None,
                metavar="DURATION",
                help="only members whose newest object is older than this (90s, 15m, 2h, 1d)",
            )
            command.add_argument("--all", action="store_true", help="delete every object under the prefix")
            command.add_argument("--dry-run", action="store_true", help="list what would be deleted")


def _admin(args: argparse.Namespace, out: TextIO) -> int:
    from flwr_serverless.cli.admin import clean_experiment, format_view, inspect_experiment, parse_duration
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


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``flwr-serverless`` command; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    light = bool(arguments) and arguments[0] in ADMIN_COMMANDS
    args = build_parser(simulate=not light).parse_args(arguments)
    out = out if out is not None else sys.stdout
    try:
        if args.command == "simulate":
            from flwr_serverless.cli.simulate import run_simulate

            return run_simulate(args, out)
        if args.command == "experiment":
            print(f"flwr-serverless experiment: {PAPER_MOVED}", file=sys.stderr)
            return 2
        if args.command in ADMIN_COMMANDS:
            return _admin(args, out)
    except (ValueError, RuntimeError, FileNotFoundError, FlwrServerlessError) as exc:
        print(f"flwr-serverless {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
