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
from flwr_serverless.node.exchange import Outcome
from flwr_serverless.node.membership import in_run
from flwr_serverless.stores import Store
from flwr_serverless.validation import check_positive
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import DecodedUpdate, UpdateHeader

logger = logging.getLogger("flwr_serverless")


class AsyncFederatedNode(FederatedNode):
    """FedAvgAsync: publish, pull every peer's latest weights, aggregate; never wait.

    A LIST of ``nodes/`` gives each peer's tag; only peers whose tag changed are
    downloaded again, the rest come from a cache. An epoch therefore costs one
    PUT, one LIST and one GET per changed peer. Objects of another run (their
    header names it; objects without one, their writer's member record) are
    skipped until their node publishes again in this run.
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
        self._leftovers_said: set[str] = set()  # peers already reported as another run's

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
        wanted, changed = self.peers.plan(listing, exchange.bad_tags)
        fetched: list[tuple[str, Outcome]] = list(
            zip(changed, exchange.fetch_many([wanted[p] for p in changed], deadline))
        )
        unnamed = any(isinstance(o, DecodedUpdate) and o.header.run is None for _, o in fetched)
        records = self._records(deadline) if unnamed and self.run is not None else {}
        for peer, outcome in fetched:
            if isinstance(outcome, StoreError):
                exchange.store_failure(wanted[peer].key, outcome, "this epoch")
            elif isinstance(outcome, DecodedUpdate):
                run, record = outcome.header.run, records.get(peer)
                if self.run is not None and (
                    (run is not None and run != self.run)
                    or (run is None and record is not None and not in_run(record, self.run, self.roster.now()))
                ):
                    self._leftover(peer, wanted[peer].tag, run if run is not None else record and record.run)
                else:
                    self.peers.keep(peer, wanted[peer].tag, outcome)
        return self.peers.updates(wanted)

    def _records(self, deadline: Deadline) -> dict[str, Any]:
        try:
            return self.roster.read(deadline)
        except StoreError as exc:
            logger.info("node %s could not read members: %s", self.node_id, exc)
            return {}

    def _leftover(self, peer: str, tag: str, run: str | None) -> None:
        """``peer``'s object at ``tag`` is another run's: skipped until the peer publishes again."""
        self.peers.leftovers[peer] = tag
        self.peers.cached.pop(peer, None)
        self.stats.leftovers_skipped += 1
        if peer not in self._leftovers_said:
            self._leftovers_said.add(peer)
            logger.warning(
                "node %s (run %s) ignores %s's object: it belongs to an earlier run (%s) in this prefix, and is "
                "aggregated only when %s publishes in this run",
                self.node_id,
                self.run,
                peer,
                run,
                peer,
            )
