"""A node cut off from the store for twice its lease, then back (issue 17, item 4).

Its peers drop it when its lease expires (on the store's clock) and go on; when it is back it rejoins
the round they are at (sync) or federates again (async): no crash, no timeout waited out (a sync
round that waited out its timeout raises ``SyncTimeoutError``, as no ``min_nodes`` is set), and no
node averages into round r an object that is not round r's. The cut is real: node "c" reaches the
S3 server (moto, and SeaweedFS) through ``benchmarks/shaping_proxy.py``, which resets its
connections and refuses new ones until restored. A fast variant cuts a memory store instead.

The nodes "train" by sleeping a little per epoch, so that the others are still training when the
cut node comes back; nothing here asserts a duration.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.stores import open_store
from flwr_serverless.stores.faults import FaultyStore
from tests.s3_servers import S3Server, create_bucket, seaweedfs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from shaping_proxy import ShapingProxy

LEASE = 4.0  # S3 stamps LastModified in whole seconds: a lease of a few of them (and room for a loaded machine)
EPOCH_SECONDS = 0.3
CUT_SECONDS = 2 * LEASE
TIMEOUT = 60.0  # a round that waited this out would raise: the test would fail, not pass late


def _w(value: float) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.full(2, value, np.float32)]


@pytest.fixture(scope="module")
def seaweed() -> Iterator[S3Server]:
    with seaweedfs() as server:
        yield server


@pytest.fixture(params=["moto", "seaweedfs"])
def server(request: pytest.FixtureRequest) -> tuple[str, str, dict[str, str]]:
    """(endpoint, bucket, credentials) of a real S3 server on 127.0.0.1."""
    bucket = f"part-{uuid.uuid4().hex[:12]}"
    if request.param == "moto":
        endpoint = request.getfixturevalue("moto_endpoint")
        import boto3

        boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        return endpoint, bucket, {}
    weed: S3Server = request.getfixturevalue("seaweed")
    create_bucket(weed, bucket)
    return weed.endpoint, bucket, {"aws_access_key_id": weed.access_key, "aws_secret_access_key": weed.secret_key}


def _upstream(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit("://", 1)[-1].rsplit(":", 1)
    return host, int(port)


class _Run:
    """Nodes training in threads; each remembers, per round it aggregated, what it got."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def start(
        self,
        node: Any,
        epochs: int,
        value: Callable[[], float],
        got: dict[int, np.ndarray],
        until: threading.Event | None = None,
    ) -> threading.Event:
        """Train ``epochs`` epochs (and, with ``until``, on until it is set, then one more); set the event returned
        when done."""
        done = threading.Event()

        def train() -> None:
            try:
                epoch = 0
                while epoch < epochs or (until is not None and not until.is_set() and epoch < 50 * epochs):
                    time.sleep(EPOCH_SECONDS)  # local training
                    weights, _ = node.update_parameters(_w(value()), num_examples=10, epoch=epoch)
                    got[getattr(node, "round", epoch + 1) - 1] = weights[0]
                    epoch += 1
                if until is not None:
                    weights, _ = node.update_parameters(_w(value()), num_examples=10, epoch=epoch)
                    got[epoch] = weights[0]
                node.leave()
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        self.threads.append(thread)
        return done

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=180)
        assert not any(t.is_alive() for t in self.threads), "a node hung"
        assert not self.errors, self.errors


def _wait_until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    give_up = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < give_up, f"never happened: {what}"
        time.sleep(0.05)


def _cut_for(outage: Any, seconds: float) -> None:
    """Hold ``outage`` (a context manager) for ``seconds``: the partition itself."""
    with outage:
        time.sleep(seconds)


class _Cut:
    def __init__(self, proxy: ShapingProxy) -> None:
        self.proxy = proxy

    def __enter__(self) -> None:
        self.proxy.cut("refuse")

    def __exit__(self, *exc: object) -> None:
        self.proxy.restore()


