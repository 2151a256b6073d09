"""``from flwr_serverless.keras import FlwrFederatedCallback``, as in the flwr-serverless paper."""

from flwr_serverless.callbacks.keras import FlwrFederatedCallback

__all__ = ["FlwrFederatedCallback"]
