"""0.2's module path of the Keras callback: the class is ``flwr_serverless.callbacks.keras.FlwrFederatedCallback``."""

from flwr_serverless.callbacks.keras import FlwrFederatedCallback

__all__ = ["FlwrFederatedCallback"]
