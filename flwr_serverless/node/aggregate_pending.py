"""Helping in the aggregate mode: a change whose compare-and-swap lost is published for others to fold in.

A member that used up its attempts writes ``pending/<id>/<base>.<slot>.<hash>``:
the weighted difference ``d`` between its contribution in ``<slot>`` (already
written) and the one the table named when it read (``<base>``), signed like any
object. A member that reads the aggregate lists one small page of these (a
random start spreads the helpers), fetches one beside the aggregate, and folds
it into its own write if the table still names exactly that base entry. The
write replaces the entry, so the same change can never match again: a change is
folded at most once, and only into the aggregate it was computed against.

``Helping`` is the node's component for this, with its own state; whether a
fetched change is folded into a write is ``modes.aggregate.plan_write``'s call.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flwr_serverless.errors import InvalidObjectError, StoreError
from flwr_serverless.modes.aggregate import (
    Entry,
    Pending,
    PendingRef,
    delta,
    free_slot,
    parse_entry,
    stored_specs,
    taken_slots,
)
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.node.exchange import Exchange, NodeStats
from flwr_serverless.stores.base import StoreStats
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader, decode, encode

logger = logging.getLogger("flwr_serverless")

FIELD = "pending"  # the key of the entries in a pending object's header ``extra``
PAGE = 8  # pending changes listed per epoch: one LIST page of a few hundred bytes per key


def encode_pending(
    node: str,
    base: Entry | None,
    entry: Entry,
    change: Sequence[np.ndarray],
    names: Sequence[str] | None,
    secret: bytes | None,
    framework: str | None,
) -> bytes:
    extra = {FIELD: {"base": None if base is None else base.to_json(), "new": entry.to_json()}}
    header = UpdateHeader(node_id=node, seq=entry.seq, base_own_seq=0, framework=framework, extra=extra)
    return encode(list(change), header, names, secret)


def decode_pending(
    data: bytes,
    ref: PendingRef,
    expected: Sequence[tuple[tuple[int, ...], np.dtype]] | None,
    names: Sequence[str] | None,
    secret: bytes | None,
    framework: str | None,
) -> Pending:
    """Decode and check every claim against the key; ``InvalidObjectError`` naming the key otherwise."""
    decoded = decode(
        data,
        ref.key,
        expected=None if expected is None else stored_specs(expected),
        secret=secret,
        expected_names=names,
        framework=framework,
    )
    raw = decoded.header.extra.get(FIELD)
    if decoded.header.node_id != ref.node:
        raise InvalidObjectError(ref.key, f"pending change: written by {decoded.header.node_id!r}, not {ref.node!r}")
    if not isinstance(raw, dict) or set(raw) != {"base", "new"}:
        raise InvalidObjectError(ref.key, "pending change: must carry {'base': entry or null, 'new': entry}")
    base = None if raw["base"] is None else parse_entry(raw["base"], ref.node, ref.key, "pending change")
    entry = parse_entry(raw["new"], ref.node, ref.key, "pending change")
    if (base.payload_hash if base else None, entry.slot, entry.payload_hash) != (ref.base, ref.slot, ref.new):
        raise InvalidObjectError(ref.key, "pending change: its entries do not match its key")
    if base is not None and base.slot == entry.slot:
        raise InvalidObjectError(ref.key, "pending change: replaces a contribution by one in the same slot")
    return Pending(ref, base, entry, list(decoded.arrays))


RESERVED = 2  # requests kept for publishing our change and deleting a dead one
LIST_ENTRY_BYTES = 350  # what one key costs in an S3 listing (XML): counted against MAX_MODELS_DOWN


@dataclass
class HelpingStats:
    """What became of contributions whose compare-and-swap lost (``node.helping_stats``)."""

    published: int = 0  # changes published as pending (all attempts lost)
    folded_by_helper: int = 0  # of ours, found folded in by another member at a later read
    folded_for_others: int = 0  # pending changes of other members this node folded into its write
    deferred: int = 0  # contributions replaced by the member's next one before reaching the aggregate


class Spend:
    """Requests and bytes down of one epoch so far, against the node's ``max_requests`` and ``max_models_down``."""

    def __init__(
        self,
        store_stats: StoreStats,
        node_stats: NodeStats,
        model_bytes: int,
        max_models_down: float | None,
        max_requests: int | None,
    ) -> None:
        self.store_stats, self.node_stats, self.model_bytes = store_stats, node_stats, model_bytes
        self.limit = math.inf if max_models_down is None else max_models_down * model_bytes
        self.requests = math.inf if max_requests is None else max_requests
        self.start = (store_stats.requests + node_stats.cas_conflicts, store_stats.bytes_down)
        self.listing = 0

    def listed(self, keys: int) -> None:
        self.listing += LIST_ENTRY_BYTES * (keys + 1)

    def allows(self, more_bytes: float, requests: int) -> bool:
        spent = self.store_stats.requests + self.node_stats.cas_conflicts - self.start[0]
        down = self.store_stats.bytes_down - self.start[1] + self.listing
        return down + more_bytes <= self.limit and spent + requests + RESERVED <= self.requests


