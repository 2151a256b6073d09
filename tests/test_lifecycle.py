"""Experiment lifecycle: nodes join, finish, stop early, die and come back; no peer hangs or averages leftovers.

Each numbered case of the lifecycle issue has a test here (nodes in threads and processes; memory://,
file stores and the moto server through the ``store_url`` fixture). Waits are bounded by the nodes'
own timeouts: a test that used to hang now fails with ``SyncTimeoutError`` instead of passing late.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.modes.synchronous import barrier, entry_round
from flwr_serverless.node.membership import EXPIRED, GONE, LEFT, LIVE, MemberRecord, in_run, member_state
from flwr_serverless.stores import open_store
from flwr_serverless.stores.faults import FaultyStore
from flwr_serverless.stores.retry import RetryPolicy, _local, with_retries
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader, encode
from tests.store_time import backdate, can_backdate
from tests.threads import outcomes


def _w(value: float) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.full(2, value, np.float32)]


def _open(store_url: tuple[str, dict[str, Any]]) -> Any:
    url, options = store_url
    return open_store(url, **options)


def _train(node: Any, rounds: int, value: float, leave: bool = True) -> list[np.ndarray]:
    weights = _w(value)
    with node if leave else _NoLeave():
        for epoch in range(rounds):
            weights, _ = node.update_parameters(weights, num_examples=10, epoch=epoch)
    return weights


class _NoLeave:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- case 1: a node that trains fewer epochs (or stops early) leaves; its peers do not wait for it ------------
@pytest.mark.parametrize("min_nodes", [None, 1])
def test_sync_peer_that_finishes_early_leaves_and_the_other_goes_on(store_url: Any, min_nodes: int | None) -> None:
    short = SyncFederatedNode(_open(store_url), num_nodes=2, timeout=30, min_nodes=min_nodes, node_id="short")
    long = SyncFederatedNode(_open(store_url), num_nodes=2, timeout=30, min_nodes=min_nodes, node_id="long")
    results = outcomes(lambda: _train(short, 2, 1.0), lambda: _train(long, 4, 3.0))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert long.round == 4 and short.round == 2
    assert long.stats.partial_rounds == 0  # rounds 2 and 3 completed at once: the only live member had published
    record = MemberRecord.parse(long.store.get(layout.member_key("short")))
    assert record is not None and record.status == "left"


# -- case 3: a node killed in sync mode is dropped after its lease (threads) or at once (process gone) --------
def test_sync_node_whose_peer_stops_heartbeating_is_dropped_after_the_lease() -> None:
    url = f"memory://life-{uuid.uuid4().hex[:8]}"
    a = SyncFederatedNode(url, num_nodes=2, timeout=60, node_id="a", member_lease=0.6)
    b = SyncFederatedNode(url, num_nodes=2, timeout=60, node_id="b", member_lease=0.6)
    outcomes(lambda: _train(a, 1, 1.0, leave=False), lambda: _train(b, 1, 2.0, leave=False))
    weights, _ = a.update_parameters(_w(5.0), num_examples=10)  # b is silent from now on ("killed")
    np.testing.assert_array_equal(weights[0], _w(5.0)[0])  # round 1 went on without b, after b's lease
    assert a.stats.dropped_members == 1 and a.round == 2


_KILLED_WORKER = """
import os, sys
import numpy as np
from flwr_serverless import SyncFederatedNode
node = SyncFederatedNode(sys.argv[1], num_nodes=2, timeout=60, node_id="victim")
weights = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
node.update_parameters(weights, num_examples=10)
os._exit(9)  # as if killed: no leave, no cleanup
"""


def test_sync_node_whose_peer_process_died_drops_it_without_waiting_for_the_lease(tmp_path: Any) -> None:
    url = str(tmp_path / "store")
    survivor = SyncFederatedNode(url, num_nodes=2, timeout=60, node_id="survivor")  # default lease: 300 s
    worker = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, url], cwd=os.getcwd())
    _train(survivor, 1, 1.0, leave=False)  # round 0 with the victim
    assert worker.wait(timeout=60) == 9
    weights, _ = survivor.update_parameters(_w(2.0), num_examples=10)  # round 1: victim's pid is gone
    np.testing.assert_array_equal(weights[0], _w(2.0)[0])
    assert survivor.stats.dropped_members == 1


# -- case 4: an earlier run's leftovers in the same prefix are not averaged in ----------------------------------
EARLIER = "earlier-run"


def _leftover(store: Any, node_id: str, value: float, ago: float, status: str = "active") -> None:
    """An earlier run's member record and weights, last written ``ago`` seconds before now on the store's clock
    (where the backend lets a test move that clock: memory and file stores)."""
    now = time.time()
    record = MemberRecord(
        node_id,
        "old-owner",
        "elsewhere",
        1,
        joined=now - ago - 60,
        heartbeat=now - ago,
        lease=300.0,
        status=status,
        left=(now - ago) if status == "left" else None,
        run=EARLIER,
    )
    store.put(layout.member_key(node_id), record.to_bytes())
    header = UpdateHeader(node_id=node_id, num_examples=10, run=EARLIER)
    store.put(layout.node_key(node_id), encode(_w(value), header))
    backdate(store, layout.member_key(node_id), ago)
    backdate(store, layout.node_key(node_id), ago)


def _backdatable(store_url: Any) -> Any:
    """A store whose stamps a test can move (S3 servers stamp writes themselves: those cases use run ids)."""
    store = _open(store_url)
    if not can_backdate(store):
        pytest.skip("an S3 server's LastModified cannot be backdated; test_runs_and_liveness covers S3 re-runs")
    return store


def test_async_node_ignores_objects_of_an_earlier_run(store_url: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = _backdatable(store_url)
    _leftover(store, "old-crashed", 100.0, ago=28 * 60)
    _leftover(store, "old-finished", 100.0, ago=600, status="left")
    node = AsyncFederatedNode(_open(store_url), node_id="new")
    with caplog.at_level("WARNING", logger="flwr_serverless"):
        weights, _ = node.update_parameters(_w(1.0), num_examples=10)
        again, _ = node.update_parameters(_w(1.0), num_examples=10)
    assert node.run is not None and node.run != EARLIER  # nobody live: a new generation began
    np.testing.assert_array_equal(weights[0], _w(1.0)[0])
    np.testing.assert_array_equal(again[0], _w(1.0)[0])
    assert node.stats.leftovers_skipped == 2 and "earlier run" in caplog.text
    assert caplog.text.count("ignores old-crashed") == 1  # said once per peer
    # The same node id publishing anew in this run is part of this run again.
    header = UpdateHeader(node_id="old-crashed", num_examples=10, run=node.run)
    store.put(layout.node_key("old-crashed"), encode(_w(3.0), header))
    mixed, _ = node.update_parameters(_w(1.0), num_examples=10)
    np.testing.assert_allclose(mixed[0], _w(2.0)[0])


# -- case 5: a sync re-run into a prefix left by a crashed run -----------------------------------------------------
def test_sync_rerun_ignores_round_objects_of_a_crashed_run(store_url: Any) -> None:
    store = _backdatable(store_url)
    _leftover(store, "ghost", 100.0, ago=30 * 60)
    old = UpdateHeader(node_id="ghost", num_examples=10, run=EARLIER)
    store.put(layout.round_key(3, "ghost"), encode(_w(100.0), old))
    store.put(layout.round_key(0, "a"), encode(_w(100.0), UpdateHeader(node_id="a", num_examples=10, run=EARLIER)))
    old_a = MemberRecord("a", "old-owner", "elsewhere", 1, joined=1.0, heartbeat=2.0, lease=300.0, run=EARLIER)
    store.put(layout.member_key("a"), old_a.to_bytes())  # the new "a" takes this id over
    backdate(store, layout.member_key("a"), 30 * 60)
    a = SyncFederatedNode(_open(store_url), num_nodes=2, timeout=30, node_id="a")
    b = SyncFederatedNode(_open(store_url), num_nodes=2, timeout=30, node_id="b")
    results = outcomes(lambda: _train(a, 3, 1.0), lambda: _train(b, 3, 3.0))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert a.round == b.round == 3
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][0], _w(2.0)[0])  # neither ghost nor the old "a" was averaged in


# -- case 6: num_nodes is required; three real nodes all wait for each other --------------------------------------
def test_sync_node_requires_num_nodes() -> None:
    with pytest.raises(TypeError, match="num_nodes is required"):
        SyncFederatedNode("memory://x")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_nodes"):
            SyncFederatedNode("memory://x", num_nodes=bad)


def test_three_sync_nodes_with_num_nodes_two_still_wait_for_the_third_member() -> None:
    url = f"memory://life-{uuid.uuid4().hex[:8]}"
    nodes = [SyncFederatedNode(url, num_nodes=2, timeout=30, node_id=f"n{i}") for i in range(3)]
    for node in nodes:  # all three joined before training (the members exist)
        node._ensure_joined(node._deadline())
    results = outcomes(*(lambda n=n, i=i: _train(n, 3, float(i)) for i, n in enumerate(nodes)))
    assert not any(isinstance(r, BaseException) for r in results), results
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])


# -- case 7: the deadline reaches download threads and the semi-sync profile PUT -----------------------------------
class _DeadlineSpy(FaultyStore):
    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.seen: dict[str, list[float | None]] = {}

    def _get_into(self, key: str, sink: Any) -> int:
        self.seen.setdefault("get", []).append(getattr(_local, "deadline", None))
        return super()._get_into(key, sink)

    def _put(self, key: str, data: bytes) -> str:
        self.seen.setdefault(key.split("/")[0], []).append(getattr(_local, "deadline", None))
        return super()._put(key, data)


def test_sync_deadline_is_carried_into_download_threads_and_profile_puts() -> None:
    from flwr_serverless.node import SemiSyncFederatedNode

    url = f"memory://life-{uuid.uuid4().hex[:8]}"
    spies = [_DeadlineSpy(open_store(url)) for _ in range(3)]
    for spy in spies:
        spy.zero_copy_get = False  # spool through get_into, in the download threads
    nodes = [SemiSyncFederatedNode(spy, num_nodes=3, timeout=20, node_id=f"s{i}") for i, spy in enumerate(spies)]
    outcomes(*(lambda n=n: _train(n, 1, 1.0, leave=False) for n in nodes))
    for spy in spies:
        assert spy.seen["get"] and all(d is not None for d in spy.seen["get"])  # 2 peers, each under the deadline
        assert spy.seen["profiles"] and all(d is not None for d in spy.seen["profiles"])


def test_failing_downloads_end_at_the_sync_deadline_not_the_store_retry_bound() -> None:
    url = f"memory://life-{uuid.uuid4().hex[:8]}"
    peer = SyncFederatedNode(url, num_nodes=2, timeout=20, node_id="peer")
    failing = with_retries(
        FaultyStore(open_store(url), fail_rate=1.0, operations={"get"}), RetryPolicy(attempts=1000, max_time=3600)
    )
    failing.zero_copy_get = False
    node = SyncFederatedNode(failing, num_nodes=2, timeout=1.0, min_nodes=1, node_id="me")
    results = outcomes(
        lambda: peer.update_parameters(_w(1.0), num_examples=1), lambda: node.update_parameters(_w(0.0), num_examples=1)
    )
    assert not isinstance(results[1], BaseException), results[1]
    np.testing.assert_array_equal(results[1][0][0], _w(0.0)[0])  # the peer could not be fetched in time
    assert node.stats.store_failures >= 1


# -- case 8: node ids are matched whole ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["x\n", "a/b", "..", "", "-x", "a" * 129, "x\r"])
def test_node_ids_are_validated_whole(bad: str) -> None:
    assert not layout.is_valid_node_id(bad)
    with pytest.raises(ValueError, match="not a plain name"):
        AsyncFederatedNode("memory://x", node_id=bad)


# -- every option is validated at construction ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [
        ({"member_lease": 0}, "member_lease"),
        ({"member_lease": -1}, "member_lease"),
        ({"max_object_bytes": 0}, "max_object_bytes"),
        ({"timeout": 0}, "timeout"),
        ({"strategy": "no-such-strategy"}, "no-such-strategy"),
        ({"staleness": "poly:x"}, "staleness"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"alpha": 2.0}, "alpha"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        AsyncFederatedNode("memory://x", **options)


def test_sync_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SyncFederatedNode("memory://x", num_nodes=2, timeout=-1)
    with pytest.raises(ValueError, match="min_nodes"):
        SyncFederatedNode("memory://x", num_nodes=2, min_nodes=3)


# -- pure decisions, with the clock injected -----------------------------------------------------------------------
def _record(
    node: str,
    heartbeat: float,
    status: str = "active",
    left: float | None = None,
    host: str = "h",
    pid: int = 1,
    run: str | None = "r1",
) -> MemberRecord:
    return MemberRecord(
        node, "o", host, pid, joined=0.0, heartbeat=heartbeat, lease=10.0, status=status, left=left, run=run
    )


def test_member_state_classifies_live_left_expired_and_gone() -> None:
    assert member_state(_record("a", 95.0), now=100.0, host="other") == LIVE
    assert member_state(_record("a", 89.0), now=100.0, host="other") == EXPIRED
    assert member_state(_record("a", 99.0, "left", 99.0), now=100.0) == LEFT
    assert member_state(_record("a", 99.0, host="h", pid=4242), now=100.0, host="h", alive=lambda pid: False) == GONE
    # The store's stamp, when the roster set one, is what ages a record; the writer's clock is ignored.
    skewed = _record("a", 100.0 - 7200.0)
    assert member_state(skewed, now=100.0, host="other") == EXPIRED
    assert member_state(replace(skewed, stamp=95.0), now=100.0, host="other") == LIVE
    # A run is the record's run id; a record without one belongs to the run going on while it is live.
    assert in_run(_record("a", 50.0), "r1", 100.0) and not in_run(_record("a", 99.0), "r2", 100.0)
    assert in_run(_record("a", 99.0, run=None), "r2", 100.0) and not in_run(_record("a", 50.0, run=None), "r2", 100.0)


def test_barrier_waits_for_live_members_only() -> None:
    records = {
        "me": _record("me", 100.0),
        "live": _record("live", 99.0),
        "dead": _record("dead", 85.0),
        "gone": _record("gone", 99.0, "left", 99.0),
        "old": _record("old", 99.0, run="r0"),
    }
    kwargs = {"now": 100.0, "run": "r1", "num_nodes": 2, "min_nodes": None, "started": True}
    state = barrier("me", {"me", "old"}, records, **kwargs)
    assert not state.complete and state.waiting_for == {"live"} and state.leftovers == {"old"}
    assert state.dropped == {"dead"} and state.departed == {"gone"}
    assert barrier("me", {"me", "live"}, records, **kwargs).complete
    # Not started: num_nodes members must have been seen first.
    assert not barrier("me", {"me"}, {"me": records["me"]}, **{**kwargs, "started": False}).complete
    assert not barrier("me", {"me", "live"}, records, **{**kwargs, "min_nodes": 3}).complete


def test_entry_round_enters_where_current_peers_are() -> None:
    rounds = {0: {"a", "b"}, 1: {"a"}, 7: {"ghost"}}
    assert entry_round("b", rounds, {"a", "b"}, 0) == (1, True)
    assert entry_round("a", rounds, {"a", "b"}, 0) == (1, False)  # only our own object in round 1: peers at 0
    assert entry_round("c", {0: {"a"}}, {"a"}, 0) == (0, False)
    assert entry_round("c", {}, set(), 0) == (0, False)


def test_layout_builds_and_parses_every_key() -> None:
    assert layout.parse_round_key(layout.round_key(12, "n-1")) == layout.RoundKey(12, "n-1")
    assert layout.parse_node_key(layout.node_key("a")) == "a"
    assert layout.parse_member_key(layout.member_key("a")) == "a"
    assert layout.parse_profile_key(layout.profile_key("a")) == "a"
    for bad in ("rounds/x/a", "rounds/00000001/a/b", "nodes/a/b", "profiles/a.txt"):
        assert not any(p(bad) for p in (layout.parse_round_key, layout.parse_node_key, layout.parse_profile_key))


def test_member_record_round_trips_and_rejects_garbage() -> None:
    record = _record("a", 5.0)
    assert MemberRecord.parse(record.to_bytes()) == record
    assert MemberRecord.parse(b"{") is None and MemberRecord.parse(json.dumps([1]).encode()) is None


# -- inspect and clean -------------------------------------------------------------------------------------------------
def test_inspect_and_clean_an_experiment_prefix(tmp_path: Any) -> None:
    from flwr_serverless.cli import main

    url = str(tmp_path / "exp")
    store = open_store(url)
    _leftover(store, "old", 1.0, ago=3600)
    node = AsyncFederatedNode(url, node_id="current")
    node.update_parameters(_w(1.0), num_examples=1, epoch=4)
    out = __import__("io").StringIO()
    assert main(["inspect", url], out=out) == 0
    text = out.getvalue()
    assert "current" in text and "live" in text and "old" in text and "expired" in text
    out = __import__("io").StringIO()
    assert main(["clean", url, "--older-than", "10m"], out=out) == 0
    assert "deleted 2 object(s)" in out.getvalue()
    assert sorted(store.list("")) == ["members/current", "nodes/current"]
    assert main(["clean", url, "--all"], out=__import__("io").StringIO()) == 0
    assert store.list("") == {}
    with pytest.raises(ValueError, match="older-than"):
        from flwr_serverless.cli.admin import parse_duration

        parse_duration("soon")


def test_a_node_that_left_and_federates_again_is_a_live_member_again() -> None:
    url = f"memory://life-{uuid.uuid4().hex[:8]}"
    node = AsyncFederatedNode(url, node_id="back")
    node.update_parameters(_w(1.0), num_examples=1)
    node.leave()
    assert MemberRecord.parse(node.store.get("members/back")).status == "left"
    node.update_parameters(_w(1.0), num_examples=1)
    assert MemberRecord.parse(node.store.get("members/back")).status == "active"
