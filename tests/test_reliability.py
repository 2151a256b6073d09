"""Store faults, crashes and outages: retries are bounded, nothing torn is ever read, no training is lost."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.errors import InvalidObjectError, ObjectNotFoundError, StoreError, SyncTimeoutError
from flwr_serverless.stores import RetryPolicy, open_store, with_retries
from flwr_serverless.stores.faults import FaultyStore, InjectedServiceError
from flwr_serverless.stores.fsspec_store import TEMP_PREFIX
from flwr_serverless.stores.retry import call_with_retries, is_transient
from flwr_serverless.wire.codec import decode
from tests.fakes import FakeClock
from tests.s3_servers import S3Server, create_bucket, free_port, seaweedfs
from tests.threads import in_background

WORKER = str(Path(__file__).with_name("reliability_worker.py"))
FAST = RetryPolicy(attempts=4, max_time=2.0, base_delay=0.01, max_delay=0.05)


def _memory() -> Any:
    return open_store(f"memory://rel-{uuid.uuid4().hex[:10]}", retry=False)


# -- retries -------------------------------------------------------------------------------


def test_transient_failures_are_retried_then_succeed() -> None:
    faulty = with_retries(FaultyStore(_memory(), fail_first=3), FAST)
    faulty.put("nodes/a", b"x")
    assert faulty.get("nodes/a") == b"x"
    assert faulty.injected == 3 and faulty.stats.retries == 3
    assert faulty.stats.puts == 1 and faulty.stats.gets == 1  # stats count requests that succeeded


@pytest.mark.parametrize("kind", ["reset", "refused", "timeout", "slowdown", "internal"])
def test_every_transient_kind_is_retried(kind: str) -> None:
    faulty = with_retries(FaultyStore(_memory(), fail_calls={1}, kind=kind), FAST)
    faulty.put("k", b"v")
    assert faulty.injected == 1 and faulty.stats.retries == 1


def test_persistent_failure_is_one_store_error_naming_op_and_key_within_the_bound() -> None:
    clock = FakeClock()
    policy = RetryPolicy(
        attempts=1000, max_time=0.5, base_delay=0.01, max_delay=0.1, clock=clock.now, sleep=clock.sleep
    )
    faulty = with_retries(FaultyStore(_memory(), fail_rate=1.0, kind="slowdown"), policy)
    with pytest.raises(StoreError) as info:
        faulty.put("nodes/a", b"x")
    assert 0.5 - 0.1 <= clock.t <= 0.5 and faulty.injected > 5  # retried until the time bound, not past it
    assert info.value.operation == "put" and info.value.key == "nodes/a"
    assert "gave up after" in str(info.value) and "SlowDown" in str(info.value)

    counted = with_retries(FaultyStore(_memory(), fail_rate=1.0), RetryPolicy(attempts=3, base_delay=0.0))
    with pytest.raises(StoreError, match="gave up after 3 attempt"):
        counted.list("nodes/")
    assert counted.injected == 3


def test_non_transient_errors_are_not_retried() -> None:
    forbidden = with_retries(FaultyStore(_memory(), fail_first=5, kind="forbidden"), FAST)
    with pytest.raises(StoreError, match="AccessDenied"):
        forbidden.put("k", b"v")
    assert forbidden.injected == 1 and forbidden.stats.retries == 0

    missing = with_retries(FaultyStore(_memory()), FAST)
    with pytest.raises(ObjectNotFoundError):
        missing.get("absent")
    assert missing.calls == 1

    racing = with_retries(FaultyStore(_memory()), FAST)
    racing.put_if_absent("m", b"1")
    with pytest.raises(StoreError, match="precondition"):
        racing.put_if_absent("m", b"2")
    assert racing.stats.retries == 0


def test_transient_classification_of_real_backend_errors() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def wrapped(exc: BaseException) -> StoreError:
        try:
            raise StoreError("put", "k", str(exc)) from exc
        except StoreError as outer:
            return outer

    assert is_transient(wrapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")))
    assert is_transient(wrapped(ReadTimeoutError(endpoint_url="http://x")))
    assert is_transient(wrapped(client_error("SlowDown", 503)))
    assert is_transient(wrapped(client_error("InternalError", 500)))
    assert is_transient(wrapped(ConnectionResetError()))
    assert not is_transient(wrapped(client_error("AccessDenied", 403)))
    assert not is_transient(wrapped(client_error("NoSuchKey", 404)))
    assert not is_transient(wrapped(client_error("PreconditionFailed", 412)))
    assert not is_transient(ObjectNotFoundError("k"))
    assert not is_transient(ValueError("bug"))
    aiohttp = pytest.importorskip("aiohttp")
    assert is_transient(wrapped(aiohttp.ServerDisconnectedError()))
    assert is_transient(InjectedServiceError("SlowDown", 503))
    from botocore.exceptions import FlexibleChecksumError

    assert is_transient(wrapped(FlexibleChecksumError(error_msg="Expected checksum x did not match")))


def test_call_with_retries_honours_the_thread_deadline() -> None:
    from flwr_serverless.stores.retry import retry_deadline

    calls = []

    def fail() -> None:
        calls.append(1)
        raise ConnectionRefusedError()

    clock = FakeClock()
    policy = RetryPolicy(
        attempts=10**6, max_time=60, base_delay=0.01, max_delay=0.02, clock=clock.now, sleep=clock.sleep
    )
    with retry_deadline(clock.t + 0.2, clock.now), pytest.raises(StoreError):
        call_with_retries(policy, "get", "k", fail)
    assert 0.2 - 0.02 <= clock.t <= 0.2 and len(calls) > 1

    calls.clear()  # a deadline on another clock does not bind this policy: its own bound does
    with retry_deadline(time.monotonic() + 0.2), pytest.raises(StoreError):
        call_with_retries(replace(policy, max_time=1.0), "get", "k", fail)
    assert 0.2 < clock.t - 0.2 <= 1.0 and len(calls) > 1


def test_truncated_reads_are_rejected_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://rel-{uuid.uuid4().hex[:10]}"
    writer = AsyncFederatedNode(url, node_id="w")
    reader = AsyncFederatedNode(FaultyStore(open_store(url), truncate_rate=1.0, operations=()), node_id="r")
    writer.update_parameters([np.ones(1000, np.float32)], num_examples=1)
    with caplog.at_level(logging.WARNING, logger="flwr_serverless"):
        result, _ = reader.update_parameters([np.zeros(1000, np.float32)], num_examples=1)
    assert np.array_equal(result[0], np.zeros(1000, np.float32))
    assert reader.stats.rejected == 1 and "nodes/w" in caplog.text and "nodes/w" in reader.stats.rejections


def test_async_node_keeps_local_training_through_an_outage() -> None:
    url = f"memory://rel-{uuid.uuid4().hex[:10]}"
    peer = AsyncFederatedNode(url, node_id="peer")
    peer.update_parameters([np.full(10, 10.0, np.float32)], num_examples=1)
    faulty = with_retries(FaultyStore(open_store(url)), FAST)
    node = AsyncFederatedNode(faulty, node_id="me")
    with faulty.outage():  # even the first join fails
        for epoch in range(3):
            own = [np.full(10, float(epoch), np.float32)]
            result, _ = node.update_parameters(own, num_examples=1)
            assert np.array_equal(result[0], own[0])  # local progress kept, not replaced by anything
    assert node.stats.store_failures >= 3
    result, _ = node.update_parameters([np.zeros(10, np.float32)], num_examples=1)
    assert np.allclose(result[0], 5.0)  # back: federated with the peer again
    assert "members/me" in faulty.list("members/")


def test_sync_node_waits_through_list_errors_until_its_timeout() -> None:
    url = f"memory://rel-{uuid.uuid4().hex[:10]}"
    faulty = with_retries(FaultyStore(open_store(url), operations={"list"}), FAST)
    node = SyncFederatedNode(faulty, num_nodes=2, timeout=1.5, node_id="a")
    other = SyncFederatedNode(url, num_nodes=2, timeout=10, node_id="b")
    faulty.down = True
    threading.Timer(0.6, lambda: setattr(faulty, "down", False)).start()
    waiting = in_background(lambda: other.update_parameters([np.ones(2)], num_examples=1))
    result, _ = node.update_parameters([np.zeros(2)], num_examples=1)
    assert np.allclose(result[0], 0.5) and np.allclose(waiting.result(timeout=10)[0][0], 0.5)
    assert node.stats.store_failures >= 1

    clock = FakeClock()
    fake_time = replace(FAST, clock=clock.now, sleep=clock.sleep)
    alone = SyncFederatedNode(
        with_retries(FaultyStore(open_store(url), operations={"list"}), fake_time),
        num_nodes=2,
        timeout=0.8,
        node_id="c",
    )
    alone.clock, alone.sleep = clock.now, clock.sleep
    alone.store.down = True
    with pytest.raises(SyncTimeoutError):
        alone.update_parameters([np.zeros(2)], num_examples=1)
    assert 0.8 * 0.75 <= clock.t <= 0.8  # retried and waited until the node's timeout, not past it


# -- multi-process soak ------------------------------------------------------------------------


def _run_soak(url: str, options: dict[str, Any], tmp_path: Path, nodes: int, epochs: int, params: int) -> None:
    procs = []
    for i in range(nodes):
        out = tmp_path / f"result-{i}.json"
        args = [sys.executable, WORKER, "train", url, json.dumps(options), f"n{i}", str(epochs), str(params), str(out)]
        procs.append((subprocess.Popen(args), out))
    for proc, _ in procs:
        assert proc.wait(timeout=600) == 0
    results = [json.loads(out.read_text()) for _, out in procs]
    for result in results:
        assert result["error"] is None, result["error"]
        assert result["epochs"] == epochs
        assert result["rejected"] == 0, result["rejections"]  # a torn read would be rejected: none seen
        assert result["store_failures"] == 0
    assert sum(r["peers_used"] for r in results) > 0
    store = open_store(url, **options)
    listing = store.list("nodes/")
    assert sorted(listing) == sorted(f"nodes/n{i}" for i in range(nodes))
    for key in listing:
        update = decode(store.get(key), key)
        assert update.header.epoch == epochs - 1 and sum(a.size for a in update.arrays) == params
    # nothing but the updates and the member records is left: no torn or orphaned write
    assert set(store.list("")) - set(listing) <= {f"members/n{i}" for i in range(nodes)}
    if "://" not in url:  # a local store writes through temp files: none may be left behind
        assert not list(Path(url).rglob(f"{TEMP_PREFIX}*"))
    else:  # an S3 write is one PUT or one multipart upload: none may be left open
        import boto3

        bucket = url.removeprefix("s3://").split("/", 1)[0]
        client = boto3.session.Session().client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1")
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_soak_small_local(tmp_path: Path) -> None:
    _run_soak(str(tmp_path / "store"), {}, tmp_path, nodes=3, epochs=5, params=20_000)


def test_soak_small_s3(tmp_path: Path, s3_server: str, store_url_factory: Any) -> None:
    url, options = store_url_factory(f"{s3_server}-boto3")
    _run_soak(url, options, tmp_path, nodes=3, epochs=5, params=20_000)


@pytest.mark.slow
def test_soak_8_processes_30_epochs_1m_parameters(tmp_path: Path) -> None:
    _run_soak(str(tmp_path / "store"), {}, tmp_path, nodes=8, epochs=30, params=1_000_000)


@pytest.mark.slow
def test_soak_8_processes_30_epochs_1m_parameters_s3(tmp_path: Path, s3_server: str, store_url_factory: Any) -> None:
    url, options = store_url_factory(f"{s3_server}-boto3")
    _run_soak(url, options, tmp_path, nodes=8, epochs=30, params=1_000_000)


# -- kill -9 mid-write --------------------------------------------------------------------------


def _kill_writer_repeatedly(url: str, options: dict[str, Any], kills: int, params: int) -> dict[str, int]:
    """SIGKILL a process rewriting one big object, ``kills`` times, while this process reads and decodes it."""
    store = open_store(url, **options)
    key = "nodes/writer"
    counts = {"reads": 0, "failures": 0, "kills": 0, "refused": 0}
    stop = threading.Event()
    failures: list[str] = []

    def read_forever() -> None:
        mapped = False
        while not stop.is_set():
            mapped = not mapped  # alternately a copy and, where the store can, a map of the file itself
            try:
                data = (store.open_mapped(key) if mapped else None) or store.get(key)
            except ObjectNotFoundError:
                time.sleep(0.01)
                continue
            except StoreError as exc:
                # moto keeps a PUT cut by the kill with the whole body's checksum; the client refuses it
                if "checksum" not in str(exc).lower():
                    raise
                counts["refused"] += 1
                continue
            try:
                decode(data, key)
                counts["reads"] += 1
            except InvalidObjectError as exc:
                counts["failures"] += 1
                failures.append(exc.reason)

    reader = in_background(read_forever)
    rng = random.Random(1)
    try:
        for _ in range(kills):
            proc = subprocess.Popen(
                [sys.executable, WORKER, "write", url, json.dumps(options), key, str(params)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            proc.stdout.readline()  # one object written: the next write is under way
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
            counts["kills"] += 1
    finally:
        stop.set()
        reader.result(timeout=30)  # a read that raised fails the test
    assert not failures, failures[:3]
    assert list(store.list("nodes/")) == [key]  # leftover temp files are never listed
    decode(store.get(key), key)
    return counts


def test_kill_9_mid_write_local_folder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    counts = _kill_writer_repeatedly(str(root), {}, kills=4, params=2_000_000)
    assert counts["kills"] == 4 and counts["reads"] > 0 and counts["failures"] == 0


def test_kill_9_mid_write_s3(s3_server: str, store_url_factory: Any) -> None:
    url, options = store_url_factory(f"{s3_server}-boto3")
    counts = _kill_writer_repeatedly(url, options, kills=3, params=2_000_000)
    assert counts["kills"] == 3 and counts["reads"] > 0 and counts["failures"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "moto-boto3", "seaweedfs-boto3"])
def test_kill_9_mid_write_ten_times(kind: str, tmp_path: Path, store_url_factory: Any) -> None:
    url, options = store_url_factory(kind)
    counts = _kill_writer_repeatedly(url, options, kills=10, params=4_000_000)
    assert counts["kills"] == 10 and counts["failures"] == 0


def test_stale_temp_files_of_killed_writers_are_removed_by_the_next_put(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    store.put("nodes/a", b"1")
    folder = tmp_path / "store" / "nodes"
    old, fresh = folder / f"{TEMP_PREFIX}dead", folder / f"{TEMP_PREFIX}alive"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert list(store.list()) == ["nodes/a"]
    open_store(str(tmp_path / "store")).put("nodes/b", b"2")  # a fresh handle sweeps at its first put
    assert not old.exists() and fresh.exists()


# -- S3 outage: stop the server, start it again on the same port ------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def restartable_moto(moto_endpoint: str) -> Any:
    """A second moto server (same process, so same buckets) that a test may stop and start."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    state: dict[str, Any] = {"server": ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)}
    state["server"].start()

    def stop() -> None:
        state["server"].stop()
        state["server"]._server.server_close()  # stop() leaves the socket listening: clients would hang

    def start() -> None:
        for _ in range(50):  # make sure the port is free: a failed bind in moto's thread would hang start()
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                    break
                except OSError:
                    time.sleep(0.1)
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()

    state.update(endpoint=f"http://127.0.0.1:{port}", stop=stop, start=start)
    yield state
    stop()


