"""The framework-neutral half of the callbacks: metric filtering, FedProx math, budgets, the node adapter."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from fakes import RecordingNode

from flwr_serverless.callbacks.core import FederatedCallbackCore, as_federating
from flwr_serverless.callbacks.parts import (
    ProximalTerm,
    RunningMean,
    federated_logs,
    leading_dim,
    numeric_metrics,
)
from flwr_serverless.node.protocol import Federating
from flwr_serverless.nodes import AsyncFederatedNode
from flwr_serverless.stores import open_store


def test_numeric_metrics_keep_finite_scalars_and_drop_our_echoes() -> None:
    logs = {
        "loss": np.float32(0.5),
        "acc": 1,
        "flag": True,
        "nan": float("nan"),
        "inf": np.inf,
        "name": "x",
        "vector": np.ones(3),
        "loss_fed": 0.1,
        "acc_global": 0.2,
        "lr": np.array(0.01),
    }
    assert numeric_metrics(logs) == {"loss": 0.5, "acc": 1.0, "acc_global": 0.2, "lr": pytest.approx(0.01)}
    assert "loss_fed" in numeric_metrics(logs, suffix="_global") and "acc_global" not in numeric_metrics(
        logs, suffix="_global"
    )
    assert numeric_metrics(None) == {}


def test_federated_log_names() -> None:
    assert federated_logs({"acc": 0.5}, "_fed", override=False) == {"acc_fed": 0.5}
    assert federated_logs({"acc": 0.5}, "_fed", override=True) == {"acc": 0.5}


def test_leading_dim_of_nested_batches() -> None:
    assert leading_dim((np.zeros((7, 3)), np.zeros(7))) == 7
    assert leading_dim({"image": np.zeros((5, 2)), "label": np.zeros(5)}) == 5
    assert leading_dim([[], (np.zeros((4,)),)]) == 4
    assert leading_dim(np.float32(1.0)) == 1 and leading_dim("text") == 0


def test_running_mean_weighs_batches_by_examples() -> None:
    mean = RunningMean()
    mean.add({"acc": 1.0, "loss": 2.0}, weight=3)
    mean.add({"acc": 0.0}, weight=1)
    assert mean.result() == {"acc": 0.75, "loss": 2.0}


def test_proximal_term_matches_the_formula_and_copies_its_anchor() -> None:
    term = ProximalTerm(mu=0.5)
    w = np.array([1.0, 2.0])
    term.set_anchor([("w", w)], copy=np.copy)
    w += 1.0  # training moves the weights; the anchor must not move with them
    np.testing.assert_allclose(term.pulled("w", w, lr=0.1), w - 0.1 * 0.5 * (w - [1.0, 2.0]))
    assert term.pulled("unknown", w, lr=0.1) is None
    off = ProximalTerm(mu=0.0)
    off.set_anchor([("w", w)], copy=np.copy)
    assert not off.active and off.anchor == {}


def test_a_full_federating_node_is_used_as_is() -> None:
    node = RecordingNode()
    assert isinstance(node, Federating) and as_federating(node) is node


def test_todays_node_is_adapted_without_tensor_names(tmp_path: Any) -> None:
    node = AsyncFederatedNode(open_store(f"file://{tmp_path}"), node_id="a")
    adapted = as_federating(node)
    params = inspect.signature(node.update_parameters).parameters
    if "tensor_names" in params and hasattr(node, "leave"):
        pytest.skip("the integrated node implements Federating: the adapter is gone")
    assert adapted is not node and adapted.node_id == "a"
    weights, _ = adapted.update_parameters(
        [np.ones(2, np.float32)],
        num_examples=3,
        metrics={"loss": 1.0},
        epoch=0,
        num_steps=2,
        tensor_names=["w"],
        framework="keras",
    )
    np.testing.assert_array_equal(weights[0], np.ones(2))
    assert node.local_steps == 2 and adapted.steps_until_federation() is None
    adapted.record_batch_time(0.1)
    adapted.leave()
    assert adapted.state_dict()["node_id"] == "a"


class _Core(FederatedCallbackCore):
    """The core alone, on plain numpy weights: what both callbacks build on."""

    framework = "numpy"
    model_suffix = ".npy"

    def __init__(self, node: Any, **options: Any) -> None:
        self._init_core(node, **options)
        self.weights = [np.zeros(2, np.float32)]
        self.examples = 0
        self.logged: list[tuple[dict[str, float], bool]] = []

    def _get_arrays(self) -> list[np.ndarray]:
        return self.weights

    def _tensor_names(self) -> list[str]:
        return ["w"]

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        self.weights = arrays

    def _named_trainables(self) -> list[tuple[str, Any]]:
        return [("w", self.weights[0])]

    def _copy_tensor(self, value: Any) -> Any:
        return np.copy(value)

    def _count_examples(self) -> int:
        examples, self.examples = self.examples, 0
        return examples

    def _log(self, names_values: dict[str, float], final: bool) -> None:
        self.logged.append((names_values, final))

    def train(self, batches: int, logs: Mapping[str, Any]) -> None:
        for _ in range(batches):
            self._batch_begin()
            self.examples += 8
            self._batch_end()
            if self._budget_due:
                self._federate(0, logs)


def test_budget_bookkeeping_flush_and_leave_in_the_core() -> None:
    node = RecordingNode(shift=1.0, budget=3)
    core = _Core(node)
    core._start_training()
    core.train(4, {"loss": 0.5})
    core._federate(0, {"loss": 0.5})  # epoch end, cold start: the node plans 3 batches from now on
    core.train(7, {"loss": 0.5, "loss_fed": 9.0})  # two budgets, one batch left
    assert core.pending_batches == 1
    core._finish_training(1, {"loss": 0.25})
    core._leave()
    core._leave()  # once
    assert [c["num_steps"] for c in node.calls] == [4, 3, 3, 1]
    assert [c["num_examples"] for c in node.calls] == [32, 24, 24, 8]
    assert all(c["metrics"] == {"loss": c["metrics"]["loss"]} for c in node.calls)  # no echo of loss_fed
    assert node.events == ["update"] * 4 + ["leave"] and len(node.batch_times) == 11
    np.testing.assert_array_equal(core.weights[0], np.full(2, 4.0))
    assert core.logged[-1] == ({"loss_fed": 1.25}, True) and core.federated_metrics == {"loss": 1.25}


def test_no_framework_is_imported_by_the_core() -> None:
    code = "import flwr_serverless.callbacks.core, sys; print('keras' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr
