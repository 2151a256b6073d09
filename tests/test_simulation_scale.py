"""Many nodes on one machine (threads, a bounded process pool) and nodes as Ray tasks (local Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from flwr_serverless.cli import main
from flwr_serverless.simulation import SimulationConfig, SimulationResult, run_simulation
from flwr_serverless.simulation.execution import pool_size

pytest.importorskip("keras")
pytest.importorskip("sklearn")


def _config(tmp_path: Path, **overrides: Any) -> SimulationConfig:
    values: dict[str, Any] = {
        "num_nodes": 20,
        "mode": "async",
        "epochs": 1,
        "skew": 0.0,
        "baselines": False,
        "store_url": f"file://{tmp_path}/store",
        "seed": 3,
    }
    return SimulationConfig(**(values | overrides))


def _check_every_node_completed(result: SimulationResult) -> None:
    config = result.config
    assert result.ok, [r.error for r in result.nodes if r.error]
    assert [r.node_id for r in result.nodes] == [f"node-{i}" for i in range(config.num_nodes)]
    assert all(r.epochs_completed == config.epochs and r.test_accuracy is not None for r in result.nodes)
    totals = result.totals
    assert totals["nodes"] == totals["completed"] == config.num_nodes
    for key in ("requests", "puts", "gets", "lists", "bytes_up", "bytes_down"):
        assert totals[key] == sum(getattr(r, key) for r in result.nodes), key
    assert totals["puts"] >= config.num_nodes * config.epochs  # every node published every epoch
    assert totals["requests"] == totals["puts"] + totals["gets"] + totals["lists"] + totals["deletes"]
    assert totals["gets"] > 0 and totals["bytes_down"] > 0  # nodes read each other


def test_twenty_threaded_nodes_complete_and_the_report_totals_their_traffic(tmp_path: Path) -> None:
    out = io.StringIO()
    code = main(
        [
            "simulate",
            "--nodes",
            "20",
            "--epochs",
            "1",
            "--skew",
            "0",
            "--no-baselines",
            "--quiet",
            "--store",
            f"file://{tmp_path}/store",
            "--json",
            str(tmp_path / "r.json"),
        ],
        out=out,
    )
    assert code == 0, out.getvalue()
    report = json.loads((tmp_path / "r.json").read_text())
    totals = report["summary"]["totals"]
    assert totals["nodes"] == totals["completed"] == 20
    assert totals["requests"] == sum(n["requests"] for n in report["nodes"])
    assert totals["bytes_down"] == sum(n["bytes_down"] for n in report["nodes"]) > 0
    assert f"Totals over 20 nodes (20 completed every epoch): {totals['requests']} requests" in out.getvalue()


@pytest.mark.slow
def test_hundred_threaded_nodes_complete(tmp_path: Path) -> None:
    _check_every_node_completed(run_simulation(_config(tmp_path, num_nodes=100, epochs=2)))


@pytest.mark.slow
def test_hundred_nodes_in_a_pool_of_four_processes(tmp_path: Path) -> None:
    result = run_simulation(_config(tmp_path, num_nodes=100, epochs=2, use_processes=True, workers=4))
    _check_every_node_completed(result)


def test_the_process_pool_is_bounded() -> None:
    assert pool_size(100, None) == 8  # not 100 TensorFlow runtimes
    assert pool_size(3, None) == 3
    assert pool_size(100, 4) == 4
    assert pool_size(2, 16) == 2


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"engine": "spark"}, "option engine (--engine) must be one of local, ray"),
        ({"workers": 4}, "option workers (--workers)"),
        ({"use_processes": True, "workers": 0}, "must be a positive integer"),
        ({"engine": "ray", "use_processes": True}, "option use_processes (--processes)"),
        ({"engine": "ray", "store_url": "memory://x"}, "option store_url (--store)"),
        ({"engine": "ray", "store_url": None}, "option store_url (--store)"),
        ({"ray_address": "auto"}, "option ray_address (--address) applies to --engine ray only"),
    ],
)
def test_execution_options_are_checked_before_training(tmp_path: Path, overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, **overrides).validate()


@pytest.fixture
def local_ray() -> Any:
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'flwr-serverless[ray]' to test --engine ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_nodes_run_as_ray_tasks_and_federate_through_the_store(tmp_path: Path, local_ray: Any) -> None:
    events: list[dict[str, Any]] = []
    config = _config(tmp_path, num_nodes=2, epochs=2, skew=0.9, engine="ray", mode="sync", sync_timeout=120)
    result = run_simulation(config, progress=events.append)
    _check_every_node_completed(result)
    assert local_ray.is_initialized()  # the caller's Ray session is used and left running
    for row in result.nodes:
        assert row.peers_used == config.epochs  # each sync round aggregated the other node
    assert len({r.test_accuracy for r in result.nodes}) == 1  # sync: both end on the same model
    epochs = sorted((e["node"], e["epoch"]) for e in events if e.get("event") == "epoch_end")
    assert epochs == [("node-0", 1), ("node-0", 2), ("node-1", 1), ("node-1", 2)]  # progress came back


def test_ray_sync_refuses_more_tasks_than_cpus(tmp_path: Path, local_ray: Any) -> None:
    config = _config(tmp_path, num_nodes=3, engine="ray", mode="sync")
    with pytest.raises(RuntimeError, match=r"needs all 3 Ray tasks running at once.*--workers 2"):
        run_simulation(config)
