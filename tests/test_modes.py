"""The modes' pure decisions, unit-tested without a store (as Flower tests its aggregate functions)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from flwr_serverless.modes.aggregate import (
    BACKOFF,
    Entry,
    Pending,
    PendingRef,
    backoff,
    delta,
    latest_contributions,
    plan_write,
    rebuild,
    taken_slots,
)
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


# -- the aggregate mode's planner: the write to attempt after one read ------------------------------------------
def _arrays(value: float, count: int = 1) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.array([count], np.int64)]


def _entry(slot: int, seq: int, weight: float, tag: str) -> Entry:
    return Entry(slot, seq, weight, tag * 16)


def _pending(node: str, base: Entry | None, entry: Entry, change: list[np.ndarray]) -> Pending:
    ref = PendingRef("pending/x", node, None if base is None else base.payload_hash, entry.slot, entry.payload_hash)
    return Pending(ref, base, entry, change)


def test_plan_first_write_into_an_empty_aggregate() -> None:
    new = _entry(0, 1, 10.0, "a")
    write = plan_write(None, {}, "me", None, _arrays(2.0), new, taken=set())
    assert write is not None and write.table == {"me": new} and write.put_slot == 0 and write.base is None
    assert write.changes_own and write.helped is None
    assert write.mean[0].dtype == np.float32 and np.all(write.mean[0] == 2.0) and write.mean[1][0] == 1


def test_plan_replaces_our_contribution_in_another_slot_and_keeps_exact_fedavg() -> None:
    mine, theirs = _entry(0, 1, 10.0, "a"), _entry(2, 4, 30.0, "b")
    mean, table = rebuild({"me": (mine, _arrays(1.0)), "peer": (theirs, _arrays(5.0, count=3))})
    new = _entry(0, 2, 20.0, "c")  # the slot is the planner's choice
    write = plan_write(mean, table, "me", _arrays(1.0), _arrays(4.0, count=2), new, taken={0})
    assert write is not None and write.put_slot == 1 and write.entry == _entry(1, 2, 20.0, "c")
    assert write.base == mine and write.changes_own and write.table == {"me": write.entry, "peer": theirs}
    np.testing.assert_allclose(write.mean[0], (20 * 4.0 + 30 * 5.0) / 50, rtol=1e-6)
    assert write.mean[1][0] == 3  # integer tensors keep the maximum
    # Already uploaded to a free slot: nothing more to PUT before the write.
    again = plan_write(mean, table, "me", _arrays(1.0), _arrays(4.0), new, taken={0}, written=2)
    assert again is not None and again.put_slot is None and again.entry.slot == 2


def test_plan_writes_what_a_repair_already_folded_and_skips_when_every_slot_is_taken() -> None:
    new = _entry(1, 3, 10.0, "a")
    mean, table = rebuild({"me": (new, _arrays(1.0))})
    write = plan_write(mean, table, "me", _arrays(1.0), _arrays(1.0), _entry(0, 3, 10.0, "a"), taken={1})
    assert write is not None and write.entry == write.base == new and not write.changes_own
    assert write.put_slot is None and write.table == table and write.mean[0] is mean[0]
    assert plan_write(mean, table, "me", _arrays(1.0), _arrays(2.0), _entry(0, 4, 10.0, "b"), {0, 1, 2}) is None


def test_plan_folds_a_pending_change_only_while_the_table_names_its_base() -> None:
    peer_old, peer_new = _entry(0, 1, 10.0, "p"), _entry(1, 2, 30.0, "q")
    mean, table = rebuild({"peer": (peer_old, _arrays(1.0))})
    change = _pending("peer", peer_old, peer_new, delta(_arrays(1.0), 10.0, _arrays(3.0), 30.0))
    mine = _entry(0, 1, 20.0, "m")
    write = plan_write(mean, table, "me", None, _arrays(6.0), mine, taken=set(), helper=change)
    assert write is not None and write.helped is change and write.table == {"peer": peer_new, "me": mine}
    np.testing.assert_allclose(write.mean[0], (30 * 3.0 + 20 * 6.0) / 50, rtol=1e-6)
    stale = _pending("peer", _entry(2, 0, 10.0, "z"), peer_new, change.change)  # its base is no longer named
    write = plan_write(mean, table, "me", None, _arrays(6.0), mine, taken=set(), helper=stale)
    assert write is not None and write.helped is None and write.table == {"peer": peer_old, "me": mine}
    empty = plan_write(None, {}, "me", None, _arrays(6.0), mine, taken=set(), helper=change)
    assert empty is not None and empty.helped is None  # nothing to fold into


def test_a_repair_takes_each_members_newest_slot_by_clock_then_seq() -> None:
    old, new = Entry(0, 9, 1.0, "a" * 16, timestamp=10.0), Entry(1, 1, 1.0, "b" * 16, timestamp=20.0)
    same_time = Entry(2, 2, 1.0, "c" * 16, timestamp=20.0)
    best = latest_contributions([("n", old, _arrays(1.0)), ("n", new, _arrays(2.0)), ("m", old, _arrays(3.0))])
    assert best["n"][0] == new and best["m"][0] == old  # a restarted process's seq starts again: clock first
    assert latest_contributions([("n", new, _arrays(2.0)), ("n", same_time, _arrays(4.0))])["n"][0] == same_time


def test_taken_slots_and_backoff() -> None:
    named = _entry(1, 1, 1.0, "a")
    live = PendingRef("pending/me/a", "me", named.payload_hash, 2, "b" * 16)
    dead = PendingRef("pending/me/c", "me", "c" * 16, 0, "d" * 16)
    assert taken_slots(named, [live, dead]) == {1, 2} and taken_slots(None, [dead]) == set()
    first, second = random.Random(0), random.Random(0)
    waits = [backoff(attempt, first) for attempt in (1, 2, 3)]
    assert all(0 <= wait <= BACKOFF * 2 ** (n - 1) for n, wait in enumerate(waits, 1))
    assert waits == [backoff(attempt, second) for attempt in (1, 2, 3)]  # the node's seed replays them


def test_async_mode_passes_its_view_explicitly() -> None:
    mode = AsyncMode(AsyncPolicy(staleness="poly:1", unit="steps"))
    own = UpdateHeader(node_id="me", num_examples=10, seq=3, local_steps=30)
    decision = mode.decide(own, [np.zeros(2)], [_update("slow", 1.0, seq=1, steps=10)])
    assert decision is not None and decision.view.steps == 40
    assert mode.contribution(_update("slow", 1.0, steps=10).header, [np.zeros(2)]).weight == 10.0  # no view: fresh
    assert mode.policy.last_view is None  # a record of aggregations only: nothing aggregated yet
