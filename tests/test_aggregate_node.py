"""The aggregate mode: FedAvgAsync through one compare-and-swap object, O(1) requests per node-epoch.

Real nodes on every backend (memory://, file, moto S3 via s3fs and boto3): same
results as FedAvgAsync, constant requests whatever the number of nodes, lost
races retried or deferred, crashes and lost or hostile objects repaired.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate as flower_fedavg

from flwr_serverless import AggregateFederatedNode, AsyncFederatedNode, open_store
from flwr_serverless.errors import ConditionalWritesUnsupportedError, StoreError
from flwr_serverless.modes.aggregate import TABLE, Entry, fold, parse_table, rebuild, short_hash, stored_specs
from flwr_serverless.stores.faults import FaultyStore
from flwr_serverless.wire.codec import UpdateHeader, decode, encode
from tests.objects import rewrite
from tests.threads import run_in_threads


def _model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((16, 8)).astype(np.float32),
        rng.standard_normal(8).astype(np.float32),
        np.array([seed % 7], np.int64),
    ]


def _open(url_options: tuple[str, dict[str, Any]]) -> Any:
    url, options = url_options
    return open_store(url, **options)


def _fedavg(contributions: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    floats = flower_fedavg([(arrays[:2], count) for arrays, count in contributions])
    return [*floats, np.maximum.reduce([arrays[2] for arrays, _ in contributions])]


def _close(got: list[np.ndarray], want: list[np.ndarray], rtol: float = 1e-6) -> None:
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6)


def _aggregate_of(store: Any, model: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, Entry]]:
    decoded = decode(store.get("aggregate"), "aggregate", expected=stored_specs([(a.shape, a.dtype) for a in model]))
    return list(decoded.arrays), parse_table(decoded.header.extra[TABLE], "aggregate")


def _named_contributions(store: Any, table: dict[str, Entry]) -> list[tuple[list[np.ndarray], int]]:
    """What the table names, read back from the contribution slots (hashes checked)."""
    out = []
    for node, entry in sorted(table.items()):
        decoded = decode(store.get(f"contributions/{node}/{entry.slot}"), node)
        assert short_hash(decoded.payload_hash) == entry.payload_hash
        out.append((list(decoded.arrays), int(entry.weight)))
    return out


class HookedStore(FaultyStore):
    """Calls ``before_cas()`` once before the next compare-and-swap write (to let another node win the race),
    and fails compare-and-swap writes while ``refuse_cas`` is set (a node dying right before its write)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.before_cas: Callable[[], None] | None = None
        self.refuse_cas = False
        self.got: list[str] = []  # keys read, in order

    def _get(self, key: str) -> bytes:
        self.got.append(key)
        return super()._get(key)

    def _maybe_fail(self, operation: str, key: str) -> None:
        return None

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        hook, self.before_cas = self.before_cas, None
        if hook is not None:
            hook()
        if self.refuse_cas:
            raise StoreError("put_if_match", key, "refused by the test")
        return super()._put_conditional(key, data, if_match)


# -- construction -------------------------------------------------------------------------------------
class NoConditionalWrites(FaultyStore):
    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.supports_conditional_writes = False


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"strategy": "fedmedian"}, ValueError, "FedMedian is not one"),
        ({"compression": "topk:0.01"}, ValueError, "not available in the aggregate mode"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"max_attempts": True}, ValueError, "max_attempts"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"max_models_down": 0.5}, ValueError, "max_models_down"),
        ({"max_requests": 3}, ValueError, "max_requests"),
        ({"compression": "int4"}, ValueError, "compression='int4'"),
    ],
)
def test_options_are_validated_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        AggregateFederatedNode("memory://aggregate-options", **options)


def test_a_store_without_compare_and_swap_is_refused_by_name():
    with pytest.raises(ConditionalWritesUnsupportedError, match=r"cannot compare-and-swap.*AsyncFederatedNode"):
        AggregateFederatedNode(NoConditionalWrites(open_store("memory://no-cas")))


# -- same result as FedAvgAsync, O(1) requests -------------------------------------------------------------
def test_same_weights_as_fedavg_async_in_the_same_order(store_url_factory, store_url):
    ids = ["a", "b", "c", "d"]
    counts = {"a": 10, "b": 30, "c": 5, "d": 55}
    other_url = store_url_factory("memory")
    fast = {i: AggregateFederatedNode(_open(store_url), node_id=i) for i in ids}
    slow = {i: AsyncFederatedNode(_open(other_url), node_id=i) for i in ids}
    for epoch in range(3):
        for k, i in enumerate(ids):
            weights = _model(10 * epoch + k)
            got, metrics = fast[i].update_parameters(weights, counts[i], epoch=epoch)
            want, _ = slow[i].update_parameters(weights, counts[i], epoch=epoch)
            _close(got, want)
            assert metrics["num_nodes"] == (k + 1 if epoch == 0 else 4)
    store = fast["a"].store
    mean, table = _aggregate_of(store, _model(0))
    assert sorted(table) == ids and all(table[i].weight == counts[i] for i in ids)
    _close(mean, _fedavg(_named_contributions(store, table)))
    assert sum(n.stats.cas_conflicts + n.stats.repairs for n in fast.values()) == 0


