"""The paper grid: its cells, the run cache, the statistics, the tables and claims (no training here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.paper import grid as paper
from benchmarks.paper.claims import FAILS, INCONCLUSIVE, REPRODUCES, claims
from benchmarks.paper.run import write_outputs
from benchmarks.paper.tables import table1
from flwr_serverless.simulation.options import parse_seeds
from flwr_serverless.simulation.runner import NodeResult, SimulationConfig, SimulationResult
from flwr_serverless.simulation.seeds import mean_ci


def test_mean_ci_uses_students_t() -> None:
    stats = mean_ci([0.8, 0.9, 1.0])
    assert stats["mean"] == pytest.approx(0.9) and stats["sd"] == pytest.approx(0.1)
    assert stats["ci95"] == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-3)
    assert mean_ci([0.5])["ci95"] is None and mean_ci([None])["mean"] is None


def test_seed_lists() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("1,3,7") == [1, 3, 7] and parse_seeds("0-1,9") == [0, 1, 9]
    for bad in ("", "a", "1,1", "3-x"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_the_grids_are_valid_ordered_by_seed_and_share_the_fedavg_cell() -> None:
    for quick in (True, False):
        grid = paper.make_grid(quick, dataset="digits" if quick else "fashion_mnist")
        cells = paper.cells(grid, "/tmp/cache")
        for cell in cells:
            cell.config.validate()
        # Table 1 first, then tables 2 and hetero seed by seed: a grid stopped early has whole seeds.
        first_other = next(i for i, c in enumerate(cells) if c.table != "table1")
        assert all(c.table == "table1" for c in cells[:first_other])
        seeds = [c.config.seed for c in cells[first_other:]]
        assert seeds == sorted(seeds)
        tables = {c.table for c in cells}
        assert tables == {"table1", "table2", "hetero"}
        table1_cells = [c for c in cells if c.table == "table1"]
        assert len(table1_cells) == 2 * len(grid.skews) * len(grid.seeds) and {
            c.config.num_nodes for c in table1_cells
        } == {2}
        # Table 2's FedAvg cell at 2 nodes is table 1's skew-0.9 cell: one run (same key), two tables.
        keys1 = {json.dumps(paper.run_key(c.config), sort_keys=True) for c in table1_cells}
        shared = [c for c in cells if c.table == "table2" and c.label.startswith("fedavg ") and c.config.num_nodes == 2]
        assert shared and all(json.dumps(paper.run_key(c.config), sort_keys=True) in keys1 for c in shared)
        hetero = [c for c in cells if c.table == "hetero"]
        assert {c.label for c in hetero} == {"sync", "async", "fedrec", "fedbuff", "semisync"}
        for cell in hetero:
            assert cell.config.heterogeneity.slowdown == (1.0, 4.0, 10.0) and cell.config.heterogeneity.time_budget
            assert (cell.config.min_nodes is None) == (cell.config.mode == "async")  # waits are bounded
        assert next(c for c in hetero if c.label == "fedbuff").config.async_options.buffer_size == 2
        assert next(c for c in hetero if c.label == "semisync").config.semisync.lambda_ == 1.0
        assert next(c for c in hetero if c.label == "fedrec").config.async_options.staleness == "poly:0.5"


def _fake_result(config: SimulationConfig) -> SimulationResult:
    accuracy = 0.5 + 0.1 * config.seed + (0.05 if config.mode == "sync" else 0.0)
    nodes = [
        NodeResult(
            f"node-{i}",
            test_accuracy=accuracy,
            epochs_completed=config.epochs,
            history=[{"time": 1.0 + i, "test_accuracy": accuracy, "peer_lag_max": 1.0, "peer_lag_mean": 0.5}],
        )
        for i in range(config.num_nodes)
    ]
    return SimulationResult(
        config=config,
        run_url="memory://x",
        nodes=nodes,
        standalone=[NodeResult("node-0", test_accuracy=0.3)],
        centralized=NodeResult("centralized", test_accuracy=0.9),
    )


def test_runs_are_cached_and_a_time_limit_skips_new_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[SimulationConfig] = []

    def fake_run(config: SimulationConfig, progress: Any = None) -> SimulationResult:
        calls.append(config)
        return _fake_result(config)

    monkeypatch.setattr(paper, "run_simulation", fake_run)
    grid = paper.make_grid(True, "digits")
    planned = len(paper.cells(grid, str(tmp_path)))
    lines: list[str] = []
    records = paper.run_grid(grid, str(tmp_path), lines.append)
    # One run per distinct config: table 2's FedAvg 2-node cells reuse table 1's skew-0.9 runs.
    assert len(records) == planned and len(calls) == planned - 2 * len(grid.table2_seeds)
    assert {r["table"] for r in records} == {"table1", "table2", "hetero"}
    assert all(c.store_url and c.store_url.startswith("/") for c in calls)  # a fresh local store per run
    calls.clear()
    again = paper.run_grid(grid, str(tmp_path), lines.append)
    assert calls == [] and [r["federated"] for r in again] == [r["federated"] for r in records]
    assert [(r["table"], r["label"]) for r in again] == [(r["table"], r["label"]) for r in records]
    # A new cache and no time left: nothing starts, nothing is invented.
    assert paper.run_grid(grid, str(tmp_path / "other"), lines.append, max_minutes=0) == []
    assert calls == [] and "skipped (time limit)" in lines[-1]


def _records(sync_sd: float, async_sd: float) -> list[dict[str, Any]]:
    rows = []
    for seed, noise in enumerate((-1.0, 0.0, 1.0)):
        for skew in (0.0, 0.9, 1.0):
            base = {0.0: 0.9, 0.9: 0.88, 1.0: 0.7}[skew]
            for mode, sd in (("sync", sync_sd), ("async", async_sd)):
                fed, apart = base + noise * sd, 0.0 if mode == "sync" else 0.05  # async nodes end apart
                rows.append(
                    {
                        "table": "table1",
                        "label": mode,
                        "mode": mode,
                        "skew": skew,
                        "seed": seed,
                        "nodes": 2,
                        "strategy": "fedavg",
                        "federated": fed,
                        "per_node": [fed - apart, fed + apart],
                        "standalone": 0.5,
                        "centralized": 0.9,
                        "epochs": [5, 5],
                        "seconds": 1.0,
                        "points": [[[1.0, base]]],
                        "peer_lag": {"max": 1.0, "mean": 0.5, "aggregations": 8},
                    }
                )
    return rows


def test_table1_statistics_and_claims() -> None:
    tables = {"table1": table1(_records(sync_sd=0.002, async_sd=0.01))}
    t = tables["table1"]["rows"]
    assert t["sync"]["1.0"]["mean"] == pytest.approx(0.7) and t["async"]["1.0"]["sd"] == pytest.approx(0.01)
    assert t["centralized"]["0.9"]["mean"] == pytest.approx(0.9)
    verdicts = {c["claim"]: c["verdict"] for c in claims(tables)}
    assert verdicts["Sync ≈ async at low skew"] == REPRODUCES
    assert verdicts["At full skew async varies much more than sync (sd ratio > 2; paper 0.114/0.02)"] == REPRODUCES
    assert verdicts["At full skew async drops more than sync"] == FAILS  # equal means
    assert verdicts["Federation beats standalone under skew"] == REPRODUCES
    spread = "At full skew async's final models vary more than sync's (sd over nodes x seeds, ratio > 2)"
    assert verdicts[spread] == REPRODUCES
    same = {c["claim"]: c["verdict"] for c in claims({"table1": table1(_records(0.005, 0.005))})}
    assert same["At full skew async varies much more than sync (sd ratio > 2; paper 0.114/0.02)"] == FAILS
    wide = {c["claim"]: c["verdict"] for c in claims({"table1": table1(_records(0.005, 0.05))})}
    assert wide["Sync ≈ async at low skew"] == INCONCLUSIVE  # a +-0.12 interval cannot show similarity


def test_outputs_put_the_papers_numbers_beside_ours(tmp_path: Path) -> None:
    grid = paper.make_grid(True, "digits")
    records = _records(0.005, 0.05)
    paths = write_outputs(
        grid,
        records,
        tmp_path,
        command="flwr-serverless experiment paper --quick",
        seconds=1.0,
        planned=len(records) + 3,
    )
    text = (tmp_path / "paper_quick.md").read_text()
    assert "Made by: `flwr-serverless experiment paper --quick` (18 of 21 planned runs finished; 0 min of runs)" in text
    assert "| sync | 0.900 ± 0.012 (0.987) | 0.880 ± 0.012 (0.983) | 0.700 ± 0.012 (0.894) |" in text
    assert "| centralized | 0.900 ± 0.000 (0.987) |" in text  # identical seeds: no spread
    assert "max 1, mean 0.50" in text and "## Claims" in text
    with open(tmp_path / "paper_quick.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(records)
    data = json.loads((tmp_path / "paper_quick.json").read_text())
    assert data["command"].startswith("flwr-serverless experiment paper") and data["planned_runs"] == 21
    assert data["strategy_options"]["fedavgm"]["server_momentum"] == 0.9
    pytest.importorskip("matplotlib")
    assert {p.name for p in paths if p.suffix == ".png"} == {
        "paper_quick_accuracy_by_skew.png",
        "paper_quick_accuracy_vs_time.png",
    }


def test_a_direction_claim_needs_the_gap_to_beat_the_intervals() -> None:
    from benchmarks.paper.claims import _lower

    def stat(mean: float, ci: float) -> dict[str, float]:
        return {"mean": mean, "ci95": ci}

    assert _lower(stat(0.70, 0.01), stat(0.80, 0.01)) == REPRODUCES
    assert _lower(stat(0.70, 0.20), stat(0.80, 0.01)) == INCONCLUSIVE  # lower, but well within a wide CI
    assert _lower(stat(0.795, 0.01), stat(0.80, 0.01)) == FAILS  # a gap smaller than tight intervals
    assert _lower(stat(0.90, 0.01), stat(0.80, 0.01)) == FAILS


def test_the_semisync_claim_is_judged_run_by_run() -> None:
    from benchmarks.paper.claims import PARTLY, hetero_claims

    def row(*times: float | None) -> dict[str, Any]:
        final = mean_ci([0.7, 0.72])
        return {"final": final, "peer_lag_max": None, "time_to_target": {"0.7": {"mean": None, "values": list(times)}}}

    table = {"targets": [0.7], "rows": {"semisync": row(53.0, 52.0), "sync": row(44.0, None), "async": row(37.0, 40.5)}}
    claim = hetero_claims(table)[0]
    # Mean times would say "sooner than sync" (sync's mean is undefined); per run it is 1 of 2.
    assert claim["verdict"] == PARTLY and "sooner than sync in 1 of 2 runs, than async in 0 of 2" in claim["measured"]
    table["rows"]["async"] = row(None, 60.0)
    table["rows"]["sync"] = row(None, None)
    assert hetero_claims(table)[0]["verdict"] == REPRODUCES


def test_the_paper_command_checks_its_tables_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.paper.run import main

    assert main(["--tables", "table1,nope", "--cache", "/nonexistent"]) == 2
    assert "unknown table(s) nope; choose from table1, table2, hetero" in capsys.readouterr().err
