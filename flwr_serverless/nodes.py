"""The 0.2.0 module of the nodes; they now live in ``flwr_serverless.node``."""

from flwr_serverless.node import AsyncFederatedNode, FederatedNode, SemiSyncFederatedNode, SyncFederatedNode
from flwr_serverless.node.exchange import NodeStats
from flwr_serverless.wire.layout import MEMBERS as MEMBERS_PREFIX
from flwr_serverless.wire.layout import NODES as NODES_PREFIX
from flwr_serverless.wire.layout import ROUNDS as ROUNDS_PREFIX

__all__ = [
    "MEMBERS_PREFIX",
    "NODES_PREFIX",
    "ROUNDS_PREFIX",
    "AsyncFederatedNode",
    "FederatedNode",
    "NodeStats",
    "SemiSyncFederatedNode",
    "SyncFederatedNode",
]