def test_requests_and_downloads_per_epoch_do_not_grow_with_the_number_of_nodes(store_url_factory):
    url = store_url_factory("boto3")
    nodes = [AggregateFederatedNode(_open(url), node_id=f"n{i:02d}") for i in range(12)]
    for epoch in range(2):
        for i, node in enumerate(nodes):
            before = node.store.stats.as_dict()
            node.update_parameters(_model(i + epoch), 10, epoch=epoch)
            after = node.store.stats.as_dict()
            if epoch == 1:  # (the first epoch also claims members/<id>; the LIST is one page of pending changes)
                delta = {k: after[k] - before[k] for k in ("lists", "gets", "puts", "deletes")}
                assert delta == {"lists": 1, "gets": 1, "puts": 2, "deletes": 0}, (node.node_id, delta)
                size = len(node.store.get("aggregate"))  # one aggregate down, whatever the number of nodes
                assert abs(after["bytes_down"] - before["bytes_down"] - size) < 0.05 * size


def test_int8_contributions_fold_exactly_what_readers_decode(store_url_factory):
    url = store_url_factory("memory")
    a = AggregateFederatedNode(_open(url), node_id="a", compression="int8")
    b = AggregateFederatedNode(_open(url), node_id="b")
    a.update_parameters(_model(1), 10, epoch=0)
    got, _ = b.update_parameters(_model(2), 30, epoch=0)
    _close(got, _fedavg([(a.writer.seen(_model(1)), 10), (_model(2), 30)]))
    assert decode(a.store.get("contributions/a/0"), "a").encodings == {"t0000": "int8", "t0001": "int8"}


# -- races -------------------------------------------------------------------------------------------------
def _race(url: tuple[str, dict[str, Any]], **options: Any) -> tuple[AggregateFederatedNode, HookedStore]:
    """Nodes a and b have contributed once; a's next federation will find that b wrote between its read and
    its compare-and-swap write (b's new weights _model(4))."""
    hooked = HookedStore(_open(url))
    a = AggregateFederatedNode(hooked, node_id="a", **options)
    b = AggregateFederatedNode(_open(url), node_id="b")
    a.update_parameters(_model(1), 10, epoch=0)
    b.update_parameters(_model(2), 20, epoch=0)
    hooked.before_cas = lambda: b.update_parameters(_model(4), 20, epoch=1)
    return a, hooked


def test_a_lost_race_is_retried_and_both_contributions_count(store_url_factory):
    a, _ = _race(store_url_factory("boto3"), seed=1, max_models_down=None)  # (a toy model: headers dominate)
    got, _ = a.update_parameters(_model(3), 10, epoch=1)
    assert a.stats.cas_conflicts == 1 and a.stats.cas_giveups == 0
    _close(got, _fedavg([(_model(3), 10), (_model(4), 20)]))
    _close(_aggregate_of(a.store, _model(0))[0], got)


def test_attempts_used_up_publish_the_change_and_the_next_epoch_replaces_it(store_url_factory):
    a, hooked = _race(store_url_factory("memory"), max_attempts=1)
    before = hooked.stats.requests
    got, _ = a.update_parameters(_model(3), 10, epoch=1)
    assert hooked.stats.requests + a.stats.cas_conflicts - before <= a.max_requests and a.stats.cas_giveups == 1
    _close(got, _fedavg([(_model(3), 10), (_model(2), 20)]))  # trains on from what it would have written
    mean, _ = _aggregate_of(a.store, _model(0))
    _close(mean, _fedavg([(_model(1), 10), (_model(4), 20)]))  # the store still holds a's previous one
    assert a.helping_stats.published == 1 and len(a.store.list("pending/a/")) == 1
    got, _ = a.update_parameters(_model(5), 10, epoch=2)  # nobody folded it: a's own write replaces it
    _close(_aggregate_of(a.store, _model(0))[0], _fedavg([(_model(5), 10), (_model(4), 20)]))
    assert a.helping_stats.deferred == 1 and a.store.list("pending/") == {}
    # The pending change took slot 1, so a's next contribution went to slot 2: never a slot that could be named.
    assert _aggregate_of(a.store, _model(0))[1]["a"].slot == 2


