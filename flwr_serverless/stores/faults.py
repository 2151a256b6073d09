"""A store wrapper that misbehaves on purpose, so every fault path has a test.

``FaultyStore(inner, ...)`` forwards to ``inner`` and, according to its
settings, fails the n-th calls or a random fraction of them with the kind of
error a real backend raises (connection reset/refused, timeout, S3 503
SlowDown, 500, 403...), returns truncated bytes from GETs, adds latency, or is
entirely "down" for a while. ``failing_requests`` goes one level down, into an S3
store's individual API requests (the 2nd ``upload_part`` of a multipart upload...).
Injected errors are shaped like a backend's: a ``StoreError`` whose cause is the low-level exception, so the retry logic
classifies them exactly as it would classify real ones.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from flwr_serverless.errors import StoreError
from flwr_serverless.stores.base import ObjectInfo, Store

T = TypeVar("T")
OPERATIONS = ("put", "get", "list", "delete", "put_conditional")


class InjectedServiceError(Exception):
    """Looks like a botocore ClientError (has ``.response``) without needing botocore."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"injected {code} (HTTP {status})")
        self.response = {"Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": status}}


def _low_level(kind: str) -> BaseException:
    factories: dict[str, Callable[[], BaseException]] = {
        "reset": lambda: ConnectionResetError(104, "injected: connection reset by peer"),
        "refused": lambda: ConnectionRefusedError(111, "injected: connection refused"),
        "timeout": lambda: TimeoutError("injected: read timed out"),
        "slowdown": lambda: InjectedServiceError("SlowDown", 503),
        "internal": lambda: InjectedServiceError("InternalError", 500),
        "forbidden": lambda: InjectedServiceError("AccessDenied", 403),
    }
    if kind not in factories:
        raise ValueError(f"unknown fault kind {kind!r}; use one of {', '.join(sorted(factories))}")
    return factories[kind]()


class FaultyStore(Store):
    """Forward to ``inner``, injecting faults. All counters are thread-safe.

    ``fail_calls``: 1-based numbers of the (affected) calls that fail; ``fail_first``: fail calls 1..n;
    ``fail_rate``: fraction of calls that fail at random (seeded); ``kind``: which error;
    ``operations``: which primitives are affected; ``truncate_rate``: fraction of GETs cut short;
    ``latency``: seconds added to every call; ``down``: fail everything while True.
    """

    def __init__(
        self,
        inner: Store,
        *,
        fail_calls: Collection[int] = (),
        fail_first: int = 0,
        fail_rate: float = 0.0,
        kind: str = "reset",
        operations: Collection[str] = OPERATIONS,
        truncate_rate: float = 0.0,
        latency: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(operations) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown operation(s) {sorted(unknown)}; use {', '.join(OPERATIONS)}")
        _low_level(kind)  # validate early
        self.inner = inner
        self.fail_calls = set(fail_calls) | set(range(1, fail_first + 1))
        self.fail_rate = fail_rate
        self.kind = kind
        self.operations = set(operations)
        self.truncate_rate = truncate_rate
        self.latency = latency
        self.down = False
        self.supports_conditional_writes = inner.supports_conditional_writes
        self.calls = 0  # affected calls seen (numbering used by fail_calls)
        self.injected = 0  # errors injected
        self.truncated = 0  # GETs returned short
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Everything fails with ``kind`` inside the block (a store that went away)."""
        self.down = True
        try:
            yield
        finally:
            self.down = False

    def _maybe_fail(self, operation: str, key: str) -> None:
        if self.latency:
            time.sleep(self.latency)
        if operation not in self.operations:
            return
        with self._lock:
            self.calls += 1
            rolled = bool(self.fail_rate) and self._rng.random() < self.fail_rate
            fail = self.down or self.calls in self.fail_calls or rolled
            if fail:
                self.injected += 1
        if fail:
            cause = _low_level(self.kind)
            raise StoreError(operation, key, f"{type(cause).__name__}: {cause}") from cause

    def _call(self, operation: str, key: str, call: Callable[[], T]) -> T:
        self._maybe_fail(operation, key)
        return call()

    # -- primitives ------------------------------------------------------------
    def _put(self, key: str, data: bytes) -> str:
        return self._call("put", key, lambda: self.inner.put(key, data))

    def _get(self, key: str) -> bytes:
        data = self._call("get", key, lambda: self.inner.get(key))
        with self._lock:
            cut = bool(self.truncate_rate) and len(data) > 1 and self._rng.random() < self.truncate_rate
            if cut:
                self.truncated += 1
                return data[: self._rng.randrange(0, len(data))]
        return data

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def _delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        if if_match is None:
            return self._call("put_conditional", key, lambda: self.inner.put_if_absent(key, data))
        return self._call("put_conditional", key, lambda: self.inner.put_if_match(key, data, if_match))

    def now(self) -> float | None:
        return self.inner.now()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # e.g. ``.url``, ``.client`` of the wrapped store
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@contextmanager
def failing_requests(store: Any, method: str, calls: Collection[int], kind: str = "reset") -> Iterator[list[int]]:
    """Inside the block, the ``calls``-th (1-based) S3 API requests named ``method`` of an S3 store fail with
    ``kind``; yields a one-item list counting the requests of that name seen so far (thread-safe)."""
    _low_level(kind)  # validate early
    original = store._call
    seen = [0]
    lock = threading.Lock()

    def call(name: str, **params: Any) -> Any:
        if name == method:
            with lock:
                seen[0] += 1
                number = seen[0]
            if number in calls:
                raise _low_level(kind)
        return original(name, **params)

    store._call = call
    try:
        yield seen
    finally:
        del store._call  # the class's own method again