def _sync_partition(stores: dict[str, Any], outage: Any) -> dict[str, Any]:
    epochs = 16
    nodes = {
        name: SyncFederatedNode(store, num_nodes=3, timeout=TIMEOUT, member_lease=LEASE, node_id=name)
        for name, store in stores.items()
    }
    got: dict[str, dict[int, np.ndarray]] = {name: {} for name in nodes}
    values = {"a": 1.0, "b": 2.0, "c": 6.0}
    run = _Run()
    c_done = run.start(nodes["c"], epochs, lambda: values["c"], got["c"])
    for name in "ab":  # a and b train on while c is away (however slow this machine), so c has peers to rejoin
        run.start(nodes[name], epochs, lambda name=name: values[name], got[name], until=c_done)
    _wait_until(lambda: nodes["c"].round >= 2, "c reached round 2")
    _cut_for(outage, CUT_SECONDS)
    run.join()
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    assert a.stats.dropped_members >= 1 and b.stats.dropped_members >= 1  # c's lease expired: dropped, went on
    for node in nodes.values():
        assert node.stats.partial_rounds == 0 and node.stats.rejected == 0
    assert c.round > epochs  # c entered the peers' round when back (it skipped the rounds it missed)
    # Each result is the mean over a set of members that includes the node itself, each member's round-r object
    # once (a node dropped in a round may still count the others' objects of that round: they are round r's).
    means = {float(np.mean([values[n] for n in group])) for group in ("a", "b", "c", "ab", "ac", "bc", "abc")}
    for name, rounds in got.items():
        for number, weights in rounds.items():
            assert any(np.allclose(weights, m) for m in means), (name, number, weights)
    back = min(n for n in got["c"] if n >= 2)  # the round c rejoined (its call at round 2 was cut)
    missed = [n for n in got["a"] if 2 <= n < back]
    assert missed and all(np.allclose(got[x][n], 1.5) for n in missed for x in "ab"), got  # a and b went on
    together = [n for n in got["c"] if n > 2 and all(np.allclose(got[x].get(n, 0.0), 3.0) for x in "abc")]
    assert len(together) >= 2  # after the cut, rounds in which every node averaged all three again
    return nodes


def _async_partition(stores: dict[str, Any], outage: Any) -> None:
    epochs = 16
    nodes = {name: AsyncFederatedNode(store, member_lease=LEASE, node_id=name) for name, store in stores.items()}
    got: dict[str, dict[int, np.ndarray]] = {name: {} for name in nodes}
    phase = {"c": 3.0}
    run = _Run()
    c_done = run.start(nodes["c"], epochs, lambda: phase["c"], got["c"])
    run.start(nodes["a"], epochs, lambda: 1.0, got["a"], until=c_done)  # a and b train on while c is away
    run.start(nodes["b"], epochs, lambda: 2.0, got["b"], until=c_done)
    _wait_until(lambda: nodes["c"].stats.federations >= 2, "c federated twice")
    _cut_for(outage, CUT_SECONDS)
    phase["c"] = 9.0  # what c publishes once it is back
    run.join()
    assert any(np.allclose(w, 4.0) for w in got["a"].values())  # a averaged c's post-cut weights: (1+2+9)/3
    assert np.allclose(got["c"][max(got["c"])], 4.0)  # and c federated again with both peers


@pytest.mark.slow
def test_a_sync_node_cut_off_from_s3_for_twice_its_lease_rejoins_the_current_round(
    server: tuple[str, str, dict[str, str]],
) -> None:
    endpoint, bucket, credentials = server
    url = f"s3://{bucket}/exp"
    with ShapingProxy(upstream=_upstream(endpoint)) as proxy:

        def store(via: str) -> Any:
            return open_store(url, endpoint_url=via, backend="boto3", **credentials)

        _sync_partition({"a": store(endpoint), "b": store(endpoint), "c": store(proxy.endpoint)}, _Cut(proxy))
        assert proxy.stats()["refused"] > 0  # the cut was real: c's calls were refused while it lasted


@pytest.mark.slow
def test_an_async_node_cut_off_from_s3_for_twice_its_lease_federates_again(
    server: tuple[str, str, dict[str, str]],
) -> None:
    endpoint, bucket, credentials = server
    url = f"s3://{bucket}/exp"
    with ShapingProxy(upstream=_upstream(endpoint)) as proxy:

        def store(via: str) -> Any:
            return open_store(url, endpoint_url=via, backend="boto3", **credentials)

        _async_partition({"a": store(endpoint), "b": store(endpoint), "c": store(proxy.endpoint)}, _Cut(proxy))
        assert proxy.stats()["refused"] > 0


def test_a_sync_node_cut_off_for_twice_its_lease_rejoins_the_current_round_fast() -> None:
    """The same story on a memory store whose handle for c fails every call while cut (no server, no proxy)."""
    url = f"memory://partition-{uuid.uuid4().hex[:8]}"
    cut = FaultyStore(open_store(url))  # "reset": a connection reset, as the proxy gives
    nodes = _sync_partition({"a": open_store(url), "b": open_store(url), "c": cut}, cut.outage())
    assert cut.injected > 0 and nodes["c"].stats.store_failures > 0  # the cut was real
