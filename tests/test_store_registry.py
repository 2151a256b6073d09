"""The store registry: which class serves which URL, third-party backends by scheme and entry point."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

import flwr_serverless
from flwr_serverless.errors import ConditionalWritesUnsupportedError, StoreConfigurationError
from flwr_serverless.stores import (
    FsspecStore,
    InMemoryFolder,
    LocalFolder,
    LocalStore,
    MemoryStore,
    ObjectInfo,
    RetryPolicy,
    S3FsStore,
    S3Store,
    Store,
    open_store,
    register_store,
    registered_schemes,
    registry,
    unregister_store,
)
from flwr_serverless.stores.base import url_scheme


class NotesStore(Store):
    """A third-party backend: objects in a dict, remembering how it was opened."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__()
        self.url, self.options = url, options
        self.objects: dict[str, bytes] = {}

    def _put(self, key: str, data: bytes) -> str:
        self.objects[key] = bytes(data)
        return str(len(self.objects))

    def _get(self, key: str) -> bytes:
        return self.objects[key]

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        return {k: ObjectInfo(k, "t", len(v)) for k, v in self.objects.items() if k.startswith(prefix)}

    def _delete(self, key: str) -> None:
        self.objects.pop(key, None)


@pytest.fixture
def scratch_schemes() -> Iterator[list[str]]:
    """Schemes a test registers; unregistered afterwards so tests stay independent."""
    schemes: list[str] = []
    yield schemes
    for scheme in schemes:
        unregister_store(scheme)


# -- built-in dispatch -------------------------------------------------------------------------


def test_builtin_schemes_open_their_classes(tmp_path: Path) -> None:
    assert type(open_store(str(tmp_path / "a"))) is LocalStore
    assert type(open_store(f"file://{tmp_path}/b")) is LocalStore
    assert type(open_store("memory://registry-builtin")) is MemoryStore
    assert registry.store_target("s3://bucket/exp") is S3Store
    assert registry.store_target("S3A://bucket/exp") is S3Store
    assert registry.store_target("s3://bucket/exp", backend="fsspec") is FsspecStore  # whose from_url picks s3fs
    assert registry.store_target("gcs://bucket/exp") is FsspecStore  # fsspec knows it (gcsfs may be missing)
    assert {"file", "memory", "s3", "s3a", "local"} <= set(registered_schemes())


def test_s3_falls_back_to_s3fs_without_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = registry.importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real_find_spec(name, *a)
    )
    assert registry.store_target("s3://bucket/exp") is S3FsStore
    with pytest.raises(StoreConfigurationError, match="needs boto3"):
        registry.store_target("s3://bucket/exp", backend="boto3")


def test_unknown_scheme_names_the_url_and_the_registered_schemes() -> None:
    assert "nosuchscheme" not in fsspec.available_protocols()
    with pytest.raises(StoreConfigurationError) as info:
        open_store("nosuchscheme://bucket/prefix")
    message = str(info.value)
    assert "nosuchscheme://bucket/prefix" in message
    assert "memory, s3, s3a" in message and "register_store" in message


def test_other_fsspec_protocols_get_the_generic_backend() -> None:
    store = open_store("dir://exp", path="/flwr-registry-generic", target_protocol="memory")
    assert type(store) is FsspecStore and not store.supports_conditional_writes
    store.put("k", b"v")
    assert store.get("k") == b"v"
    with pytest.raises(ConditionalWritesUnsupportedError):
        store.put_if_absent("k2", b"v")


def test_url_scheme() -> None:
    assert url_scheme("/data/exp") == "" and url_scheme("relative/exp") == ""
    assert url_scheme("S3://bucket/p") == "s3"
    assert url_scheme("simplecache::s3://bucket/p") == "simplecache"
    assert url_scheme("zip://inner::s3://bucket/f.zip") == "zip"


def test_fsspec_store_still_opens_the_urls_it_used_to(tmp_path: Path) -> None:
    assert type(FsspecStore("memory://registry-compat")) is MemoryStore
    assert type(FsspecStore(str(tmp_path / "p"))) is LocalStore
    assert type(FsspecStore(f"file://{tmp_path}/q")) is LocalStore
    assert type(FsspecStore.from_url("memory://registry-compat")) is MemoryStore


def test_legacy_folders_are_the_new_classes(tmp_path: Path) -> None:
    assert isinstance(LocalFolder(directory=str(tmp_path / "legacy")), LocalStore)
    assert isinstance(InMemoryFolder(), MemoryStore)


def test_options_a_backend_cannot_use_are_named(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigurationError, match="endpoint_url mean nothing to a local folder"):
        open_store(str(tmp_path / "x"), endpoint_url="http://example")
    with pytest.raises(StoreConfigurationError, match="anon mean nothing to a memory"):
        open_store("memory://registry-options", anon=True)
    with pytest.raises(StoreConfigurationError, match="only serves s3://"):
        open_store("memory://registry-options", backend="boto3")


# -- third-party backends -------------------------------------------------------------------------


def test_a_registered_class_is_reached_by_url(scratch_schemes: list[str]) -> None:
    scratch_schemes.append("notes")
    register_store("notes", NotesStore)
    policy = RetryPolicy(attempts=2, max_time=1.0)
    store = open_store("notes://shelf/exp", colour="blue", retry=policy)
    assert isinstance(store, NotesStore)
    assert (store.url, store.options, store.retry_policy) == ("notes://shelf/exp", {"colour": "blue"}, policy)
    store.put("a", b"1")
    assert store.get("a") == b"1" and store.stats.puts == 1
    assert "notes" in registered_schemes()
    # the package's top-level name is the same function
    assert flwr_serverless.register_store is register_store