# Our toy models are smaller than an object header: a budget of 3 model sizes down would leave no room to help.
TOY = {"max_models_down": None}


def _lost_and_pending(url: tuple[str, dict[str, Any]]) -> AggregateFederatedNode:
    """a's write of _model(3) (10 examples) lost to b's _model(4) (20) and is pending (base: a's _model(1))."""
    a, _ = _race(url, max_attempts=1)
    a.update_parameters(_model(3), 10, epoch=1)
    assert a.stats.cas_giveups == 1 and a.helping_stats.published == 1
    return a


def test_a_winner_folds_a_pending_change_exactly_once_and_its_owner_replaces_it_later(store_url_factory):
    url = store_url_factory("boto3")
    a = _lost_and_pending(url)
    b = AggregateFederatedNode(_open(url), node_id="c", **TOY)
    pending = a.store.list("pending/")
    (key,) = pending
    forged_copy = a.store.get(key)
    got, _ = b.update_parameters(_model(6), 30, epoch=0)  # c's write folds a's pending change in too
    assert b.helping_stats.folded_for_others == 1
    want = _fedavg([(_model(3), 10), (_model(4), 20), (_model(6), 30)])
    _close(got, want)
    mean, table = _aggregate_of(a.store, _model(0))
    _close(mean, want)
    _close(mean, _fedavg(_named_contributions(a.store, table)))
    assert table["a"].slot == 1 and a.store.list("pending/") == {}  # the helper deleted it
    # The same change put back (a slow helper, a replay): the table no longer names its base, so never twice.
    a.store.put(key, forged_copy)
    got, _ = b.update_parameters(_model(13), 30, epoch=1)
    assert b.helping_stats.folded_for_others == 1
    _close(got, _fedavg([(_model(3), 10), (_model(4), 20), (_model(13), 30)]))
    # a's next epoch finds its change folded, subtracts it (from memory: no GET) and adds the new one.
    got, _ = a.update_parameters(_model(5), 10, epoch=2)
    assert a.helping_stats.folded_by_helper == 1 and a.helping_stats.deferred == 0
    want = _fedavg([(_model(5), 10), (_model(4), 20), (_model(13), 30)])
    _close(got, want)
    _close(_aggregate_of(a.store, _model(0))[0], want)


def test_a_node_whose_changes_keep_losing_never_overwrites_the_slot_a_helper_made_it_name(store_url_factory):
    url = store_url_factory("memory")
    a = _lost_and_pending(url)  # change 1: slot 0 -> 1, pending
    d = AggregateFederatedNode(_open(url), node_id="d", helping=False)
    helper = AggregateFederatedNode(_open(url), node_id="c", **TOY)
    helper.update_parameters(_model(6), 30, epoch=0)  # folds change 1: the table names a's slot 1
    assert helper.helping_stats.folded_for_others == 1
    a.store.before_cas = lambda: d.update_parameters(_model(8), 20, epoch=0)
    a.update_parameters(_model(5), 10, epoch=2)  # loses again: change 2 from slot 1 to slot 2, pending
    assert a.stats.cas_giveups == 2 and a.helping_stats.folded_by_helper == 1
    got, _ = a.update_parameters(_model(9), 10, epoch=3)  # must go to slot 0: 1 is named, 2 may be
    _close(got, _fedavg([(_model(9), 10), (_model(4), 20), (_model(6), 30), (_model(8), 20)]))
    mean, table = _aggregate_of(a.store, _model(0))
    assert table["a"].slot == 0 and a.stats.repairs == 0
    _close(mean, _fedavg([(_model(9), 10), (_model(4), 20), (_model(6), 30), (_model(8), 20)]))
    _close(mean, _fedavg(_named_contributions(a.store, table)))


def test_a_node_dying_with_a_pending_change_loses_nothing_and_its_restart_avoids_its_slot(store_url_factory):
    url = store_url_factory("boto3")
    a = _lost_and_pending(url)  # a dies here: contribution in slot 1, pending change from slot 0 to slot 1
    restarted = AggregateFederatedNode(_open(url), node_id="a")
    restarted.load_state_dict(a.state_dict())
    got, _ = restarted.update_parameters(_model(5), 10, epoch=2)
    mean, table = _aggregate_of(restarted.store, _model(0))
    assert table["a"].slot == 2  # not 0 (named), not 1 (named if someone had folded the pending change)
    _close(mean, _fedavg([(_model(5), 10), (_model(4), 20)]))
    _close(got, mean)
    helper = AggregateFederatedNode(_open(url), node_id="c", **TOY)
    got, _ = helper.update_parameters(_model(6), 30, epoch=0)  # the dead change, if still listed, is not folded
    assert helper.helping_stats.folded_for_others == 0
    _close(got, _fedavg([(_model(5), 10), (_model(4), 20), (_model(6), 30)]))
    _close(got, _fedavg(_named_contributions(helper.store, _aggregate_of(helper.store, _model(0))[1])))


