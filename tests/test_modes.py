"""The modes' pure decisions, unit-tested without a store (as Flower tests its aggregate functions)."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_serverless.modes.asynchronous import AsyncMode, PeerTracker
from flwr_serverless.modes.semisync import BatchClock, check_lambda, dataset_weight, plan_budgets, valid_profile
from flwr_serverless.modes.staleness import AsyncPolicy
from flwr_serverless.modes.synchronous import check_counts
from flwr_serverless.stores import ObjectInfo
from flwr_serverless.wire.codec import DecodedUpdate, UpdateHeader


def _update(node: str, value: float, examples: int = 10, seq: int = 1, steps: int = 0) -> DecodedUpdate:
    header = UpdateHeader(node_id=node, num_examples=examples, seq=seq, local_steps=steps)
    return DecodedUpdate(header=header, names=["t0000"], arrays=[np.full(2, value, np.float32)])


def _listing(**tags: str) -> dict[str, ObjectInfo]:
    return {f"nodes/{node}": ObjectInfo(f"nodes/{node}", tag, 8) for node, tag in tags.items()}


def test_peer_tracker_downloads_only_changed_peers_and_never_itself_or_leftovers() -> None:
    tracker = PeerTracker("me")
    tracker.leftovers["old"] = "t-old"
    wanted, changed = tracker.plan(_listing(me="x", a="t1", b="t1", old="t-old"), bad={})
    assert sorted(wanted) == ["a", "b"] and sorted(changed) == ["a", "b"]
    tracker.keep("a", "t1", _update("a", 1.0))
    tracker.keep("b", "t1", _update("b", 2.0))
    wanted, changed = tracker.plan(_listing(a="t2", b="t1", old="t-new"), bad={})
    assert changed == ["a", "old"] and "a" not in tracker.cached  # freed before the download
    wanted, changed = tracker.plan(_listing(a="t2"), bad={"nodes/a": "t2"})
    assert wanted == {} and tracker.cached == {}  # a bad object and a gone peer are both dropped


def test_async_mode_weighs_by_examples_and_gates_fedbuff() -> None:
    mode = AsyncMode(AsyncPolicy(buffer_size=2))
    own = UpdateHeader(node_id="me", num_examples=30, seq=1)
    assert mode.decide(own, [np.zeros(2)], [_update("a", 1.0, seq=1)]) is None  # 1 new update < K = 2
    decision = mode.decide(own, [np.zeros(2)], [_update("a", 1.0, seq=2), _update("b", 1.0, examples=20)])
    assert decision is not None and decision.fresh == 3  # a published twice (seq 2) since we last aggregated
    assert [c.weight for c in decision.peers] == [10.0, 20.0] and decision.own.weight == 30.0


def test_async_mode_discounts_stale_peers() -> None:
    mode = AsyncMode(AsyncPolicy(staleness="poly:1", unit="steps"))
    own = UpdateHeader(node_id="me", num_examples=10, seq=3, local_steps=30)
    stale = _update("slow", 1.0, seq=1, steps=10)  # saw none of our 30 steps
    decision = mode.decide(own, [np.zeros(2)], [stale])
    assert decision is not None
    assert decision.peers[0].weight == pytest.approx(10.0 / 31.0)  # (u + 1)^-1 with u = 30 steps


def test_semisync_plan_weights_and_batch_clock() -> None:
    profiles = {
        "fast": {"node_id": "fast", "dataset_size": 320, "batch_size": 32, "seconds_per_batch": 0.01},
        "slow": {"node_id": "slow", "dataset_size": 320, "batch_size": 32, "seconds_per_batch": 0.04},
    }
    t_max, budgets = plan_budgets(profiles, 2.0)
    assert t_max == pytest.approx(0.8) and budgets == {"fast": 80, "slow": 20}
    assert valid_profile(profiles["fast"]) and not valid_profile({**profiles["fast"], "seconds_per_batch": 0})
    assert dataset_weight(UpdateHeader(node_id="a", num_examples=999, dataset_size=5)) == 5.0
    assert dataset_weight(UpdateHeader(node_id="a", num_examples=7)) == 7.0
    clock = BatchClock()
    for end in (1.0, 1.1, 1.2, 1.3):
        clock.record(0.1, ended_at=end)
    assert clock.close_round() == pytest.approx(0.1)
    for end in (2.0, 2.3, 2.6):
        clock.record(0.3, ended_at=end)
    assert clock.close_round() == pytest.approx(0.2)  # smoothed with the previous estimate
    with pytest.raises(ValueError, match="lambda_"):
        check_lambda(0)


def test_sync_counts_are_validated() -> None:
    assert check_counts(3, 2) == (3, 2)
    with pytest.raises(TypeError, match="num_nodes is required"):
        check_counts(None, None)
    with pytest.raises(ValueError, match="min_nodes"):
        check_counts(2, 3)
