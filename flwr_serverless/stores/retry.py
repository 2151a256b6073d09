"""Bounded retries for transient store faults.

A store shared by many jobs over the internet sees dropped connections, 503
SlowDown and brief outages. Those are worth another try; a missing object, a
denied request or a lost compare-and-swap is not, and retrying it would only
hide the real answer. Every retry loop here is bounded twice: by a number of
attempts and by a total time budget, with exponential backoff and full jitter
so that many nodes hitting the same outage do not come back in lockstep.

Every ``Store`` retries through this module (see ``Store.retry_policy``);
``open_store(url, retry=...)`` and ``with_retries(store, policy)`` set the policy.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from flwr_serverless.errors import StoreError
from flwr_serverless.stores.backend_errors import (  # re-exported: callers import them from here
    TRANSIENT_CODES,
    TRANSIENT_NAMES,
    TRANSIENT_STATUS,
    is_transient,
)
from flwr_serverless.validation import check_number, check_positive_int

if TYPE_CHECKING:
    from flwr_serverless.stores.base import Store

T = TypeVar("T")
__all__ = [
    "DEFAULT_POLICY",
    "NO_RETRIES",
    "TRANSIENT_CODES",
    "TRANSIENT_NAMES",
    "TRANSIENT_STATUS",
    "RetryPolicy",
    "as_policy",
    "call_with_retries",
    "is_transient",
    "retry_deadline",
    "with_retries",
]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: at most ``attempts`` calls and ``max_time`` seconds per operation.

    The sleep before retry n is uniform in [0, min(max_delay, base_delay * 2**n)]
    ("full jitter"), clipped so the whole operation ends within ``max_time``
    plus the duration of one last attempt.
    """

    attempts: int = 5
    max_time: float = 30.0
    base_delay: float = 0.2
    max_delay: float = 5.0
    #: the time the bound is measured on and the backoff's sleep: a test injects a fake pair, so the bound
    #: is checked without waiting (never compared or printed)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_positive_int("retry attempts", self.attempts)
        for name in ("max_time", "base_delay", "max_delay"):
            check_number(f"retry {name}", getattr(self, name), 0.0)


DEFAULT_POLICY = RetryPolicy()
NO_RETRIES = RetryPolicy(attempts=1, max_time=0.0)

_local = threading.local()


@contextmanager
def retry_deadline(deadline: float | None, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Cap retries in this thread at ``deadline``, a point on ``clock``.

    A sync node waiting for a barrier uses it so that one store call cannot
    retry past the node's own timeout. The cap binds the retries whose policy
    measures time on the same clock (a deadline on another clock means nothing to them).
    """
    previous: tuple[float, Callable[[], float]] | None = getattr(_local, "deadline", None)
    current = previous
    if deadline is not None:
        if previous is not None and previous[1] == clock:
            deadline = min(deadline, previous[0])
        current = (deadline, clock)
    _local.deadline = current
    try:
        yield
    finally:
        _local.deadline = previous


def backoff_delay(policy: RetryPolicy, retry_number: int) -> float:
    """Full-jitter sleep before retry ``retry_number`` (1-based)."""
    cap = min(policy.max_delay, policy.base_delay * 2.0 ** min(retry_number - 1, 64))  # 2**1024 overflows
    return random.uniform(0.0, cap)


def call_with_retries(
    policy: RetryPolicy,
    operation: str,
    key: str,
    call: Callable[[], T],
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``call``; retry transient failures within the policy, then raise one StoreError naming op and key."""
    start = policy.clock()
    deadline = start + policy.max_time
    thread_deadline = getattr(_local, "deadline", None)
    if thread_deadline is not None and thread_deadline[1] == policy.clock:  # == : bound methods are remade
        deadline = min(deadline, thread_deadline[0])
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = policy.clock()
            if attempt >= policy.attempts or now >= deadline - 1e-9:  # a sleep of less never moves a clock
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                raise StoreError(
                    operation,
                    key,
                    f"gave up after {attempt} attempt(s) in {now - start:.1f}s (transient fault): {reason}",
                ) from exc
            if on_retry is not None:
                on_retry(exc)
            policy.sleep(min(backoff_delay(policy, attempt), max(0.0, deadline - now)))


def with_retries(store: Store, policy: RetryPolicy | bool | dict[str, Any] | None = None) -> Store:
    """Give a store handle (for example one built directly, not by ``open_store``) a retry policy.

    The policy replaces the store's own, so retries never multiply. ``stats``
    keeps counting requests that succeeded; ``stats.retries`` counts the failed
    attempts that were retried.
    """
    store.retry_policy = as_policy(policy)
    return store


def as_policy(value: Any) -> RetryPolicy:
    """``True``/``None`` -> default policy, ``False`` -> no retries, a dict -> RetryPolicy(**dict)."""
    if value is None or value is True:
        return DEFAULT_POLICY
    if value is False:
        return NO_RETRIES
    if isinstance(value, RetryPolicy):
        return value
    if isinstance(value, dict):
        return RetryPolicy(**value)
    if isinstance(value, int):
        return RetryPolicy(attempts=value)
    raise TypeError(f"retry must be True, False, a RetryPolicy or a dict of its fields, not {value!r}")