# Real races: moto (serialised by the suite) and SeaweedFS (no lock: the server's own If-Match), both clients.
@pytest.mark.parametrize("kind", ["memory", "moto-boto3", "seaweedfs-boto3", "seaweedfs-s3fs"])
def test_concurrent_writers_keep_the_aggregate_equal_to_fedavg_of_the_named_contributions(store_url_factory, kind):
    url = store_url_factory(kind)
    # 5 ms per store call: all eight read before the first write lands, so most writes lose a race.
    nodes = [
        AggregateFederatedNode(
            FaultyStore(_open(url), latency=0.005),
            node_id=f"w{i}",
            max_attempts=50,
            max_models_down=None,
            max_requests=None,
            seed=i,
        )
        for i in range(8)
    ]
    start = threading.Barrier(len(nodes))
    last: dict[str, list[np.ndarray]] = {}

    def work(index: int, node: AggregateFederatedNode) -> None:
        for epoch in range(4):
            start.wait(30)  # everyone writes at once: races are the point
            last[node.node_id] = _model(100 * index + epoch)
            node.update_parameters(last[node.node_id], 10 + index, epoch=epoch)

    run_in_threads(*(functools.partial(work, i, n) for i, n in enumerate(nodes)))
    assert sum(n.stats.cas_giveups for n in nodes) == 0 and sum(n.stats.cas_conflicts for n in nodes) >= 7
    mean, table = _aggregate_of(nodes[0].store, _model(0))
    _close(mean, _fedavg([(last[n.node_id], 10 + i) for i, n in enumerate(nodes)]), rtol=1e-5)
    _close(mean, _fedavg(_named_contributions(nodes[0].store, table)), rtol=1e-5)


# -- crashes, lost and hostile objects --------------------------------------------------------------------
def test_a_node_dying_before_its_write_loses_nothing_and_its_restart_subtracts_the_right_contribution(
    store_url_factory,
):
    url = store_url_factory("boto3")
    hooked = HookedStore(_open(url))
    a = AggregateFederatedNode(hooked, node_id="a")
    b = AggregateFederatedNode(_open(url), node_id="b")
    a.update_parameters(_model(1), 10, epoch=0)
    b.update_parameters(_model(2), 20, epoch=0)
    hooked.refuse_cas = True  # a reads and PUTs its next contribution, then dies before the write
    a.update_parameters(_model(3), 10, epoch=1)
    _close(_aggregate_of(b.store, _model(0))[0], _fedavg([(_model(1), 10), (_model(2), 20)]))
    spy = HookedStore(_open(url))
    restarted = AggregateFederatedNode(spy, node_id="a")
    restarted.load_state_dict(a.state_dict())
    got, _ = restarted.update_parameters(_model(5), 10, epoch=2)
    # Weights read: the aggregate, and once the contribution it names for "a" (slot 0, not the unnamed slot 1).
    assert [k for k in spy.got if not k.startswith("members/")] == ["aggregate", "contributions/a/0"]
    _close(got, _fedavg([(_model(5), 10), (_model(2), 20)]))
    assert restarted.stats.repairs == 0


def test_a_lost_contribution_is_repaired_from_the_others(store_url_factory, caplog):
    url = store_url_factory("memory")
    a = AggregateFederatedNode(_open(url), node_id="a")
    b = AggregateFederatedNode(_open(url), node_id="b")
    a.update_parameters(_model(1), 10, epoch=0)
    b.update_parameters(_model(2), 20, epoch=0)
    a.store.delete("contributions/a/0")
    restarted = AggregateFederatedNode(_open(url), node_id="a", owner_token=a.owner_token)
    with caplog.at_level("WARNING", logger="flwr_serverless"):
        got, _ = restarted.update_parameters(_model(3), 10, epoch=1)
    assert restarted.stats.repairs == 1 and any("gone or changed" in r.getMessage() for r in caplog.records)
    _close(got, _fedavg([(_model(3), 10), (_model(2), 20)]))
    _close(_aggregate_of(a.store, _model(0))[0], got)


