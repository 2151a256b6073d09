"""Nodes publishing compressed updates (fp16, bf16, int8, top-k with keyframes), on memory:// and moto S3.

Every test goes through real nodes: what a reader aggregates is compared with
what the writer says peers decode (``writer.seen``), keyframes are followed,
cached and refetched, hostile keyframes are refused by name, and the bytes a
node moves per epoch are counted by the store.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate as flower_fedavg

from flwr_serverless import AsyncFederatedNode, SemiSyncFederatedNode, SyncFederatedNode, open_store
from flwr_serverless.errors import StoreError
from flwr_serverless.stores.faults import FaultyStore
from flwr_serverless.wire.codec import UpdateHeader, encode, object_ref
from flwr_serverless.wire.compression import SEP, EncodedTensor
from tests.objects import rewrite
from tests.test_nodes import _run_sync_round

BACKENDS = ["memory", "boto3"]


def _model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((64, 32)) * 0.1).astype(np.float32),
        (rng.standard_normal(32) * 0.1).astype(np.float32),
        np.array([seed], np.int64),
    ]


def _drift(arrays: list[np.ndarray], seed: int, moved: int = 20, scale: float = 0.05) -> list[np.ndarray]:
    """A few entries of the kernel move a lot: a change top-k captures exactly."""
    rng = np.random.default_rng(1000 + seed)
    out = [a.copy() for a in arrays]
    flat = out[0].reshape(-1)
    flat[rng.choice(flat.size, moved, replace=False)] += scale * rng.standard_normal(moved).astype(np.float32)
    return out


def _open(url_options: tuple[str, dict[str, Any]]) -> Any:
    url, options = url_options
    return open_store(url, **options)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _expected(own: list[np.ndarray], own_count: int, peers: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    floats = flower_fedavg([(own[:2], own_count), *((p[:2], c) for p, c in peers)])
    return [*floats, np.maximum.reduce([own[2], *(p[2] for p, _ in peers)])]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, store_url_factory: Any) -> tuple[str, dict[str, Any]]:
    return store_url_factory(request.param)


class BlockingStore(FaultyStore):
    """Fails PUTs of the keys in ``blocked`` (a store refusing one write), forwards everything else."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner, kind="forbidden")
        self.blocked: set[str] = set()

    def _maybe_fail(self, operation: str, key: str) -> None:
        if operation == "put" and key in self.blocked:
            raise StoreError(operation, key, "refused by the test")


# -- construction -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compression": "int4"}, "compression='int4'"),
        ({"compression": "topk:0.7"}, "top-k fraction"),
        ({"compression": "topk:abc"}, "top-k fraction"),
        ({"compression": 8}, "compression=8"),
        ({"compression": "int8", "topk_keyframe_every": 5}, "topk_keyframe_every only apply"),
        ({"compression": None, "topk_max_error": 0.1}, "topk_max_error only apply"),
        ({"compression": "topk:0.01", "topk_keyframe_every": 0}, "topk_keyframe_every must be a positive integer"),
        ({"compression": "topk:0.01", "topk_keyframe_every": 2.5}, "topk_keyframe_every must be a positive integer"),
        ({"compression": "topk:0.01", "topk_max_error": float("nan")}, "topk_max_error must be a positive number"),
    ],
)
@pytest.mark.parametrize("kind", ["async", "sync", "semisync"])
def test_compression_options_are_validated_at_construction(options, match, kind):
    make = {
        "async": lambda: AsyncFederatedNode("memory://bad-options", **options),
        "sync": lambda: SyncFederatedNode("memory://bad-options", num_nodes=2, **options),
        "semisync": lambda: SemiSyncFederatedNode("memory://bad-options", num_nodes=2, **options),
    }[kind]
    with pytest.raises(ValueError, match=match):
        make()