def test_a_registered_factory_is_called_with_url_and_options(scratch_schemes: list[str]) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def factory(url: str, **options: Any) -> Store:
        calls.append((url, options))
        return MemoryStore("memory://registry-factory/" + url.split("://", 1)[1])

    scratch_schemes.extend(["viafactory", "broken"])
    register_store("viafactory", factory)
    store = open_store("viafactory://exp", depth=3)
    assert isinstance(store, MemoryStore) and calls == [("viafactory://exp", {"depth": 3})]
    register_store("broken", lambda url, **options: "not a store")
    with pytest.raises(StoreConfigurationError, match="not a Store"):
        open_store("broken://x")


def test_registration_rules(scratch_schemes: list[str]) -> None:
    scratch_schemes.extend(["memory", "twice"])
    for bad in ("", "9lives", "has space", "UPPER", "a/b"):
        with pytest.raises(StoreConfigurationError, match="invalid scheme"):
            register_store(bad, NotesStore)
    with pytest.raises(StoreConfigurationError, match="already served by MemoryStore"):
        register_store("memory", NotesStore)
    register_store("memory", NotesStore, replace=True)
    assert isinstance(open_store("memory://anything"), NotesStore)
    unregister_store("memory")
    assert isinstance(open_store("memory://anything"), MemoryStore)  # the built-in is back
    register_store("twice", NotesStore)
    register_store("twice", NotesStore)  # same target again: fine
    with pytest.raises(StoreConfigurationError, match="replace=True"):
        register_store("twice", MemoryStore)


PLUGIN = '''
from flwr_serverless.stores import MemoryStore


class PluginStore(MemoryStore):
    """Serves plugin://name as memory://plugin-name."""

    def __init__(self, url, **options):
        super().__init__("memory://plugin-" + url.split("://", 1)[1], **options)
'''


def test_an_entry_point_makes_a_scheme_reachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scratch_schemes: list[str]
) -> None:
    (tmp_path / "flwr_plugin_under_test.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    group = registry.ENTRY_POINT_GROUP
    declared = [
        importlib.metadata.EntryPoint("plugin", "flwr_plugin_under_test:PluginStore", group),
        importlib.metadata.EntryPoint("brokenplugin", "flwr_plugin_under_test:Missing", group),
    ]
    real = importlib.metadata.entry_points

    def entry_points(**selection: Any) -> Any:
        return declared if selection.get("group") == group else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    scratch_schemes.extend(["plugin", "brokenplugin"])
    assert {"plugin", "brokenplugin"} <= set(registered_schemes())
    store = open_store("plugin://exp")
    assert type(store).__name__ == "PluginStore" and sys.modules["flwr_plugin_under_test"]
    store.put("k", b"v")
    assert MemoryStore("memory://plugin-exp").get("k") == b"v"
    with pytest.raises(StoreConfigurationError, match="flwr_plugin_under_test:Missing"):
        open_store("brokenplugin://exp")


def test_entry_points_cannot_take_over_builtin_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    group = registry.ENTRY_POINT_GROUP
    declared = [importlib.metadata.EntryPoint("memory", "flwr_plugin_never_imported:Store", group)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **selection: declared)
    assert type(open_store("memory://registry-not-hijacked")) is MemoryStore


# -- memory:// namespaces ---------------------------------------------------------------------------


def test_memory_handles_on_one_name_share_objects_and_other_names_do_not() -> None:
    one, two = open_store("memory://ns-share"), MemoryStore("memory://ns-share/")
    other, longer = MemoryStore("memory://ns-other"), MemoryStore("memory://ns-share-longer")
    tag = one.put("k", b"v")
    assert two.get("k") == b"v" and two.list()["k"].tag == tag
    assert other.list() == {} and longer.list() == {}
    two.put_if_match("k", b"w", tag)
    assert one.get("k") == b"w"


def test_memory_prefix_inside_a_namespace() -> None:
    whole, sub = MemoryStore("memory://ns-prefix"), MemoryStore("memory://ns-prefix/run-1")
    sub.put("nodes/a", b"1")
    whole.put("top", b"2")
    assert set(whole.list()) == {"run-1/nodes/a", "top"}
    assert set(sub.list()) == {"nodes/a"}
    assert MemoryStore("memory://ns-prefix/run-10").list() == {}


def test_memory_objects_stay_out_of_fsspec_and_are_handed_out_without_copies() -> None:
    store = MemoryStore("memory://ns-private")
    payload = b"x" * 1000
    store.put("k", payload)
    assert store.zero_copy_get and store.get("k") is payload
    assert not [path for path in fsspec.filesystem("memory").store if "ns-private" in path]


def test_memory_discard_and_bad_urls() -> None:
    store = MemoryStore("memory://ns-discard")
    store.put("k", b"v")
    MemoryStore.discard("ns-discard")
    assert store.list() == {}
    for bad in ("memory://ns/../escape", "memory://ns/./x", "file:///not-memory"):
        with pytest.raises(StoreConfigurationError):
            MemoryStore(bad)
