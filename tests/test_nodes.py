"""Async and sync nodes against every store backend (moto S3 via s3fs and boto3, file://, memory://)."""

from __future__ import annotations

import functools
import pickle
import time

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy.aggregate import aggregate as flower_fedavg

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode, SyncTimeoutError, open_store
from flwr_serverless.strategy.factory import STRATEGY_NAMES, make_strategy
from flwr_serverless.wire.codec import UpdateHeader, encode
from tests.fakes import FakeClock
from tests.threads import run_in_threads

# Node logic, not the server: S3 through moto here; test_stores, test_lifecycle and test_aggregate_node run SeaweedFS.
pytestmark = pytest.mark.s3_servers("moto")


def _model(seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((5, 4)) * scale).astype(np.float32), rng.standard_normal(4).astype(np.float32)]


def _open(store_url):
    url, options = store_url
    return open_store(url, **options)


def test_lonely_async_node_returns_own_weights_without_waiting(store, monkeypatch):
    node = AsyncFederatedNode(store, node_id="alone")
    weights = _model(0)

    def no_waiting(seconds: float) -> None:
        raise AssertionError(f"an async node alone must not wait, slept {seconds}s")

    monkeypatch.setattr(time, "sleep", no_waiting)
    result, metrics = node.update_parameters(weights, num_examples=10, epoch=0, metrics={"loss": 0.5})
    assert all(np.array_equal(a, b) for a, b in zip(result, weights))
    assert metrics == {"loss": 0.5}