@pytest.fixture(params=["moto", "seaweedfs"])
def restartable_s3(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """An S3 server a test may stop and start on the same port and data: a second moto, or a SeaweedFS of its own.

    Keys: endpoint, bucket, options (endpoint and credentials for open_store), stop(), start().
    """
    if request.param == "moto":
        state = request.getfixturevalue("restartable_moto")
        return {**state, "bucket": request.getfixturevalue("s3_bucket"), "options": {"endpoint_url": state["endpoint"]}}
    port, stack = free_port(), contextlib.ExitStack()

    def start() -> None:
        stack.enter_context(seaweedfs(data_dir=tmp_path / "weed", port=port))

    start()
    request.addfinalizer(stack.close)
    server = S3Server(endpoint=f"http://127.0.0.1:{port}")
    create_bucket(server, "outage")
    options = {"endpoint_url": server.endpoint, "key": server.access_key, "secret": server.secret_key}
    return {"endpoint": server.endpoint, "bucket": "outage", "options": options, "stop": stack.close, "start": start}


def test_s3_outage_async_nodes_finish_every_epoch(restartable_s3: dict[str, Any]) -> None:
    options = {**restartable_s3["options"], "retry": FAST, "max_attempts": 1}
    url = f"s3://{restartable_s3['bucket']}/outage"
    epochs = 16
    nodes = [AsyncFederatedNode(url, node_id=f"a{i}", storage_options=options) for i in range(2)]
    kept: list[bool] = []
    done: dict[str, int] = {}
    restarted = threading.Event()

    def train(node: AsyncFederatedNode, value: float) -> None:
        for epoch in range(epochs):
            if epoch == epochs - 3:  # the last epochs run after the restart, however fast the failed ones were
                restarted.wait(30)
            own = [np.full(100, value + epoch, np.float32)]
            failures = node.stats.store_failures
            result, _ = node.update_parameters(own, num_examples=1, epoch=epoch)
            if node.stats.store_failures > failures:
                kept.append(bool(np.array_equal(result[0], own[0])))
            done[node.node_id] = epoch + 1
            time.sleep(0.15)

    training = [in_background(functools.partial(train, n, 10.0 * i)) for i, n in enumerate(nodes)]
    time.sleep(0.7)
    restartable_s3["stop"]()
    time.sleep(3.5)  # longer than FAST's 2 s retry bound: some epochs must fail over to local weights
    restartable_s3["start"]()
    restarted.set()
    for job in training:
        job.result()
    assert done == {"a0": epochs, "a1": epochs}
    assert kept and all(kept)  # every epoch hit by the outage kept its own training
    assert sum(n.stats.store_failures for n in nodes) > 0  # (the other may have retried through it)
    store = open_store(url, **restartable_s3["options"])
    for key in store.list("nodes/"):
        assert decode(store.get(key), key).header.epoch == epochs - 1  # the bucket survived the restart


def test_s3_outage_sync_nodes_complete_or_time_out(restartable_s3: dict[str, Any]) -> None:
    options = {**restartable_s3["options"], "retry": FAST, "max_attempts": 1}
    url = f"s3://{restartable_s3['bucket']}/sync-outage"
    nodes = [
        SyncFederatedNode(url, num_nodes=2, timeout=15, node_id=f"s{i}", storage_options=options) for i in range(2)
    ]
    results: dict[str, Any] = {}

    def train(node: SyncFederatedNode, delay: float) -> None:
        time.sleep(delay)
        for epoch in range(3):
            results[node.node_id] = node.update_parameters([np.full(4, float(epoch))], num_examples=1)

    first = in_background(lambda: train(nodes[0], 0.0))
    time.sleep(0.3)
    restartable_s3["stop"]()  # s0 waits at the barrier of round 0 through the outage
    second = in_background(lambda: train(nodes[1], 0.0))
    time.sleep(2.0)
    restartable_s3["start"]()
    first.result(timeout=60)
    second.result(timeout=60)
    assert nodes[0].round == nodes[1].round == 3
    assert np.array_equal(results["s0"][0][0], results["s1"][0][0])

    clock = FakeClock()
    fake_time = {**options, "retry": replace(FAST, clock=clock.now, sleep=clock.sleep)}
    lonely = SyncFederatedNode(url, num_nodes=3, timeout=1.5, node_id="s2", storage_options=fake_time)
    lonely.clock, lonely.sleep = clock.now, clock.sleep
    lonely.round = 3
    restartable_s3["stop"]()
    try:
        with pytest.raises((SyncTimeoutError, StoreError)):
            lonely.update_parameters([np.zeros(4)], num_examples=1)
    finally:
        restartable_s3["start"]()
    assert 0 < clock.t <= 1.5 + FAST.max_time  # retried, then gave up within timeout + the first join's retry bound
