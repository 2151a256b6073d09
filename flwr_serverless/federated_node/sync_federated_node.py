"""0.2's ``SyncFederatedNode``: the real sync node (a bounded barrier per round) with 0.2's arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from flwr_serverless.federated_node._legacy_node import LegacyNode, open_view
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.nodes import SyncFederatedNode as _SyncFederatedNode
from flwr_serverless.stores import Store
from flwr_serverless.strategy.aggregate import Contribution
from flwr_serverless.wire.codec import UpdateHeader

__all__ = ["SyncFederatedNode"]


class SyncFederatedNode(LegacyNode, _SyncFederatedNode):
    """``SyncFederatedNode(shared_folder, strategy, num_nodes, **options)``; ``num_nodes`` is required, as in 0.2.

    Unlike 0.2 the barrier is bounded: after ``timeout`` seconds (default 300) the round
    raises ``SyncTimeoutError`` naming the missing nodes, or continues with ``min_nodes``.
    """

    _reports_counts_alone = True

    def __init__(
        self,
        shared_folder: Store | str | None = None,
        strategy: Strategy | None = None,
        num_nodes: int | None = None,
        timeout: float = 300.0,
        min_nodes: int | None = None,
        node_id: str | None = None,
        *,
        store: Store | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if num_nodes is None:
            raise TypeError("SyncFederatedNode needs num_nodes: how many nodes each round waits for")
        folder, view = open_view(shared_folder, store, storage_options, self)
        self._init_legacy(folder, view)
        super().__init__(
            view, strategy, num_nodes=num_nodes, timeout=timeout, min_nodes=min_nodes, node_id=node_id, **options
        )
        self._upload_only = False  # this call publishes the round's object, neither waits nor aggregates

    def update_parameters(  # type: ignore[override]
        self,
        local_parameters: Any,
        num_examples: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        upload_only: bool = False,
        **options: Any,
    ) -> tuple[Any, dict[str, Any]] | None:
        """As the async alias; ``upload_only=True`` publishes this round's object, does not wait, returns None.

        The node still joins the experiment's current round first; its peers count the
        object in that round as usual.
        """
        if not upload_only:
            return super().update_parameters(local_parameters, num_examples, metrics, epoch, **options)
        self._upload_only = True
        try:
            super().update_parameters(local_parameters, num_examples, metrics, epoch, upload_only=True, **options)
        finally:
            self._upload_only = False
        return None

    def _federate(
        self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """``upload_only``: the real node's publish for the round (joining it first), then on to the next."""
        if not self._upload_only:
            return super()._federate(arrays, header, deadline)
        self._publish_round(arrays, header, deadline)
        self.round += 1
        return arrays, self._metrics([Contribution(self.node_id, arrays, 1.0, header.num_examples, header.metrics)])
