"""``from flwr_serverless.transformers import FlwrFederatedCallback`` (imports torch and transformers)."""

from flwr_serverless.callbacks.transformers import FlwrFederatedCallback

__all__ = ["FlwrFederatedCallback"]
