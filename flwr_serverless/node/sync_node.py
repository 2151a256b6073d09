"""A barrier per round over the experiment's live members; every node aggregates the same set."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from flwr_serverless.errors import IncompatiblePeersError, InvalidObjectError, StoreError, SyncTimeoutError
from flwr_serverless.modes.synchronous import Barrier, barrier, check_counts, current_members, entry_round
from flwr_serverless.node.base import FederatedNode
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.node.exchange import KeyframeMiss, is_transient
from flwr_serverless.node.publisher import Encoded
from flwr_serverless.stores import ObjectInfo, Store
from flwr_serverless.strategy.aggregate import Contribution
from flwr_serverless.validation import check_positive, check_positive_int
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader
from flwr_serverless.wire.topk import state_ref

logger = logging.getLogger("flwr_serverless")

POLL_FIRST, POLL_MAX, POLL_GROWTH = 0.05, 1.0, 1.5
DOWNLOAD_RESERVE = 0.25  # share of ``timeout`` (at most 30 s) kept for the downloads after a timed-out barrier
CATCH_UP_EVERY = 1.0  # seconds between looks, while waiting, at whether the awaited members are rounds ahead


class SyncFederatedNode(FederatedNode):
    """A barrier per round: wait until every live member published round r, then all aggregate the same set.

    ``num_nodes`` members must have joined for the experiment to start; after
    that a round waits for the members that are live now. Members that left
    are not awaited; members whose lease expired (or whose process is gone on
    this host) are dropped from the barrier with a warning. ``min_nodes`` is
    how few may make a round (default 1). At ``timeout`` a round still missing
    live members continues when ``min_nodes`` allows (partial), else raises
    ``SyncTimeoutError`` naming them. ``max_incompatible_rounds`` rounds in a
    row with peers but none compatible raise ``IncompatiblePeersError``.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | str | None = None,
        *,
        num_nodes: int | None = None,
        timeout: float = 300.0,
        min_nodes: int | None = None,
        max_incompatible_rounds: int = 3,
        **options: Any,
    ) -> None:
        self.num_nodes, self.min_nodes = check_counts(num_nodes, min_nodes)
        self.timeout = check_positive("timeout", timeout, unit="seconds")
        self.max_incompatible_rounds = check_positive_int("max_incompatible_rounds", max_incompatible_rounds)
        super().__init__(store, strategy, **options)
        self.round = 0
        self.started = False  # the experiment is under way: num_nodes no longer gates a round
        self._round_checked = False  # first federation: look up the experiment's current round
        self._incompatible = 0
        self._announced: set[str] = set()  # members already reported as dropped or departed
        self.sleep = time.sleep  # barrier polling (tests inject their own)

    def _deadline(self) -> Deadline:
        """The whole call (join, publish, barrier, downloads, outages included) ends within ``timeout``."""
        return Deadline.after(self.timeout, self.clock)

    @staticmethod
    def round_prefix(round_number: int) -> str:
        return layout.round_prefix(round_number)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self.round = int(state.get("round", self.round))
        self._round_checked = False

    # -- joining -----------------------------------------------------------------------
    def _before_takeover(self, deadline: Deadline) -> None:
        """Round objects under our id are an earlier instance's: peers must never count them as ours."""
        if not self._round_checked:
            try:
                for key in self.exchange.list(layout.ROUNDS, deadline):
                    parsed = layout.parse_round_key(key)
                    if parsed is not None and parsed.node_id == self.node_id and parsed.round >= self.round:
                        self.exchange.delete_quietly(key, deadline)
            except StoreError as exc:
                logger.info("node %s could not clean its earlier instance's rounds: %s", self.node_id, exc)

    def _enter(self, deadline: Deadline) -> None:
        """Start at the experiment's current round, so a restarted or late node never waits alone."""
        exchange = self.exchange
        records = self.roster.read(deadline)  # before the rounds: see ``_wait_for_round``
        listing = exchange.list(layout.ROUNDS, deadline)
        rounds = layout.rounds_by_number(listing)
        # Members of this run, and publishers without a record (a store or peer without membership).
        current = set(current_members(records, self.roster.now(), self.run))
        current |= {node for nodes in rounds.values() for node in nodes if node not in records}
        target, under_way = entry_round(self.node_id, rounds, current, self.round)
        self._round_checked = True
        self.started = self.started or under_way
        if target != self.round:
            logger.info("node %s joins the experiment at round %d (had round %d)", self.node_id, target, self.round)
            self.round = target
        for number, nodes in rounds.items():
            if number < target - 1 and self.node_id in nodes:
                exchange.delete_quietly(layout.round_key(number, self.node_id), deadline)

    # -- a round -------------------------------------------------------------------------
    def _weight(self, header: UpdateHeader) -> float:
        return float(header.num_examples)

    def _publish_round(self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline) -> Encoded:
        """Join the experiment's current round (first call) and publish our object for it."""
        if not self._round_checked:
            try:
                self._enter(deadline)
            except StoreError as exc:  # store away: stay at our round, the barrier wait copes with the outage
                if not is_transient(exc):
                    raise
                logger.warning("node %s could not look up the current round (will retry): %s", self.node_id, exc)
        header.round = self.round
        data = self._encode(arrays, header, deadline, persist=True)
        self._publish(layout.round_key(self.round, self.node_id), data, deadline, persist=True)
        return data

    def _federate(
        self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        while True:
            data = self._publish_round(arrays, header, deadline)
            # Our own weights as peers decode them (compression included), without decoding our own object:
            # every member then averages the same values and all hold identical weights.
            own_arrays = self.writer.seen(arrays)
            listing, waited = self._wait_for_round(deadline)
            if waited is not None:
                state = waited
                break
            self.writer.restart()  # we left the round for the peers' one: they never saw our chain's last link
        others = [listing[layout.round_key(self.round, n)] for n in sorted(state.counted - {self.node_id})]
        peers, headers, chains, missed = self._gather(others, deadline)
        self._check_compatibility(others, peers)
        own = Contribution(self.node_id, own_arrays, self._weight(header), header.num_examples, header.metrics)
        result = self._aggregate(own, peers, [header, *headers])
        self._rebase(
            result[0],
            chains,
            len(peers),
            arrays,
            diverged=missed or (any(c == 0 for c in chains.values()) and not data.keyframe),
        )
        if self.round >= 2:
            self.exchange.delete_quietly(layout.round_key(self.round - 2, self.node_id), deadline)
        self.round += 1
        self.started = True
        return result

    def _rebase(
        self,
        arrays: list[np.ndarray],
        chains: dict[str, int],
        aggregated: int,
        trained: list[np.ndarray],
        diverged: bool,
    ) -> None:
        """When every member of the round sends top-k deltas and we followed them all, every member now holds
        ``arrays``: the next deltas are against them, on writers and readers alike (named by a hash of their
        bits, so a member whose round went otherwise cannot misapply them).

        A member that cannot follow (a miss, or a peer's new keyframe while we sent a delta: it could not follow
        us, or just joined) publishes a keyframe next, and that round every member reads every other whole
        and agrees again. With a member that sends no top-k (it cannot rebase its readers' view of us), the
        chain stays on stored keyframes and the log, which any reader can follow.
        """
        topk = self.writer.topk
        if topk is None:
            return
        if len(chains) < aggregated:  # a member without top-k: no rebase, by it or by anyone
            if topk.rebased:
                self.writer.restart()  # it may not hold the state our next delta would name
            return
        ref = state_ref(self.round, arrays)
        self.exchange.rebase(sorted(chains), arrays, ref)
        self.writer.rebase(arrays, ref, trained)
        if diverged:
            self.writer.restart()

    def _gather(
        self, others: list[ObjectInfo], deadline: Deadline
    ) -> tuple[list[Contribution], list[UpdateHeader], dict[str, int], bool]:
        """The usable peer objects, their headers, the chain position of each top-k peer's object, and whether
        a top-k peer could not be followed (a keyframe miss)."""
        peers: list[Contribution] = []
        headers: list[UpdateHeader] = []
        chains: dict[str, int] = {}
        missed = False
        for info, outcome in zip(others, self.exchange.fetch_many(others, deadline)):
            if isinstance(outcome, StoreError):
                self.exchange.store_failure(info.key, outcome, f"in round {self.round}")
            elif isinstance(outcome, KeyframeMiss):
                missed = True
            elif outcome is not None and outcome.header.round not in (None, self.round):
                self.exchange.reject(
                    InvalidObjectError(info.key, f"its header says round {outcome.header.round}"), info.tag
                )
            elif outcome is not None and self.run is not None and outcome.header.run not in (None, self.run):
                self.stats.leftovers_skipped += 1  # the same id in another run: its object is not this run's
                logger.warning(
                    "node %s skips %s in round %d: it belongs to run %s, not %s",
                    self.node_id,
                    info.key,
                    self.round,
                    outcome.header.run,
                    self.run,
                )
            elif outcome is not None:
                h = outcome.header
                peers.append(Contribution(h.node_id, outcome.arrays, self._weight(h), h.num_examples, h.metrics))
                headers.append(h)
                if outcome.chain is not None:
                    chains[h.node_id] = outcome.chain
        return peers, headers, chains, missed

    def _check_compatibility(self, others: list[ObjectInfo], peers: list[Contribution]) -> None:
        """Peers present but none usable, round after round: say so instead of training alone."""
        rejections = {info.key: self.stats.rejections[info.key] for info in others if info.key in self.stats.rejections}
        if others and not peers and len(rejections) == len(others):
            self._incompatible += 1
            if self._incompatible >= self.max_incompatible_rounds:
                raise IncompatiblePeersError(self.node_id, self._incompatible, rejections)
        else:
            self._incompatible = 0

    def _wait_for_round(self, deadline: Deadline) -> tuple[dict[str, ObjectInfo], Barrier | None]:
        """Poll the round's listing and the member records until the barrier says go (or the deadline).

        ``None`` for the barrier: the members we wait for went on without us (we were cut off from the
        store past our lease) and ``self.round`` is now theirs: publish there and wait again.
        """
        prefix = layout.round_prefix(self.round)
        reserve = min(DOWNLOAD_RESERVE * self.timeout, 30.0)
        wait_until = Deadline(None if deadline.at is None else deadline.at - reserve, deadline.clock)
        delay = POLL_FIRST
        listing: dict[str, ObjectInfo] = {}
        records: dict[str, Any] = {}
        next_look = self.clock()  # when to look again whether the members we wait for are rounds ahead
        while True:
            # Records first: a node taking over an id deletes its predecessor's round objects before its
            # record shows it live in our run, so a listing taken after the records (fresh or kept from an
            # earlier look) never holds an earlier run's object under a name they call ours (it would count,
            # then be skipped at the fetch). Each read that fails keeps its last answer.
            failure: StoreError | None = None
            try:
                records = self.roster.read(deadline)
            except StoreError as exc:
                failure = exc
            try:
                listing = self.exchange.list(prefix, deadline)
            except StoreError as exc:
                failure = exc
            if failure is not None:  # an outage: keep waiting (up to the deadline) for the store to return
                if not is_transient(failure):
                    raise failure
                self.stats.store_failures += 1
                logger.warning(
                    "node %s: store unavailable during round %d barrier: %s", self.node_id, self.round, failure
                )
            if self.membership is not None:
                self.membership.heartbeat(deadline)  # a long wait must not let our own lease run out
            state = self._barrier(listing, records)
            if state.complete:
                return listing, state
            if state.waiting_for and self.clock() >= next_look and self._fell_behind(state, records, deadline):
                return listing, None
            if state.waiting_for:
                next_look = self.clock() + CATCH_UP_EVERY
            if wait_until.expired:
                return listing, self._timed_out(state)
            self.sleep(min(delay, wait_until.remaining()))
            delay = min(delay * POLL_GROWTH, POLL_MAX)

    def _fell_behind(self, state: Barrier, records: dict[str, Any], deadline: Deadline) -> bool:
        """Whether members we wait for have published later rounds: they dropped us at our lease's expiry
        (a partition, a long stall) and went on. Then enter their round (``entry_round``), like a late joiner."""
        try:
            rounds = layout.rounds_by_number(self.exchange.list(layout.ROUNDS, deadline))
        except StoreError:
            return False
        ahead = {node for number, nodes in rounds.items() if number > self.round for node in nodes}
        if not ahead & state.waiting_for:
            return False
        current = set(current_members(records, self.roster.now(), self.run))
        target, _ = entry_round(self.node_id, rounds, current, self.round)
        if target <= self.round:
            return False
        logger.warning(
            "node %s: %s went on without us (round %d); we rejoin them at round %d",
            self.node_id,
            ", ".join(sorted(ahead & state.waiting_for)),
            self.round,
            target,
        )
        for number, nodes in rounds.items():
            if number < target - 1 and self.node_id in nodes:
                self.exchange.delete_quietly(layout.round_key(number, self.node_id), deadline)
        self.round = target
        self.started = True
        return True

    def _barrier(self, listing: dict[str, ObjectInfo], records: dict[str, Any]) -> Barrier:
        published = {k.rsplit("/", 1)[-1] for k in listing if layout.parse_round_key(k) is not None}
        state = barrier(
            self.node_id,
            published,
            records,
            now=self.roster.now(),
            run=self.run,
            num_nodes=self.num_nodes,
            min_nodes=self.min_nodes,
            started=self.started,
        )
        for node in sorted((state.dropped | state.departed) - self._announced):
            self._announced.add(node)
            if node in state.dropped:
                self.stats.dropped_members += 1
                logger.warning(
                    "node %s: round %d no longer waits for %s (its lease expired or its process is gone)",
                    self.node_id,
                    self.round,
                    node,
                )
            else:
                logger.info("node %s: %s has left the experiment", self.node_id, node)
        return state

    def _timed_out(self, state: Barrier) -> Barrier:
        present = sorted(state.counted)
        missing = sorted(state.waiting_for)
        unknown = 0 if self.started else self.num_nodes - state.members_seen
        if unknown > 0:
            missing.append(f"{unknown} node(s) that never joined")
        if self.min_nodes is not None and len(present) >= self.min_nodes:
            self.stats.partial_rounds += 1
            logger.warning(
                "node %s: round %d continues with %d node(s) after %.1fs, without %s",
                self.node_id,
                self.round,
                len(present),
                self.timeout,
                ", ".join(missing),
            )
            return state
        raise SyncTimeoutError(self.round, self.timeout, present, missing)
