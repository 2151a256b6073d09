"""The aggregate mode and compressed updates in the simulation, and node counters in every report.

Runs are small (digits, a few nodes, 1-2 epochs) on memory:// or file://
stores; option errors are checked before any data is loaded.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flwr_serverless.cli import main
from flwr_serverless.node.exchange import NodeStats
from flwr_serverless.simulation import NodeResult, SimulationConfig, SimulationResult, run_simulation
from flwr_serverless.simulation.report import format_report
from flwr_serverless.simulation.update_options import CompressionOptions
from flwr_serverless.stores import open_store
from flwr_serverless.wire import layout

pytest.importorskip("sklearn")


def _aggregate_config(url: str, **overrides: Any) -> SimulationConfig:
    values: dict[str, Any] = {
        "num_nodes": 3,
        "mode": "aggregate",
        "store_url": url,
        "epochs": 2,
        "skew": 0.5,
        "baselines": False,
        "seed": 2,
    }
    return SimulationConfig(**(values | overrides))


def _check_aggregate_run(result: SimulationResult) -> None:
    config = result.config
    assert result.ok, [r.error for r in result.nodes]
    for row in result.nodes:
        assert row.epochs_completed == config.epochs and row.federations == config.epochs
        assert set(row.counters) >= set(NodeStats().as_dict())  # every counter, cas_* and repairs included
        assert row.counters["federations"] == config.epochs
        # O(1) per epoch: LIST + GET aggregate, PUT contribution, PUT aggregate, plus 3 per retry and joining.
        retries = row.counters["cas_conflicts"]
        assert row.requests <= config.epochs * 4 + 3 * retries + 6, row
    # The nodes federated through one shared object, never through nodes/<id>.
    keys = set(open_store(result.run_url).list(""))
    assert layout.AGGREGATE in keys
    assert not any(layout.parse_node_key(k) for k in keys)
    owners = {parsed[0] for k in keys if (parsed := layout.parse_contribution_key(k))}
    assert owners == {r.node_id for r in result.nodes}


def test_aggregate_mode_in_threads_and_int8_contributions_are_smaller() -> None:
    pytest.importorskip("keras")
    plain = run_simulation(_aggregate_config("memory://sim-aggregate-plain"))
    _check_aggregate_run(plain)
    int8 = run_simulation(_aggregate_config("memory://sim-aggregate-int8", compression=CompressionOptions("int8")))
    _check_aggregate_run(int8)

    # Same model: int8 contributions are about a quarter of float32's (the aggregate stays float32).
    def contribution_bytes(result: SimulationResult) -> int:
        listing = open_store(result.run_url).list(layout.CONTRIBUTIONS)
        return sum(info.size for info in listing.values())

    assert contribution_bytes(int8) < 0.35 * contribution_bytes(plain)
    assert int8.totals["bytes_up"] < plain.totals["bytes_up"]
    assert int8.config.public_dict()["compression"] == {"compression": "int8", "topk": {}}


def test_aggregate_mode_with_lightning_nodes() -> None:
    pytest.importorskip("torch")
    result = run_simulation(
        _aggregate_config(
            "memory://sim-aggregate-lightning",
            num_nodes=2,
            epochs=1,
            framework="lightning",
            compression=CompressionOptions("fp16"),
        )
    )
    _check_aggregate_run(result)


@pytest.mark.slow
def test_aggregate_mode_in_a_process_pool(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    out = io.StringIO()
    code = main(
        [
            "simulate",
            "--mode",
            "aggregate",
            "--nodes",
            "3",
            "--epochs",
            "2",
            "--no-baselines",
            "--quiet",
            "--processes",
            "--workers",
            "2",
            "--compression",
            "bf16",
            "--store",
            f"file://{tmp_path}/s",
            "--json",
            str(tmp_path / "r.json"),
        ],
        out=out,
    )
    assert code == 0, out.getvalue()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["mode"] == "aggregate" and report["config"]["compression"]["compression"] == "bf16"
    assert [n["counters"]["federations"] for n in report["nodes"]] == [2, 2, 2]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr_serverless.simulation.runner as runner

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation must fail before the data is even loaded")

    monkeypatch.setattr(runner, "load_dataset", no_data)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--strategy", "fedavgm"], "--strategy"),
        (["--strategy", "fedadam"], "--strategy"),
        (["--staleness", "poly:0.5"], "--staleness"),
        (["--buffer-size", "2"], "--buffer-size"),
        (["--participation", "0.5"], "--participation"),
        (["--lambda", "3"], "--lambda"),
        (["--timeout", "5"], "--timeout"),
        (["--min-nodes", "1"], "--min-nodes"),
        (["--compression", "topk:0.05"], "--compression"),
        (
            [
                "--store",
                "dir://exp",
                "--storage-option",
                "path=/flwr-sim-noncas",
                "--storage-option",
                "target_protocol=memory",
            ],
            "--store",
        ),
    ],
)
def test_aggregate_mode_refuses_what_it_cannot_honour_before_training(
    flags: list[str], named: str, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--mode", "aggregate", "--no-baselines", *flags]) == 2
    err = capsys.readouterr().err
    assert f"({named})" in err and "aggregate" in err, err


@pytest.mark.parametrize(
    ("flags", "named", "why"),
    [
        (["--topk-keyframe-every", "4"], "--topk-keyframe-every", "only apply with compression='topk"),
        (["--compression", "int8", "--topk-max-error", "0.1"], "--topk-max-error", "only apply"),
        (["--compression", "topk:0.05", "--topk-keyframe-every", "0"], "--topk-keyframe-every", "positive integer"),
        (["--compression", "topk:0.05", "--topk-keyframe-every", "2.5"], "--topk-keyframe-every", "positive integer"),
    ],
)
def test_compression_flags_are_checked_before_training(
    flags: list[str], named: str, why: str, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--no-baselines", *flags]) == 2
    err = capsys.readouterr().err
    assert f"({named})" in err and why in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compression", "int4"], "argument --compression: compression='int4'"),
        (["--compression", "topk:0.7"], "top-k fraction must be a number in (0, 0.5)"),
        (["--compression", "topk:0.05", "--topk-keyframe-every", "often"], "argument --topk-keyframe-every"),
    ],
)
def test_compression_values_are_refused_by_the_parser(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"compression": CompressionOptions("fp16"), "node_options": {"compression": "int8"}},
            r"compression \(--compression\) is set both",
        ),
        (
            {"mode": "aggregate", "node_options": {"compression": "topk:0.1"}},
            r"compression \(--compression\) 'topk:0.1' is not available with --mode aggregate",
        ),
        (
            {"compression": CompressionOptions("topk:0.1", {"topk_sometimes": 3})},
            r"topk_sometimes \(--topk-sometimes\) is not a node option",
        ),
    ],
)
def test_python_config_compression_errors_name_the_option(
    changes: dict[str, Any], match: str, no_training: None
) -> None:
    with pytest.raises(ValueError, match=match):
        run_simulation(SimulationConfig(**({"num_nodes": 2, "baselines": False} | changes)))


def test_every_node_counter_reaches_json_csv_and_the_printed_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A counter the simulation has never heard of (as main adds them) is carried like the others."""
    pytest.importorskip("keras")
    original = NodeStats.as_dict

    def with_new_counter(self: NodeStats) -> dict[str, Any]:
        return original(self) | {"delta_log_writes": 7 * self.federations}

    monkeypatch.setattr(NodeStats, "as_dict", with_new_counter)
    out = io.StringIO()
    paths = {name: tmp_path / name for name in ("r.json", "runs.csv", "nodes.csv")}
    code = main(
        [
            "simulate",
            "--nodes",
            "2",
            "--epochs",
            "1",
            "--no-baselines",
            "--quiet",
            "--store",
            "memory://cnt",
            "--json",
            str(paths["r.json"]),
            "--csv",
            str(paths["runs.csv"]),
            "--nodes-csv",
            str(paths["nodes.csv"]),
        ],
        out=out,
    )
    text = out.getvalue()
    assert code == 0, text
    report = json.loads(paths["r.json"].read_text())
    assert [n["counters"]["delta_log_writes"] for n in report["nodes"]] == [7, 7]
    assert report["summary"]["totals"]["counters"]["delta_log_writes"] == 14
    assert NodeResult.from_dict(report["nodes"][0]).counters["delta_log_writes"] == 7
    run_rows = list(csv.DictReader(paths["runs.csv"].open()))
    assert run_rows[0]["delta_log_writes"] == "14" and int(run_rows[0]["requests"]) > 0
    node_rows = list(csv.DictReader(paths["nodes.csv"].open()))
    assert [(r["node_id"], r["delta_log_writes"], r["federations"]) for r in node_rows] == [
        ("node-0", "7", "1"),
        ("node-1", "7", "1"),
    ]
    assert all(int(r["bytes_up"]) > 0 and int(r["requests"]) > 0 for r in node_rows)
    summary = text[text.index("Node counters (non-zero):") :]
    assert "node-0       federations 1" in summary and "delta_log_writes 7" in summary
    assert "all nodes    federations 2" in summary and "delta_log_writes 14" in summary


