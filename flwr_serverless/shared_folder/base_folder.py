"""``SharedFolder``: the dict-like folder interface of flwr-serverless 0.2 (a mixin over any Store)."""

from flwr_serverless.stores.legacy import NotBytesError, SharedFolder

__all__ = ["NotBytesError", "SharedFolder"]
