"""Weight stores: bytes in, bytes out, under one experiment prefix.

``open_store(url)`` picks the backend from the URL's scheme through a registry
(see :mod:`~flwr_serverless.stores.registry`): plain paths and ``file://`` ->
:class:`LocalStore`, ``memory://`` -> :class:`MemoryStore`, ``s3://`` ->
:class:`S3Store` (boto3; :class:`S3FsStore` with ``backend="fsspec"`` or without
boto3), a scheme registered with :func:`register_store` or by a package's entry
point -> its class, any other fsspec protocol -> :class:`FsspecStore`.
boto3 and s3fs are imported only when an S3 store is actually opened.
"""

from __future__ import annotations

from flwr_serverless.stores.base import ObjectInfo, Store, StoreStats
from flwr_serverless.stores.fsspec_store import FsspecStore
from flwr_serverless.stores.legacy import InMemoryFolder, LocalFolder, S3Folder
from flwr_serverless.stores.local import LocalStore
from flwr_serverless.stores.memory import MemoryStore
from flwr_serverless.stores.registry import open_store, register_store, registered_schemes, unregister_store
from flwr_serverless.stores.retry import RetryPolicy, as_policy, with_retries
from flwr_serverless.stores.s3_store import S3Store
from flwr_serverless.stores.s3fs_store import S3FsStore

__all__ = [
    "FsspecStore",
    "InMemoryFolder",
    "LocalFolder",
    "LocalStore",
    "MemoryStore",
    "ObjectInfo",
    "RetryPolicy",
    "S3Folder",
    "S3FsStore",
    "S3Store",
    "Store",
    "StoreStats",
    "as_policy",
    "open_store",
    "register_store",
    "registered_schemes",
    "unregister_store",
    "with_retries",
]