class Helping:
    """The aggregate node's side of helping, with its own state: the changes it published that may still be
    folded, the members it lists pending changes from, and what became of them (``stats``).

    Every store call goes through the node's ``exchange`` (which also names the node and its codec settings).
    """

    def __init__(self, exchange: Exchange, rng: random.Random, enabled: bool = True) -> None:
        self.exchange = exchange
        self.random = rng  # the node's generator: picks which page and which change
        self.enabled = enabled  # fold one pending change of another member into our writes
        self.stats = HelpingStats()
        self.own: dict[str, PendingRef] = {}  # our published changes that may still be folded
        self.own_listed = False  # whether ``own`` covers what an earlier process of ours published
        self.members_seen: set[str] = set()  # members of the last table read (random starts of the page)

    @property
    def node_id(self) -> str:
        return self.exchange.node_id

    def taken(self, named: Entry | None) -> set[int]:
        """Slots the aggregate may name for us at the next read: the named one and those of live changes."""
        return taken_slots(named, self.own.values())

    def guess_slot(self, named: Entry | None, named_known: bool) -> int | None:
        """Where to PUT the contribution before reading: free whatever helpers did since (None: unknown)."""
        if not named_known or not self.own_listed:
            return None
        return free_slot(self.taken(named))

    def load_own(self, deadline: Deadline) -> None:
        """Once per process: the changes an earlier process of ours published may still be folded."""
        if self.own_listed:
            return
        self.own = {
            ref.key: ref
            for key, info in self.exchange.list(f"{layout.PENDING}{self.node_id}/", deadline).items()
            if (ref := PendingRef.parse(key, info.size)) is not None
        }
        self.own_listed = True

    def settle(self, named: Entry | None, deadline: Deadline) -> None:
        """Forget our published changes that can no longer be folded; count what became of them."""
        for key, ref in list(self.own.items()):
            if ref.live_in(named):
                continue
            del self.own[key]
            if named is not None and named.payload_hash == ref.new and named.slot == ref.slot:
                self.stats.folded_by_helper += 1  # the helper deleted it
            else:
                self.stats.deferred += 1  # replaced before anyone folded it
                self.exchange.delete_quietly(key, deadline)

    def pick(self, deadline: Deadline, spend: Spend, aggregate_size: int) -> PendingRef | None:
        """One page of pending changes from a random point; one of another member's, if the budget allows."""
        if not self.enabled:
            return None
        members = sorted(self.members_seen)
        start = f"{layout.PENDING}{self.random.choice(members)}" if members and self.random.random() < 0.8 else ""
        try:
            page = self.exchange.list_page(layout.PENDING, start, PAGE, deadline)
        except StoreError as exc:
            logger.info("node %s could not list pending changes: %s", self.node_id, exc)
            return None
        spend.listed(len(page))
        refs = [
            ref
            for key, info in page.items()
            if (ref := PendingRef.parse(key, info.size)) is not None and ref.node != self.node_id
        ]
        if not refs:
            return None
        ref = self.random.choice(refs)
        return ref if spend.allows(aggregate_size + ref.size, requests=3) else None

    def fetch(self, ref: PendingRef, deadline: Deadline) -> Pending | None:
        exchange = self.exchange
        try:
            got = exchange.get_tagged(ref.key, deadline)
            if got is None:
                return None
            names = exchange.expected_names if exchange.framework == "torch" else None
            return decode_pending(got[0], ref, exchange.expected, names, exchange.secret, exchange.framework)
        except InvalidObjectError as exc:
            exchange.reject(exc)
        except StoreError as exc:
            logger.info("node %s could not fetch %s: %s", self.node_id, ref.key, exc)
        return None

    def folded(self, change: Pending, deadline: Deadline) -> None:
        """Our write folded ``change`` in: it can never match again, delete it."""
        self.stats.folded_for_others += 1
        self.exchange.delete_quietly(change.ref.key, deadline)

    def publish(
        self,
        named: Entry | None,
        old: list[np.ndarray] | None,
        folded: list[np.ndarray],
        entry: Entry,
        deadline: Deadline,
        attempts: int,
    ) -> None:
        """Our change since ``named`` (the entry the last read named), for another member to fold in."""
        if any(ref.live_in(named) for ref in self.own.values()):
            self.stats.deferred += 1  # an older change on the same base may still land: never two
            return
        exchange = self.exchange
        base_hash = None if named is None else named.payload_hash
        key = layout.pending_key(self.node_id, base_hash, entry.slot, entry.payload_hash)
        change = delta(old, 0.0 if named is None else named.weight, folded, entry.weight)
        names, secret, framework = exchange.expected_names, exchange.secret, exchange.framework
        data = encode_pending(self.node_id, named, entry, change, names, secret, framework)
        try:
            exchange.put(key, data, deadline)
        except StoreError as exc:
            logger.info("node %s could not publish its pending change: %s", self.node_id, exc)
            self.stats.deferred += 1
            return
        self.own[key] = PendingRef(key, self.node_id, base_hash, entry.slot, entry.payload_hash, len(data))
        self.stats.published += 1
        logger.info(
            "node %s: %d compare-and-swap attempts lost; its change is pending for others to fold in",
            self.node_id,
            attempts,
        )
