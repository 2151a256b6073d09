"""Run calls in threads and surface what went wrong: the one helper for the tests' concurrent scenarios.

Every wait is bounded: a call still running after ``timeout`` fails the test as hung instead of hanging it.
An error raised in a thread is re-raised in the test (with the others listed), never lost in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

TIMEOUT = 120.0


class Background:
    """One call running in a daemon thread; ``result()`` joins it (bounded) and returns or raises what it did."""

    def __init__(self, call: Callable[[], Any], name: str | None = None) -> None:
        self.name = name or getattr(call, "__name__", "call")
        self._call = call
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"test-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self._call()
        except BaseException as exc:  # re-raised by result()
            self.error = exc

    def join(self, timeout: float = TIMEOUT) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout:g}s: it hung")

    def result(self, timeout: float = TIMEOUT) -> Any:
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.value


def in_background(call: Callable[[], Any], name: str | None = None) -> Background:
    """Start ``call`` in a thread now; collect it with ``.result()``."""
    return Background(call, name)


def outcomes(*calls: Callable[[], Any], timeout: float = TIMEOUT) -> list[Any]:
    """Run every call at once, each in its thread; each one's return value, or the exception it raised."""
    jobs = [in_background(call, f"call-{i}") for i, call in enumerate(calls)]
    for job in jobs:
        job.join(timeout)
    return [job.error if job.error is not None else job.value for job in jobs]


def run_in_threads(*calls: Callable[[], Any], timeout: float = TIMEOUT) -> list[Any]:
    """Run every call at once, each in its thread; their return values in order, or the first error re-raised
    (the message lists every error)."""
    jobs = [in_background(call, f"call-{i}") for i, call in enumerate(calls)]
    for job in jobs:
        job.join(timeout)
    errors = [job.error for job in jobs if job.error is not None]
    if errors:
        raise AssertionError(f"{len(errors)} of {len(jobs)} threads failed: {errors!r}") from errors[0]
    return [job.value for job in jobs]