def test_the_printed_summary_shows_non_zero_counters_only() -> None:
    config = SimulationConfig(num_nodes=2, mode="aggregate", epochs=3, baselines=False)
    quiet = {name: 0 for name in NodeStats().as_dict()}
    rows = [
        NodeResult("node-0", epochs_completed=3, counters=quiet | {"federations": 3, "cas_conflicts": 2, "repairs": 1}),
        NodeResult("node-1", epochs_completed=3, counters=quiet | {"federations": 3, "keyframe_misses": 4}),
    ]
    text = format_report(SimulationResult(config=config, run_url="memory://x", nodes=rows))
    assert "node-0       federations 3, cas_conflicts 2, repairs 1" in text
    assert "node-1       federations 3, keyframe_misses 4" in text
    assert "all nodes    federations 6, keyframe_misses 4, cas_conflicts 2, repairs 1" in text
    assert "cas_giveups" not in text
    silent = [replace(r, counters=quiet) for r in rows]
    assert "Node counters" not in format_report(SimulationResult(config=config, run_url="memory://x", nodes=silent))


def test_ray_places_aggregate_nodes_without_demanding_a_cpu_each() -> None:
    """Aggregate nodes never wait for each other, so Ray may run them in turns (unlike sync/semisync)."""
    import numpy as np

    from flwr_serverless.simulation.ray_engine import _check_capacity
    from flwr_serverless.simulation.runner import NodeTask

    class TwoCpus:
        def cluster_resources(self) -> dict[str, float]:
            return {"CPU": 2.0}

    def tasks(mode: str) -> list[NodeTask]:
        config = SimulationConfig(num_nodes=4, mode=mode, engine="ray", store_url="file:///tmp/x")
        return [NodeTask("federated", i, f"node-{i}", np.arange(2), config) for i in range(4)]

    _check_capacity(TwoCpus(), tasks("aggregate"), 4)
    with pytest.raises(RuntimeError, match="--mode sync needs all 4 Ray tasks"):
        _check_capacity(TwoCpus(), tasks("sync"), 4)
