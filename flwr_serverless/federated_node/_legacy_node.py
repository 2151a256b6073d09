"""What both 0.2 node aliases add to the real nodes: 0.2's call signature, attributes and metrics."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr_serverless.federated_node._peer_view import PeerView, seen_label
from flwr_serverless.stores import Store, open_store

if TYPE_CHECKING:
    from flwr_serverless.nodes import FederatedNode

    _NodeBase = FederatedNode
else:
    _NodeBase = object


def open_view(
    shared_folder: Store | str | None, store: Store | str | None, storage_options: Mapping[str, Any] | None, owner: Any
) -> tuple[Store, PeerView]:
    """Open the user's folder (0.2's ``shared_folder`` or the new ``store``) and the node's view on it."""
    if shared_folder is not None and store is not None:
        raise TypeError("pass the folder once: shared_folder= (0.2's name) or store=, not both")
    target = shared_folder if shared_folder is not None else store
    if target is None:
        raise TypeError("a shared_folder is required: a folder/Store or a URL such as s3://bucket/prefix")
    folder = open_store(target, **dict(storage_options or {}))
    return folder, PeerView(folder, lambda: owner.node_id)


class LegacyNode(_NodeBase):
    """Mixin for the 0.2 aliases; the concrete class sets ``_view`` and ``model_store`` before the real node."""

    #: 0.2's sync node always aggregated (itself at least), so it always reported counts.
    _reports_counts_alone = False

    model_store: Store  # the user's folder (0.2's attribute)
    counter: int  # federations that aggregated (0.2's attribute)
    seen_models: set[str]  # peer objects this node has pulled, as "<node_id>_<tag>"
    _view: PeerView

    def _init_legacy(self, folder: Store, view: PeerView) -> None:
        self.model_store = folder
        self.counter = 0
        self.seen_models = set()
        self._view = view
        self._legacy_lock = threading.Lock()

    def update_parameters(  # type: ignore[override]
        self,
        local_parameters: Any,
        num_examples: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        upload_only: bool = False,
        **options: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """0.2's order ``(weights, num_examples, metrics, epoch)``; ``upload_only`` publishes without aggregating.

        Other keywords (``num_steps``...) go to the real node. The metrics of a federation
        with peers carry 0.2's ``num_examples`` (all participants) and ``num_nodes``.
        """
        with self._legacy_lock:
            used_before = self.stats.peers_used
            rejected_before = dict(self.stats.rejections)
            self._view.begin(publish_only=bool(upload_only))
            try:
                weights, aggregated = super().update_parameters(
                    local_parameters, num_examples=num_examples, metrics=metrics, epoch=epoch, **options
                )
            finally:
                self._view.publish_only = False
            used = self.stats.peers_used - used_before
            return weights, self._legacy_metrics(aggregated, used, num_examples, rejected_before, bool(upload_only))

    def _legacy_metrics(
        self,
        aggregated: Mapping[str, Any] | None,
        used: int,
        own_examples: int | None,
        rejected_before: Mapping[str, str],
        upload_only: bool,
    ) -> dict[str, Any]:
        """Add 0.2's ``num_examples``/``num_nodes``; count the federation and the peer objects seen."""
        metrics = dict(aggregated or {})
        for key, reason in self.stats.rejections.items():
            if rejected_before.get(key) != reason:  # rejected during this call: the node will skip that object
                self._view.forget(key.rsplit("/", 1)[-1])
        peers = self._view.participants()
        self.seen_models.update(seen_label(peer, tag) for peer, (tag, _) in peers.items())
        if upload_only or (used == 0 and not self._reports_counts_alone):
            return metrics  # nothing was aggregated: 0.2 returned the local metrics as they were
        self.counter += 1
        own = int(own_examples) if own_examples is not None else 1
        if len(peers) == used:
            metrics.setdefault("num_examples", own + sum(count for _, count in peers.values()))
        metrics.setdefault("num_nodes", 1 + used)
        return metrics
