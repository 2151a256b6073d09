"""``simulate --partitioner``: Flower Datasets' partitioners beside the paper's label skew, options checked."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from flwr_serverless.cli import main
from flwr_serverless.simulation import Partitioning, SimulationConfig, run_simulation

LABELS = np.random.default_rng(0).integers(0, 10, 1000)


@pytest.mark.parametrize(
    ("partitioning", "match"),
    [
        (Partitioning("quantile"), r"option partitioner \(--partitioner\) must be one of skew, iid, dirichlet"),
        (Partitioning("iid:3"), r"iid takes no parameter"),
        (Partitioning("dirichlet"), r"dirichlet needs its parameter: dirichlet:ALPHA"),
        (Partitioning("dirichlet:0"), r"option partitioner \(--partitioner\) must be a positive number, got 0"),
        (Partitioning("dirichlet:x"), r"must be a positive number, got 'x'"),
        (Partitioning("pathological:1.5"), r"must be a positive integer, got 1.5"),
        (Partitioning("shard:2", {"shard_size": 0}), r"option shard_size \(--partitioner-option\) must be a positive"),
        (
            Partitioning("iid", {"alpha": 1}),
            r"alpha \(--partitioner-option\) is not an argument of the iid partitioner",
        ),
        (Partitioning("dirichlet:1", {"seed": 3}), r"seed \(--partitioner-option\) is not an argument .*min_partition"),
        (Partitioning("dirichlet:1", {"alpha": 2}), r"alpha \(--partitioner-option\) is already set by --partitioner"),
        (Partitioning("dirichlet:1", {"self_balancing": "yes"}), r"self_balancing .* must be True or False"),
        (Partitioning("pathological:2", {"class_assignment_mode": "x"}), r"must be one of random, deterministic"),
    ],
)
def test_bad_partitioner_options_fail_before_the_data_is_loaded(
    partitioning: Partitioning, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr_serverless.simulation.runner as runner

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation must fail before the data is even loaded")

    monkeypatch.setattr(runner, "load_dataset", no_data)
    with pytest.raises(ValueError, match=match):
        run_simulation(SimulationConfig(num_nodes=2, partitioning=partitioning))
    with pytest.raises(ValueError, match=r"skew \(--skew\) applies to --partitioner skew only, not iid"):
        run_simulation(SimulationConfig(num_nodes=2, skew=0.5, partitioning=Partitioning("iid")))


def test_the_default_is_the_papers_label_skew_and_keeps_its_cache_keys() -> None:
    from flwr_serverless.simulation.baselines import standalone_key
    from flwr_serverless.simulation.data import partition_label_skew

    default = Partitioning()
    assert default.kind == "skew" and default.key() is None
    expected = partition_label_skew(LABELS, 3, 0.9, 4)
    assert all(np.array_equal(a, b) for a, b in zip(default.split(LABELS, 3, 0.9, 4), expected))
    assert standalone_key(SimulationConfig(num_nodes=3))["partition"] == {"num_nodes": 3, "skew": 0.9}
    other = standalone_key(SimulationConfig(num_nodes=3, partitioning=Partitioning("dirichlet:0.5")))
    assert other["partition"]["partitioner"] == {"spec": "dirichlet:0.5", "options": {}}


def _label_counts(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([np.bincount(LABELS[p], minlength=10) for p in parts])


def test_flower_datasets_partitioners_split_by_index() -> None:
    pytest.importorskip("flwr_datasets")
    iid = Partitioning("iid").split(LABELS, 4, 0.9, 0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(1000))  # disjoint and complete
    assert [len(p) for p in iid] == [250] * 4 and (_label_counts(iid) > 0).all()  # every node sees every class

    pathological = Partitioning("pathological:2", {"class_assignment_mode": "deterministic"}).split(LABELS, 5, 0.9, 0)
    assert [(counts > 0).sum() for counts in _label_counts(pathological)] == [2] * 5
    assert len(np.unique(np.concatenate(pathological))) == sum(len(p) for p in pathological)

    shards = Partitioning("shard:2", {"shard_size": 50}).split(LABELS, 4, 0.9, 0)
    assert [len(p) for p in shards] == [100] * 4
    assert len(np.unique(np.concatenate(shards))) == 400

    def spread(alpha: float) -> float:  # how far the nodes' label mixes are from the global one
        counts = _label_counts(Partitioning(f"dirichlet:{alpha}").split(LABELS, 4, 0.9, 1))
        mixes = counts / counts.sum(axis=1, keepdims=True)
        return float(np.abs(mixes - np.bincount(LABELS) / len(LABELS)).sum(axis=1).mean())

    assert spread(0.1) > 2 * spread(100.0)  # a small alpha skews the labels, a large one is near IID
    again = Partitioning("dirichlet:0.5").split(LABELS, 4, 0.9, 7)
    assert all(np.array_equal(a, b) for a, b in zip(again, Partitioning("dirichlet:0.5").split(LABELS, 4, 0.9, 7)))


def test_simulate_partitioner_flag_gives_the_nodes_flower_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flwr_datasets")
    import flwr_serverless.simulation.runner as runner

    seen: list[Any] = []

    def record(tasks: list[Any], use_processes: bool, progress: Any) -> list[dict[str, Any]]:
        seen.extend(tasks)
        return [{"node_id": t.name, "role": t.role, "error": "Recorded"} for t in tasks]

    monkeypatch.setattr(runner, "run_tasks", record)
    out = io.StringIO()
    flags = ["--partitioner", "pathological:2", "--partitioner-option", "class_assignment_mode=deterministic"]
    code = main(["simulate", "--nodes", "3", "--epochs", "1", "--no-baselines", "--dataset", "digits", *flags], out=out)
    assert code == 1, out.getvalue()  # every node stopped at the recorder
    assert "partitioner pathological:2, class_assignment_mode=deterministic" in out.getvalue()
    _, y_train, _, _ = runner.load_dataset("digits", None)
    assert len(seen) == 3 and [len(set(y_train[t.train_indices])) for t in seen] == [2, 2, 2]


def test_simulate_refuses_skew_with_another_partitioner(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--partitioner", "iid", "--skew", "0.9"]) == 2
    assert "skew (--skew) applies to --partitioner skew only, not iid" in capsys.readouterr().err
    assert main(["simulate", "--partitioner", "shard:2", "--partitioner-option", "shard_size=-1"]) == 2
    assert "shard_size (--partitioner-option) must be a positive integer" in capsys.readouterr().err
