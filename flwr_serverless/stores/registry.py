"""Which class serves which URL: a registry of store backends by URL scheme, open to other packages.

``open_store(url)`` looks the URL's scheme up in this order:

1. schemes registered in this process with :func:`register_store`;
2. the built-in backends: plain paths, ``file://`` and ``local://`` -> :class:`LocalStore`,
   ``memory://`` -> :class:`MemoryStore`, ``s3://``/``s3a://`` -> :class:`S3Store` (boto3) when
   boto3 is installed, else :class:`S3FsStore`;
3. entry points of the group ``flwr_serverless.stores`` (name = scheme, value = a Store class or a
   factory), so that installing a package is enough to make its URLs work;
4. any other protocol fsspec knows -> :class:`FsspecStore`.

A registered class is opened with ``cls.from_url(url, retry_policy=..., **options)`` (by default
``cls(url, **options)``); a factory is called as ``factory(url, **options)`` and must return a Store.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import threading
from collections.abc import Callable
from typing import Any

import fsspec

from flwr_serverless.errors import StoreConfigurationError
from flwr_serverless.stores.base import Store, url_scheme
from flwr_serverless.stores.fsspec_store import FsspecStore
from flwr_serverless.stores.local import LOCAL_SCHEMES, LocalStore
from flwr_serverless.stores.memory import MemoryStore
from flwr_serverless.stores.retry import RetryPolicy, as_policy, with_retries
from flwr_serverless.stores.s3_common import S3_SCHEMES
from flwr_serverless.stores.s3_store import S3Store
from flwr_serverless.stores.s3fs_store import S3FsStore

StoreTarget = type[Store] | Callable[..., Store]
ENTRY_POINT_GROUP = "flwr_serverless.stores"
BACKENDS = ("auto", "boto3", "fsspec")
BUILTIN_SCHEMES = ("", *LOCAL_SCHEMES, "memory", *S3_SCHEMES)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")

_registered: dict[str, StoreTarget] = {}
_lock = threading.Lock()


def register_store(scheme: str, target: StoreTarget, *, replace: bool = False) -> None:
    """Serve ``scheme://...`` URLs with ``target``: a Store subclass, or a callable ``(url, **options) -> Store``.

    A scheme that is already served (built in or registered) needs ``replace=True``;
    registering the same target again is a no-op.
    """
    if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
        raise StoreConfigurationError(f"register_store: invalid scheme {scheme!r} (letters, digits, '+', '-', '.')")
    if not callable(target):
        raise StoreConfigurationError(f"register_store({scheme!r}): {target!r} is neither a Store class nor callable")
    with _lock:
        current = _registered.get(scheme) or _builtin(scheme)
        if current is not None and current is not target and not replace:
            raise StoreConfigurationError(
                f"register_store: scheme {scheme!r} is already served by {_name(current)}; pass replace=True"
            )
        _registered[scheme] = target


def unregister_store(scheme: str) -> None:
    """Forget a :func:`register_store` registration (built-in backends come back)."""
    with _lock:
        _registered.pop(scheme, None)


def registered_schemes() -> list[str]:
    """Every scheme a registry entry serves (built in, registered, or from an entry point)."""
    with _lock:
        names = set(BUILTIN_SCHEMES) | set(_registered)
    names |= {entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(name for name in names if name)


def store_target(url: str, backend: str = "auto") -> StoreTarget:
    """The class or factory that ``open_store(url, backend=backend)`` would use."""
    if backend not in BACKENDS:
        raise StoreConfigurationError(f"store {url!r}: unknown backend {backend!r} (use one of {', '.join(BACKENDS)})")
    scheme = url_scheme(url)
    if backend == "fsspec":
        return FsspecStore  # (its from_url sends s3:// to S3FsStore, local and memory:// to theirs)
    if backend == "boto3":
        if scheme not in S3_SCHEMES:
            raise StoreConfigurationError(f"store {url!r}: backend='boto3' only serves s3:// URLs")
        if importlib.util.find_spec("boto3") is None:
            raise StoreConfigurationError(
                f"store {url!r}: backend='boto3' needs boto3: pip install 'flwr-serverless[s3]'"
            )
        return S3Store
    with _lock:
        target = _registered.get(scheme) or _builtin(scheme)
    if target is None:
        target = _from_entry_point(url, scheme)
    if target is not None:
        return target
    if scheme in fsspec.available_protocols():
        return FsspecStore
    raise StoreConfigurationError(
        f"store {url!r}: no store backend serves scheme {scheme!r}; registered schemes: "
        f"{', '.join(registered_schemes())}, plus fsspec's protocols. Install the package that provides it, "
        "or call flwr_serverless.register_store(scheme, StoreClass)"
    )


def open_store(url: str | Store, **storage_options: Any) -> Store:
    """Open the store at ``url``; a Store instance is returned unchanged.

    ``backend="boto3"`` or ``backend="fsspec"`` overrides the choice for ``s3://`` URLs;
    the remaining options go to the backend (s3fs spellings are translated for boto3).
    ``retry`` (default on: 5 attempts / 30 s, see ``RetryPolicy``) retries transient faults;
    ``retry=False`` disables it, a ``RetryPolicy`` or a dict of its fields tunes it.
    """
    retry = storage_options.pop("retry", None)
    policy = as_policy(retry)
    backend = storage_options.pop("backend", "auto") or "auto"
    if isinstance(url, Store):
        if backend not in BACKENDS:
            raise StoreConfigurationError(f"store {url!r}: unknown backend {backend!r}")
        return url if retry is None else with_retries(url, policy)
    url = str(url)
    store = _construct(store_target(url, backend), url, policy, storage_options)
    return with_retries(store, policy)


def _construct(target: StoreTarget, url: str, policy: RetryPolicy, options: dict[str, Any]) -> Store:
    build: Callable[..., object] = target  # a Store subclass takes the URL, whatever Store's own signature
    store: object
    if isinstance(target, type) and issubclass(target, Store):
        store = target.from_url(url, retry_policy=policy, **options)
    else:
        store = build(url, **options)
    if not isinstance(store, Store):
        raise StoreConfigurationError(f"store {url!r}: {_name(target)} returned {type(store).__name__}, not a Store")
    return store


def _builtin(scheme: str) -> StoreTarget | None:
    if scheme in ("", *LOCAL_SCHEMES):
        return LocalStore
    if scheme == "memory":
        return MemoryStore
    if scheme in S3_SCHEMES:
        return S3Store if importlib.util.find_spec("boto3") is not None else S3FsStore
    return None


def _from_entry_point(url: str, scheme: str) -> StoreTarget | None:
    """Load (once) the target an installed package declares for ``scheme``."""
    found = [entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if entry.name == scheme]
    if not found:
        return None
    entry = found[0]
    try:
        target = entry.load()
    except Exception as exc:  # a broken plugin must say which one it is
        raise StoreConfigurationError(
            f"store {url!r}: entry point {entry.name} = {entry.value} (group {ENTRY_POINT_GROUP}) failed to load: {exc}"
        ) from exc
    if not callable(target):
        raise StoreConfigurationError(f"store {url!r}: entry point {entry.value} is not a Store class or factory")
    with _lock:
        return _registered.setdefault(scheme, target)


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or repr(target)
