"""Liveness on the store's clock, and runs that never mix (issue 17, items 2 and 3).

Hosts' clocks are skewed by injecting a node's ``wall_clock`` (the store's clock stays true): a node
whose clock is minutes or hours off is neither dropped while it publishes nor keeps a dead peer alive.
A re-run in a used prefix starts a new generation and averages nothing of the earlier run, however soon
after it; a run id handed to every node keeps a peer that finished early in the run. Waits are bounded
by the nodes' own timeouts: a regression fails with ``SyncTimeoutError``, it does not pass late.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.cli.admin import format_view, inspect_experiment
from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.node.membership import MemberRecord, Roster, choose_run
from flwr_serverless.node.store_clock import StoreClock
from flwr_serverless.stores import ObjectInfo, open_store
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader, decode, encode
from tests.objects import rewrite

MINUTES_10, HOURS_2 = 600.0, 7200.0


def _w(value: float) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.full(2, value, np.float32)]


def _skewed(node: Any, seconds: float) -> Any:
    """The node's host clock is ``seconds`` off (the store's clock, and every other host's, are not)."""
    node.wall_clock = lambda: time.time() + seconds
    return node


def _in_threads(*calls: Callable[[], Any]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # returned, so the test names it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a node hung"
    return results


def _train(node: Any, epochs: int, value: float, leave: bool = True) -> list[list[np.ndarray]]:
    """Federate ``epochs`` times from constant weights; return what each federation gave back."""
    got = []
    for epoch in range(epochs):
        weights, _ = node.update_parameters(_w(value), num_examples=10, epoch=epoch)
        got.append(weights)
    if leave:
        node.leave()
    return got


@pytest.fixture(params=["memory", "file", "boto3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _lease(kind: str) -> float:
    """Short leases; S3 stamps LastModified in whole seconds, so a lease there spans a few of them."""
    return 0.6 if kind in ("memory", "file") else 3.0


# -- store-time leases -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skew", [-MINUTES_10, MINUTES_10, -HOURS_2, HOURS_2])
@pytest.mark.parametrize("backend", ["memory", "boto3"])
def test_a_sync_node_whose_clock_is_off_is_never_taken_for_dead(
    store_url_factory: Any, backend: str, skew: float
) -> None:
    url, options = store_url_factory(backend)
    nodes = [
        SyncFederatedNode(open_store(url, **options), num_nodes=2, timeout=20, member_lease=20, node_id=name)
        for name in ("true", "skewed")
    ]
    _skewed(nodes[1], skew)
    results = _in_threads(lambda: _train(nodes[0], 3, 1.0), lambda: _train(nodes[1], 3, 3.0))
    assert not any(isinstance(r, BaseException) for r in results), results
    for epoch in range(3):
        np.testing.assert_allclose(results[0][epoch][0], _w(2.0)[0])  # both averaged, every round
        np.testing.assert_array_equal(results[0][epoch][0], results[1][epoch][0])
    for node in nodes:
        assert node.stats.dropped_members == 0 and node.stats.partial_rounds == 0 and node.round == 3


@pytest.mark.parametrize("backend", ["memory", "boto3"])
def test_a_dead_peer_whose_clock_runs_ahead_is_dropped_at_lease_expiry(store_url_factory: Any, backend: str) -> None:
    """On the writers' clocks the dead peer's heartbeat would stay four hours in the future: live for hours."""
    url, options = store_url_factory(backend)
    lease = _lease(backend)
    survivor = _skewed(
        SyncFederatedNode(open_store(url, **options), num_nodes=2, timeout=60, member_lease=lease, node_id="a"),
        -HOURS_2,
    )
    doomed = _skewed(
        SyncFederatedNode(open_store(url, **options), num_nodes=2, timeout=60, member_lease=lease, node_id="b"),
        HOURS_2,
    )
    _in_threads(lambda: _train(survivor, 1, 1.0, leave=False), lambda: _train(doomed, 1, 3.0, leave=False))
    weights, _ = survivor.update_parameters(_w(5.0), num_examples=10)  # b is silent from now on ("killed")
    np.testing.assert_array_equal(weights[0], _w(5.0)[0])
    assert survivor.stats.dropped_members == 1 and survivor.stats.partial_rounds == 0 and survivor.round == 2


class _NoClockStore:
    """What StoreClock asks of a remote store that tells no time of its own."""

    def now(self) -> None:
        return None


def test_store_clock_carries_our_own_write_forward_on_the_monotonic_clock() -> None:
    mono = [100.0]
    clock = StoreClock(_NoClockStore(), monotonic=lambda: mono[0])  # type: ignore[arg-type]
    assert clock.now() is None  # nothing seen yet: callers fall back to stamps-free ages
    clock.wrote("members/me", "t1")  # our write returned at monotonic 100
    mono[0] = 104.0
    listing = {
        "members/me": ObjectInfo("members/me", "t1", 10, modified=5000.0),
        "members/peer": ObjectInfo("members/peer", "p", 10, modified=4990.0),
    }
    clock.observe(listing)
    assert clock.now() == pytest.approx(5004.0)  # the store time of our write, plus 4 s of this host's time
    mono[0] = 110.0
    assert clock.now() == pytest.approx(5010.0)
    # A listing without our own write only bounds the store's time from below (its newest stamp, at arrival).
    other = StoreClock(_NoClockStore(), monotonic=lambda: mono[0])  # type: ignore[arg-type]
    other.observe({"members/peer": ObjectInfo("members/peer", "p", 10, modified=4990.0)})
    assert other.now() == pytest.approx(4990.0)


def test_roster_ages_records_by_store_stamps_not_by_the_writers_clocks() -> None:
    url = f"memory://lease-{uuid.uuid4().hex[:8]}"
    store = open_store(url)
    record = MemberRecord("far", "o", "elsewhere", 1, joined=0.0, heartbeat=time.time() + HOURS_2, lease=5.0, run="r")
    store.put(layout.member_key("far"), record.to_bytes())
    roster = Roster(store, wall_clock=lambda: time.time() - HOURS_2)  # the reader's clock is off too
    records = roster.read()
    age = roster.now() - records["far"].last_seen
    assert 0.0 <= age < 5.0  # just written, on the store's clock


# -- run generations ---------------------------------------------------------------------------------------------
def test_an_async_rerun_right_after_the_last_one_averages_nothing_of_it(store_url_factory: Any, kind: str) -> None:
    url, options = store_url_factory(kind)
    first = [AsyncFederatedNode(open_store(url, **options), node_id=n) for n in ("a", "b")]
    # Both stay members until both trained: a peer that finished and left before the other's first
    # federation is, by design, indistinguishable from an earlier run (a loaded machine did just that).
    _in_threads(lambda: _train(first[0], 2, 100.0, leave=False), lambda: _train(first[1], 2, 100.0, leave=False))
    for node in first:
        node.leave()
    assert first[0].run == first[1].run
    # At once (well within a second and within any lease): the same ids, new weights, epochs interleaved.
    again = [AsyncFederatedNode(open_store(url, **options), node_id=n) for n in ("a", "b")]
    got_a, got_b = [], []
    for epoch in range(2):
        got_a.append(again[0].update_parameters(_w(1.0), num_examples=10, epoch=epoch)[0])
        got_b.append(again[1].update_parameters(_w(3.0), num_examples=10, epoch=epoch)[0])
    assert again[0].run == again[1].run != first[0].run
    np.testing.assert_array_equal(got_a[0][0], _w(1.0)[0])  # b's object was the earlier run's: skipped
    np.testing.assert_allclose(got_b[0][0], _w(2.0)[0])  # a's object is this run's
    np.testing.assert_allclose(got_a[1][0], _w(2.0)[0])  # and b's, once b published in this run
    for got in (*got_a, *got_b):
        assert float(np.max(got[0])) < 10.0  # nothing of the earlier run's 100s
    assert again[0].stats.leftovers_skipped == 1


def test_a_sync_rerun_right_after_the_last_one_averages_nothing_of_it(store_url_factory: Any, kind: str) -> None:
    url, options = store_url_factory(kind)

    def nodes() -> list[SyncFederatedNode]:
        return [SyncFederatedNode(open_store(url, **options), num_nodes=2, timeout=30, node_id=n) for n in ("a", "b")]

    first = nodes()
    _in_threads(lambda: _train(first[0], 2, 100.0), lambda: _train(first[1], 2, 100.0))
    again = nodes()
    results = _in_threads(lambda: _train(again[0], 3, 1.0), lambda: _train(again[1], 3, 3.0))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert again[0].run == again[1].run != first[0].run
    for got in (*results[0], *results[1]):
        np.testing.assert_allclose(got[0], _w(2.0)[0])


def test_a_sync_barrier_never_counts_a_leftover_object_under_a_rejoined_id() -> None:
    """b takes its id over just after a listed round 0 (which still held b's object of the earlier run).

    a reads the member records before the round's listing, and b deletes its predecessor's round objects
    before its record shows it in the new run: a never counts that object as b's (it would skip it at the
    fetch and average itself alone), it waits for b's own. The interleaving is forced, no timing involved.
    """
    url = f"memory://runs-{uuid.uuid4().hex[:8]}"

    def nodes() -> list[SyncFederatedNode]:
        return [SyncFederatedNode(open_store(url), num_nodes=2, timeout=30, node_id=n) for n in ("a", "b")]

    first = nodes()
    _in_threads(lambda: _train(first[0], 2, 100.0), lambda: _train(first[1], 2, 100.0))
    assert first[0].store.list(layout.round_prefix(0))  # b's earlier object is still there
    a, b = nodes()
    b_joined = threading.Event()
    listed = a.store.list

    def list_then_b_joins(prefix: str = "") -> dict[str, ObjectInfo]:
        found = listed(prefix)
        if prefix == layout.round_prefix(0) and not b_joined.is_set():
            b._ensure_joined(Deadline.after(30))  # b claims its id between a's listing and a's next read
            b_joined.set()
        return found

    a.store.list = list_then_b_joins  # type: ignore[method-assign]

    def train_b() -> list[list[np.ndarray]]:
        assert b_joined.wait(60), "a never reached its round-0 barrier"
        return _train(b, 3, 3.0)

    results = _in_threads(lambda: _train(a, 3, 1.0), train_b)
    assert not any(isinstance(r, BaseException) for r in results), results
    assert a.run == b.run != first[0].run
    for got in (*results[0], *results[1]):
        np.testing.assert_allclose(got[0], _w(2.0)[0])
    assert a.stats.leftovers_skipped == 0


def test_a_peer_that_finished_before_a_slow_peer_joined_counts_within_a_named_run() -> None:
    url = f"memory://runs-{uuid.uuid4().hex[:8]}"
    fast = AsyncFederatedNode(url, node_id="fast", run_id="exp-7")
    _train(fast, 2, 5.0)  # done and gone before the slow node starts
    slow = AsyncFederatedNode(url, node_id="slow", run_id="exp-7")
    np.testing.assert_allclose(_train(slow, 1, 1.0)[0][0], _w(3.0)[0])
    # Without a run id nobody is live when the slow node joins: it begins a new generation, alone.
    unnamed = AsyncFederatedNode(url, node_id="late")
    np.testing.assert_array_equal(_train(unnamed, 1, 1.0)[0][0], _w(1.0)[0])
    assert unnamed.run != "exp-7"
    # Continuing a run on purpose: pass its id.
    resumed = AsyncFederatedNode(url, node_id="late-2", run_id="exp-7")
    np.testing.assert_allclose(_train(resumed, 1, 0.0)[0][0], _w(2.0)[0])  # (5 + 1 + 0) / 3


@pytest.mark.parametrize("backend", ["memory", "boto3"])
def test_nodes_starting_together_join_one_generation(store_url_factory: Any, backend: str) -> None:
    url, options = store_url_factory(backend)
    store = open_store(url, **options)
    old = MemberRecord("old", "o", "h", 1, joined=0.0, heartbeat=0.0, status="left", left=0.0, run="earlier")
    store.put(layout.member_key("old"), old.to_bytes())
    nodes = [SyncFederatedNode(open_store(url, **options), num_nodes=4, timeout=30, node_id=f"n{i}") for i in range(4)]
    results = _in_threads(*(lambda node=node, i=i: _train(node, 2, float(i)) for i, node in enumerate(nodes)))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert len({node.run for node in nodes}) == 1 and nodes[0].run != "earlier"
    for got in results:
        np.testing.assert_allclose(got[-1][0], _w(1.5)[0])


def test_choose_run_adopts_the_live_run_or_mints_one_from_the_listing() -> None:
    now = 1000.0

    def rec(node: str, run: str, stamp: float, status: str = "active") -> MemberRecord:
        record = MemberRecord(node, "o", "h", 1, joined=0.0, heartbeat=0.0, lease=10.0, status=status, run=run)
        return MemberRecord(**{**record.__dict__, "stamp": stamp})

    listing = {"members/x": ObjectInfo("members/x", "t", 1)}
    live = {"x": rec("x", "r1", 995.0), "y": rec("y", "r1", 999.0), "z": rec("z", "r0", 999.0)}
    assert choose_run("me", live, now, listing) == "r1"  # the run most live members share
    dead = {"x": rec("x", "r1", 900.0), "y": rec("y", "r1", 999.0, "left")}
    minted = choose_run("me", dead, now, listing)
    assert minted.startswith("g-") and minted == choose_run("other", dead, now, listing)  # same state, same id
    assert minted != choose_run("me", dead, now, {**listing, "members/y": ObjectInfo("members/y", "u", 1)})


def test_run_ids_and_header_runs_are_validated() -> None:
    for bad in ("", "a/b", "..", "x" * 200, 7):
        with pytest.raises(ValueError, match="run_id"):
            AsyncFederatedNode("memory://runs-v", run_id=bad)
    with pytest.raises(ValueError, match="run"):
        encode(_w(1.0), UpdateHeader(node_id="a", run="no/slashes"))
    data = encode(_w(1.0), UpdateHeader(node_id="a", run="r-1"))
    assert decode(data, "nodes/a").header.run == "r-1"
    assert decode(encode(_w(1.0), UpdateHeader(node_id="a")), "nodes/a").header.run is None
    for bad in (12345, "../x", ["r"]):
        with pytest.raises(InvalidObjectError, match="'run'"):
            decode(rewrite(data, lambda fields, bad=bad: fields.update(run=bad)), "nodes/a")


def test_a_resumed_node_continues_its_run() -> None:
    url = f"memory://runs-{uuid.uuid4().hex[:8]}"
    node = AsyncFederatedNode(url, node_id="n")
    _train(node, 1, 1.0)
    restarted = AsyncFederatedNode(url, node_id="n")
    restarted.load_state_dict(node.state_dict())
    _train(restarted, 1, 1.0)
    assert restarted.run == node.run


def test_inspect_shows_each_run_and_its_members(tmp_path: Any) -> None:
    from flwr_serverless.cli import main

    url = str(tmp_path / "exp")
    for node_id in ("a", "b", "c"):
        _train(AsyncFederatedNode(url, node_id=node_id, run_id="first"), 1, 1.0)
    for node_id in ("a", "b"):
        _train(AsyncFederatedNode(url, node_id=node_id, run_id="second"), 1, 1.0)
    live = AsyncFederatedNode(url, node_id="d", run_id="second")
    live.update_parameters(_w(1.0), num_examples=10)
    view = inspect_experiment(open_store(url))
    assert view.clock == "store"
    assert view.runs == {"first": {"left": ["c"]}, "second": {"left": ["a", "b"], "live": ["d"]}}
    out = io.StringIO()
    assert main(["inspect", url], out=out) == 0
    text = out.getvalue()
    assert "run first: left c" in text and "run second: left a, b; live d" in text
    assert format_view(view) in text


@pytest.mark.parametrize("backend", ["memory", "boto3"])
def test_an_aggregate_mode_rerun_starts_from_an_empty_aggregate(store_url_factory: Any, backend: str) -> None:
    from flwr_serverless.node import AggregateFederatedNode

    url, options = store_url_factory(backend)
    first = [AggregateFederatedNode(open_store(url, **options), node_id=n) for n in ("a", "b")]
    for node in first:
        node.update_parameters(_w(100.0), num_examples=10)
    for node in first:
        node.leave()
    again = [AggregateFederatedNode(open_store(url, **options), node_id=n) for n in ("c", "a")]
    got_c, _ = again[0].update_parameters(_w(1.0), num_examples=10)
    got_a, _ = again[1].update_parameters(_w(3.0), num_examples=10)
    assert again[0].run == again[1].run != first[0].run
    np.testing.assert_array_equal(got_c[0], _w(1.0)[0])  # the earlier run's mean of 100s is not folded in
    np.testing.assert_allclose(got_a[0], _w(2.0)[0])
    assert again[0].stats.leftovers_skipped >= 1
