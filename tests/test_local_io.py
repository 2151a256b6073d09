"""Copies a store can skip: writes from a list of buffers, and local objects mapped where they lie."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode
from flwr_serverless.errors import ObjectNotFoundError, StoreConfigurationError
from flwr_serverless.node.spool import PeerSpool
from flwr_serverless.stores import LocalStore, Store, open_store
from flwr_serverless.stores.local_mapping import can_map_in_place, filesystem_type
from flwr_serverless.wire.codec import UpdateHeader, decode, encode, encode_parts


def _parts() -> list[Any]:
    """Buffers of several kinds and sizes, one of them empty, one a float32 view."""
    floats = np.arange(1000, dtype=np.float32)
    return [b"head", memoryview(floats), b"", bytearray(b"\x00\xff" * 70_000), memoryview(b"tail")]


def _joined() -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in _parts())


def test_put_of_buffers_stores_them_back_to_back_on_every_backend(store: Store) -> None:
    tag = store.put("nodes/a", _parts())
    assert store.get("nodes/a") == _joined()
    listed = store.list("nodes/")["nodes/a"]
    assert listed.size == len(_joined()) and listed.tag == tag
    assert store.stats.puts == 1 and store.stats.bytes_up == len(_joined())


def test_put_of_an_encoded_model_as_parts_decodes_like_the_joined_object(store: Store) -> None:
    arrays = [np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32), np.arange(5, dtype=np.int64)]
    header = UpdateHeader(node_id="a", epoch=1, num_examples=3)
    store.put("nodes/a", encode_parts(arrays, header))
    assert store.get("nodes/a") == encode(arrays, header)
    for got, want in zip(decode(store.get("nodes/a"), "nodes/a").arrays, arrays):
        assert np.array_equal(got, want)


def test_open_mapped_maps_local_objects_and_is_none_elsewhere(store: Store) -> None:
    store.put("nodes/a", b"weights" * 1000)
    mapped = store.open_mapped("nodes/a")
    if isinstance(store, LocalStore):
        assert isinstance(mapped, mmap.mmap) and mapped[:] == b"weights" * 1000
        assert store.stats.gets == 1 and store.stats.bytes_down == 7000
    else:  # memory:// and S3 objects are read with get/get_into
        assert mapped is None and store.stats.gets == 0


def test_a_mapped_object_outlives_its_replacement_and_deletion(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), map_reads=True)
    store.put("nodes/a", b"old" * 10_000)
    mapped = store.open_mapped("nodes/a")
    assert isinstance(mapped, mmap.mmap)
    store.put("nodes/a", b"new" * 5)  # a writer replaces the object (temp + rename)...
    assert mapped[:] == b"old" * 10_000 and store.get("nodes/a") == b"new" * 5
    store.delete("nodes/a")  # ...or deletes it: the map still reads the object it was given
    assert mapped[:] == b"old" * 10_000


def test_open_mapped_of_missing_and_empty_objects(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), map_reads=True)
    with pytest.raises(ObjectNotFoundError, match="nodes/missing"):
        store.open_mapped("nodes/missing")
    store.put("nodes/empty", b"")
    assert store.open_mapped("nodes/empty") == b""


def test_map_reads_false_reads_through_copies_and_bad_values_are_refused(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "a"), map_reads=False)
    store.put("k", b"x")
    assert store.open_mapped("k") is None
    with pytest.raises(StoreConfigurationError, match="map_reads"):
        open_store(str(tmp_path / "b"), map_reads="yes")


def test_filesystem_type_reads_the_longest_matching_mount(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "30 22 0:40 / /scratch rw shared:9 - nfs4 server:/export rw,vers=4.2\n"
        "31 22 0:41 / /scr\\040atch2 rw shared:10 - lustre 10.0.0.1@tcp:/fs rw\n"
    )
    assert filesystem_type("/home/user/exp", str(mountinfo)) == "ext4"
    assert filesystem_type("/scratch/exp", str(mountinfo)) == "nfs4"
    assert filesystem_type("/scratchy", str(mountinfo)) == "ext4"  # a prefix of the name is not the mount
    assert filesystem_type("/scr atch2/exp", str(mountinfo)) == "lustre"
    assert filesystem_type("/x", str(tmp_path / "no-such-file")) is None


def test_local_folders_on_linux_local_disks_are_mapped_by_default(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    assert store.map_reads == can_map_in_place(str(tmp_path))
    if filesystem_type(str(tmp_path)) in ("ext4", "xfs", "btrfs", "tmpfs") and os.uname().sysname == "Linux":
        assert store.map_reads


def test_the_spool_maps_local_objects_in_place_without_a_temp_file(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "store"), map_reads=True)
    store.put("nodes/a", b"weights" * 1000)
    cache = tmp_path / "cache"
    cache.mkdir()
    fetched = PeerSpool("disk", str(cache)).fetch(store, "nodes/a")
    assert isinstance(fetched, mmap.mmap) and fetched[:] == b"weights" * 1000
    assert store.stats.gets == 1


def test_objects_are_writable_by_their_owner_only(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    store.put("nodes/a", b"x")
    store.put("nodes/b", [b"x", b"y"])
    for name in ("a", "b"):
        assert not os.stat(tmp_path / "nodes" / name).st_mode & 0o022


def test_files_others_could_rewrite_are_read_through_a_private_copy(tmp_path: Path) -> None:
    """A bit flipped (or a file truncated) by another user after validation must not reach the reader."""
    store = LocalStore(str(tmp_path / "store"), map_reads=True)
    store.put("nodes/a", b"weights" * 1000)
    path = tmp_path / "store" / "nodes" / "a"
    os.chmod(path, 0o664)  # group-writable, as an older writer or another tool may leave it
    assert store.open_mapped("nodes/a") is None and store.stats.gets == 0
    fetched = PeerSpool("disk", str(tmp_path)).fetch(store, "nodes/a")
    with open(path, "r+b") as handle:  # rewritten in place, then truncated
        handle.write(b"W")
        handle.truncate(10)
    assert fetched[:] == b"weights" * 1000


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a file away")
def test_files_of_another_user_are_read_through_a_private_copy(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), map_reads=True)
    store.put("nodes/a", b"weights")
    os.chown(tmp_path / "nodes" / "a", 12345, 12345)
    assert store.open_mapped("nodes/a") is None
    assert store.get("nodes/a") == b"weights"


def test_a_filesystem_that_cannot_map_falls_back_to_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr_serverless.stores.local as local

    def refuse(fd: int) -> mmap.mmap:
        raise OSError(19, "No such device")

    monkeypatch.setattr(local, "map_read_only", refuse)
    store = LocalStore(str(tmp_path / "store"), map_reads=True)
    store.put("nodes/a", b"weights")
    assert store.open_mapped("nodes/a") is None and store.map_reads is False
    fetched = PeerSpool("disk", str(tmp_path)).fetch(store, "nodes/a")  # spooled through a private copy
    assert fetched[:] == b"weights"


def test_async_nodes_on_a_mapped_local_store_match_a_memory_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    models = [
        [rng.standard_normal(10_000).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)]
        for _ in range(3)
    ]
    results = []
    for store in (LocalStore(str(tmp_path / "local"), map_reads=True), "memory://local-io-compare"):
        nodes = [AsyncFederatedNode(store, node_id=f"n{i}") for i in range(3)]
        for i, node in enumerate(nodes):
            node.update_parameters(models[i], 10 + i, 0)
        results.append(nodes[0].update_parameters(models[0], 10, 1)[0])
        assert nodes[0].stats.peers_used == 2
    for local, memory in zip(*results):
        assert np.array_equal(local, memory)
