"""Store behaviour on every backend: memory://, local folders, S3 via s3fs and via boto3 (moto server)."""

from __future__ import annotations

import errno
import functools
import os
import threading
import warnings
from typing import Any

import pytest

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreConfigurationError,
    StoreError,
)
from flwr_serverless.stores import (
    FsspecStore,
    InMemoryFolder,
    LocalFolder,
    LocalStore,
    MemoryStore,
    ObjectInfo,
    S3Folder,
    S3FsStore,
    S3Store,
    Store,
    open_store,
)
from tests.threads import in_background, run_in_threads

MB = 1024 * 1024


# -- basic operations -------------------------------------------------------------------


def test_round_trip_including_empty_and_large_objects(store: Store) -> None:
    payloads = {
        "empty": b"",
        "small": b"hello",
        "nested/deeper/obj.bin": bytes(range(256)) * 3,
        "big": os.urandom(20 * MB),
    }
    for key, data in payloads.items():
        tag = store.put(key, data)
        assert isinstance(tag, str) and tag
    for key, data in payloads.items():
        assert store.get(key) == data
    listing = store.list()
    assert set(listing) == set(payloads)
    assert {key: info.size for key, info in listing.items()} == {key: len(data) for key, data in payloads.items()}


def test_list_reports_size_and_a_tag_that_changes_on_overwrite(store: Store) -> None:
    first_tag = store.put("weights/a", b"version one")
    info = store.list()["weights/a"]
    assert info == ObjectInfo(key="weights/a", tag=first_tag, size=len(b"version one"))
    second_tag = store.put("weights/a", b"version two, longer")
    info = store.list()["weights/a"]
    assert info.tag == second_tag != first_tag
    assert info.size == len(b"version two, longer")
    # Same size, different content: the tag must still change.
    third_tag = store.put("weights/a", b"version TWO, longer")
    assert store.list()["weights/a"].tag == third_tag not in (first_tag, second_tag)


def test_list_with_prefix(store: Store) -> None:
    for key in ("round-1/a", "round-1/b", "round-10/a", "round-2/a", "meta", "nodes/x/state"):
        store.put(key, key.encode())
    assert set(store.list("round-1/")) == {"round-1/a", "round-1/b"}
    assert set(store.list("round-1")) == {"round-1/a", "round-1/b", "round-10/a"}
    assert set(store.list("nodes/")) == {"nodes/x/state"}
    assert set(store.list("me")) == {"meta"}
    assert store.list("nothing-here/") == {}
    assert len(store.list()) == 6


def test_empty_store_lists_nothing(store: Store) -> None:
    assert store.list() == {}


def test_delete_removes_and_tolerates_missing_keys(store: Store) -> None:
    store.put("a/one", b"1")
    store.put("a/two", b"2")
    store.delete("a/one")
    assert set(store.list()) == {"a/two"}
    with pytest.raises(ObjectNotFoundError):
        store.get("a/one")
    store.delete("a/one")  # already gone: fine
    store.delete("never/existed")


def test_get_missing_key_names_the_key(store: Store) -> None:
    with pytest.raises(ObjectNotFoundError) as info:
        store.get("models/missing-node.bin")
    assert info.value.key == "models/missing-node.bin"
    assert "models/missing-node.bin" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_unsafe_keys_are_rejected(store: Store) -> None:
    for key in ["../escape", "a/../../b", "/absolute", "a//b", "trailing/", "./here", "", "bad\nkey"]:
        with pytest.raises(StoreError):
            store.put(key, b"x")
        with pytest.raises(StoreError):
            store.get(key)
    with pytest.raises(StoreError):
        store.list("../")
    assert store.list() == {}


def test_stats_count_requests_and_bytes(store: Store) -> None:
    store.put("a", b"12345")
    store.put("b", b"123")
    store.get("a")
    store.list()
    store.delete("b")
    stats = store.stats.as_dict()
    assert stats == {
        "puts": 2,
        "gets": 1,
        "lists": 1,
        "deletes": 1,
        "copies": 0,
        "requests": 5,
        "bytes_up": 8,
        "bytes_down": 5,
    }


