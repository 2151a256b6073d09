"""flwr-serverless: federated learning without a server, through a shared weight store.

Importing this package never imports TensorFlow, torch or transformers; the framework
callbacks live in ``flwr_serverless.keras``, ``...lightning`` and ``...transformers``, the
plain PyTorch helper in ``flwr_serverless.torch``.
"""

from __future__ import annotations

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
from flwr_serverless.shared_folder.s3_folder import S3FolderWithPickle
from flwr_serverless.stores import (
    FsspecStore,
    InMemoryFolder,
    LocalFolder,
    LocalStore,
    MemoryStore,
    S3Folder,
    S3Store,
    Store,
    open_store,
    register_store,
)
from flwr_serverless.stores.legacy import SharedFolder
from flwr_serverless.strategy.factory import make_strategy
from flwr_serverless.wire.codec import UpdateHeader, decode, encode

__version__ = "0.3.0"

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
    "LocalStore",
    "MemoryStore",
    "ObjectNotFoundError",
    "PreconditionFailedError",
    "S3Folder",
    "S3FolderWithPickle",
    "S3Store",
    "SemiSyncFederatedNode",
    "SharedFolder",
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
    "register_store",
]
