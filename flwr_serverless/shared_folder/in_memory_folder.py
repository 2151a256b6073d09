"""0.2's ``InMemoryFolder``: a private ``memory://`` store, dict-like over bytes."""

from flwr_serverless.stores.legacy import InMemoryFolder

__all__ = ["InMemoryFolder"]
