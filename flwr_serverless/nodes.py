"""The 0.2.0 module of the nodes, and the nodes the package exports: the real nodes of ``flwr_serverless.node``
with 0.2's spellings translated.

The core nodes take a ``store`` and ``update_parameters(parameters, num_examples, metrics, epoch)``.
These subclasses also accept what scripts written for 0.2 pass:

* ``shared_folder=``: flwr-serverless 0.2.10's name for the store (its README's snippet passes it
  to ``flwr_serverless.AsyncFederatedNode``);
* this project's 0.2.0 order ``update_parameters(parameters, num_examples, epoch, metrics)``: an
  integer in the ``metrics`` place is the epoch.

0.2.10's own node classes (``ignore_seen_models``, ``upload_only``, its metrics) are in
``flwr_serverless.federated_node``, built on these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common import Parameters
from flwr.server.strategy import Strategy

from flwr_serverless.node import AggregateFederatedNode as _Aggregate
from flwr_serverless.node import AsyncFederatedNode as _Async
from flwr_serverless.node import FederatedNode
from flwr_serverless.node import SemiSyncFederatedNode as _SemiSync
from flwr_serverless.node import SyncFederatedNode as _Sync
from flwr_serverless.node.exchange import NodeStats
from flwr_serverless.stores import Store
from flwr_serverless.stores.legacy import SharedFolder
from flwr_serverless.wire.layout import MEMBERS as MEMBERS_PREFIX
from flwr_serverless.wire.layout import NODES as NODES_PREFIX
from flwr_serverless.wire.layout import ROUNDS as ROUNDS_PREFIX

if TYPE_CHECKING:
    _NodeBase = FederatedNode
else:
    _NodeBase = object


def split_metrics_epoch(metrics: Any, epoch: Any) -> tuple[Any, Any]:
    """0.2.0's order ``(parameters, num_examples, epoch, metrics)``: an integer where the metrics go is the epoch."""
    if isinstance(metrics, (int, np.integer)) and not isinstance(metrics, bool):
        return (epoch if isinstance(epoch, Mapping) else None), metrics
    return metrics, epoch


#: The run of every node built the 0.2 way (``shared_folder=`` or a 0.2 folder class): one run per folder.
LEGACY_RUN = "flwr-serverless-0.2"


class Accepts02Arguments(_NodeBase):
    """Mixin before a core node: translates ``shared_folder=`` and 0.2.0's argument order, then calls the node."""

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | str | None = None,
        *,
        shared_folder: Store | str | None = None,
        **options: Any,
    ) -> None:
        if store is None and shared_folder is None:
            raise TypeError("a store (or shared_folder) is required: a Store or a URL such as s3://bucket/prefix")
        folder = store if store is not None else shared_folder
        if shared_folder is not None or isinstance(folder, SharedFolder):
            # 0.2 had no runs: everything in the folder counts, so 0.2 scripts started one after another
            # still pull the earlier ones' weights. A run_id given explicitly still names a run.
            options.setdefault("run_id", LEGACY_RUN)
        super().__init__(folder, strategy, **options)

    def update_parameters(
        self,
        parameters: Parameters | Sequence[np.ndarray],
        num_examples: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        *,
        num_steps: int | None = None,
        tensor_names: Sequence[str] | None = None,
        framework: str | None = None,
    ) -> tuple[Any, dict[str, float]]:
        metrics, epoch = split_metrics_epoch(metrics, epoch)
        return super().update_parameters(
            parameters,
            num_examples,
            metrics,
            epoch,
            num_steps=num_steps,
            tensor_names=tensor_names,
            framework=framework,
        )

    update_parameters.__doc__ = FederatedNode.update_parameters.__doc__


class AsyncFederatedNode(Accepts02Arguments, _Async):
    __doc__ = _Async.__doc__


class SyncFederatedNode(Accepts02Arguments, _Sync):
    __doc__ = _Sync.__doc__


class SemiSyncFederatedNode(Accepts02Arguments, _SemiSync):
    __doc__ = _SemiSync.__doc__


class AggregateFederatedNode(Accepts02Arguments, _Aggregate):
    __doc__ = _Aggregate.__doc__


__all__ = [
    "MEMBERS_PREFIX",
    "NODES_PREFIX",
    "ROUNDS_PREFIX",
    "AggregateFederatedNode",
    "AsyncFederatedNode",
    "FederatedNode",
    "NodeStats",
    "SemiSyncFederatedNode",
    "SyncFederatedNode",
]