# -- async ---------------------------------------------------------------------------------------------
def test_async_nodes_with_mixed_compression_aggregate_what_each_peer_published(backend):
    options = {"plain": None, "half": "fp16", "brain": "bf16", "quant": "int8", "sparse": "topk:0.05"}
    counts = {"plain": 10, "half": 20, "brain": 15, "quant": 30, "sparse": 25}
    nodes = {
        name: AsyncFederatedNode(
            _open(backend), node_id=name, compression=c, **({"topk_max_error": 0.9} if c == "topk:0.05" else {})
        )
        for name, c in options.items()
    }
    weights = {name: _model(i) for i, name in enumerate(options)}
    for name in ("half", "brain", "quant", "sparse"):
        nodes[name].update_parameters(weights[name], counts[name], epoch=0)
    result, _ = nodes["plain"].update_parameters(weights["plain"], counts["plain"], epoch=0)
    peers = [(nodes[n].writer.seen(weights[n]), counts[n]) for n in ("half", "brain", "quant", "sparse")]
    for got, want in zip(result, _expected(weights["plain"], 10, peers)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Lossy encodings really were lossy, and within their bounds.
    for name, bound in (("half", 1e-3), ("brain", 8e-3), ("quant", 1e-2)):
        seen = nodes[name].writer.seen(weights[name])[0]
        assert not np.array_equal(seen, weights[name][0])
        assert np.abs(seen - weights[name][0]).max() <= bound * np.abs(weights[name][0]).max()
    store = nodes["plain"].store
    assert set(store.list("keyframes/")) == {"keyframes/sparse"}
    assert nodes["plain"].stats.keyframe_downloads == 1

    # The top-k node moves; the reader GETs its delta alone (it holds the chain's state) and rebuilds what
    # the writer says readers hold, bit for bit: within the int8 keyframe's rounding, which later deltas send.
    weights["sparse"] = _drift(weights["sparse"], 1)
    nodes["sparse"].update_parameters(weights["sparse"], counts["sparse"], epoch=1)
    seen = nodes["sparse"].writer.seen(weights["sparse"])
    for got, want in zip(seen[:2], weights["sparse"][:2]):
        assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    assert _same(seen[2:], weights["sparse"][2:])  # the int64 tensor travels raw
    before = store.stats.gets
    result, _ = nodes["plain"].update_parameters(weights["plain"], counts["plain"], epoch=1)
    assert store.stats.gets - before == 1 and nodes["plain"].stats.keyframe_downloads == 1
    peers[-1] = (seen, counts["sparse"])
    for got, want in zip(result, _expected(weights["plain"], 10, peers)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_topk_reader_follows_new_keyframes_and_catches_up_from_the_log(backend):
    writer = AsyncFederatedNode(_open(backend), node_id="w", compression="topk:0.05", topk_keyframe_every=2)
    reader = AsyncFederatedNode(_open(backend), node_id="r")
    weights, own = _model(1), _model(2)
    tags = []
    for epoch in range(5):  # keyframes at epochs 0 and 3 (after deltas 1 and 2)
        weights = _drift(weights, epoch)
        writer.update_parameters(weights, 10, epoch=epoch)
        tags.append(writer.store.list("keyframes/")["keyframes/w"].tag)
        result, _ = reader.update_parameters(own, 10, epoch=epoch)
        for got, want in zip(result, _expected(own, 10, [(writer.writer.seen(weights), 10)])):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    keyframe_puts = [True] + [a != b for a, b in itertools.pairwise(tags)]
    assert keyframe_puts == [True, False, False, True, False] and writer.writer.keyframes_written == 2
    assert reader.stats.keyframe_downloads == 2 and reader.stats.delta_log_downloads == 0
    assert sorted(writer.store.list("deltas/")) == ["deltas/w/00000001", "deltas/w/00000002"]

    # A reader that joins late (or misses epochs) applies the logged deltas it missed, then the current one.
    late = AsyncFederatedNode(_open(backend), node_id="late")
    weights = _drift(weights, 5)
    writer.update_parameters(weights, 10, epoch=5)
    assert writer.writer.topk.chain == 2
    result, _ = late.update_parameters(own, 10, epoch=0)
    for got, want in zip(result, _expected(own, 10, [(writer.writer.seen(weights), 10), (own, 10)])):  # w and r
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert late.stats.keyframe_downloads == 1 and late.stats.delta_log_downloads == 1


def test_a_chain_replaced_between_the_gets_skips_the_peer_once(backend, caplog):
    blocking = BlockingStore(_open(backend))
    writer = AsyncFederatedNode(blocking, node_id="w", compression="topk:0.05", topk_keyframe_every=2)
    reader = AsyncFederatedNode(_open(backend), node_id="r")
    weights = _model(1)
    for epoch in range(3):  # keyframe K1 (position 0), deltas 1 and 2
        weights = _drift(weights, epoch)
        writer.update_parameters(weights, 10, epoch=epoch)
    # Epoch 3: the writer's next keyframe K2 lands, but its position 0 does not: nodes/w is still delta 2 of K1.
    blocking.blocked.add("nodes/w")
    weights = _drift(weights, 3)
    writer.update_parameters(weights, 10, epoch=3)
    assert writer.stats.store_failures == 1 and writer.writer.keyframes_written == 2
    own = _model(2)
    with caplog.at_level(logging.INFO, logger="flwr_serverless"):
        result, _ = reader.update_parameters(own, 10, epoch=0)
    assert _same(result, own)  # the peer skipped, nothing hangs or breaks
    assert reader.stats.keyframe_misses == 1 and reader.stats.rejected == 0
    assert any("top-k delta 2 after keyframe seq 1" in r.getMessage() for r in caplog.records)
    reader.update_parameters(own, 10, epoch=1)  # the same delta is not downloaded again
    assert reader.stats.keyframe_misses == 1 and reader.stats.keyframe_downloads == 1
    # The writer's next delta is on K2: the reader fetches K2 and uses it.
    blocking.blocked.clear()
    weights = _drift(weights, 4)
    writer.update_parameters(weights, 10, epoch=4)
    result, _ = reader.update_parameters(own, 10, epoch=2)
    assert reader.stats.peers_used == 1
    for got, want in zip(result, _expected(own, 10, [(writer.writer.seen(weights), 10)])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_failed_keyframe_put_publishes_nothing_and_the_next_epoch_starts_afresh(backend):
    blocking = BlockingStore(_open(backend))
    writer = AsyncFederatedNode(blocking, node_id="w", compression="topk:0.05")
    blocking.blocked.add("keyframes/w")
    local, _ = writer.update_parameters(_model(1), 10, epoch=0)
    assert _same(local, _model(1)) and writer.stats.store_failures == 1
    assert "nodes/w" not in blocking.list("nodes/")  # no delta naming a keyframe that is not there
    blocking.blocked.clear()
    writer.update_parameters(_model(1), 10, epoch=1)
    reader = AsyncFederatedNode(_open(backend), node_id="r")
    result, _ = reader.update_parameters(_model(2), 10, epoch=0)
    for got, want in zip(result, _expected(_model(2), 10, [(writer.writer.seen(_model(1)), 10)])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("blocked", ["nodes/w", "deltas/w/00000001"])
def test_no_delta_builds_on_one_that_was_not_published_and_logged(backend, blocked, caplog):
    blocking = BlockingStore(_open(backend))
    writer = AsyncFederatedNode(blocking, node_id="w", compression="topk:0.05")
    reader = AsyncFederatedNode(_open(backend), node_id="r")
    writer.update_parameters(_model(1), 10, epoch=0)  # keyframe and position 0
    blocking.blocked.add(blocked)
    moved = _drift(_model(1), 1)
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        writer.update_parameters(moved, 10, epoch=1)  # delta 1: its PUT, or its log copy, fails
    assert writer.writer.deltas_logged == 0
    if blocked == "nodes/w":
        assert writer.stats.store_failures == 1
    else:  # published: readers may hold it, the epoch federated; only the log is missing
        assert writer.stats.store_failures == 0 and "could not log its top-k delta" in caplog.text
    blocking.blocked.clear()
    moved = _drift(moved, 2)
    writer.update_parameters(moved, 10, epoch=2)  # a new chain: never a delta 2 that needs the missing link
    assert writer.writer.topk.chain == 0 and writer.writer.keyframes_written == 2
    result, _ = reader.update_parameters(_model(2), 10, epoch=0)
    for got, want in zip(result, _expected(_model(2), 10, [(writer.writer.seen(moved), 10)])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# -- hostile keyframes -----------------------------------------------------------------------------------
def _delta_as_keyframe(arrays: list[np.ndarray], header: UpdateHeader) -> bytes:
    delta = EncodedTensor(
        "delta",
        np.dtype("<f4"),
        (64, 32),
        {SEP + "indices": np.array([1], np.uint32), SEP + "values": np.array([1.0], np.float32)},
    )
    keyframe = encode(arrays, header)
    return encode([delta, *arrays[1:]], header, keyframe=object_ref(keyframe), chain=1)


def _corrupt(data: bytes) -> bytes:
    return data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]


HOSTILE = {
    "other-node": (lambda a, h: encode(a, UpdateHeader("mallory", seq=h.seq)), "header says node 'mallory'"),
    "delta": (_delta_as_keyframe, "keyframe must be a whole model, this object is a top-k delta"),
    "wrong-shape": (lambda a, h: encode([np.ones((32, 64), np.float32), *a[1:]], h), "local model has"),
    "corrupt": (lambda a, h: _corrupt(encode(a, h)), "checksum mismatch"),
    "bad-field": (lambda a, h: rewrite(encode(a, h), lambda f: f.update(seq=-1)), "seq"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_keyframes_are_refused_by_name_and_never_aggregated(backend, kind, caplog):
    make, reason = HOSTILE[kind]
    writer = AsyncFederatedNode(_open(backend), node_id="w", compression="topk:0.05")
    reader = AsyncFederatedNode(_open(backend), node_id="r")
    honest = AsyncFederatedNode(_open(backend), node_id="h")
    writer.update_parameters(_model(1), 10, epoch=0)
    honest.update_parameters(_model(3), 30, epoch=0)
    writer.store.put("keyframes/w", make(_model(9), UpdateHeader("w", seq=1)))
    own = _model(2)
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = reader.update_parameters(own, 10, epoch=0)
    for got, want in zip(result, _expected(own, 10, [(_model(3), 30)])):  # the honest peer only
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert reader.stats.rejected == 1 and reason in reader.stats.rejections["keyframes/w"]
    assert any("keyframes/w" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    gets = reader.store.stats.gets
    reader.update_parameters(own, 10, epoch=1)  # nothing downloaded again until w publishes anew
    assert reader.store.stats.gets == gets and reader.stats.rejected == 1


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("other-node", "not one of the same node"), ("corrupt", "checksum mismatch"), ("other-chain", None)],
)
def test_hostile_or_foreign_log_entries_are_never_applied(backend, kind, reason):
    writer = AsyncFederatedNode(_open(backend), node_id="w", compression="topk:0.05")
    weights = _model(1)
    for epoch in range(3):  # keyframe, deltas 1 and 2
        weights = _drift(weights, epoch)
        writer.update_parameters(weights, 10, epoch=epoch)
    store = writer.store
    logged = store.get("deltas/w/00000001")
    if kind == "other-node":
        store.put("deltas/w/00000001", rewrite(logged, lambda f: f.update(node_id="mallory")))
    elif kind == "corrupt":
        store.put("deltas/w/00000001", _corrupt(logged))
    else:  # a delta 1 of an earlier chain (another keyframe): not this chain's link
        store.put("deltas/w/00000001", rewrite(logged, lambda f: f["keyframe"].update(seq=99)))
    late = AsyncFederatedNode(_open(backend), node_id="late")
    own = _model(2)
    result, _ = late.update_parameters(own, 10, epoch=0)
    assert _same(result, own) and late.stats.peers_used == 0
    if reason is None:
        assert late.stats.keyframe_misses == 1 and late.stats.rejected == 0
    else:
        assert late.stats.rejected == 1 and reason in late.stats.rejections["deltas/w/00000001"]


def test_keyframes_from_outside_a_signed_experiment_and_oversized_ones_are_refused(backend):
    writer = AsyncFederatedNode(
        _open(backend), node_id="w", compression="topk:0.05", secret="s3cret", max_object_bytes=20_000
    )
    reader = AsyncFederatedNode(_open(backend), node_id="r", secret="s3cret", max_object_bytes=20_000)
    writer.update_parameters(_model(1), 10, epoch=0)
    writer.store.put("keyframes/w", encode(_model(9), UpdateHeader("w", seq=1)))  # unsigned
    reader.update_parameters(_model(2), 10, epoch=0)
    assert "unsigned object" in reader.stats.rejections["keyframes/w"]
    writer.update_parameters(_model(1), 10, epoch=1)  # a new delta (the reader tries again)
    big = [np.zeros((64, 128), np.float32), *_model(9)[1:]]
    writer.store.put("keyframes/w", encode(big, UpdateHeader("w", seq=1), secret=b"s3cret"))
    reader.update_parameters(_model(2), 10, epoch=1)
    assert "over the limit of 20000" in reader.stats.rejections["keyframes/w"]
    assert reader.stats.rejected == 2 and reader.stats.peers_used == 0


def test_a_missing_keyframe_skips_the_peer_without_rejecting_it(backend):
    writer = AsyncFederatedNode(_open(backend), node_id="w", compression="topk:0.05")
    reader = AsyncFederatedNode(_open(backend), node_id="r")
    writer.update_parameters(_model(1), 10, epoch=0)
    writer.store.delete("keyframes/w")
    result, _ = reader.update_parameters(_model(2), 10, epoch=0)
    assert _same(result, _model(2)) and reader.stats.keyframe_misses == 1 and reader.stats.rejected == 0


# -- sync -------------------------------------------------------------------------------------------------
def test_sync_nodes_with_mixed_compression_hold_identical_weights(backend):
    options = {"n0": None, "n1": "int8", "n2": "topk:0.05", "n3": "bf16"}
    counts = {"n0": 10, "n1": 25, "n2": 40, "n3": 5}
    nodes = [
        SyncFederatedNode(
            _open(backend),
            num_nodes=4,
            timeout=30,
            node_id=i,
            compression=c,
            **({"topk_max_error": 0.9} if c and c.startswith("topk") else {}),
        )
        for i, c in options.items()
    ]
    inputs = {i: _model(k) for k, i in enumerate(options)}
    for round_number in range(3):
        results = _run_sync_round(nodes, inputs, counts)
        seen = {n.node_id: n.writer.seen(inputs[n.node_id]) for n in nodes}
        for i in options:
            assert _same(results[i], results["n0"])  # bit-identical on every node
        want = _expected(seen["n0"], counts["n0"], [(seen[i], counts[i]) for i in ("n1", "n2", "n3")])
        for got, expected in zip(results["n0"], want):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        inputs = {i: _drift(results[i], 10 * round_number + k) for k, i in enumerate(options)}
    assert nodes[0].stats.keyframe_misses == 0 and nodes[0].stats.rejected == 0
    # With members that send no top-k, the top-k chain never rebases: it stays on keyframes and the log,
    # which the others can always follow.
    assert not nodes[2].writer.topk.rebased and nodes[2].writer.deltas_logged == 2


# -- bytes ---------------------------------------------------------------------------------------------
def _big_model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((256, 384)) * 0.1).astype(np.float32), np.zeros(384, np.float32)]


@pytest.mark.parametrize(
    ("compression", "at_most"), [("fp16", 0.51), ("bf16", 0.51), ("int8", 0.26), ("topk:0.01", 0.10)]
)
def test_compression_cuts_the_bytes_each_node_moves_per_epoch(backend, compression, at_most):
    epochs = 20

    def run(option: str | None) -> tuple[float, float]:
        url, storage = backend
        topk = {"topk_keyframe_every": epochs} if option and option.startswith("topk") else {}
        writer = AsyncFederatedNode(open_store(url + f"-{option}", **storage), node_id="w", compression=option, **topk)
        reader = AsyncFederatedNode(open_store(url + f"-{option}", **storage), node_id="r")
        weights = _big_model(0)
        for epoch in range(epochs):  # 40 of 98304 kernel entries move each epoch: top-k keeps up
            weights = [_drift([weights[0]], epoch, moved=40, scale=0.02)[0], weights[1]]
            writer.update_parameters(weights, 10, epoch=epoch)
            reader.update_parameters(_big_model(1), 10, epoch=epoch)
        assert reader.stats.peers_used == epochs  # the reader downloaded and used the writer every epoch
        return writer.store.stats.bytes_up / epochs, reader.store.stats.bytes_down / epochs

    up_plain, down_plain = run(None)
    up, down = run(compression)
    assert up_plain > 384 * 1024 and down_plain > 384 * 1024
    assert up <= at_most * up_plain and down <= at_most * down_plain, (up / up_plain, down / down_plain)


# -- sync: deltas against the round's aggregate ------------------------------------------------------------
def _sync_topk_nodes(backend: tuple[str, dict[str, Any]], ids: list[str], **options: Any) -> list[SyncFederatedNode]:
    return [
        SyncFederatedNode(_open(backend), num_nodes=len(ids), timeout=30, node_id=i, compression="topk:0.05", **options)
        for i in ids
    ]


def test_sync_topk_deltas_carry_only_the_local_training(backend):
    """After a round every member holds the aggregate, so the next deltas are against it: 20 moved entries
    per node are sent exactly, and the round equals FedAvg of the true weights, not of lagging states."""
    ids = ["n0", "n1", "n2"]
    nodes = _sync_topk_nodes(backend, ids, topk_keyframe="lossless")  # nothing rounded to carry from round 0
    counts = {"n0": 10, "n1": 25, "n2": 40}
    inputs = {i: _model(k) for k, i in enumerate(ids)}
    sizes = []
    for round_number in range(4):
        before = nodes[0].store.stats.bytes_up
        results = _run_sync_round(nodes, inputs, counts)
        sizes.append(nodes[0].store.stats.bytes_up - before)
        for i in ids:
            assert _same(results[i], results["n0"])
        if round_number >= 1:  # round 0 published int8 keyframes
            want = _expected(inputs["n0"], 10, [(inputs["n1"], 25), (inputs["n2"], 40)])
            for got, expected in zip(results["n0"], want):
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)  # float16 rounding of the deltas
        inputs = {i: _drift(results[i], 10 * round_number + k) for k, i in enumerate(ids)}
    assert all(n.writer.keyframes_written == 1 and n.stats.keyframe_misses == 0 for n in nodes)
    assert max(sizes[1:]) < sizes[0] / 5  # a delta of 20 entries against a keyframe of 2048
    assert "deltas/" not in str(list(nodes[0].store.list("deltas/")))  # rebased chains need no log


def test_sync_topk_carries_what_a_round_left_unsent_into_the_next():
    """Error feedback across rebases: a node's unsent training reached no one and its weights no longer hold
    it after taking the aggregate, so its next deltas send it; the community ends where dense FedAvg would."""
    ids = ["n0", "n1"]
    nodes = [
        SyncFederatedNode(
            "memory://carry",
            num_nodes=2,
            timeout=30,
            node_id=i,
            compression="topk:0.01",
            topk_keyframe="lossless",
            topk_max_error=1e6,
        )
        for i in ids
    ]  # never a keyframe
    zero = [np.zeros(1000, np.float32)]
    _run_sync_round(nodes, {"n0": zero, "n1": zero}, {"n0": 10, "n1": 10})
    step = [np.full(1000, 0.5, np.float32)]  # n0 moves every entry; k = 10 per round
    results = _run_sync_round(nodes, {"n0": step, "n1": zero}, {"n0": 10, "n1": 10})
    assert np.count_nonzero(results["n0"][0]) == 10  # only 10 entries reached n1 this round
    for _ in range(100):  # both nodes keep what they were given: n0's unsent steps go out 10 at a time
        results = _run_sync_round(nodes, {i: results[i] for i in ids}, {"n0": 10, "n1": 10})
    assert _same(results["n0"], results["n1"])
    np.testing.assert_allclose(results["n0"][0], 0.25, atol=1e-3)  # FedAvg of 0.5 and 0: nothing lost


@pytest.mark.parametrize("shift", [1e-3, 1.0])
def test_sync_members_whose_aggregates_differ_resynchronise_through_keyframes(backend, monkeypatch, shift):
    """n2 ends round 1 holding another aggregate than n0 and n1 (as if it had missed a peer). A small
    difference: its next delta names its own view, so both sides skip each other (a miss each way). A large
    one: its next object is a keyframe while the others sent deltas. Either way every member publishes a
    keyframe the round after, and from then on they agree again."""
    ids = ["n0", "n1", "n2"]
    nodes = _sync_topk_nodes(backend, ids)
    counts = {i: 10 for i in ids}
    inputs = {i: _model(k) for k, i in enumerate(ids)}
    odd = nodes[2]
    real_rebase = odd._rebase

    def rebase_elsewhere(arrays: list[np.ndarray], *rest: Any, **options: Any) -> None:
        real_rebase([a + shift if a.dtype.kind == "f" else a for a in arrays], *rest, **options)

    history = []
    for round_number in range(6):
        monkeypatch.setattr(odd, "_rebase", rebase_elsewhere if round_number == 1 else real_rebase)
        results = _run_sync_round(nodes, inputs, counts)
        history.append(all(_same(results[i], results["n0"]) for i in ids))
        inputs = {i: _drift(results[i], 10 * round_number + k) for k, i in enumerate(ids)}
    assert history == [True, True, False, True, True, True]
    assert all(n.stats.rejected == 0 for n in nodes) and odd.stats.keyframe_misses == 2
    if shift < 0.1:  # a delta on n2's own view: n0 and n1 could not follow it either
        assert nodes[0].stats.keyframe_misses == nodes[1].stats.keyframe_misses == 1
        assert [n.writer.keyframes_written for n in nodes] == [2, 2, 2]
    else:  # n2's view was too far from its weights: it started a keyframe in round 2 already
        assert nodes[0].stats.keyframe_misses == nodes[1].stats.keyframe_misses == 0
        assert [n.writer.keyframes_written for n in nodes] == [2, 2, 3]
