"""``flwr-serverless inspect`` and ``clean`` on the newer keys: keyframes, delta logs, contributions, the aggregate.

Real nodes write the objects (aggregate mode, top-k compression) on memory://
and local-folder stores; the top-k delta log is written with ``layout.delta_key``
directly. Time is injected through ``now``.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flwr_serverless.cli import main
from flwr_serverless.cli.admin import clean_experiment, format_view, inspect_experiment, owner_of
from flwr_serverless.node import AggregateFederatedNode, AsyncFederatedNode
from flwr_serverless.stores import open_store
from flwr_serverless.wire import layout


def _w(value: float) -> list[np.ndarray]:
    return [np.full((40, 5), value, np.float32), np.full(5, value, np.float32)]


@pytest.fixture(params=["memory", "folder"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"memory://admin-{uuid.uuid4().hex[:8]}" if request.param == "memory" else str(tmp_path / "exp")


def _experiment(url: str) -> dict[str, Any]:
    """Two aggregate-mode members (b has left), a top-k member with a delta log, a Keras checkpoint of b's."""
    nodes = {name: AggregateFederatedNode(url, node_id=name, seed=0) for name in ("a", "b")}
    for epoch in (1, 2):
        for value, node in enumerate(nodes.values()):
            node.update_parameters(_w(float(value + epoch)), num_examples=10, epoch=epoch)
    nodes["b"].leave()
    topk = AsyncFederatedNode(url, node_id="t", compression="topk:0.05")
    topk.update_parameters(_w(3.0), num_examples=10, epoch=1)
    store = open_store(url)
    for index in range(3):
        store.put(layout.delta_key("t", index), b"d" * 100)
        store.put(layout.delta_key("b", index), b"d" * 10)
    store.put(f"{layout.CHECKPOINTS}b/metrics_after_aggregation_2.json", b"{}")
    return {"store": store, **nodes, "t": topk}


def test_every_member_key_is_attributed_to_its_node() -> None:
    assert owner_of(layout.keyframe_key("t")) == ("keyframes", "t")
    assert owner_of(layout.delta_key("t", 12)) == ("deltas", "t")
    assert owner_of(layout.contribution_key("a", 1)) == ("contributions", "a")
    assert owner_of("deltas/t/not-an-index") == ("deltas", "t")  # still t's: clean removes it with the rest
    assert owner_of("pending/p/00000003.2.0123456789abcdef") == ("pending", "p")  # a change that lost its CAS
    assert owner_of(layout.round_key(3, "s")) == ("rounds", "s")
    for shared in (layout.AGGREGATE, "keras/b/model.h5", "deltas/../x", "contributions/", layout.member_key("a")):
        assert owner_of(shared) is None, shared
    assert layout.parse_delta_key(layout.delta_key("t", 12)) == ("t", 12)
    assert layout.delta_key("t", 12) == "deltas/t/00000012"
    for bad in ("deltas/t/12", "deltas/t/0000001x", "deltas/t", "keyframes/t"):
        assert layout.parse_delta_key(bad) is None, bad
    with pytest.raises(ValueError, match="delta indices"):
        layout.delta_key("t", -1)


def test_inspect_shows_keyframes_delta_logs_contributions_and_the_aggregate(url: str) -> None:
    made = _experiment(url)
    view = inspect_experiment(made["store"])
    members = view.members
    assert {m: members[m].status for m in members} == {"a": "live", "b": "left", "t": "live"}
    assert members["a"].objects["contributions"][0] == 2  # both slots after two epochs
    assert "nodes" not in members["a"].objects and members["a"].epoch == 2
    assert members["t"].objects["deltas"] == [3, 300]
    assert members["t"].objects["keyframes"][0] == 1 and members["t"].objects["nodes"][0] == 1
    assert members["b"].objects["deltas"] == [3, 30]
    aggregate = view.aggregate
    assert aggregate is not None and aggregate.members == ["a", "b"] and aggregate.missing == []
    assert aggregate.version == 4 and aggregate.size > 0  # four successful writes
    assert view.other_keys == ["keras/b/metrics_after_aggregation_2.json"]

    out = io.StringIO()
    assert main(["inspect", url], out=out) == 0
    text = out.getvalue()
    assert "deltas 3 (300 B)" in text and "keyframes 1" in text and "contributions 2" in text
    assert "aggregate: " in text and "version 4, 2 member(s) in its table: a, b" in text
    assert "other objects: 1 (keras/ 1; clean removes them with --all only)" in text


def test_clean_removes_every_key_of_a_member_that_left_and_dry_run_only_lists_them(url: str) -> None:
    made = _experiment(url)
    store = made["store"]
    before = sorted(store.list(""))
    b_keys = sorted(
        [
            layout.member_key("b"),
            *(layout.delta_key("b", i) for i in range(3)),
            *(layout.contribution_key("b", slot) for slot in (0, 1)),
        ]
    )

    out = io.StringIO()
    assert main(["clean", url, "--dry-run"], out=out) == 0
    assert out.getvalue().startswith(f"would delete {len(b_keys)} object(s)")
    assert all(f"\n  {key}" in out.getvalue() for key in b_keys)
    assert sorted(store.list("")) == before

    assert clean_experiment(store) == b_keys
    left = set(store.list(""))
    assert left == set(before) - set(b_keys)
    assert layout.AGGREGATE in left and "keras/b/metrics_after_aggregation_2.json" in left

    # The shared aggregate stays; it names b's gone contribution, and a federates on from it.
    view = inspect_experiment(store)
    assert view.aggregate is not None and view.aggregate.missing == ["b"]
    assert "contribution object gone for b" in format_view(view)
    made["a"].update_parameters(_w(5.0), num_examples=10, epoch=3)
    assert made["a"].stats.store_failures == 0 and made["a"].stats.federations == 3


def test_clean_older_than_and_all(url: str) -> None:
    made = _experiment(url)
    store = made["store"]
    later = time.time() + 3600  # an hour on: every lease has expired
    assert clean_experiment(store, older_than=7200, now=later) == []
    doomed = clean_experiment(store, older_than=1800, now=later, dry_run=True)
    kinds = {owner_of(key)[0] if owner_of(key) else key.split("/")[0] for key in doomed}
    assert kinds == {"members", "contributions", "deltas", "keyframes", "nodes"}
    assert {layout.member_key(n) for n in "abt"} <= set(doomed)
    assert clean_experiment(store, older_than=1800, now=later) == doomed
    assert set(store.list("")) == {layout.AGGREGATE, "keras/b/metrics_after_aggregation_2.json"}

    out = io.StringIO()
    assert main(["clean", url, "--all", "--dry-run"], out=out) == 0
    assert "would delete 2 object(s)" in out.getvalue() and f"  {layout.AGGREGATE}\n" in out.getvalue()
    assert main(["clean", url, "--all"], out=io.StringIO()) == 0
    assert store.list("") == {}
