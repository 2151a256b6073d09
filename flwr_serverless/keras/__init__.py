"""``from flwr_serverless.keras import FlwrFederatedCallback``, as in flwr-serverless 0.2 and its paper.

A package, as in 0.2: ``flwr_serverless.keras.federated_learning_callback`` and
``flwr_serverless.keras.example`` are its submodules. Importing it imports Keras.
"""

from flwr_serverless.callbacks.keras import FlwrFederatedCallback

__all__ = ["FlwrFederatedCallback"]
