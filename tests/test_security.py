"""Hostile or broken objects, signing, and node-id ownership, through real nodes."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.errors import DuplicateNodeIdError
from flwr_serverless.node.membership import Membership
from flwr_serverless.stores import open_store
from flwr_serverless.stores.faults import FaultyStore
from flwr_serverless.wire.codec import FORMAT, UpdateHeader, encode

WORKER = str(Path(__file__).with_name("reliability_worker.py"))
OWN = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]


def _valid(node_id: str, arrays: list[np.ndarray] | None = None, secret: bytes | None = None, **header: Any) -> bytes:
    arrays = arrays if arrays is not None else [np.ones((4, 3), np.float32), np.ones(3, np.float32)]
    return encode(arrays, UpdateHeader(node_id=node_id, num_examples=1, **header), secret=secret)


def _flip_payload_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


HOSTILE: dict[str, tuple[Callable[[str], bytes], str]] = {
    "format": (lambda n: _valid(n).replace(FORMAT.encode(), b"flwr-serverless/9"), "unsupported format"),
    "checksum": (lambda n: _flip_payload_byte(_valid(n)), "checksum"),
    "truncated": (lambda n: _valid(n)[:-7], "truncated"),
    "count": (lambda n: _valid(n, [np.ones((4, 3), np.float32)]), "tensors, the local model has"),
    "shape": (lambda n: _valid(n, [np.ones((3, 4), np.float32), np.ones(3, np.float32)]), "the local model has"),
    "dtype": (lambda n: _valid(n, [np.ones((4, 3), np.float64), np.ones(3, np.float32)]), "the local model has"),
    "nan": (lambda n: _valid(n, [np.full((4, 3), np.nan, np.float32), np.ones(3, np.float32)]), "NaN or Inf"),
    "inf": (lambda n: _valid(n, [np.ones((4, 3), np.float32), np.full(3, np.inf, np.float32)]), "NaN or Inf"),
    "header_size": (lambda n: struct.pack("<Q", 2**62) + b"{}" * 8, "header claims"),
    "garbage": (lambda n: b"\x00" * 5, "truncated"),
    "impersonation": (lambda n: _valid("someone-else"), "header says node"),
}


def _url() -> str:
    return f"memory://sec-{uuid.uuid4().hex[:10]}"


def _check_rejected(node: Any, key: str, reason: str, result: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert node.stats.rejected >= 1
    assert reason in node.stats.rejections[key], node.stats.rejections
    assert key in caplog.text and reason.split()[0] in caplog.text
    assert all(np.array_equal(r, o) for r, o in zip(result, OWN))  # only our own weights were used


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_object_rejected_by_async_node(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    make, reason = HOSTILE[kind]
    url = _url()
    open_store(url).put("nodes/evil", make("evil"))
    node = AsyncFederatedNode(url, node_id="me")
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = node.update_parameters(OWN, num_examples=1)
        again, _ = node.update_parameters(OWN, num_examples=1)  # the same bad object: not fetched again
    _check_rejected(node, "nodes/evil", reason, result, caplog)
    assert node.stats.rejected == 1 and all(np.array_equal(r, o) for r, o in zip(again, OWN))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_object_rejected_by_sync_node(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    make, reason = HOSTILE[kind]
    url = _url()
    key = SyncFederatedNode.round_prefix(0) + "evil"
    open_store(url).put(key, make("evil"))
    node = SyncFederatedNode(url, num_nodes=2, timeout=5, node_id="me")
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = node.update_parameters(OWN, num_examples=1)
    _check_rejected(node, key, reason, result, caplog)


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("bad_id", ["bad..id", "bad\x01id", ".hidden"])
def test_node_ids_that_are_not_plain_names_are_rejected(
    mode: str, bad_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    folder = root / ("nodes" if mode == "async" else "rounds/00000000")
    folder.mkdir(parents=True)
    (folder / bad_id).write_bytes(_valid("x"))
    node = (
        AsyncFederatedNode(str(root), node_id="me")
        if mode == "async"
        else SyncFederatedNode(str(root), num_nodes=2, timeout=5, node_id="me")
    )
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = node.update_parameters(OWN, num_examples=1)
    rel = str(folder.relative_to(root)) + "/" + bad_id
    _check_rejected(node, rel, "not a plain name", result, caplog)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_oversized_object_rejected_from_listing_size_before_download(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url()
    key = "nodes/big" if mode == "async" else SyncFederatedNode.round_prefix(0) + "big"
    open_store(url).put(key, _valid("big"))
    store = open_store(url)
    node = (
        AsyncFederatedNode(store, node_id="me", max_object_bytes=64)
        if mode == "async"
        else SyncFederatedNode(store, num_nodes=2, timeout=5, node_id="me", max_object_bytes=64)
    )
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = node.update_parameters(OWN, num_examples=1)
    _check_rejected(node, key, "over the limit", result, caplog)
    assert store.stats.bytes_down < len(_valid("big"))  # never downloaded (only small member records were)


def test_hostile_objects_among_honest_peers_do_not_stop_training() -> None:
    url = _url()
    store = open_store(url)
    for kind, (make, _) in HOSTILE.items():
        store.put(f"nodes/evil-{kind}", make(f"evil-{kind}"))
    honest = AsyncFederatedNode(url, node_id="honest")
    honest.update_parameters([np.full((4, 3), 2.0, np.float32), np.full(3, 2.0, np.float32)], num_examples=1)
    node = AsyncFederatedNode(url, node_id="me")
    result, _ = node.update_parameters(OWN, num_examples=1)
    assert np.allclose(result[0], 1.0) and node.stats.rejected == len(HOSTILE)


# -- signing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_signed_experiment_rejects_unsigned_and_forged_objects(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    url = _url()
    store = open_store(url)
    prefix = "nodes/" if mode == "async" else SyncFederatedNode.round_prefix(0)
    store.put(prefix + "unsigned", _valid("unsigned"))
    store.put(prefix + "forged", _valid("forged", secret=b"not-the-secret"))
    store.put(prefix + "friend", _valid("friend", secret=b"s3cret"))
    node = (
        AsyncFederatedNode(url, node_id="me", secret="s3cret")
        if mode == "async"
        else SyncFederatedNode(url, num_nodes=4, timeout=5, node_id="me", secret="s3cret")
    )
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = node.update_parameters(OWN, num_examples=1)
    assert "unsigned object" in node.stats.rejections[prefix + "unsigned"]
    assert "bad signature" in node.stats.rejections[prefix + "forged"]
    assert node.stats.rejected == 2 and np.allclose(result[0], 0.5)  # the correctly signed friend was used


def test_secret_from_environment_and_unsigned_experiments_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    url = _url()
    monkeypatch.setenv("FLWR_SERVERLESS_SECRET", "from-env")
    signer = AsyncFederatedNode(url, node_id="signer")
    signer.update_parameters([np.ones((4, 3), np.float32), np.ones(3, np.float32)], num_examples=1)
    assert b"signature" in open_store(url).get("nodes/signer")
    verifier = AsyncFederatedNode(url, node_id="verifier")
    assert np.allclose(verifier.update_parameters(OWN, num_examples=1)[0][0], 0.5)
    monkeypatch.delenv("FLWR_SERVERLESS_SECRET")
    plain = AsyncFederatedNode(url, node_id="plain")  # no secret: signatures are not checked, nothing rejected
    plain.update_parameters(OWN, num_examples=1)
    assert plain.stats.rejected == 0 and plain.stats.peers_used == 2


# -- node ids: duplicates refused, restarts allowed ------------------------------------------------


def test_second_live_node_with_the_same_id_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    first = AsyncFederatedNode(url, node_id="alice")
    first.update_parameters(OWN, num_examples=1)
    second = AsyncFederatedNode(url, node_id="alice")
    with pytest.raises(DuplicateNodeIdError, match="'alice' is already used by a live node") as info:
        second.update_parameters(OWN, num_examples=1)
    assert "pid" in str(info.value) and "state_dict" in str(info.value)
    sync = SyncFederatedNode(url, num_nodes=2, timeout=1, node_id="alice")
    with pytest.raises(DuplicateNodeIdError):
        sync.update_parameters(OWN, num_examples=1)


def test_duplicate_id_in_another_process_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    first = AsyncFederatedNode(url, node_id="bob")
    first.update_parameters(OWN, num_examples=1)
    proc = subprocess.run([sys.executable, WORKER, "join", url, "bob"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DuplicateNodeIdError" in proc.stderr


def test_restored_node_with_the_owner_token_rejoins_at_once(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    first = AsyncFederatedNode(url, node_id="carol")
    first.update_parameters(OWN, num_examples=1)
    resumed = AsyncFederatedNode(url, node_id="carol")
    resumed.load_state_dict(first.state_dict())
    resumed.update_parameters(OWN, num_examples=1)
    assert AsyncFederatedNode(url, node_id="carol", owner_token=first.owner_token).update_parameters(OWN)


def test_node_restarted_after_its_process_died_rejoins_at_once(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    proc = subprocess.run([sys.executable, WORKER, "join", url, "dave"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    restarted = AsyncFederatedNode(url, node_id="dave")
    restarted.update_parameters(OWN, num_examples=1)
    assert json.loads(open_store(url).get("members/dave"))["owner"] == restarted.owner_token


def test_takeover_after_the_lease_expired_and_heartbeat_keeps_it(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    first = AsyncFederatedNode(url, node_id="erin", member_lease=0.4)
    first.update_parameters(OWN, num_examples=1)
    for _ in range(3):  # a live node refreshes its lease from its federation calls
        time.sleep(0.15)
        first.update_parameters(OWN, num_examples=1)
    with pytest.raises(DuplicateNodeIdError):
        AsyncFederatedNode(url, node_id="erin", member_lease=0.4).update_parameters(OWN, num_examples=1)
    time.sleep(0.5)  # silent past its lease: a restart elsewhere may take the id
    AsyncFederatedNode(url, node_id="erin", member_lease=0.4).update_parameters(OWN, num_examples=1)
    time.sleep(0.15)
    first.update_parameters(OWN, num_examples=1)  # the old owner notices, logs an error, keeps training
    assert first.membership is not None and first.membership.lost


def test_backend_without_conditional_writes_warns_and_joins(caplog: pytest.LogCaptureFixture) -> None:
    store = FaultyStore(open_store(_url()))
    store.supports_conditional_writes = False
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        AsyncFederatedNode(store, node_id="frank").update_parameters(OWN, num_examples=1)
        AsyncFederatedNode(store, node_id="frank").update_parameters(OWN, num_examples=1)
    assert "cannot detect another node using the same id" in caplog.text


def test_retried_create_that_had_landed_is_not_a_duplicate() -> None:
    store = open_store(_url())
    node = AsyncFederatedNode(store, node_id="gina")
    Membership(store, "gina", node.owner_token).join()  # as if a first put_if_absent landed, response lost ...
    node.update_parameters(OWN, num_examples=1)  # ... the retry finds its own token and carries on
