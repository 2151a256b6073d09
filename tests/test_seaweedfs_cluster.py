"""The aggregate mode on a SeaweedFS cluster on one host (master, 2 volume servers, filer, 2 S3 gateways).

Nodes are split over the two gateways (and the two S3 clients), so every compare-and-swap
race crosses gateways: only the filer can decide it. After the nodes settle, the aggregate
must be exactly the FedAvg of every node's last contribution, as in test_aggregate_node.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flwr_serverless import AggregateFederatedNode, open_store
from flwr_serverless.errors import PreconditionFailedError
from flwr_serverless.stores.faults import FaultyStore
from tests.s3_servers import S3Cluster, create_bucket, seaweedfs_cluster
from tests.test_aggregate_node import _aggregate_of, _close, _fedavg, _model, _named_contributions

pytestmark = pytest.mark.slow

BUCKET = "flwr-cluster"


@pytest.fixture(scope="module")
def cluster() -> Iterator[S3Cluster]:
    with seaweedfs_cluster(gateways=2, volumes=2) as running:
        create_bucket(running.gateways[0], BUCKET)
        yield running


def _store(cluster: S3Cluster, index: int, prefix: str) -> Any:
    """Node ``index``'s store: gateway ``index % 2``; boto3 on gateway 0, s3fs on gateway 1."""
    gateway = cluster.gateways[index % 2]
    return open_store(
        f"s3://{BUCKET}/{prefix}",
        endpoint_url=gateway.endpoint,
        key=gateway.access_key,
        secret=gateway.secret_key,
        backend="boto3" if index % 2 == 0 else "fsspec",
    )


def test_aggregate_mode_holds_the_exact_fedavg_across_two_gateways(cluster: S3Cluster) -> None:
    prefix = f"exp-{uuid.uuid4().hex[:12]}"
    nodes = [
        AggregateFederatedNode(
            FaultyStore(_store(cluster, i, prefix), latency=0.005),  # all read before the first write lands
            node_id=f"g{i % 2}n{i}",
            max_attempts=100,
            max_models_down=None,
            max_requests=None,
            seed=i,
        )
        for i in range(8)
    ]
    start = threading.Barrier(len(nodes))
    errors: list[BaseException] = []
    last: dict[str, tuple[list[np.ndarray], int]] = {}

    def work(index: int, node: AggregateFederatedNode) -> None:
        try:
            for epoch in range(6):
                start.wait(60)  # everyone writes at once, half through each gateway
                last[node.node_id] = (_model(100 * index + epoch), 10 + index)
                node.update_parameters(*last[node.node_id], epoch=epoch)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "nodes still running after 300 s"
    assert not errors, errors
    assert sum(n.stats.cas_giveups for n in nodes) == 0 and sum(n.stats.cas_conflicts for n in nodes) >= 7
    want = _fedavg([last[n.node_id] for n in nodes])
    for gateway in (0, 1):  # both gateways serve the same settled aggregate
        store = _store(cluster, gateway, prefix)
        mean, table = _aggregate_of(store, _model(0))
        assert sorted(table) == sorted(n.node_id for n in nodes)
        _close(mean, want, rtol=1e-5)
        _close(mean, _fedavg(_named_contributions(store, table)), rtol=1e-5)


def test_compare_and_swap_counter_loses_no_update_across_gateways(cluster: S3Cluster) -> None:
    prefix = f"counter-{uuid.uuid4().hex[:12]}"
    handles = [_store(cluster, i, prefix) for i in range(12)]
    handles[0].put_if_absent("counter", b"0")
    increments, errors = 10, []

    def work(handle: Any) -> None:
        try:
            for _ in range(increments):
                for _attempt in range(1000):  # bounded: a livelock fails the test instead of hanging it
                    data, tag = handle.get_with_tag("counter")
                    try:
                        handle.put_if_match("counter", str(int(data) + 1).encode(), tag)
                        break
                    except PreconditionFailedError:
                        continue
                else:
                    raise AssertionError("1000 lost races in a row")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(h,)) for h in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert int(handles[1].get("counter")) == len(handles) * increments  # read through the other gateway
