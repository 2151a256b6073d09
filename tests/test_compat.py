"""Drop-in compatibility with flwr-serverless 0.2: module paths, dict-like folders, node arguments and metrics.

The original's own tests run in tests/compat_original/; these check each 0.2 behaviour
we promise (docs/migrating.md) directly, on every store backend.
"""

from __future__ import annotations

import importlib
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

import flwr_serverless
from flwr_serverless.cli import build_parser
from flwr_serverless.errors import ObjectNotFoundError, StoreError
from flwr_serverless.federated_node.aggregatable import Aggregatable
from flwr_serverless.federated_node.async_federated_node import AsyncFederatedNode
from flwr_serverless.federated_node.sync_federated_node import SyncFederatedNode
from flwr_serverless.shared_folder.base_folder import NotBytesError, SharedFolder
from flwr_serverless.shared_folder.in_memory_folder import InMemoryFolder
from flwr_serverless.shared_folder.local_folder import LocalFolder, LocalFolderWithBytes
from flwr_serverless.shared_folder.s3_folder import S3FolderWithBytes, S3FolderWithPickle
from flwr_serverless.stores import FsspecStore, Store
from flwr_serverless.wire.codec import decode
from tests.threads import in_background

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.s3_servers("moto")  # the 0.2 API over a Store, not the server (see test_stores)

