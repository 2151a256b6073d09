"""Regenerate the paper tables and plots: ``make paper`` (or ``make paper-quick``).

    python benchmarks/paper/run.py [--quick] [--dataset digits|fashion_mnist] [--tables table1,table2,hetero]

The grid and the strategy settings are in ``grid.py``, the tables in ``tables.py``, the claims checked
in ``claims.py``; outputs go to benchmarks/results/paper_<grid>.{json,csv,md} and PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.paper.claims import claims as find_claims
from benchmarks.paper.grid import STRATEGIES, cells, default_cache_dir, grid_digest, make_grid, run_grid
from benchmarks.paper.plots import plot_all
from benchmarks.paper.tables import hetero, json_default, markdown, table1, table2, write_csv
from flwr_serverless.simulation.data import IDX_DIRS

COMMAND = "python benchmarks/paper/run.py"


def write_outputs(
    grid: Any, records: list[dict[str, Any]], out_dir: Path, command: str, seconds: float, planned: int | None = None
) -> list[Path]:
    """JSON, CSV, markdown and PNGs named ``paper_<grid>.*`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, Any] = {}
    if any(r["table"] == "table1" for r in records):
        tables["table1"] = table1(records)
    if any(r["table"] == "table2" for r in records):
        tables["table2"] = table2(records)
    if any(r["table"] == "hetero" for r in records):
        tables["hetero"] = hetero(records, grid.hetero.targets)
    claims = find_claims(tables)
    stem = out_dir / f"paper_{grid.name}"
    data = {
        "command": command,
        "grid": asdict(grid),
        "seconds": seconds,
        "run_seconds": sum(r["seconds"] for r in records),
        "planned_runs": planned,
        "strategy_options": STRATEGIES,
        "tables": tables,
        "claims": claims,
        "records": records,
    }
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(data, indent=1, default=json_default), encoding="utf-8")
    write_csv(paths[1], records)
    runs = None if planned is None else (len(records), planned)
    paths[2].write_text(markdown(grid, tables, claims, command, runs, records), encoding="utf-8")
    return paths + plot_all(grid, tables, records, stem)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Run the paper-reproduction grid and write JSON, CSV, a markdown table and PNG plots. "
        "Runs and baselines are cached, so an interrupted grid resumes where it stopped.",
    )
    parser.add_argument("--quick", action="store_true", help="a small digits grid that takes a few minutes")
    parser.add_argument(
        "--dataset",
        choices=("digits", "fashion_mnist"),
        default=None,
        help=f"default: fashion_mnist when its IDX files are in {IDX_DIRS['fashion_mnist'][0]}, else digits",
    )
    parser.add_argument("--tables", default=None, metavar="LIST", help="subset, e.g. table1,hetero (default: all)")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR", help="where the outputs go")
    parser.add_argument("--cache", default=None, metavar="DIR", help=f"run cache (default {default_cache_dir()})")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        metavar="M",
        help="start no new run after M minutes; the tables show the runs that finished",
    )
    return parser


def run_experiment(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run (or read from the cache) the grid, then write the outputs; 1 when a run failed."""
    stream = out if out is not None else sys.stdout
    grid = make_grid(args.quick, args.dataset)
    if args.tables:
        tables = tuple(t.strip() for t in args.tables.split(",") if t.strip())
        unknown = sorted(set(tables) - set(grid.tables))
        if unknown:
            raise ValueError(f"unknown table(s) {', '.join(unknown)}; choose from {', '.join(grid.tables)}")
        grid = replace(grid, tables=tables)
    cache_dir = args.cache or default_cache_dir()
    command = " ".join(
        [
            COMMAND,
            *(["--quick"] if args.quick else []),
            *([f"--dataset {args.dataset}"] if args.dataset else []),
            *([f"--tables {args.tables}"] if args.tables else []),
            *([f"--max-minutes {args.max_minutes:g}"] if args.max_minutes is not None else []),
            f"--out {args.out}",
        ]
    )

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    planned = len(cells(grid, cache_dir))
    log(f"grid {grid.name} ({grid_digest(grid)}): {grid.dataset}, {planned} runs; cache {cache_dir}")
    started = time.monotonic()
    records = run_grid(grid, cache_dir, log, max_minutes=args.max_minutes)
    paths = write_outputs(
        grid, records, Path(args.out), command=command, seconds=time.monotonic() - started, planned=planned
    )
    log("written: " + ", ".join(str(p) for p in paths))
    return 0 if all(not r["errors"] for r in records) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_experiment(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"{COMMAND}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
