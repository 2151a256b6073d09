"""0.2's ``AsyncFederatedNode``: the real async node (FedAvgAsync, never waits) with 0.2's arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.server.strategy import Strategy

from flwr_serverless.federated_node._legacy_node import LegacyNode, open_view
from flwr_serverless.nodes import AsyncFederatedNode as _AsyncFederatedNode
from flwr_serverless.stores import Store

__all__ = ["AsyncFederatedNode"]


class AsyncFederatedNode(LegacyNode, _AsyncFederatedNode):  # type: ignore[misc]  # 0.2.10 adds upload_only
    """``AsyncFederatedNode(shared_folder, strategy, ignore_seen_models=False, node_id=None, **options)``.

    ``ignore_seen_models=True`` aggregates each peer object once: a peer that has not
    published since this node last pulled it is left out (0.2's behaviour). Every other
    keyword (``staleness``, ``secret``...) is the real node's.
    """

    def __init__(
        self,
        shared_folder: Store | str | None = None,
        strategy: Strategy | None = None,
        ignore_seen_models: bool = False,
        node_id: str | None = None,
        *,
        store: Store | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        folder, view = open_view(shared_folder, store, storage_options, self)
        self._init_legacy(folder, view)
        super().__init__(view, strategy, node_id=node_id, **options)
        self.ignore_seen_models = bool(ignore_seen_models)
        if self.ignore_seen_models:
            view.hide_seen = self.seen_models