def test_copy_inside_the_store_is_an_independent_object(store: Store) -> None:
    store.put("nodes/a", b"first")
    up = store.stats.bytes_up
    tag = store.copy("nodes/a", "deltas/a/00000001")
    assert store.get("deltas/a/00000001") == b"first"
    assert store.list("deltas/")["deltas/a/00000001"].tag == tag
    assert store.stats.copies == 1 and store.stats.bytes_up == up  # no bytes through this process
    store.put("nodes/a", b"second, longer")  # a later put of the source leaves the copy alone
    assert store.get("deltas/a/00000001") == b"first"
    store.copy("nodes/a", "deltas/a/00000001")  # and a copy replaces its destination whole
    assert store.get("deltas/a/00000001") == b"second, longer"
    with pytest.raises(ObjectNotFoundError) as info:
        store.copy("nodes/missing", "deltas/x/00000001")
    assert info.value.key == "nodes/missing" and "deltas/x/00000001" not in store.list("deltas/")


def test_a_backend_without_copy_gets_and_puts() -> None:
    store = FsspecStore("dir://exp", path="/flwr-copy-fallback", target_protocol="memory")
    store.put("a", b"12345")
    store.copy("a", "b")
    assert store.get("b") == b"12345" and store.stats.copies == 0 and store.stats.bytes_up == 10


def test_one_handle_is_safe_to_share_between_threads(store: Store) -> None:
    def work(index: int) -> None:
        for round_number in range(5):
            key = f"t{index}/r{round_number}"
            payload = f"{index}-{round_number}".encode() * 1000
            store.put(key, payload)
            assert store.get(key) == payload
            assert key in store.list(f"t{index}/")

    run_in_threads(*(functools.partial(work, i) for i in range(8)), timeout=60)
    assert len(store.list()) == 40
    assert store.stats.puts == 40 and store.stats.gets == 40


# -- conditional writes -------------------------------------------------------------------


def test_conditional_writes_are_supported_on_known_backends(store: Store) -> None:
    assert store.supports_conditional_writes


def test_put_if_absent_creates_once(store: Store) -> None:
    tag = store.put_if_absent("lease", b"node-a")
    with pytest.raises(PreconditionFailedError) as info:
        store.put_if_absent("lease", b"node-b")
    assert info.value.key == "lease"
    assert store.get("lease") == b"node-a"
    assert store.list()["lease"].tag == tag


def test_put_if_match_is_compare_and_swap(store: Store) -> None:
    old_tag = store.put("state", b"v1")
    new_tag = store.put_if_match("state", b"v2", old_tag)
    assert store.get("state") == b"v2"
    assert store.list()["state"].tag == new_tag != old_tag
    with pytest.raises(PreconditionFailedError):
        store.put_if_match("state", b"v3 from a stale reader", old_tag)
    assert store.get("state") == b"v2"
    with pytest.raises(PreconditionFailedError):
        store.put_if_match("not-there", b"x", new_tag)
    assert "not-there" not in store.list()


def test_get_with_tag_returns_the_tag_of_the_bytes_read(store: Store) -> None:
    tag = store.put("state", b"v1")
    before = store.stats.requests
    assert store.get_with_tag("state") == (b"v1", tag)
    if "S3" in type(store).__name__:  # S3 returns the ETag with the body: one request, not LIST + GET + LIST
        assert store.stats.requests - before == 1
    store.put_if_match("state", b"v2", tag)
    with pytest.raises(ObjectNotFoundError):
        store.get_with_tag("not-there")


def test_list_page_returns_at_most_max_keys_after_start_after_in_one_request(store: Store) -> None:
    for name in ("p/a", "p/b", "p/c", "p/d", "q/e"):
        store.put(name, b"x")
    before = store.stats.requests
    assert sorted(store.list_page("p/", max_keys=2)) == ["p/a", "p/b"]
    assert sorted(store.list_page("p/", start_after="p/b", max_keys=5)) == ["p/c", "p/d"]
    assert store.list_page("p/", start_after="p/d") == {}
    assert store.stats.requests - before == 3
    with pytest.raises(ValueError, match="max_keys"):
        store.list_page("p/", max_keys=0)


