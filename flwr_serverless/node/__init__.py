"""Federated nodes: an ``Exchange`` (all I/O) composed with a mode's pure decisions.

Follow a federation from a callback to the store: the callback calls
``update_parameters`` (``Federating`` protocol); the node claims its member
record, encodes its weights (``codec``), and its mode decides what to read and
how to weigh it (``modes``); the ``Exchange`` does every store call under the
call's deadline; ``strategy.aggregate`` does the math.

These are the core signatures. 0.2's spellings (``shared_folder=``, 0.2.0's
argument order) are translated by ``flwr_serverless.nodes``, whose subclasses
the package exports; 0.2.10's classes are in ``flwr_serverless.federated_node``.
"""

from flwr_serverless.node.aggregate_node import AggregateFederatedNode
from flwr_serverless.node.async_node import AsyncFederatedNode
from flwr_serverless.node.base import FederatedNode
from flwr_serverless.node.exchange import NodeStats
from flwr_serverless.node.protocol import Federating
from flwr_serverless.node.semisync_node import SemiSyncFederatedNode
from flwr_serverless.node.sync_node import SyncFederatedNode

__all__ = [
    "AggregateFederatedNode",
    "AsyncFederatedNode",
    "FederatedNode",
    "Federating",
    "NodeStats",
    "SemiSyncFederatedNode",
    "SyncFederatedNode",
]
