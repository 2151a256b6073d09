"""FedAvgAsync and its staleness-aware variants: publish, pull every current peer's latest weights, never wait."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from flwr_serverless.errors import InvalidObjectError, StoreError
from flwr_serverless.modes.asynchronous import AsyncMode, PeerTracker
from flwr_serverless.modes.staleness import AsyncPolicy, StalenessFunction
from flwr_serverless.node.base import FederatedNode
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.node.membership import ended_before
from flwr_serverless.stores import Store
from flwr_serverless.validation import check_positive
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader

logger = logging.getLogger("flwr_serverless")


class AsyncFederatedNode(FederatedNode):
    """FedAvgAsync: publish, pull every peer's latest weights, aggregate; never wait.

    A LIST of ``nodes/`` gives each peer's tag; only peers whose tag changed are
    downloaded again, the rest come from a cache. An epoch therefore costs one
    PUT, one LIST and one GET per changed peer. Objects of nodes that left or
    died before this node joined (an earlier run in the same prefix) are skipped
    until their node publishes again.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | str | None = None,
        *,
        staleness: str | StalenessFunction | None = None,
        staleness_unit: str = "steps",
        alpha: float | None = None,
        buffer_size: int | None = None,
        participation: float = 1.0,
        seed: int | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(store, strategy, **options)
        self.timeout = check_positive("timeout", timeout, unit="seconds", none=True)
        # Staleness weighting, FedAsync mixing, FedBuff and client sampling (all off by default).
        self.policy = AsyncPolicy(staleness, staleness_unit, alpha, buffer_size, participation, seed)
        self.mode = AsyncMode(self.policy)
        self.peers = PeerTracker(self.node_id)
        self._leftovers_checked = False

    def _deadline(self) -> Deadline:
        return Deadline.after(self.timeout, self.clock)

    def _participates(self) -> bool:
        return self.mode.participates()

    def _federate(
        self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        # The upload and the pull are independent: encoding and the PUT(s) run beside the LIST and the GETs.
        with ThreadPoolExecutor(max_workers=1) as uploader:
            upload = uploader.submit(self._upload, arrays, header, deadline)
            try:
                updates = self._pull(deadline)
                upload.result()
            except StoreError as exc:
                upload.cancel()
                return self._keep_local(arrays, header, exc)
        decision = self.mode.decide(header, arrays, updates)
        if decision is None:  # FedBuff: not enough new peer updates yet, keep training locally
            return arrays, self._metrics([self.mode.contribution(header, arrays)])
        headers = [header, *(u.header for u in updates)]
        result, metrics = self._aggregate(decision.own, decision.peers, headers)
        return self.mode.after_aggregation(arrays, result, decision, updates), metrics

    def _upload(self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline) -> str:
        data = self._encode(arrays, header, deadline)  # a due top-k keyframe is PUT here, before the delta
        return self._publish(layout.node_key(self.node_id), data, deadline)

    def _keep_local(
        self, arrays: list[np.ndarray], header: UpdateHeader, exc: StoreError
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """The store is away: keep the local training, federate again next epoch."""
        self.stats.store_failures += 1
        logger.warning("node %s could not federate this epoch, keeping local weights: %s", self.node_id, exc)
        return arrays, self._metrics([self.mode.contribution(header, arrays)])

    def _pull(self, deadline: Deadline) -> list[Any]:
        """LIST ``nodes/``, GET the peers whose tag changed, return every usable peer's latest update."""
        exchange = self.exchange
        listing = exchange.list(layout.NODES, deadline)
        for key, info in listing.items():
            peer = layout.parse_node_key(key)
            if peer is None and not exchange.already_rejected(info):
                exchange.reject(InvalidObjectError(key, "node id is not a plain name"), info.tag)
        if not self._leftovers_checked and any(layout.parse_node_key(k) not in (None, self.node_id) for k in listing):
            self._mark_leftovers(listing, deadline)
        wanted, changed = self.peers.plan(listing, exchange.bad_tags)
        for peer, outcome in zip(changed, exchange.fetch_many([wanted[p] for p in changed], deadline)):
            if isinstance(outcome, StoreError):
                exchange.store_failure(wanted[peer].key, outcome, "this epoch")
            elif outcome is not None:
                self.peers.keep(peer, wanted[peer].tag, outcome)
        return self.peers.updates(wanted)

    def _mark_leftovers(self, listing: dict[str, Any], deadline: Deadline) -> None:
        """Once, at the first pull: objects of members that ended before we joined are an earlier run's."""
        self._leftovers_checked = True
        membership = self.membership
        if membership is None or membership.joined_at is None:
            self._leftovers_checked = False  # not joined yet (store away): look again next time
            return
        try:
            records = self.roster.read(deadline)
        except StoreError as exc:
            self._leftovers_checked = False
            logger.info("node %s could not read members yet: %s", self.node_id, exc)
            return
        skipped = []
        for key, info in listing.items():
            peer = layout.parse_node_key(key)
            record = records.get(peer) if peer is not None else None
            if (
                peer is not None
                and peer != self.node_id
                and record is not None
                and ended_before(record, membership.joined_at)
            ):
                self.peers.leftovers[peer] = info.tag
                skipped.append(
                    f"{peer} ({record.status}, last heard {membership.joined_at - record.heartbeat:.0f}s "
                    "before we joined)"
                )
        if skipped:
            self.stats.leftovers_skipped += len(skipped)
            logger.warning(
                "node %s ignores objects left by an earlier run in this prefix (they are aggregated "
                "again only if their node publishes anew): %s",
                self.node_id,
                "; ".join(skipped),
            )
