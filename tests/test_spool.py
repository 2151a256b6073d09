"""Streamed GETs, the on-disk peer cache, and the memory they save."""

from __future__ import annotations

import logging
import mmap
import os
import tracemalloc
import uuid
from typing import Any, BinaryIO

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode
from flwr_serverless.node.spool import PeerSpool
from flwr_serverless.stores import ObjectInfo, Store, open_store
from flwr_serverless.strategy.aggregate import weighted_mean, weighted_sum


def test_get_into_streams_the_object_and_counts_one_get(store: Store, tmp_path: Any) -> None:
    data = os.urandom(3 * (1 << 20) + 123)  # several stream chunks and a ragged end
    store.put("nodes/a", data)
    before = store.stats.gets
    with open(tmp_path / "sink", "w+b") as sink:
        assert store.get_into("nodes/a", sink) == len(data)
        sink.seek(0)
        assert sink.read() == data
    assert store.stats.gets == before + 1


class _FlakyStreamStore(Store):
    """Its first streamed GET writes half the object, then the connection drops."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, bytes] = {}
        self.attempts = 0

    def _put(self, key: str, data: bytes) -> str:
        self.objects[key] = bytes(data)
        return str(len(data))

    def _get(self, key: str) -> bytes:
        return self.objects[key]

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        self.attempts += 1
        data = self.objects[key]
        if self.attempts == 1:
            sink.write(data[: len(data) // 2])
            raise ConnectionResetError("connection reset by peer")
        sink.write(data)
        return len(data)

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        return {k: ObjectInfo(k, str(len(v)), len(v)) for k, v in self.objects.items() if k.startswith(prefix)}

    def _delete(self, key: str) -> None:
        self.objects.pop(key, None)


def test_a_retried_streamed_get_starts_the_sink_afresh(tmp_path: Any) -> None:
    store = _FlakyStreamStore()
    store.put("k", b"0123456789" * 1000)
    with open(tmp_path / "sink", "w+b") as sink:
        assert store.get_into("k", sink) == 10_000
        sink.seek(0)
        assert sink.read() == b"0123456789" * 1000  # not the half-object plus the whole one
    assert store.attempts == 2 and store.stats.retries == 1


@pytest.mark.parametrize("how", ["store never maps", "spool told not to map"])
def test_disk_spool_maps_the_object_and_leaves_no_file_behind(how: str, tmp_path: Any) -> None:
    store = open_store(tmp_path / "store", map_reads=how != "store never maps")
    store.put("nodes/a", b"weights" * 1000)
    cache = tmp_path / "cache"
    cache.mkdir()
    spooled = PeerSpool("disk", str(cache), map_store_files=how != "spool told not to map").fetch(store, "nodes/a")
    assert isinstance(spooled, mmap.mmap) and spooled[:] == b"weights" * 1000
    store.put("nodes/a", b"changed")  # a private copy: the store's new object does not show through
    assert spooled[:] == b"weights" * 1000
    assert os.listdir(cache) == []  # anonymous temp file: nothing to clean up, even after kill -9


def test_unusable_spool_directory_falls_back_to_memory(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(tmp_path / "store", map_reads=False)
    store.put("nodes/a", b"x" * 100)
    spool = PeerSpool("disk", str(tmp_path / "does-not-exist"))
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        assert spool.fetch(store, "nodes/a") == b"x" * 100
    assert spool.mode == "memory" and "keeping them in memory" in caplog.text


def test_memory_stores_are_read_directly() -> None:
    store = open_store(f"memory://spool-{uuid.uuid4().hex[:8]}")
    store.put("nodes/a", b"abc")
    assert store.zero_copy_get and PeerSpool("disk").fetch(store, "nodes/a") == b"abc"


def test_unknown_peer_cache_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="peer_cache"):
        AsyncFederatedNode(open_store(tmp_path), peer_cache="gpu")


def _model(seed: int, size: int = 250_000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size, dtype=np.float32), rng.standard_normal((3, 5), dtype=np.float32)]


@pytest.mark.parametrize("kind", ["file", "s3fs", "boto3"])
def test_disk_and_memory_peer_caches_give_the_same_bits(kind: str, store_url_factory: Any) -> None:
    results = {}
    for cache in ("disk", "memory"):
        url, options = store_url_factory(kind)
        url = f"{url.rstrip('/')}/{cache}"
        nodes = [AsyncFederatedNode(open_store(url, **options), node_id=f"n{i}", peer_cache=cache) for i in range(3)]
        for i, node in enumerate(nodes):
            node.update_parameters(_model(i), 10 + i, 0)
        results[cache], _ = nodes[0].update_parameters(_model(0), 10, 1)
    for disk, memory in zip(results["disk"], results["memory"]):
        assert np.array_equal(disk, memory)


def test_async_step_allocates_about_one_model_however_many_peers(tmp_path: Any) -> None:
    """Peers live in memory-mapped temp files; a step allocates the encoded object, then the result."""
    store_url = str(tmp_path / "store")
    nodes = [AsyncFederatedNode(open_store(store_url), node_id=f"n{i}") for i in range(5)]
    models = [_model(i, size=1_000_000) for i in range(5)]
    for node, model in zip(nodes, models):
        node.update_parameters(model, 100, 0)
    model_bytes = sum(a.nbytes for a in models[0])
    tracemalloc.start()
    try:
        nodes[0].update_parameters(models[0], 100, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert nodes[0].stats.peers_used == 4
    assert peak < 1.5 * model_bytes, peak / model_bytes  # 4 peers held in memory would be > 5x


def test_slicedweighted_sum_equals_the_whole_tensor_computation() -> None:
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal((13, 7)).astype(np.float32) for _ in range(3)]
    scales = [0.2, 0.5, 0.3]
    whole = np.zeros((13, 7))
    for tensor, scale in zip(tensors, scales):
        whole += tensor.astype(np.float64) * scale
    sliced = weighted_sum(tensors, scales, np.dtype(np.float32), chunk=10)  # slices across rows
    assert sliced.dtype == np.float32 and np.array_equal(sliced, whole.astype(np.float32))
    assert np.array_equal(weighted_mean([[t] for t in tensors], [2, 5, 3])[0], sliced)
