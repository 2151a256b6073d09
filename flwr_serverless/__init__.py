"""flwr-serverless: federated learning without a server, through a shared weight store.

Importing this package never imports TensorFlow or torch; the framework
callbacks live in ``flwr_serverless.callbacks.keras`` and ``...lightning``.
"""

from __future__ import annotations

from flwr_serverless.codec import UpdateHeader, decode, encode
from flwr_serverless.errors import (
    DuplicateNodeIdError,
    FlwrServerlessError,
    InvalidObjectError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreConfigurationError,
    StoreError,
    SyncTimeoutError,
)
from flwr_serverless.node import (
    AggregateFederatedNode,
    AsyncFederatedNode,
    FederatedNode,
    Federating,
    SemiSyncFederatedNode,
    SyncFederatedNode,
)
from flwr_serverless.stores import (
    FsspecStore,
    InMemoryFolder,
    LocalFolder,
    S3Folder,
    S3Store,
    Store,
    open_store,
)
from flwr_serverless.strategies import make_strategy

__version__ = "0.2.0"

__all__ = [
    "AggregateFederatedNode",
    "AsyncFederatedNode",
    "DuplicateNodeIdError",
    "FederatedNode",
    "Federating",
    "FlwrServerlessError",
    "FsspecStore",
    "InMemoryFolder",
    "InvalidObjectError",
    "LocalFolder",
    "ObjectNotFoundError",
    "PreconditionFailedError",
    "S3Folder",
    "S3Store",
    "SemiSyncFederatedNode",
    "Store",
    "StoreConfigurationError",
    "StoreError",
    "SyncFederatedNode",
    "SyncTimeoutError",
    "UpdateHeader",
    "decode",
    "encode",
    "make_strategy",
    "open_store",
]
