"""End-to-end simulations: async on a file:// store, sync on memory://, the CLI, and (slow) processes."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from flwr_serverless.cli import main
from flwr_serverless.simulation import NodeResult, SimulationConfig, SimulationResult, make_run_url, run_simulation

pytest.importorskip("keras")
pytest.importorskip("sklearn")


def _check_rows(result: SimulationResult, config: SimulationConfig) -> None:
    assert result.ok, [r.error for r in result.nodes]
    assert [r.node_id for r in result.nodes] == [f"node-{i}" for i in range(config.num_nodes)]
    for row in result.nodes:
        assert row.epochs_completed == config.epochs
        assert row.federations == config.epochs
        assert row.test_accuracy is not None and 0.0 < row.test_accuracy <= 1.0
        assert 0.0 < row.wall_time < 120
        assert row.num_train_examples > 0
        assert row.puts >= config.epochs  # one publication per epoch (plus joining)
        assert row.requests >= 2 * config.epochs  # at least a PUT and a LIST per epoch
        assert row.bytes_up > 0
        assert row.rejected == 0
        assert len(row.history) == config.epochs and "accuracy_fed" in row.history[-1]
    assert sum(r.num_train_examples for r in result.nodes) > 0


def test_async_simulation_on_a_file_store(tmp_path: Path) -> None:
    config = SimulationConfig(
        num_nodes=3, mode="async", store_url=f"file://{tmp_path}/store", epochs=3, skew=0.5, baselines=False
    )
    events: list[dict] = []
    result = run_simulation(config, progress=events.append)
    _check_rows(result, config)
    assert result.run_url.startswith(f"file://{tmp_path}/store/run-")
    assert result.standalone == [] and result.centralized is None
    # Async: nodes publish each epoch; the union of what they pulled shows they saw each other.
    assert sum(r.peers_used for r in result.nodes) > 0
    assert sum(r.bytes_down for r in result.nodes) > 0
    epoch_events = [e for e in events if e["event"] == "epoch_end"]
    assert len(epoch_events) == 3 * 3
    assert {e["node"] for e in epoch_events} == {"node-0", "node-1", "node-2"}
    assert all(e["accuracy_fed"] is not None for e in epoch_events)


def test_sync_simulation_on_a_memory_store() -> None:
    config = SimulationConfig(
        num_nodes=3, mode="sync", store_url="memory://sim-sync", epochs=3, skew=0.9, sync_timeout=60, baselines=True
    )
    result = run_simulation(config)
    _check_rows(result, config)
    for row in result.nodes:
        assert row.peers_used == 2 * config.epochs  # every round aggregates all three nodes
        assert row.bytes_down > 0
    # The last round aggregated the same three models on every node: identical final models.
    assert len({r.test_accuracy for r in result.nodes}) == 1
    assert [r.node_id for r in result.standalone] == ["node-0", "node-1", "node-2"]
    assert result.centralized is not None and result.centralized.test_accuracy is not None
    assert [r.num_train_examples for r in result.standalone] == [r.num_train_examples for r in result.nodes]
    assert result.centralized.num_train_examples == sum(r.num_train_examples for r in result.nodes)


def test_each_run_gets_a_fresh_prefix() -> None:
    assert make_run_url("s3://bucket/exp/") != make_run_url("s3://bucket/exp")
    assert make_run_url("s3://bucket/exp/").startswith("s3://bucket/exp/run-")


def test_config_errors_are_reported_before_training() -> None:
    with pytest.raises(ValueError, match="mode"):
        run_simulation(SimulationConfig(mode="semi-sync"))
    with pytest.raises(ValueError, match="memory"):
        run_simulation(SimulationConfig(use_processes=True, store_url="memory://x"))
    with pytest.raises(ValueError, match="no training data"):
        run_simulation(SimulationConfig(num_nodes=12, skew=1.0, store_url="memory://x"))


def test_cli_runs_end_to_end_and_prints_the_table(tmp_path: Path) -> None:
    out = io.StringIO()
    json_path = tmp_path / "result.json"
    code = main(
        [
            "simulate",
            "--nodes",
            "2",
            "--mode",
            "async",
            "--strategy",
            "fedavg",
            "--store",
            f"file://{tmp_path}/cli-store",
            "--epochs",
            "2",
            "--dataset",
            "digits",
            "--skew",
            "0.9",
            "--batch-size",
            "32",
            "--seed",
            "1",
            "--eval-each-epoch",
            "--json",
            str(json_path),
        ],
        out=out,
    )
    text = out.getvalue()
    assert code == 0, text
    assert "[node-0] epoch 2/2" in text and "[node-1] epoch 1/2" in text
    # The live line names each figure: training accuracy, the nodes' mean of it, and the federated model's test.
    live = next(line for line in text.splitlines() if line.startswith("[node-0] epoch 2/2"))
    assert "train acc" in live and "nodes' mean" in live and "test acc" in live and "(federated model)" in live
    assert "acc_fed" not in text
    assert "Peer lag in the async aggregates" in text
    for needle in (
        "Federated nodes",
        "test acc",
        "MB up",
        "requests",
        "rejected",
        "standalone node-0",
        "standalone node-1",
        "centralized",
        "Summary: federated mean accuracy",
    ):
        assert needle in text, needle
    table = text[text.index("Federated nodes") :]
    assert "node-0" in table and "2/2" in table
    report = json.loads(json_path.read_text())
    assert [n["node_id"] for n in report["nodes"]] == ["node-0", "node-1"]
    assert report["summary"]["centralized_accuracy"] > 0
    node = NodeResult.from_dict(report["nodes"][0])
    assert node.epochs_completed == 2
    assert all(0 < h["test_accuracy"] <= 1 and h["time"] > 0 for h in node.history)
    lags = [h["peer_lag_max"] for n in report["nodes"] for h in n["history"] if "peer_lag_max" in h]
    assert lags and all(0 <= lag <= 1 for lag in lags)  # two equal nodes: at most one epoch apart


def test_reports_never_contain_credentials() -> None:
    config = SimulationConfig(
        storage_options={"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"}, node_options={"secret": "hmac"}
    )
    public = config.public_dict()
    assert public["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert public["node_options"] == {"secret": "***"}
    assert "s3cr3t" not in json.dumps(public) and "hmac" not in json.dumps(public)


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--mode", "never"])
    assert main(["simulate", "--processes", "--store", "memory://x", "--epochs", "1"]) == 2
    assert "memory" in capsys.readouterr().err


@pytest.mark.slow
def test_processes_mode(tmp_path: Path) -> None:
    config = SimulationConfig(
        num_nodes=2,
        mode="sync",
        store_url=str(tmp_path / "store"),
        epochs=2,
        use_processes=True,
        baselines=False,
        sync_timeout=120,
    )
    events: list[dict] = []
    result = run_simulation(config, progress=events.append)
    _check_rows(result, config)
    assert len({r.test_accuracy for r in result.nodes}) == 1
    assert len([e for e in events if e["event"] == "epoch_end"]) == 4


def test_models_are_small_deterministic_and_fit_each_dataset_shape() -> None:
    import numpy as np

    from flwr_serverless.simulation import build_keras_model

    a = build_keras_model("digits", (64,), 10, seed=0)
    b = build_keras_model("digits", (64,), 10, seed=0)
    c = build_keras_model("digits", (64,), 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    assert not all(np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights()))
    assert a.count_params() < 10_000
    cnn = build_keras_model("fashion_mnist", (28, 28), 10, seed=0)
    assert cnn.count_params() < 150_000
    images = np.random.default_rng(0).random((8, 28, 28), dtype=np.float32)
    history = cnn.fit(images, np.arange(8) % 10, epochs=1, verbose=0)
    assert "accuracy" in history.history
    assert cnn.predict(images, verbose=0).shape == (8, 10)


def test_baselines_are_trained_once_per_seed_and_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr_serverless.simulation.runner as runner

    trained: list[list[str]] = []
    real = runner.run_tasks

    def counting(tasks: list, use_processes: bool, progress: object) -> list:
        trained.append([t.role for t in tasks])
        return real(tasks, use_processes, progress)

    monkeypatch.setattr(runner, "run_tasks", counting)
    config = SimulationConfig(
        num_nodes=2,
        mode="async",
        epochs=1,
        seed=4,
        store_url="memory://cache-test",
        baseline_cache=str(tmp_path / "baselines"),
    )
    first = run_simulation(config)
    second = run_simulation(replace(config, mode="sync"))  # another mode: same partition, same baselines
    third = run_simulation(replace(config, num_nodes=3))  # another partition: same centralized model
    assert first.ok and second.ok and third.ok
    baseline_phases = [roles for roles in trained if roles and "federated" not in roles]
    assert baseline_phases == [["standalone", "standalone", "centralized"], ["standalone"] * 3]
    assert [r.test_accuracy for r in second.standalone] == [r.test_accuracy for r in first.standalone]
    assert second.centralized == first.centralized == third.centralized
    assert len(list((tmp_path / "baselines").glob("*.json"))) == 3


def test_cli_repeats_over_seeds_and_summarizes(tmp_path: Path) -> None:
    out = io.StringIO()
    csv_path, json_path = tmp_path / "runs.csv", tmp_path / "runs.json"
    code = main(
        [
            "simulate",
            "--nodes",
            "2",
            "--epochs",
            "1",
            "--no-baselines",
            "--seeds",
            "0-1",
            "--quiet",
            "--store",
            "memory://seeds",
            "--csv",
            str(csv_path),
            "--json",
            str(json_path),
        ],
        out=out,
    )
    text = out.getvalue()
    assert code == 0, text
    assert "== seed 0 ==" in text and "== seed 1 ==" in text
    assert "Over 2 seeds (0, 1): mean test accuracy +- 95% CI" in text
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("seed,mode,strategy") and [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    report = json.loads(json_path.read_text())
    assert [r["config"]["seed"] for r in report["runs"]] == [0, 1]
    assert report["summary"]["federated"]["n"] == 2 and report["summary"]["federated"]["ci95"] is not None


def test_fedavgm_with_momentum_runs_in_an_async_simulation() -> None:
    """Each node's first federation has no peers; FedAvgM's rounds must still start at 1 (nodes number them)."""
    config = SimulationConfig(
        num_nodes=2,
        mode="async",
        strategy="fedavgm",
        strategy_options={"server_momentum": 0.9},
        epochs=2,
        baselines=False,
        max_train_examples=300,
    )
    result = run_simulation(config)
    assert result.ok, [row.error for row in result.nodes]
    assert sum(row.peers_used for row in result.nodes) > 0
