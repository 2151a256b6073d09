"""Staleness functions, provenance, staleness-weighted aggregation, FedAsync mixing, FedBuff, client sampling."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from flwr.server.strategy import FedAvg, FedMedian

from flwr_serverless.modes.staleness import Constant, Hinge, Polynomial, mix, parse_staleness
from flwr_serverless.nodes import AsyncFederatedNode
from flwr_serverless.stores import open_store
from flwr_serverless.strategy.aggregate import Contribution, aggregate
from flwr_serverless.wire.codec import decode


def _store():
    return open_store(f"memory://staleness-{uuid.uuid4().hex[:8]}")


def _w(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, dtype=np.float32), np.full(3, value, dtype=np.float32)]


def test_staleness_functions_match_hand_computed_values():
    assert Constant()(0) == 1.0 and Constant()(100) == 1.0
    poly = Polynomial(0.5)
    assert poly(0) == 1.0
    assert poly(3) == pytest.approx(0.5)  # 4^-0.5
    assert poly(8) == pytest.approx(1 / 3)  # 9^-0.5
    assert Polynomial(1.0)(4) == pytest.approx(0.2)
    hinge = Hinge(10, 4)
    assert hinge(0) == 1.0 and hinge(4) == 1.0
    assert hinge(5) == pytest.approx(1 / 11)
    assert hinge(6) == pytest.approx(1 / 21)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("constant", Constant()),
        ("poly", Polynomial(0.5)),
        ("poly:0.5", Polynomial(0.5)),
        ("poly:2", Polynomial(2.0)),
        ("hinge", Hinge(10, 4)),
        ("hinge:10,4", Hinge(10, 4)),
        ("hinge:2,1", Hinge(2, 1)),
        (None, Constant()),
    ],
)
def test_parse_staleness_specs(spec, expected):
    assert parse_staleness(spec) == expected


@pytest.mark.parametrize("spec", ["exp", "poly:a", "hinge:1", "constant:3"])
def test_parse_staleness_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        parse_staleness(spec)


def test_fedavg_with_real_valued_weights_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    arrays = [[rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)] for _ in range(3)]
    weights = [0.3, 1.7 / 3, math.pi]
    contributions = [Contribution(f"n{i}", a, w) for i, (a, w) in enumerate(zip(arrays, weights))]
    result = aggregate(FedAvg(), 1, contributions)
    for layer, got in enumerate(result):
        expected = sum(w * a[layer].astype(np.float64) for a, w in zip(arrays, weights)) / sum(weights)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # A non-linear strategy sees the same weights through scaled integer counts.
    median = aggregate(FedMedian(), 1, contributions)
    np.testing.assert_allclose(median[0], np.median(np.stack([a[0] for a in arrays]), axis=0), rtol=1e-6)


def test_published_headers_carry_provenance():
    store = _store()
    a = AsyncFederatedNode(store, node_id="a")
    b = AsyncFederatedNode(store, node_id="b")
    a.update_parameters(_w(0), num_examples=10, num_steps=5)  # a sees nobody: base = itself (seq 1, 5 steps)
    b.update_parameters(_w(1), num_examples=10, num_steps=7)  # b aggregates a(1) + b(1)
    a.update_parameters(_w(2), num_examples=10, num_steps=5)
    header_a = decode(store.get("nodes/a"), "nodes/a").header
    assert (header_a.local_steps, header_a.seq) == (10, 2)
    assert (header_a.base_version, header_a.base_steps) == (1, 5)
    assert (header_a.base_own_seq, header_a.base_own_steps) == (1, 5)
    assert (b.provenance.base_version, b.provenance.base_steps) == (2, 12)
    assert (a.provenance.base_version, a.provenance.base_steps) == (3, 17)  # a(2) + b(1); 10 + 7 steps


def _slow_weight(unit: str, k: int = 10) -> tuple[float, float]:
    """Fast node (zeros) makes 5 updates of k steps; the slow node (ones) 1 update of 4k steps in between.

    Returns the slow node's share of the fast node's next aggregate, and its staleness u.
    """
    store = _store()
    fast = AsyncFederatedNode(store, node_id="fast", staleness="poly:0.5", staleness_unit=unit)
    slow = AsyncFederatedNode(store, node_id="slow", staleness="poly:0.5", staleness_unit=unit)
    for _ in range(4):
        fast.update_parameters(_w(0), num_examples=100, num_steps=k)
    slow.update_parameters(_w(1), num_examples=100, num_steps=4 * k)  # trained from scratch, saw nothing
    result, _ = fast.update_parameters(_w(0), num_examples=100, num_steps=k)
    slow_header = fast.peers.cached["slow"][1].header
    return float(result[0][0, 0]), fast.policy.staleness_of(slow_header, fast.policy.last_view)


def test_versions_penalise_a_slow_node_more_than_steps():
    share_versions, u_versions = _slow_weight("versions")
    share_steps, u_steps = _slow_weight("steps")
    # versions: V = 5 + 1; slow: 6 - 0 - 1 = 5; fast: 6 - 4 - 1 = 1   -> share = 6^-.5 / (6^-.5 + 2^-.5)
    assert u_versions == 5
    assert share_versions == pytest.approx(6**-0.5 / (6**-0.5 + 2**-0.5), rel=1e-6)
    # steps: S = 50 + 40; slow: 90 - 0 - 40 = 50; fast: 90 - 40 - 10 = 40  -> share = 51^-.5 / (51^-.5 + 41^-.5)
    assert u_steps == 50
    assert share_steps == pytest.approx(51**-0.5 / (51**-0.5 + 41**-0.5), rel=1e-6)
    assert share_versions < share_steps < 0.5


def test_staleness_weights_equal_examples_times_s_u():
    """The async node's FedAvg result is sum(c_k w_k) / sum(c_k) with c_k = examples_k * s(u_k)."""
    store = _store()
    nodes = [
        AsyncFederatedNode(store, node_id=f"n{i}", staleness="hinge:1,0", staleness_unit="versions") for i in range(3)
    ]
    nodes[0].update_parameters(_w(1.0), num_examples=30, num_steps=1)  # base 0
    nodes[1].update_parameters(_w(9.0), num_examples=50, num_steps=1)  # published with base 0, then aggregates
    nodes[1].update_parameters(_w(2.0), num_examples=50, num_steps=1)  # seq 2, base: n0(1) + n1(1) = 2
    result, _ = nodes[2].update_parameters(_w(4.0), num_examples=20, num_steps=1)
    # V = 1 + 2 + 1 = 4. n0: 4 - 0 - 1 = 3 -> s = 1/4; n1: 4 - 2 - (2 - 1) = 1 -> 1/2; n2: 4 - 0 - 1 = 3 -> 1/4
    c = [30 / 4, 50 / 2, 20 / 4]
    expected = (c[0] * 1.0 + c[1] * 2.0 + c[2] * 4.0) / sum(c)
    np.testing.assert_allclose(result[0], expected, rtol=1e-6)


