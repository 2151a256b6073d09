"""``from flwr_serverless.lightning import FlwrFederatedCallback`` (imports torch and Lightning)."""

from flwr_serverless.callbacks.lightning import FlwrFederatedCallback, make_callback_class

__all__ = ["FlwrFederatedCallback", "make_callback_class"]