def test_async_nodes_average_by_examples_and_pull_only_changed_peers(store_url):
    a = AsyncFederatedNode(_open(store_url), node_id="a")
    b = AsyncFederatedNode(_open(store_url), node_id="b")
    wa, wb = _model(1), _model(2)
    a.update_parameters(wa, num_examples=10, epoch=0, metrics={"accuracy": 0.5})
    result, metrics = b.update_parameters(wb, num_examples=30, epoch=0, metrics={"accuracy": 0.9})
    for ra, xa, xb in zip(result, wa, wb):
        np.testing.assert_allclose(ra, (10 * xa + 30 * xb) / 40, rtol=1e-6)
    assert metrics["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)

    # b federates again while a has not published anything new: one PUT + one LIST, no GET.
    before = b.store.stats.as_dict()
    b.update_parameters(wb, num_examples=30, epoch=1)
    after = b.store.stats.as_dict()
    delta = {k: after[k] - before[k] for k in ("puts", "lists", "gets")}
    assert delta == {"puts": 1, "lists": 1, "gets": 0}
    # a published again: exactly one GET for the changed peer.
    a.update_parameters(wa, num_examples=10, epoch=1)
    before = b.store.stats.as_dict()
    b.update_parameters(wb, num_examples=30, epoch=2)
    assert b.store.stats.as_dict()["gets"] - before["gets"] == 1


def test_flower_parameters_in_flower_parameters_out(store):
    node = AsyncFederatedNode(shared_folder=store, node_id="p")  # the original keyword
    params, _ = node.update_parameters(ndarrays_to_parameters(_model(3)), 5, 0)
    assert [x.shape for x in parameters_to_ndarrays(params)] == [(5, 4), (4,)]


def _run_sync_round(nodes, inputs, counts):
    def work(node):
        return node.update_parameters(inputs[node.node_id], counts[node.node_id], 0)[0]

    outputs = run_in_threads(*(functools.partial(work, n) for n in nodes), timeout=60)
    return {node.node_id: output for node, output in zip(nodes, outputs)}


def test_sync_nodes_hold_identical_weights_equal_to_fedavg(store_url):
    ids = ["n0", "n1", "n2"]
    nodes = [SyncFederatedNode(_open(store_url), num_nodes=3, timeout=30, node_id=i) for i in ids]
    counts = {"n0": 10, "n1": 25, "n2": 65}
    for round_number in range(3):
        inputs = {i: _model(10 * round_number + k, scale=k + 1) for k, i in enumerate(ids)}
        results = _run_sync_round(nodes, inputs, counts)
        expected = flower_fedavg([(inputs[i], counts[i]) for i in ids])
        for i in ids[1:]:  # bit-identical on every node
            assert all(np.array_equal(x, y) for x, y in zip(results[i], results[ids[0]]))
        for got, want in zip(results["n0"], expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # rounds older than r-2 were cleaned up by their writers
    remaining = sorted({k.split("/")[1] for k in nodes[0].store.list("rounds/")})
    assert remaining == ["00000001", "00000002"]


def test_sync_node_with_dead_peer_times_out_naming_it(store_url):
    alive = SyncFederatedNode(_open(store_url), num_nodes=2, timeout=20, node_id="alive")
    doomed = SyncFederatedNode(_open(store_url), num_nodes=2, timeout=20, node_id="doomed")
    _run_sync_round([alive, doomed], {"alive": _model(1), "doomed": _model(2)}, {"alive": 1, "doomed": 1})
    alive.timeout = 1.5  # "doomed" is silent from now on (its lease has not run out yet)
    clock = FakeClock()
    alive.clock, alive.sleep = clock.now, clock.sleep
    with pytest.raises(SyncTimeoutError, match="missing nodes: doomed") as info:
        alive.update_parameters(_model(3), 1, 1)
    assert 1.5 * 0.75 <= clock.t <= 1.5  # waited until the deadline less the download reserve, not longer
    assert info.value.missing == ["doomed"] and info.value.present == ["alive"]


def test_sync_node_that_never_saw_its_peers_says_so(store):
    node = SyncFederatedNode(store, num_nodes=3, timeout=0.5, node_id="first")
    with pytest.raises(SyncTimeoutError, match="2 node"):
        node.update_parameters(_model(0), 1, 0)


def test_sync_partial_aggregation_when_min_nodes_allows(store_url):
    a = SyncFederatedNode(_open(store_url), num_nodes=3, min_nodes=2, timeout=4.0, node_id="a")
    b = SyncFederatedNode(_open(store_url), num_nodes=3, min_nodes=2, timeout=4.0, node_id="b")
    results = _run_sync_round([a, b], {"a": _model(1), "b": _model(2)}, {"a": 1, "b": 3})
    assert all(np.array_equal(x, y) for x, y in zip(results["a"], results["b"]))
    np.testing.assert_allclose(results["a"][0], (_model(1)[0] + 3 * _model(2)[0]) / 4, rtol=1e-6)
    assert a.stats.partial_rounds == 1


@pytest.mark.parametrize(
    "payload, reason",
    [
        (pickle.dumps([np.ones((5, 4), np.float32), np.ones(4, np.float32)]), "not a flwr-serverless|header claims"),
        (encode([np.ones((4, 5), np.float32), np.ones(4, np.float32)], UpdateHeader("evil")), "local model has"),
        (encode(_model(9), UpdateHeader("evil"))[:-8], "truncated|payload"),
        (encode(_model(9), UpdateHeader("someone-else")), "header says node"),
    ],
    ids=["pickle", "wrong-shape", "truncated", "impersonation"],
)
def test_bad_peer_objects_are_skipped_with_a_reason(store, payload, reason, caplog):
    good = AsyncFederatedNode(store, node_id="good")
    good.update_parameters(_model(1), 10, 0)
    store.put("nodes/evil", payload)
    with caplog.at_level("WARNING", logger="flwr_serverless"):
        result, _ = good.update_parameters(_model(2), 10, 1)
    assert all(np.array_equal(x, y) for x, y in zip(result, _model(2)))  # garbage never aggregated
    assert good.stats.rejected == 1
    assert "nodes/evil" in good.stats.rejections
    assert any("nodes/evil" in r.getMessage() for r in caplog.records)
    # the same bad object is not downloaded or reported again
    good.update_parameters(_model(2), 10, 2)
    assert good.stats.rejected == 1


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_flower_strategy_aggregates(store_url, name):
    initial = _model(0)
    nodes = [
        AsyncFederatedNode(_open(store_url), make_strategy(name, initial_parameters=initial), node_id=f"s{i}")
        for i in range(4)
    ]
    for i, node in enumerate(nodes):
        result, _ = node.update_parameters(_model(i + 1), 10 * (i + 1), 0)
    assert [r.shape for r in result] == [(5, 4), (4,)]
    assert all(np.isfinite(r).all() for r in result)
    assert not all(np.array_equal(x, y) for x, y in zip(result, _model(4)))  # peers changed the model


@pytest.mark.parametrize("name", ["FedAvg", "FedMedian"])
def test_message_api_strategies_aggregate_like_their_legacy_twins(name):
    import flwr.serverapp.strategy as message_api
    from flwr.server import strategy as legacy

    results = {}
    for api, kind in ((message_api, "message"), (legacy, "legacy")):
        url = f"memory://msg-{kind}-{name}-{time.time_ns()}"
        a = AsyncFederatedNode(url, getattr(api, name)(), node_id="a")
        b = AsyncFederatedNode(url, getattr(api, name)(), node_id="b")
        a.update_parameters(_model(1), num_examples=10)
        results[kind], _ = b.update_parameters(_model(2, scale=3), num_examples=30)
    for got, want in zip(results["message"], results["legacy"]):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_message_api_strategy_without_aggregation_is_refused_at_construction():
    with pytest.raises(TypeError, match="Flower strategy"):
        AsyncFederatedNode("memory://x", object())


def test_a_keras_node_refuses_a_torch_peers_layout_naming_it(caplog):
    url = f"memory://layouts-{time.time_ns()}"
    square = [np.eye(3, dtype=np.float32), np.zeros(3, np.float32)]
    torch_node = AsyncFederatedNode(url, node_id="torch-node")
    torch_node.update_parameters(
        square, num_examples=10, tensor_names=["layer.weight", "layer.bias"], framework="torch"
    )
    keras_node = AsyncFederatedNode(url, node_id="keras-node")
    with caplog.at_level("WARNING", logger="flwr_serverless"):
        result, _ = keras_node.update_parameters(
            [2 * a for a in square], num_examples=10, tensor_names=["dense/kernel", "dense/bias"], framework="keras"
        )
    np.testing.assert_array_equal(result[0], 2 * square[0])  # the transposed-layout peer was not averaged in
    assert keras_node.stats.rejected == 1 and "torch" in keras_node.stats.rejections["nodes/torch-node"]


def test_fedavgm_with_momentum_counts_rounds_by_its_own_aggregations():
    """A first call without peers must not make FedAvgM's first real round number 2 (it asserts then)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvgM

    url = f"memory://avgm-{time.time_ns()}"
    init = ndarrays_to_parameters(_model(0))
    a = AsyncFederatedNode(url, FedAvgM(server_momentum=0.9, initial_parameters=init), node_id="a")
    b = AsyncFederatedNode(url, FedAvgM(server_momentum=0.9, initial_parameters=init), node_id="b")
    a.update_parameters(_model(1), num_examples=10)  # alone: no aggregation reaches the strategy
    b.update_parameters(_model(2), num_examples=10)
    for _ in range(3):
        a.update_parameters(_model(1), num_examples=10)
    assert a.strategy_rounds == 3 and a.stats.federations == 4