def test_racing_compare_and_swap_increments_all_land(store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = store_url
    threads_n, increments = 8, 5
    stores = [open_store(url, **options) for _ in range(threads_n)]
    if not stores[0].supports_conditional_writes:
        pytest.skip("backend has no conditional writes")
    stores[0].put_if_absent("counter", b"0")
    conflicts = [0] * threads_n

    def work(index: int) -> None:
        handle = stores[index]
        for _ in range(increments):
            while True:
                tag = handle.list("counter")["counter"].tag  # tag first, then GET: never pairs a new value
                value = int(handle.get("counter"))  # with an older tag
                try:
                    handle.put_if_match("counter", str(value + 1).encode(), tag)
                    break
                except PreconditionFailedError:
                    conflicts[index] += 1

    run_in_threads(*(functools.partial(work, i) for i in range(threads_n)))
    assert int(stores[0].get("counter")) == threads_n * increments
    for handle in stores:
        handle.close()


def test_concurrent_reader_never_sees_a_torn_object(store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = store_url
    writer, reader = open_store(url, **options), open_store(url, **options)
    base_size, rewrites = 5 * MB, 50

    def version(i: int) -> bytes:  # every version has its own length and byte value
        return bytes([i % 251]) * (base_size + i)

    writer.put("model", version(0))
    done = threading.Event()
    bad: list[str] = []
    reads = [0]

    def read_loop() -> None:
        while not done.is_set():
            data = reader.get("model")
            reads[0] += 1
            i = len(data) - base_size
            if not 0 <= i < rewrites or data != version(i):
                bad.append(f"read {reads[0]}: {len(data)} bytes, not a written version")

    reading = in_background(read_loop)
    try:
        for i in range(1, rewrites):
            writer.put("model", version(i))
    finally:
        done.set()
        reading.result(timeout=60)  # a read that raised fails the test too
    assert not bad, bad[:3]
    assert reads[0] > 0
    assert reader.get("model") == version(rewrites - 1)


# -- local folders ------------------------------------------------------------------------


def test_local_writes_leave_no_temp_files_and_temp_files_are_never_listed(tmp_path: Any) -> None:
    root = tmp_path / "store"
    store = FsspecStore(str(root))
    store.put("a", b"1")
    store.put_if_absent("sub/b", b"2")
    store.put_if_match("a", b"3", store.list()["a"].tag)
    leftovers = [name for _, _, files in os.walk(root) for name in files if name.startswith(".tmp-")]
    assert leftovers == []
    (root / ".tmp-crashed-writer").write_bytes(b"half")
    (root / "sub" / ".tmp-another").write_bytes(b"half")
    assert set(store.list()) == {"a", "sub/b"}  # nor the .lock file
    assert (root / "a").read_bytes() == b"3"


def test_local_create_only_without_hard_links(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", dst)

    monkeypatch.setattr(os, "link", no_links)
    store = FsspecStore(str(tmp_path / "nolinks"))
    store.put_if_absent("lease", b"a")
    with pytest.raises(PreconditionFailedError):
        store.put_if_absent("lease", b"b")
    assert store.get("lease") == b"a"


def test_file_url_and_plain_path_reach_the_same_folder(tmp_path: Any) -> None:
    FsspecStore(f"file://{tmp_path}/shared").put("k", b"v")
    assert FsspecStore(str(tmp_path / "shared")).get("k") == b"v"


def test_unwritable_local_folder_fails_early(tmp_path: Any) -> None:
    blocker = tmp_path / "a-regular-file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(StoreConfigurationError, match="not writable"):
        FsspecStore(str(blocker / "store"))


def test_reserved_local_names_are_refused(tmp_path: Any) -> None:
    store = FsspecStore(str(tmp_path / "store"))
    for key in (".lock", ".tmp-x", "a/.tmp-y", "a/.lock"):
        with pytest.raises(StoreError, match="reserved"):
            store.put(key, b"x")


# -- other fsspec protocols ---------------------------------------------------------------


def test_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(StoreConfigurationError, match="nosuchscheme://bucket"):
        FsspecStore("nosuchscheme://bucket/prefix")
    with pytest.raises(StoreConfigurationError):
        open_store("nosuchscheme://bucket/prefix")


def test_generic_fsspec_backend_works_but_refuses_conditional_writes() -> None:
    # dir:// wraps another filesystem; FsspecStore knows nothing special about it.
    store = FsspecStore("dir://exp", path="/flwr-generic-test", target_protocol="memory")
    assert not store.supports_conditional_writes
    tag = store.put("a/b", b"payload")
    assert store.get("a/b") == b"payload"
    assert store.list() == {"a/b": ObjectInfo("a/b", tag, 7)}
    with pytest.raises(ConditionalWritesUnsupportedError):
        store.put_if_absent("c", b"x")
    with pytest.raises(ConditionalWritesUnsupportedError):
        store.put_if_match("a/b", b"x", tag)
    store.delete("a/b")
    assert store.list() == {}
    with pytest.raises(ObjectNotFoundError):
        store.get("a/b")


def test_in_memory_handles_on_one_url_share_objects_and_other_urls_do_not() -> None:
    one, two = FsspecStore("memory://flwr-share-test"), FsspecStore("memory://flwr-share-test/")
    other = FsspecStore("memory://flwr-share-test-other")
    one.put("k", b"v")
    assert two.get("k") == b"v"
    assert other.list() == {}
    one.delete("k")


# -- S3 specifics -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fsspec", "boto3"])
def test_missing_bucket_is_named(moto_endpoint: str, backend: str) -> None:
    with pytest.raises(StoreConfigurationError, match="bucket 'no-such-bucket-flwr' does not exist"):
        open_store("s3://no-such-bucket-flwr/exp", endpoint_url=moto_endpoint, backend=backend)


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """An environment in which botocore's credential chain finds nothing (and does not ask EC2)."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials_are_explained(moto_endpoint: str, s3_bucket: str, no_aws_credentials: None) -> None:
    with pytest.raises(StoreConfigurationError, match="no AWS credentials found"):
        S3Store(s3_bucket, "exp", endpoint_url=moto_endpoint)
    with pytest.raises(StoreConfigurationError, match="no AWS credentials found"):
        FsspecStore(f"s3://{s3_bucket}/exp", endpoint_url=moto_endpoint)


@pytest.mark.parametrize("backend", ["fsspec", "boto3"])
def test_s3_listing_skips_folder_placeholders(moto_endpoint: str, s3_bucket: str, s3_client: Any, backend: str) -> None:
    store = open_store(f"s3://{s3_bucket}/exp", endpoint_url=moto_endpoint, backend=backend)
    s3_client.put_object(Bucket=s3_bucket, Key="exp/folder/", Body=b"")
    s3_client.put_object(Bucket=s3_bucket, Key="exp/folder/real", Body=b"data")
    s3_client.put_object(Bucket=s3_bucket, Key="exp-sibling/not-ours", Body=b"data")
    assert set(store.list()) == {"folder/real"}
    assert store.list()["folder/real"].size == 4


def test_s3_store_without_prefix_uses_whole_bucket(moto_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, endpoint_url=moto_endpoint)
    store.put("top", b"1")
    assert set(store.list()) == {"top"}
    assert FsspecStore(f"s3://{s3_bucket}", endpoint_url=moto_endpoint).get("top") == b"1"


def test_s3_store_accepts_a_ready_made_client(moto_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    store = S3Store(s3_bucket, "exp/", client=s3_client)
    store.put("k", b"v")
    assert s3_client.get_object(Bucket=s3_bucket, Key="exp/k")["Body"].read() == b"v"
    store.close()  # not ours to close
    assert s3_client.head_bucket(Bucket=s3_bucket)


def test_both_s3_backends_see_the_same_objects_and_tags(moto_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/shared"
    via_boto3 = open_store(url, endpoint_url=moto_endpoint)
    via_s3fs = open_store(url, client_kwargs={"endpoint_url": moto_endpoint}, backend="fsspec")
    tag = via_boto3.put("k", b"value")
    assert via_s3fs.get("k") == b"value"
    assert via_s3fs.list()["k"].tag == tag
    new_tag = via_s3fs.put_if_match("k", b"value 2", tag)
    assert via_boto3.list()["k"].tag == new_tag
    # boto3 spellings work for s3fs too, so one option dict serves both backends.
    boto_style = FsspecStore(
        url,
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    assert boto_style.get("k") == b"value 2"


# -- open_store dispatch ------------------------------------------------------------------


def test_open_store_dispatch(tmp_path: Any, moto_endpoint: str, s3_bucket: str) -> None:
    memory = open_store("memory://flwr-dispatch")
    assert isinstance(memory, MemoryStore)
    assert open_store(memory) is memory
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/url"), LocalStore)
    default_s3 = open_store(f"s3://{s3_bucket}/exp", endpoint_url=moto_endpoint)
    assert isinstance(default_s3, S3Store)
    assert (default_s3.bucket, default_s3.prefix) == (s3_bucket, "exp")
    assert isinstance(open_store(f"s3://{s3_bucket}/exp", endpoint_url=moto_endpoint, backend="boto3"), S3Store)
    assert isinstance(open_store(f"s3://{s3_bucket}/exp", endpoint_url=moto_endpoint, backend="fsspec"), S3FsStore)
    with pytest.raises(StoreConfigurationError, match="only serves s3://"):
        open_store(str(tmp_path / "x"), backend="boto3")
    with pytest.raises(StoreConfigurationError, match="unknown backend"):
        open_store("memory://x", backend="ftp")


def test_open_store_translates_s3fs_options_for_boto3(moto_endpoint: str, s3_bucket: str) -> None:
    store = open_store(
        f"s3://{s3_bucket}/exp",
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
        use_listings_cache=False,
    )
    assert isinstance(store, S3Store)
    store.put("k", b"v")
    assert store.get("k") == b"v"
    with pytest.raises(StoreConfigurationError, match="not understood by the boto3 backend"):
        open_store(f"s3://{s3_bucket}/exp", endpoint_url=moto_endpoint, requester_pays=True)


# -- names from flwr-serverless 0.1 -------------------------------------------------------


def test_legacy_s3_folder_with_endpoint_argument(moto_endpoint: str, s3_bucket: str) -> None:
    folder = S3Folder(directory=f"{s3_bucket}/experiments/run-1", endpoint_url=moto_endpoint)
    assert isinstance(folder, S3Store)
    assert (folder.bucket, folder.prefix) == (s3_bucket, "experiments/run-1")
    folder.put("w", b"weights")
    assert S3Store(s3_bucket, "experiments/run-1", endpoint_url=moto_endpoint).get("w") == b"weights"


def test_legacy_s3_folder_with_endpoint_from_environment(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    folder = S3Folder(directory=f"s3://{s3_bucket}/env-prefix")
    folder.put("w", b"weights")
    assert folder.list()["w"].size == 7


def test_legacy_local_and_in_memory_folders(tmp_path: Any) -> None:
    local = LocalFolder(directory=str(tmp_path / "legacy"))
    local.put("k", b"v")
    assert (tmp_path / "legacy" / "k").read_bytes() == b"v"
    first, second = InMemoryFolder(), InMemoryFolder()
    first.put("k", b"v")
    assert second.list() == {}
    assert FsspecStore(first.url).get("k") == b"v"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LocalFolder(directory=str(tmp_path / "old-args"), retry_sleep_time=1, max_retry=3)
    assert any("no longer have any effect" in str(w.message) for w in caught)


def test_stores_are_context_managers_and_close_twice(tmp_path: Any, moto_endpoint: str, s3_bucket: str) -> None:
    for url, options in ((str(tmp_path / "ctx"), {}), (f"s3://{s3_bucket}/ctx", {"endpoint_url": moto_endpoint})):
        with open_store(url, **options) as store:
            store.put("k", b"v")
        store.close()