# -- module paths and version ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (
            "flwr_serverless",
            [
                "AsyncFederatedNode",
                "SyncFederatedNode",
                "SharedFolder",
                "S3FolderWithPickle",
                "LocalFolder",
                "S3Folder",
                "__version__",
            ],
        ),
        ("flwr_serverless.shared_folder.base_folder", ["SharedFolder"]),
        ("flwr_serverless.shared_folder.s3_folder", ["S3FolderWithBytes", "S3FolderWithPickle"]),
        ("flwr_serverless.shared_folder.local_folder", ["LocalFolder", "LocalFolderWithBytes"]),
        ("flwr_serverless.shared_folder.in_memory_folder", ["InMemoryFolder"]),
        ("flwr_serverless.federated_node.async_federated_node", ["AsyncFederatedNode"]),
        ("flwr_serverless.federated_node.sync_federated_node", ["SyncFederatedNode"]),
        ("flwr_serverless.federated_node.aggregatable", ["Aggregatable"]),
        ("flwr_serverless.dataset.federated_mnist_dataset", ["FederatedMNISTDataset"]),
        ("flwr_serverless.version", ["__version__"]),
    ],
)
def test_the_original_module_paths_import(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"


def test_version_succeeds_the_original_and_is_the_same_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    version = tuple(int(part) for part in flwr_serverless.__version__.split("."))
    assert version > (0, 2, 10)  # pip must never prefer the original's 0.2.10 over this project
    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared is not None and declared.group(1) == flwr_serverless.__version__
    assert importlib.import_module("flwr_serverless.version").__version__ == flwr_serverless.__version__
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"flwr-serverless {flwr_serverless.__version__}"


def test_aggregatable_keeps_its_fields() -> None:
    parameters = ndarrays_to_parameters([np.ones(2)])
    item = Aggregatable(parameters=parameters, num_examples=3, metrics={"loss": 1.0})
    assert (item.parameters, item.num_examples, item.metrics) == (parameters, 3, {"loss": 1.0})


# -- dict-like folders -----------------------------------------------------------------------------


class _S3fsFolder(SharedFolder, FsspecStore):
    """The mixin over a store 0.2 never had: it needs nothing but the Store API."""


@pytest.fixture(params=["in_memory", "local", "s3_boto3", "s3fs"])
def folder(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SharedFolder:
    if request.param == "in_memory":
        return InMemoryFolder()
    if request.param == "local":
        return LocalFolder(directory=tmp_path / "folder")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    if request.param == "s3fs":
        return _S3fsFolder(f"s3://{bucket}/exp", endpoint_url=endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # as 0.2 users point boto3 at S3-compatible services
    return S3FolderWithBytes(f"{bucket}/exp")


def test_folders_are_dict_like_over_bytes(folder: SharedFolder) -> None:
    assert isinstance(folder, SharedFolder) and isinstance(folder, Store)
    assert len(folder) == 0 and bool(folder)  # an empty folder is still a usable (truthy) handle
    folder["a"] = b"alpha"
    folder["sub/b"] = bytearray(b"beta")
    assert folder["a"] == b"alpha" and folder["sub/b"] == b"beta"
    assert len(folder) == 2 and "a" in folder and "missing" not in folder
    assert list(folder) == folder.keys() == ["a", "sub/b"]
    assert dict(folder.items()) == {"a": b"alpha", "sub/b": b"beta"}
    assert sorted(folder.values()) == [b"alpha", b"beta"]
    assert folder.get("missing", b"default") == b"default" and folder.get("missing", None) is None
    with pytest.raises(KeyError, match="missing"):  # without a default: the Store contract (nodes rely on it)
        folder.get("missing")
    with pytest.raises(ObjectNotFoundError):
        folder["missing"]
    assert folder.get_raw_folder() is folder
    del folder["a"]
    del folder["a"]  # deleting a missing key is no error, as in 0.2
    assert folder.keys() == ["sub/b"]


def test_folders_refuse_none_and_objects_with_a_reason(folder: SharedFolder) -> None:
    with pytest.raises(ValueError, match="cannot store None"):
        folder["k"] = None  # type: ignore[assignment]
    for value in ("text", [0, 1], {"a": 1}, np.arange(3)):
        with pytest.raises(NotBytesError, match="never pickles") as raised:
            folder["k"] = value  # type: ignore[assignment]
        message = str(raised.value)
        assert "'k'" in message and type(value).__name__ in message and "json.dumps" in message
        assert isinstance(raised.value, TypeError)
    assert len(folder) == 0


def test_old_polling_arguments_are_accepted_and_announced(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = LocalFolderWithBytes(directory=str(tmp_path / "old"), retry_sleep_time=0.1, max_retry=10)
    assert local.directory == tmp_path / "old"
    assert any("retry_sleep_time, max_retry no longer have any effect" in str(w.message) for w in caught)


def test_s3_check_at_init_false_skips_the_bucket_check(
    moto_endpoint: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bucket = f"flwr-missing-{uuid.uuid4().hex[:12]}"
    folder = S3FolderWithBytes(f"{bucket}/exp", check_at_init=False)
    assert folder.stats.requests == 0
    with pytest.raises(StoreError, match="NoSuchBucket"):  # the first use says what is wrong
        folder["k"] = b"v"
    s3_client.create_bucket(Bucket=bucket)
    folder["k"] = b"v"
    assert folder["k"] == b"v"


def test_s3_check_at_init_raises_botocores_no_such_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bucket = f"flwr-missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(boto3.client("s3").exceptions.NoSuchBucket) as raised:
        S3FolderWithBytes(f"{bucket}/exp")
    assert f"bucket {bucket!r} does not exist" in str(raised.value)
    assert raised.value.response["Error"]["Code"] == "NoSuchBucket"
    folder = S3FolderWithBytes(f"{bucket}/exp", check_at_init=False)
    with pytest.raises(folder.s3.exceptions.NoSuchBucket):  # the folder's own client's class too
        folder._check()


def test_s3_folder_with_pickle_opens_but_stores_bytes_only(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    with pytest.warns(DeprecationWarning, match="never pickles"):
        folder = S3FolderWithPickle(directory=f"{s3_bucket}/exp")
    with pytest.raises(NotBytesError, match=r"S3FolderWithPickle\['model'\].*never pickles"):
        folder["model"] = [0, 1, 2]
    folder["model"] = b"\x00\x01"
    assert folder.get_raw_folder()["model"] == b"\x00\x01"


# -- nodes -------------------------------------------------------------------------------------------


def _weights(value: float) -> Parameters:
    return ndarrays_to_parameters([np.full((2, 3), value, dtype=np.float32), np.full(3, value, dtype=np.float32)])


def _values(parameters: Parameters) -> list[float]:
    return [float(array.mean()) for array in parameters_to_ndarrays(parameters)]


@pytest.fixture
def shared(store_url: tuple[str, dict[str, Any]]) -> Store:
    """One experiment on each backend, as a Store the nodes open."""
    from flwr_serverless.stores import open_store

    url, options = store_url
    return open_store(url, **options)


def test_async_node_takes_the_original_arguments_and_order(shared: Store) -> None:
    a = AsyncFederatedNode(shared, FedAvg(), False, "node-a")  # (shared_folder, strategy, ignore_seen_models, id)
    b = AsyncFederatedNode(shared_folder=shared, strategy=FedAvg(), node_id="node-b")
    assert a.model_store is shared and a.counter == 0 and a.seen_models == set()

    weights, metrics = a.update_parameters(_weights(1.0), 10, {"loss": 2.0}, 7)  # 0.2's positional order
    assert isinstance(weights, Parameters) and _values(weights) == [1.0, 1.0]
    assert metrics == {"loss": 2.0} and a.counter == 0  # alone: local weights and metrics back, as in 0.2
    header = decode(shared.get("nodes/node-a"), "nodes/node-a").header
    assert (header.epoch, header.num_examples, header.metrics) == (7, 10, {"loss": 2.0})

    weights, metrics = b.update_parameters(_weights(4.0), num_examples=30, metrics={"loss": 1.0}, epoch=0)
    assert _values(weights) == pytest.approx([3.25, 3.25])  # (10 * 1 + 30 * 4) / 40
    assert metrics == {"loss": pytest.approx(1.25), "num_examples": 40, "num_nodes": 2}
    assert b.counter == 1 and b.seen_models == {f"node-a_{shared.list('nodes/')['nodes/node-a'].tag}"}


def test_ignore_seen_models_aggregates_each_peer_object_once(shared: Store) -> None:
    a = AsyncFederatedNode(shared, FedAvg(), node_id="node-a")
    b = AsyncFederatedNode(shared, FedAvg(), ignore_seen_models=True, node_id="node-b")
    plain = AsyncFederatedNode(shared, FedAvg(), node_id="node-c")
    a.update_parameters(_weights(0.0), 10)
    assert _values(b.update_parameters(_weights(2.0), 10)[0]) == [1.0, 1.0]  # a's object: new
    weights, metrics = b.update_parameters(_weights(2.0), 10)  # a has not published since
    assert _values(weights) == [2.0, 2.0] and "num_nodes" not in metrics and b.counter == 1
    # A node without the option aggregates every peer's latest object, seen or not.
    assert plain.update_parameters(_weights(3.0), 10)[1]["num_nodes"] == 3
    a.update_parameters(_weights(0.0), 10)  # a publishes again: b aggregates the new object (and c's)
    weights, metrics = b.update_parameters(_weights(2.0), 10)
    assert metrics["num_nodes"] == 3 and _values(weights) == pytest.approx([5 / 3, 5 / 3])
    assert b.counter == 2 and len(b.seen_models) == 3


def test_async_upload_only_publishes_without_aggregating(shared: Store) -> None:
    a = AsyncFederatedNode(shared, FedAvg(), node_id="node-a")
    b = AsyncFederatedNode(shared, FedAvg(), node_id="node-b")
    a.update_parameters(_weights(0.0), 10)
    local = _weights(5.0)
    weights, metrics = b.update_parameters(local, 10, {"loss": 0.5}, 1, upload_only=True)
    assert _values(weights) == [5.0, 5.0] and metrics == {"loss": 0.5} and b.counter == 0
    assert decode(shared.get("nodes/node-b"), "nodes/node-b").header.epoch == 1  # published
    assert _values(a.update_parameters(_weights(0.0), 10)[0]) == [2.5, 2.5]  # peers see it


def test_sync_node_requires_num_nodes_as_in_the_original(shared: Store) -> None:
    with pytest.raises(TypeError, match="num_nodes"):
        SyncFederatedNode(shared, FedAvg())
    node = SyncFederatedNode(shared, FedAvg(), 1, timeout=5)  # (shared_folder, strategy, num_nodes)
    weights, metrics = node.update_parameters(_weights(1.0), 4, {"acc": 0.5}, 0)
    assert _values(weights) == [1.0, 1.0]
    assert metrics == {"acc": 0.5, "num_examples": 4, "num_nodes": 1}  # 0.2's sync always reported counts
    assert node.counter == 1 and node.model_store is shared


def test_sync_round_reports_counts_and_upload_only_does_not_wait(shared: Store) -> None:
    a = SyncFederatedNode(shared, FedAvg(), 2, timeout=20, node_id="node-a")
    b = SyncFederatedNode(shared, FedAvg(), 2, timeout=20, node_id="node-b")
    waiting = in_background(lambda: b.update_parameters(_weights(3.0), 30, {}, 0))  # b waits at round 0's barrier
    # a's first call only uploads: it joins b's round, publishes and returns at once (a wait would time out)
    assert a.update_parameters(_weights(1.0), 10, {}, 0, upload_only=True) is None
    weights, metrics = waiting.result(timeout=30)
    assert _values(weights) == pytest.approx([2.5, 2.5])  # b aggregated a's uploaded object
    assert metrics == {"num_examples": 40, "num_nodes": 2}
    assert a.num_nodes == 2 and a.counter == 0 and b.counter == 1 and a.round == b.round == 1
    # The next round is a full barrier for both again.
    second = in_background(lambda: b.update_parameters(_weights(0.0), 10, {}, 1))
    weights, metrics = a.update_parameters(_weights(2.0), 10, {}, 1)
    assert _values(weights) == _values(second.result(timeout=30)[0]) == [1.0, 1.0] and metrics["num_nodes"] == 2


def test_alias_nodes_refuse_two_folders(shared: Store) -> None:
    with pytest.raises(TypeError, match="not both"):
        AsyncFederatedNode(shared_folder=shared, store=shared)
    with pytest.raises(TypeError, match="shared_folder is required"):
        AsyncFederatedNode(strategy=FedAvg())


def test_0_2_spellings_are_translated_by_the_shims_not_known_to_the_core_nodes(tmp_path: Path) -> None:
    from flwr_serverless import node as core

    url = f"file://{tmp_path}"
    with pytest.raises(TypeError, match="shared_folder"):
        core.AsyncFederatedNode(shared_folder=url)  # type: ignore[call-arg]
    plain = core.SyncFederatedNode(url, num_nodes=1, node_id="core")
    assert not hasattr(plain, "publish_only") and not hasattr(plain, "_upload_only")
    with pytest.raises(TypeError, match=r"0\.2\.0's order"):
        plain.update_parameters(_weights(1.0), 10, 0)  # type: ignore[arg-type]
    # The package's nodes (and flwr_serverless.nodes, 0.2.0's module) are the core nodes, translating.
    exported = flwr_serverless.SyncFederatedNode(shared_folder=url, num_nodes=1, node_id="exported", timeout=5)
    assert isinstance(exported, core.SyncFederatedNode) and exported.store.root == plain.store.root
    weights, _ = exported.update_parameters(_weights(2.0), 10, 0)  # an int where the metrics go: the epoch
    assert _values(weights) == [2.0, 2.0] and exported.round == 1
