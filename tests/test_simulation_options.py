"""Every simulate flag reaches what it names (node, strategy, store, callbacks), checked without training.

The node classes, ``open_store`` and the federated callbacks are swapped for
recorders; the worker stops right after building its callbacks. Bad options
fail in ``SimulationConfig.validate()`` with the option's name, before any
training.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from flwr_serverless.cli import main
from flwr_serverless.simulation import SimulationConfig, run_simulation
from flwr_serverless.simulation.options import AsyncOptions, Evaluation, Heterogeneity, SemiSyncOptions

pytest.importorskip("sklearn")


class Recorded(Exception):
    """Raised by the recorders to stop a worker before it trains."""


class FakeStats:
    federations = 0

    def as_dict(self) -> dict[str, int]:
        return {}


class FakeNode:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.stats = FakeStats()


class FakeStore:
    supports_conditional_writes = True

    def close(self) -> None:
        pass


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    import flwr_serverless.node as nodes_module
    import flwr_serverless.node as semisync_module
    import flwr_serverless.stores as stores_module

    calls: dict[str, list[Any]] = {"node": [], "store": [], "callback": [], "callbacks": []}

    def node_class(kind: str) -> Any:
        def build(store: Any, **kwargs: Any) -> FakeNode:
            calls["node"].append((kind, kwargs))
            return FakeNode(store)

        return build

    monkeypatch.setattr(nodes_module, "AsyncFederatedNode", node_class("async"))
    monkeypatch.setattr(nodes_module, "SyncFederatedNode", node_class("sync"))
    monkeypatch.setattr(semisync_module, "SemiSyncFederatedNode", node_class("semisync"))
    monkeypatch.setattr(nodes_module, "AggregateFederatedNode", node_class("aggregate"))

    def open_store(url: str, **kwargs: Any) -> FakeStore:
        calls["store"].append((url, kwargs))
        return FakeStore()

    monkeypatch.setattr(stores_module, "open_store", open_store)
    return calls


@pytest.fixture
def keras_recorder(recorder: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    pytest.importorskip("keras")
    import flwr_serverless.callbacks.keras as keras_callback
    from flwr_serverless.simulation import keras_callbacks

    def callback(node: Any, *args: Any, **kwargs: Any) -> object:
        recorder["callback"].append(kwargs)
        return object()

    real = keras_callbacks.worker_callbacks

    def worker_callbacks(task: Any, *args: Any) -> list[Any]:
        recorder["callbacks"].append((task.name, real(task, *args)))
        raise Recorded

    monkeypatch.setattr(keras_callback, "FlwrFederatedCallback", callback)
    monkeypatch.setattr(keras_callbacks, "worker_callbacks", worker_callbacks)
    return recorder


def _simulate(*flags: str) -> str:
    out = io.StringIO()
    code = main(["simulate", "--nodes", "2", "--epochs", "1", "--no-baselines", "--seed", "1", *flags], out=out)
    assert code == 1, out.getvalue()  # every node stopped at the recorder
    failures = [line for line in out.getvalue().splitlines() if "run failed:" in line]
    assert len(failures) == 2 and all(line.endswith("Recorded") for line in failures), failures
    return out.getvalue()


def _node_kwargs(calls: dict[str, list[Any]], kind: str) -> list[dict[str, Any]]:
    assert {k for k, _ in calls["node"]} == {kind}
    return sorted((kwargs for _, kwargs in calls["node"]), key=lambda kw: kw["node_id"])


def test_async_flags_reach_the_async_node(keras_recorder: dict[str, list[Any]]) -> None:
    _simulate(
        "--mode",
        "async",
        "--staleness",
        "poly:0.5",
        "--staleness-unit",
        "versions",
        "--alpha",
        "0.5",
        "--buffer-size",
        "2",
        "--participation",
        "0.5",
    )
    for index, kwargs in enumerate(_node_kwargs(keras_recorder, "async")):
        assert kwargs["node_id"] == f"node-{index}"
        assert {k: kwargs[k] for k in ("staleness", "staleness_unit", "alpha", "buffer_size", "participation")} == {
            "staleness": "poly:0.5",
            "staleness_unit": "versions",
            "alpha": 0.5,
            "buffer_size": 2,
            "participation": 0.5,
        }
        assert kwargs["seed"] == 1 * 7919 + index  # each node samples participation with its own stream


def test_the_simulation_hands_every_node_its_run_id(keras_recorder: dict[str, list[Any]]) -> None:
    out = _simulate("--mode", "sync")
    runs = {kwargs["run_id"] for kwargs in _node_kwargs(keras_recorder, "sync")}
    assert len(runs) == 1 and next(iter(runs)).startswith("run-")  # the run's sub-prefix names it
    assert next(iter(runs)) in out


def test_sync_and_semisync_flags_reach_their_nodes(keras_recorder: dict[str, list[Any]]) -> None:
    _simulate("--mode", "sync", "--timeout", "33", "--min-nodes", "1")
    for kwargs in _node_kwargs(keras_recorder, "sync"):
        assert (kwargs["num_nodes"], kwargs["timeout"], kwargs["min_nodes"]) == (2, 33.0, 1)
    keras_recorder["node"].clear()
    _simulate("--mode", "semisync", "--lambda", "1.5", "--no-reestimate", "--timeout", "40")
    for kwargs in _node_kwargs(keras_recorder, "semisync"):
        assert (kwargs["lambda_"], kwargs["reestimate"], kwargs["num_nodes"], kwargs["timeout"]) == (1.5, False, 2, 40)


def test_aggregate_mode_builds_aggregate_nodes_with_their_own_backoff_seed(
    keras_recorder: dict[str, list[Any]],
) -> None:
    _simulate("--mode", "aggregate", "--compression", "int8")
    for index, kwargs in enumerate(_node_kwargs(keras_recorder, "aggregate")):
        assert kwargs["seed"] == 1 * 7919 + index and kwargs["compression"] == "int8"
        assert type(kwargs["strategy"]).__name__ == "FedAvg"
        assert not {"staleness", "buffer_size", "num_nodes", "timeout", "topk_keyframe_every"} & set(kwargs)


@pytest.mark.parametrize("mode", ["async", "sync", "semisync"])
def test_compression_flags_reach_every_mode_s_node(mode: str, keras_recorder: dict[str, list[Any]]) -> None:
    _simulate("--mode", mode, "--compression", "topk:0.05", "--topk-keyframe-every", "4", "--topk-max-error", "0.5")
    for kwargs in _node_kwargs(keras_recorder, mode):
        assert (kwargs["compression"], kwargs["topk_keyframe_every"], kwargs["topk_max_error"]) == ("topk:0.05", 4, 0.5)
        assert isinstance(kwargs["topk_keyframe_every"], int)


def test_without_compression_flags_nodes_get_no_compression_option(keras_recorder: dict[str, list[Any]]) -> None:
    _simulate()
    assert all(not {"compression", "topk_keyframe_every"} & set(kw) for kw in _node_kwargs(keras_recorder, "async"))


def test_strategy_and_storage_options_reach_the_strategy_and_the_store(
    keras_recorder: dict[str, list[Any]], tmp_path: Any
) -> None:
    _simulate(
        "--strategy",
        "fedavgm",
        "--strategy-option",
        "server_momentum=0.9",
        "--store",
        f"file://{tmp_path}/s",
        "--storage-option",
        "auto_mkdir=true",
    )
    for kwargs in _node_kwargs(keras_recorder, "async"):
        assert type(kwargs["strategy"]).__name__ == "FedAvgM"
        assert kwargs["strategy"].server_momentum == 0.9
    assert [kw for _, kw in keras_recorder["store"]] == [{"auto_mkdir": True}] * 2
    assert all(url.startswith(f"file://{tmp_path}/s/run-") for url, _ in keras_recorder["store"])


def test_proximal_mu_reaches_the_keras_callback(keras_recorder: dict[str, list[Any]]) -> None:
    _simulate("--proximal-mu", "0.1")
    assert keras_recorder["callback"] == [{"proximal_mu": 0.1}] * 2


def test_strategy_option_proximal_mu_is_mapped_to_the_callback_with_a_note(
    keras_recorder: dict[str, list[Any]],
) -> None:
    text = _simulate("--strategy", "fedprox", "--strategy-option", "proximal_mu=0.2")
    assert "note: --strategy-option proximal_mu=0.2 is applied as --proximal-mu 0.2" in text
    assert "configure_fit" in text
    assert keras_recorder["callback"] == [{"proximal_mu": 0.2}] * 2
    # The FedProx strategy object agrees with what the callback applies.
    assert all(kwargs["strategy"].proximal_mu == 0.2 for kwargs in _node_kwargs(keras_recorder, "async"))


def test_fedprox_without_mu_applies_floweres_default_in_the_callback(keras_recorder: dict[str, list[Any]]) -> None:
    _simulate("--strategy", "fedprox")
    assert keras_recorder["callback"] == [{"proximal_mu": 0.01}] * 2


def test_heterogeneity_and_evaluation_flags_reach_the_keras_callbacks(keras_recorder: dict[str, list[Any]]) -> None:
    from flwr_serverless.simulation.keras_callbacks import FederatedEvaluator, Slowdown, StopAtBudget

    _simulate("--slowdown", "1,4", "--batch-seconds", "0.05", "--time-budget", "9", "--eval-each-epoch")
    built = dict(keras_recorder["callbacks"])
    slow = [c for c in built["node-1"] if isinstance(c, Slowdown)]
    assert [(c.padder.factor, c.padder.batch_seconds) for c in slow] == [(4.0, 0.05)]
    # node-0 has factor 1, but --batch-seconds still pads it (the same floor for every node).
    assert [c.padder.factor for c in built["node-0"] if isinstance(c, Slowdown)] == [1.0]
    for callbacks in built.values():
        assert [c.budget.budget for c in callbacks if isinstance(c, StopAtBudget)] == [9.0]
        evaluators = [c for c in callbacks if isinstance(c, FederatedEvaluator)]
        assert len(evaluators) == 1 and isinstance(evaluators[0].probe.node, FakeNode)
        # Order: slowdown first (semi-sync times it), the federated callback, evaluation, budget, progress last.
        kinds = [type(c).__name__ for c in callbacks]
        assert kinds[0] == "Slowdown" and kinds[-1] == "Progress"
        assert kinds.index("FederatedEvaluator") < kinds.index("StopAtBudget")


def test_proximal_mu_reaches_the_lightning_callback(
    recorder: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    import flwr_serverless.callbacks.lightning as lightning_callback

    def callback(node: Any, *args: Any, **kwargs: Any) -> None:
        recorder["callback"].append(kwargs)
        raise Recorded

    monkeypatch.setattr(lightning_callback, "FlwrFederatedCallback", callback)
    _simulate("--framework", "lightning", "--mode", "sync", "--proximal-mu", "0.3")
    assert recorder["callback"] == [{"proximal_mu": 0.3}] * 2
    assert len(_node_kwargs(recorder, "sync")) == 2


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"async_options": AsyncOptions(alpha=1.5)}, r"option alpha \(--alpha\) must be in \(0, 1\]"),
        ({"async_options": AsyncOptions(staleness="cubic")}, r"option staleness \(--staleness\) is invalid"),
        ({"async_options": AsyncOptions(staleness_unit="hours")}, r"staleness_unit \(--staleness-unit\)"),
        ({"async_options": AsyncOptions(buffer_size=0)}, r"buffer_size \(--buffer-size\) must be a positive integer"),
        ({"async_options": AsyncOptions(participation=0.0)}, r"participation \(--participation\)"),
        (
            {"mode": "sync", "async_options": AsyncOptions(staleness="poly:0.5")},
            r"staleness \(--staleness\) applies to --mode async only, not sync",
        ),
        (
            {"mode": "async", "semisync": SemiSyncOptions(lambda_=3.0)},
            r"lambda_ \(--lambda\) applies to --mode semisync",
        ),
        ({"mode": "semisync", "semisync": SemiSyncOptions(lambda_=0.0)}, r"lambda_ \(--lambda\) must be a positive"),
        ({"mode": "async", "sync_timeout": 5.0}, r"sync_timeout \(--timeout\) applies to --mode sync and semisync"),
        ({"mode": "sync", "min_nodes": 3}, r"min_nodes \(--min-nodes\) must be an integer in \[1, 2\]"),
        ({"heterogeneity": Heterogeneity(slowdown=(1.0, 0.5))}, r"slowdown \(--slowdown\) factors must be >= 1"),
        ({"heterogeneity": Heterogeneity(slowdown=(1.0, 2.0, 3.0))}, r"has 3 factors for 2 nodes"),
        ({"heterogeneity": Heterogeneity(time_budget=-1.0)}, r"time_budget \(--time-budget\) must be a positive"),
        ({"heterogeneity": Heterogeneity(batch_seconds=0.0)}, r"batch_seconds \(--batch-seconds\)"),
        ({"evaluation": Evaluation(eval_examples=100)}, r"eval_examples \(--eval-examples\) needs --eval-each-epoch"),
        ({"proximal_mu": -0.1}, r"proximal_mu \(--proximal-mu\) must be >= 0"),
        (
            {"strategy_options": {"proximal_mu": 0.1}},
            r"proximal_mu \(--strategy-option\).*configure_fit.*--proximal-mu",
        ),
        (
            {"strategy": "fedavgm", "strategy_options": {"momentum": 0.9}},
            r"option momentum \(--strategy-option\) is not accepted by fedavgm",
        ),
        ({"strategy": "fedavgx"}, r"unknown strategy 'fedavgx'"),
        ({"node_options": {"node_id": "x"}}, r"node_options may not set node_id"),
    ],
)
def test_bad_options_fail_before_training_and_name_the_option(
    changes: dict[str, Any], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr_serverless.simulation.runner as runner

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation must fail before the data is even loaded")

    monkeypatch.setattr(runner, "load_dataset", no_data)
    with pytest.raises(ValueError, match=match):
        run_simulation(SimulationConfig(**{"num_nodes": 2, **changes}))


def test_cli_reports_option_errors_by_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--mode", "sync", "--staleness", "poly:0.5"]) == 2
    assert "--staleness" in capsys.readouterr().err
    # A flag of another mode is refused even at its default value: it would still do nothing.
    assert main(["simulate", "--mode", "async", "--lambda", "2"]) == 2
    assert "lambda_ (--lambda) applies to --mode semisync only, not async" in capsys.readouterr().err
    assert main(["simulate", "--mode", "aggregate", "--staleness-unit", "steps"]) == 2
    assert "(--staleness-unit) applies to --mode async only" in capsys.readouterr().err
    assert main(["simulate", "--proximal-mu", "0.1", "--strategy-option", "proximal_mu=0.2"]) == 2
    assert "contradicts --proximal-mu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--seeds", "4-x"])
    assert "seeds must look like 0-4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--slowdown", "1,0.5"])
    assert "slowdown factors must be >= 1" in capsys.readouterr().err


def test_the_centralized_shuffle_depends_on_the_seed_not_the_number_of_nodes() -> None:
    import numpy as np

    from flwr_serverless.simulation.runner import NodeTask

    def task(role: str, index: int, nodes: int, seed: int = 3) -> NodeTask:
        return NodeTask(role, index, "x", np.arange(4), SimulationConfig(num_nodes=nodes, seed=seed))

    assert task("centralized", 2, 2).shuffle_seed == task("centralized", 5, 5).shuffle_seed
    assert task("centralized", 2, 2).shuffle_seed != task("centralized", 2, 2, seed=4).shuffle_seed
    # A standalone node shuffles like its federated twin, so the comparison isolates federation.
    assert task("standalone", 1, 2).shuffle_seed == task("federated", 1, 2).shuffle_seed
    assert task("federated", 0, 2).shuffle_seed != task("federated", 1, 2).shuffle_seed
