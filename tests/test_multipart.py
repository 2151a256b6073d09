"""Large objects on real S3 servers (moto and SeaweedFS), through boto3 and s3fs: parts up, ranges down.

Objects are a few parts of S3's smallest part size (5 MiB); the limits that need 5 GB objects
(one PUT carries at most 5 GiB, an upload has at most 10,000 parts) are shrunk instead.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from s3_servers import S3Server, boto3_client, create_bucket, seaweedfs

from flwr_serverless import AsyncFederatedNode
from flwr_serverless.cli.admin import clean_experiment
from flwr_serverless.errors import ObjectNotFoundError, PreconditionFailedError, StoreConfigurationError, StoreError
from flwr_serverless.node.spool import PeerSpool
from flwr_serverless.stores import open_store, s3_multipart
from flwr_serverless.stores.faults import failing_requests
from flwr_serverless.stores.s3_common import S3ObjectStore
from flwr_serverless.stores.s3_multipart import MIB, BufferChain, TransferOptions, part_ranges
from flwr_serverless.wire.codec import decode

PART = 5 * MIB  # S3's smallest part (both servers refuse smaller ones with EntityTooSmall)
SERVERS = ["moto", "seaweedfs"]
BACKENDS = ["boto3", "fsspec"]


@pytest.fixture(scope="module")
def seaweed() -> Iterator[S3Server]:
    """One SeaweedFS for this module (the lead may swap it for a session fixture in conftest)."""
    with seaweedfs() as server:
        yield server


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> S3Server:
    if request.param == "moto":
        return S3Server(endpoint=request.getfixturevalue("moto_endpoint"), name="moto")
    return request.getfixturevalue("seaweed")


@pytest.fixture
def bucket(server: S3Server) -> str:
    name = f"flwr-mp-{uuid.uuid4().hex[:12]}"
    create_bucket(server, name)
    return name


Opener = Callable[..., S3ObjectStore]


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Opener:
    """``open(prefix="exp", **options)``: a store on the server's bucket through the backend under test."""
    monkeypatch.setattr(s3_multipart, "IN_FLIGHT_SHARE", 1)  # a few-part test object still goes up in parallel

    def open_(prefix: str = "exp", **options: Any) -> S3ObjectStore:
        options = {"multipart_threshold": 2 * PART, "multipart_chunksize": PART, "max_concurrency": 3, **options}
        store = open_store(
            f"s3://{bucket}/{prefix}",
            backend=request.param,
            endpoint_url=server.endpoint,
            key=server.access_key,
            secret=server.secret_key,
            **options,
        )
        assert isinstance(store, S3ObjectStore)
        return store

    return open_