def _table_change(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    return lambda data: rewrite(data, lambda fields: change(fields["extra"][TABLE]))


HOSTILE = {
    "not-an-object": (lambda data: b"\x00" * 64, "header claims|truncated|not a flwr"),
    "wrong-shape": (
        lambda data: encode([np.ones((8, 16), np.float32), *_model(0)[1:]], UpdateHeader("x")),
        "local model has",
    ),
    "negative-weight": (_table_change(lambda t: t["members"]["a"].__setitem__(2, -5)), "weight of 'a'"),
    "bad-slot": (_table_change(lambda t: t["members"]["a"].__setitem__(0, 3)), "slot of 'a'"),
    "bool-seq": (_table_change(lambda t: t["members"]["a"].__setitem__(1, True)), "seq of 'a'"),
    "short-entry": (_table_change(lambda t: t["members"]["a"].pop()), "must be [slot, seq, weight, hash]"),
    "bad-member": (_table_change(lambda t: t["members"].update({"../x": t["members"]["a"]})), "plain node id"),
    "no-table": (lambda data: rewrite(data, lambda f: f["extra"].pop(TABLE)), "must be {'members'"),
    "empty-table": (_table_change(lambda t: t.update(members={})), "no members"),
    "bad-hash": (_table_change(lambda t: t["members"]["a"].__setitem__(3, "md5:0")), "payload_hash"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_aggregate_is_refused_by_name_and_rebuilt(store_url_factory, kind):
    forge, reason = HOSTILE[kind]
    url = store_url_factory("memory")
    a = AggregateFederatedNode(_open(url), node_id="a")
    b = AggregateFederatedNode(_open(url), node_id="b")
    a.update_parameters(_model(1), 10, epoch=0)
    b.update_parameters(_model(2), 20, epoch=0)
    a.store.put("aggregate", forge(a.store.get("aggregate")))
    got, _ = b.update_parameters(_model(3), 20, epoch=1)
    assert b.stats.rejected == 1 and b.stats.repairs == 1
    assert any(part in b.stats.rejections["aggregate"] for part in reason.split("|")), b.stats.rejections
    _close(got, _fedavg([(_model(1), 10), (_model(3), 20)]))
    _close(_aggregate_of(a.store, _model(0))[0], got)


def test_a_signed_experiment_refuses_an_unsigned_aggregate(store_url_factory):
    url = store_url_factory("memory")
    a = AggregateFederatedNode(_open(url), node_id="a", secret="k")
    a.update_parameters(_model(1), 10, epoch=0)
    a.store.put("aggregate", rewrite(a.store.get("aggregate"), lambda f: f.pop("signature")))
    got, _ = a.update_parameters(_model(2), 10, epoch=1)
    assert "unsigned" in a.stats.rejections["aggregate"] and a.stats.repairs == 1
    _close(got, _model(2))


# -- the math --------------------------------------------------------------------------------------------
def test_thousands_of_folds_stay_within_float32_tolerance_of_an_exact_fedavg():
    rng = np.random.default_rng(0)
    members = [f"m{i}" for i in range(10)]
    latest: dict[str, tuple[Entry, list[np.ndarray]]] = {}
    mean, table = None, {}
    for step in range(2000):
        node = members[int(rng.integers(len(members)))]
        arrays = [rng.standard_normal(1000).astype(np.float32) * 3, rng.integers(0, 50, 4)]
        entry = Entry(step % 2, step, float(rng.integers(1, 100)), "blake3:" + "0" * 64)
        old = latest[node][1] if node in latest else None
        mean, table = fold(mean, table, node, old, arrays, entry)
        latest[node] = (entry, arrays)
    exact, exact_table = rebuild(latest)
    assert exact_table == table
    np.testing.assert_allclose(mean[0], exact[0], rtol=1e-5, atol=1e-5)
    assert mean[0].dtype == np.float32 and np.array_equal(mean[1], np.maximum(mean[1], exact[1]))


def test_the_table_keeps_64_bit_hashes_and_reads_tables_with_full_ones():
    import json

    from flwr_serverless.modes.aggregate import table_json

    full = "blake3:" + "ab" * 32
    table = {f"n{i:03d}": Entry(i % 2, 1000 + i, 150.0, short_hash(full)) for i in range(100)}
    size = len(json.dumps(table_json(table), separators=(",", ":")))
    assert size < 40 * 100, size  # ~37 bytes per member instead of ~110 with the full digest
    assert parse_table(table_json(table), "aggregate") == table
    legacy = {"members": {"a": [0, 3, 10.0, full]}}
    assert parse_table(legacy, "aggregate") == {"a": Entry(0, 3, 10.0, "ab" * 8)}