def test_fedasync_mixing_uses_alpha_times_s_of_the_peers_staleness():
    store = _store()
    a = AsyncFederatedNode(store, node_id="a", alpha=0.6)
    b = AsyncFederatedNode(store, node_id="b", alpha=0.6, staleness="poly:1", staleness_unit="versions")
    a.update_parameters(_w(0.0), num_examples=10)
    a.update_parameters(_w(0.0), num_examples=10)  # a: seq 2, base 1 -> seen by b with u = 3 - 1 - 1 = 1
    result, _ = b.update_parameters(_w(1.0), num_examples=10)
    # weights: a 10 * 1/2, b (u = 3 - 0 - 1 = 2) 10 * 1/3 -> aggregate = (10/3) / (5 + 10/3) = 0.4
    aggregate_value = (10 / 3) / (5 + 10 / 3)
    alpha_t = 0.6 * 0.5  # alpha * s(u of a) = 0.6 / (1 + 1)
    np.testing.assert_allclose(result[0], (1 - alpha_t) * 1.0 + alpha_t * aggregate_value, rtol=1e-6)
    np.testing.assert_allclose(mix(_w(0), _w(2), 0.25)[1], 0.5)


def test_fedbuff_never_aggregates_fewer_than_k_new_updates():
    store = _store()
    k = 3
    nodes = [AsyncFederatedNode(store, node_id=f"n{i}", buffer_size=k) for i in range(4)]
    rng = np.random.default_rng(1)
    kept_local = 0
    for step in range(80):
        node = nodes[int(rng.integers(len(nodes)))]
        mine = _w(float(step))
        result, _ = node.update_parameters(mine, num_examples=10, num_steps=1)
        if result[0][0, 0] == mine[0][0, 0]:
            kept_local += 1
    for node in nodes:
        assert node.policy.new_updates_log, "every node aggregated at some point"
        assert min(node.policy.new_updates_log) >= k
        assert node.policy.buffered + len(node.policy.new_updates_log) == node.local_steps
    assert kept_local >= sum(n.policy.buffered for n in nodes)
    for node in nodes:  # buffered calls still published: the stored object is the node's latest
        key = f"nodes/{node.node_id}"
        assert decode(store.get(key), key).header.seq == node.provenance.seq == node.local_steps


def test_participation_skips_federation_without_touching_the_store():
    store = _store()
    node = AsyncFederatedNode(store, node_id="a", participation=0.3, seed=42)
    before = store.stats.requests
    published = 0
    for epoch in range(40):
        result, _ = node.update_parameters(_w(epoch), num_examples=5, num_steps=1)
        assert result[0][0, 0] == epoch
        published = node.provenance.seq
    assert 4 <= published <= 24 and node.policy.skipped == 40 - published
    # PUT + LIST per federation; joining: a LIST of members/ (which run to join) and the claim's PUT
    assert store.stats.requests - before == 2 * published + 2
    again = AsyncFederatedNode(_store(), node_id="a", participation=0.3, seed=42)
    for epoch in range(40):
        again.update_parameters(_w(epoch), num_examples=5)
    assert again.provenance.seq == published  # seeded: the same epochs participate


def test_bad_policy_options_fail_early():
    for options in ({"staleness_unit": "seconds"}, {"alpha": 0.0}, {"buffer_size": 0}, {"participation": 0.0}):
        with pytest.raises(ValueError):
            AsyncFederatedNode(_store(), node_id="a", **options)
