"""Exceptions raised by flwr-serverless; each names the object key or node involved."""

from __future__ import annotations


class FlwrServerlessError(Exception):
    """Base class of every error this library raises on purpose."""


class StoreError(FlwrServerlessError):
    """A store operation failed (after any retries)."""

    def __init__(self, operation: str, key: str, reason: str) -> None:
        self.operation = operation
        self.key = key
        self.reason = reason
        super().__init__(f"store {operation} of {key!r} failed: {reason}")


class ObjectNotFoundError(StoreError, KeyError):
    """The key does not exist in the store."""

    def __init__(self, key: str) -> None:
        super().__init__("get", key, "no such object")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class PreconditionFailedError(StoreError):
    """A create-only or compare-and-swap write lost the race (HTTP 412)."""

    def __init__(self, operation: str, key: str) -> None:
        super().__init__(operation, key, "precondition failed: the object changed or exists")


class ConditionalWritesUnsupportedError(StoreError):
    """The backend cannot do create-only / compare-and-swap writes."""


class StoreConfigurationError(FlwrServerlessError):
    """The store cannot be used as configured (missing bucket, credentials, unknown scheme...)."""


class InvalidObjectError(FlwrServerlessError):
    """An object in the store is corrupted, truncated, foreign or does not match the local model."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"rejected object {key!r}: {reason}")


class KeyframeRequiredError(InvalidObjectError):
    """A top-k delta applies to a state of its writer the reader does not hold: catch up, then decode again.

    ``ref`` (a ``header.KeyframeRef``: seq and payload hash) names the delta's keyframe
    and ``chain`` its position: the reader needs the writer's state at ``chain - 1``.
    """

    def __init__(self, key: str, ref: object, chain: int = 0) -> None:
        self.ref = ref
        self.chain = chain
        seq = getattr(ref, "seq", "?")
        super().__init__(
            key,
            f"a top-k delta (position {chain} after keyframe seq {seq}) on a state the reader "
            "does not hold (fetch the keyframe and logged deltas, then decode again)",
        )


class SyncTimeoutError(FlwrServerlessError, TimeoutError):
    """A synchronous round did not gather enough nodes before its timeout."""

    def __init__(self, round_number: int, timeout: float, present: list[str], missing: list[str]) -> None:
        self.round_number = round_number
        self.present = present
        self.missing = missing
        super().__init__(
            f"sync round {round_number}: timed out after {timeout:.1f}s; "
            f"missing nodes: {', '.join(missing) or '?'}; present: {', '.join(present) or 'none'}"
        )


class DuplicateNodeIdError(FlwrServerlessError):
    """Another live node already uses this node id in the experiment."""


class IncompatiblePeersError(FlwrServerlessError):
    """A sync node found peers in several rounds in a row, but none whose tensors match its model."""

    def __init__(self, node_id: str, rounds: int, reasons: dict[str, str]) -> None:
        self.node_id = node_id
        self.reasons = reasons
        detail = "; ".join(f"{key}: {reason}" for key, reason in sorted(reasons.items())) or "?"
        super().__init__(
            f"node {node_id}: {rounds} rounds in a row without a compatible peer (it would train alone "
            f"without saying so). Check that every node builds the same model. Last reasons: {detail}"
        )
