"""One deadline per federation call, handed explicitly to every store call and worker thread."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flwr_serverless.stores.retry import retry_deadline

Clock = Callable[[], float]


@dataclass(frozen=True)
class Deadline:
    """A point on ``clock`` (``time.monotonic`` by default) by which a call must be over; ``at=None``: no bound."""

    at: float | None = None
    clock: Clock = time.monotonic

    @classmethod
    def after(cls, seconds: float | None, clock: Clock = time.monotonic) -> Deadline:
        return cls(None if seconds is None else clock() + float(seconds), clock)

    def remaining(self) -> float:
        return math.inf if self.at is None else max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.at is not None and self.clock() >= self.at

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Cap the store's retries in this thread at the deadline (store retries read a thread-local)."""
        with retry_deadline(self.at, self.clock):  # binds the retries whose policy runs on the same clock
            yield


NO_DEADLINE = Deadline()