def _counting(store: S3ObjectStore, in_flight: list[int] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Record every S3 request the store makes (name, parameters without the body); ``in_flight`` gets
    ``[now, most]`` of ``upload_part`` requests running at once."""
    seen: list[tuple[str, dict[str, Any]]] = []
    original = store._call
    lock = threading.Lock()

    def call(name: str, **params: Any) -> Any:
        seen.append((name, {k: v for k, v in params.items() if k != "Body"}))
        if name != "upload_part" or in_flight is None:
            return original(name, **params)
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        try:
            time.sleep(0.05)  # let the other parts start before this one can end
            return original(name, **params)
        finally:
            with lock:
                in_flight[0] -= 1

    store._call = call  # type: ignore[method-assign]
    return seen


def _etag(server: S3Server, bucket: str, key: str) -> str:
    return str(boto3_client(server).head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


def _model(seed: int, floats: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(floats, dtype=np.float32), rng.standard_normal((7, 3), dtype=np.float32)]


def test_a_model_over_the_threshold_goes_up_in_parts_and_comes_back_intact_to_a_peer(
    opener: Opener, server: S3Server, bucket: str
) -> None:
    writer, reader = opener(), opener()
    in_flight = [0, 0]
    sent = _counting(writer, in_flight)
    ranges: list[tuple[int, int]] = []
    read_range = reader._read_range

    def counted(key: str, begin: int, end: int, *rest: Any) -> Any:
        ranges.append((begin, end))
        return read_range(key, begin, end, *rest)

    reader._read_range = counted  # type: ignore[method-assign]
    models = [_model(0, 3_000_000), _model(1, 3_000_000)]  # 12 MB each: three parts
    node_a = AsyncFederatedNode(writer, node_id="a")
    node_b = AsyncFederatedNode(reader, node_id="b")
    node_a.update_parameters(models[0], 10, 0)

    big = [info for info in writer.list("").values() if info.size > 2 * PART]
    assert len(big) == 1, big
    assert _etag(server, bucket, f"exp/{big[0].key}").endswith("-3")  # S3's mark of a 3-part upload
    assert [name for name, _ in sent].count("upload_part") == 3
    assert in_flight[1] == 2  # in parallel, as many as max_concurrency and the in-flight share allow
    assert "put_object" not in [name for name, params in sent if params.get("Key", "").endswith(big[0].key)]

    fetched = PeerSpool().fetch(reader, big[0].key)
    assert sorted(ranges) == [(0, PART), (PART, 2 * PART), (2 * PART, big[0].size)]  # one GET per part
    decoded = decode(fetched, big[0].key)
    assert all(np.array_equal(got, want) for got, want in zip(decoded.arrays, models[0]))

    merged, _ = node_b.update_parameters(models[1], 10, 0)  # the node path: the peer's object through the spool
    assert node_b.stats.peers_used == 1
    for got, a, b in zip(merged, *models):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6)
    writer.close()
    reader.close()


def test_objects_below_the_threshold_stay_one_put_and_empty_objects_read_back(opener: Opener) -> None:
    store = opener()
    seen = _counting(store)
    store.put("small", b"x" * 1000)
    store.put("empty", b"")
    assert [name for name, _ in seen] == ["put_object", "put_object"]
    assert bytes(PeerSpool().fetch(store, "small")) == b"x" * 1000
    assert PeerSpool().fetch(store, "empty") == b""
    store.close()


def test_a_failed_upload_is_aborted_and_a_retried_one_completes(opener: Opener) -> None:
    data = np.random.default_rng(2).bytes(3 * PART - 100)
    store = opener(retry=False)
    with failing_requests(store, "upload_part", calls={2}) as seen, pytest.raises(StoreError) as raised:
        store.put("model", data)
    assert seen[0] >= 2  # the fault came mid-upload
    assert "model" in str(raised.value)
    assert store.list_uploads() == []  # aborted: no parts left behind
    with pytest.raises(ObjectNotFoundError):
        store.get("model")

    retrying = opener(retry={"attempts": 3, "base_delay": 0.0})
    with failing_requests(retrying, "upload_part", calls={2}):
        retrying.put("model", data)  # the whole upload again, as a new one
    assert retrying.list_uploads() == []
    assert retrying.get("model") == data
    store.close()
    retrying.close()


def test_a_lost_completion_aborts_the_upload(opener: Opener) -> None:
    store = opener(retry=False)
    data = b"y" * (2 * PART + 1)
    with failing_requests(store, "complete_multipart_upload", calls={1}), pytest.raises(StoreError):
        store.put("model", data)
    assert store.list_uploads() == []
    store.close()


def test_clean_aborts_stale_uploads_under_the_prefix_only(opener: Opener, server: S3Server, bucket: str) -> None:
    store = opener()
    client = boto3_client(server)
    mine = client.create_multipart_upload(Bucket=bucket, Key="exp/nodes/gone")["UploadId"]
    other = client.create_multipart_upload(Bucket=bucket, Key="other/nodes/x")["UploadId"]
    assert [u.upload_id for u in store.list_uploads()] == [mine]

    if server.name != "moto":  # moto dates every upload 2010-11-10
        assert clean_experiment(store) == []  # just started: could be a live writer's
    later = time.time() + 2 * 3600
    line = f"nodes/gone (unfinished upload {mine})"
    assert clean_experiment(store, now=later, dry_run=True) == [line]
    assert len(store.list_uploads()) == 1
    assert clean_experiment(store, now=later) == [line]
    assert store.list_uploads() == []
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other]
    fresh = client.create_multipart_upload(Bucket=bucket, Key="exp/x")["UploadId"]
    assert clean_experiment(store, everything=True) == [f"x (unfinished upload {fresh})"]
    store.close()


def test_past_the_single_put_limit_the_object_goes_in_parts_and_parts_grow_to_fit_the_count(
    opener: Opener, server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a 6 GB model meets (one PUT <= 5 GiB, <= 10,000 parts), with both limits shrunk."""
    monkeypatch.setattr(s3_multipart, "MAX_SINGLE_PUT_BYTES", 2 * PART)
    monkeypatch.setattr(s3_multipart, "MAX_PARTS", 2)
    store = opener(multipart_threshold=1 << 40)  # a threshold it never reaches
    seen = _counting(store)
    data = np.random.default_rng(3).bytes(3 * PART)
    store.put("model", [data[:10], memoryview(data)[10:]])
    assert [name for name, _ in seen].count("upload_part") == 2  # 3 parts of 5 MiB would be too many
    assert _etag(server, bucket, "exp/model").endswith("-2")
    assert PeerSpool(mode="memory").fetch(store, "model") == data

    tag = store.put_if_absent("shared", data)  # a conditional write over the limit: parts plus the condition
    assert _etag(server, bucket, "exp/shared").endswith("-2")
    with pytest.raises(PreconditionFailedError):
        store.put_if_absent("shared", data)
    tag = store.put_if_match("shared", data[::-1], tag)
    assert store.get("shared") == data[::-1]
    if server.name == "seaweedfs":  # moto ignores If-Match on CompleteMultipartUpload (see S3ObjectStore)
        with pytest.raises(PreconditionFailedError):
            store.put_if_match("shared", data, "0123456789abcdef0123456789abcdef-2")
        assert store.get("shared") == data[::-1]
    assert store.list_uploads() == []  # the refused completions were aborted
    store.close()


def test_an_object_replaced_between_ranges_is_read_again(opener: Opener) -> None:
    store = opener()
    old, new = b"a" * (3 * PART), b"b" * (3 * PART)
    store.put("model", old)
    original = store._read_range
    replaced = []

    def read_range(key: str, begin: int, *rest: Any) -> Any:
        if begin > 0 and not replaced:
            replaced.append(store.put("model", new))
        return original(key, begin, *rest)

    store._read_range = read_range  # type: ignore[method-assign]
    assert bytes(PeerSpool().fetch(store, "model")) == new  # never a mix of both
    assert replaced
    store.close()


def test_publishing_copies_parts_not_the_object(seaweed: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``max_concurrency`` parts exist at once: the encoded buffers are never joined."""
    bucket = f"flwr-mp-{uuid.uuid4().hex[:12]}"
    create_bucket(seaweed, bucket)
    for backend in BACKENDS:
        store = open_store(
            f"s3://{bucket}/{backend}",
            backend=backend,
            endpoint_url=seaweed.endpoint,
            key=seaweed.access_key,
            secret=seaweed.secret_key,
            multipart_threshold=PART,
            multipart_chunksize=PART,
            max_concurrency=2,
        )
        model = np.random.default_rng(4).standard_normal(10 * PART // 4, dtype=np.float32)  # 50 MiB
        tracemalloc.start()
        try:
            store.put("model", [b"head", memoryview(model).cast("B")])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Two parts in flight, each copied once more by the client (aiobotocore), never the joined 50 MiB.
        assert peak < 6 * PART, (backend, peak / MIB)
        store.close()


def test_transfer_options_are_validated_by_name(moto_endpoint: str, s3_bucket: str) -> None:
    for backend in BACKENDS:
        for name, value in [
            ("multipart_chunksize", 1024),
            ("multipart_chunksize", 6 << 30),
            ("multipart_threshold", 0),
            ("multipart_threshold", "64MB"),
            ("max_concurrency", 0),
            ("max_concurrency", True),
        ]:
            with pytest.raises(StoreConfigurationError, match=name):
                open_store(f"s3://{s3_bucket}/exp", backend=backend, endpoint_url=moto_endpoint, **{name: value})
        store = open_store(f"s3://{s3_bucket}/exp", backend=backend, endpoint_url=moto_endpoint, max_concurrency=4)
        assert isinstance(store, S3ObjectStore)
        assert store.transfer == TransferOptions(max_concurrency=4)
        store.close()


def test_part_planning() -> None:
    options = TransferOptions(multipart_threshold=100 * MIB, multipart_chunksize=8 * MIB)
    assert not options.use_multipart(100 * MIB - 1) and options.use_multipart(100 * MIB)
    assert options.use_multipart(5 * (1 << 30) + 1) == TransferOptions(multipart_threshold=1 << 50).use_multipart(
        5 * (1 << 30) + 1
    )
    six_gb = 6 * 10**9
    assert options.part_size(six_gb) == 8 * MIB  # 716 parts
    huge = 4 * (1 << 40)  # 4 TiB: 8 MiB parts would be 524,288 of them
    assert options.part_size(huge) * 10_000 >= huge and options.part_size(huge) < huge // 9_999
    with pytest.raises(ValueError, match="largest object"):
        options.part_size(10_000 * (5 << 30) + 1)
    assert options.upload_concurrency(1 << 30, 8 * MIB) == TransferOptions().max_concurrency  # 1 GiB: all 8
    assert options.upload_concurrency(96 * MIB, 8 * MIB) == 3  # never more than a quarter of the object
    assert options.upload_concurrency(10 * MIB, 8 * MIB) == 1
    assert part_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert part_ranges(10, 4, start=4) == [(4, 8), (8, 10)]
    chain = BufferChain([b"ab", b"", memoryview(b"cdef"), bytearray(b"g")])
    assert chain.size == 7
    assert [bytes(chain.read(b, e)) for b, e in part_ranges(7, 3)] == [b"abc", b"def", b"g"]
