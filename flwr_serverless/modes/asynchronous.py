"""Asynchronous mode: pull every current peer's latest object, weigh by examples x staleness, never wait.

``PeerTracker`` decides which listed objects to download (only changed tags,
never ourselves, never an object already rejected, never a leftover of an
earlier run); ``AsyncMode`` turns the usable updates into weighted
contributions and says whether to aggregate at all (FedBuff's K).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flwr_serverless.modes.staleness import AsyncPolicy, CommunityView
from flwr_serverless.stores import ObjectInfo
from flwr_serverless.strategy.aggregate import Contribution
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import DecodedUpdate, UpdateHeader


@dataclass
class PeerTracker:
    """The latest usable update of every peer, keyed by the tag it was downloaded at."""

    me: str
    cached: dict[str, tuple[str, DecodedUpdate]] = field(default_factory=dict)  # peer -> (tag, update)
    leftovers: dict[str, str] = field(default_factory=dict)  # peer -> tag of an object from an earlier run

    def plan(
        self, listing: Mapping[str, ObjectInfo], bad: Mapping[str, str]
    ) -> tuple[dict[str, ObjectInfo], list[str]]:
        """(peer id -> listed object for every candidate peer, ids whose object must be downloaded)."""
        wanted: dict[str, ObjectInfo] = {}
        for key, info in sorted(listing.items()):
            peer = layout.parse_node_key(key)
            if peer is None or peer == self.me or bad.get(key) == info.tag or self.leftovers.get(peer) == info.tag:
                continue
            wanted[peer] = info
        for gone in set(self.cached) - set(wanted):
            del self.cached[gone]  # peer left, or its latest object is bad: drop what we held
        changed = [p for p, info in wanted.items() if p not in self.cached or self.cached[p][0] != info.tag]
        for peer in changed:
            self.cached.pop(peer, None)  # free the old weights before downloading the new ones
        return wanted, changed

    def keep(self, peer: str, tag: str, update: DecodedUpdate) -> None:
        self.cached[peer] = (tag, update)

    def updates(self, wanted: Mapping[str, ObjectInfo]) -> list[DecodedUpdate]:
        return [self.cached[p][1] for p in sorted(wanted) if p in self.cached]


@dataclass
class AsyncDecision:
    """What to aggregate: None when FedBuff keeps training locally this time."""

    own: Contribution
    peers: list[Contribution]
    fresh: int
    view: CommunityView  # what staleness is measured against: the headers being aggregated


class AsyncMode:
    """Weights and gates of ``AsyncFederatedNode`` (the math lives in ``staleness`` and ``aggregation``)."""

    def __init__(self, policy: AsyncPolicy) -> None:
        self.policy = policy

    def participates(self) -> bool:
        return self.policy.participates()

    def decide(
        self, own_header: UpdateHeader, own_arrays: Sequence[np.ndarray], updates: Sequence[DecodedUpdate]
    ) -> AsyncDecision | None:
        policy = self.policy
        fresh = policy.count_new(updates)
        if not policy.ready(fresh):
            return None
        view = CommunityView.of([own_header, *(u.header for u in updates)])
        own = self.contribution(own_header, own_arrays, view)
        peers = [self.contribution(u.header, u.arrays, view) for u in updates]
        return AsyncDecision(own, peers, fresh, view)

    def contribution(
        self, header: UpdateHeader, arrays: Sequence[np.ndarray], view: CommunityView | None = None
    ) -> Contribution:
        """Examples times s(u) against ``view`` (None: not stale): stale peers count less."""
        weight = float(header.num_examples) * self.policy.factor(header, view)
        return Contribution(header.node_id, arrays, weight, header.num_examples, header.metrics)

    def after_aggregation(
        self,
        local: Sequence[np.ndarray],
        result: list[np.ndarray],
        decision: AsyncDecision,
        updates: Sequence[DecodedUpdate],
    ) -> list[np.ndarray]:
        """Record what was folded in (FedBuff, staleness) and apply FedAsync mixing."""
        self.policy.aggregated(updates, decision.fresh, decision.view)
        if not decision.peers:
            return result
        headers, weights = [u.header for u in updates], [c.weight for c in decision.peers]
        return self.policy.mix(local, result, headers, weights, decision.view)
