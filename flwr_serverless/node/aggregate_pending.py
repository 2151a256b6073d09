"""Helping in the aggregate mode: a change whose compare-and-swap lost is published for others to fold in.

A member that used up its attempts writes ``pending/<id>/<base>.<slot>.<hash>``:
the weighted difference ``d`` between its contribution in ``<slot>`` (already
written) and the one the table named when it read (``<base>``), signed like any
object. A member that reads the aggregate lists one small page of these (a
random start spreads the helpers), fetches one beside the aggregate, and folds
it into its own write if the table still names exactly that base entry. The
write replaces the entry, so the same change can never match again: a change is
folded at most once, and only into the aggregate it was computed against.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flwr_serverless.errors import InvalidObjectError, StoreError
from flwr_serverless.modes.aggregate import Entry, Table, delta, free_slot, parse_entry, stored_specs
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.node.exchange import Exchange, NodeStats
from flwr_serverless.stores import Store
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader, decode, encode

logger = logging.getLogger("flwr_serverless")

FIELD = "pending"  # the key of the entries in a pending object's header ``extra``
PAGE = 8  # pending changes listed per epoch: one LIST page of a few hundred bytes per key


@dataclass(frozen=True)
class PendingRef:
    """What a listed key says: whose change, the entry it replaces (its hash) and the one it adds."""

    key: str
    node: str
    base: str | None  # short hash of the entry it replaces; None: the member had none
    slot: int
    new: str
    size: int = 0

    @classmethod
    def parse(cls, key: str, size: int = 0) -> PendingRef | None:
        parsed = layout.parse_pending_key(key)
        return None if parsed is None else cls(key, *parsed, size=size)

    def live_in(self, named: Entry | None) -> bool:
        """Could still be folded: the table names the entry it replaces."""
        return (named.payload_hash if named is not None else None) == self.base


@dataclass
class Pending:
    """A pending change fetched and checked: fold ``change`` in while the table names ``base`` for ``ref.node``."""

    ref: PendingRef
    base: Entry | None
    entry: Entry
    change: list[np.ndarray]

    def applies_to(self, table: Table) -> bool:
        return table.get(self.ref.node) == self.base


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

    def __init__(self, node: Helping, model_bytes: int) -> None:
        self.node, self.model_bytes = node, model_bytes
        self.limit = math.inf if node.max_models_down is None else node.max_models_down * model_bytes
        self.requests = math.inf if node.max_requests is None else node.max_requests
        stats = node.store.stats
        self.start = (stats.requests + node.stats.cas_conflicts, stats.bytes_down)
        self.listing = 0

    def listed(self, keys: int) -> None:
        self.listing += LIST_ENTRY_BYTES * (keys + 1)

    def allows(self, more_bytes: float, requests: int) -> bool:
        stats = self.node.store.stats
        spent = stats.requests + self.node.stats.cas_conflicts - self.start[0]
        down = stats.bytes_down - self.start[1] + self.listing
        return down + more_bytes <= self.limit and spent + requests + RESERVED <= self.requests


class Helping:
    """The aggregate node's side of helping: its published changes, the page it lists, what it fetches."""

    node_id: str
    exchange: Exchange
    store: Store
    stats: NodeStats
    random: random.Random
    secret: bytes | None
    _tensor_names: list[str] | None
    _framework: str | None
    _named: Entry | None
    _named_known: bool
    helping_stats: HelpingStats
    max_models_down: float | None
    max_requests: int | None
    _own: dict[str, PendingRef]
    _own_listed: bool
    _members_seen: set[str]
    _aggregate_size: int | None

    def _taken(self, named: Entry | None) -> set[int]:
        """Slots the aggregate may name for us at the next read: the named one and those of live changes."""
        return ({named.slot} if named is not None else set()) | {r.slot for r in self._own.values() if r.live_in(named)}

    def _guess_slot(self) -> int | None:
        """Where to PUT the contribution before reading: free whatever helpers did since (None: unknown)."""
        if not self._named_known or not self._own_listed:
            return None
        return free_slot(self._taken(self._named))

    def _settle_own(self, named: Entry | None, deadline: Deadline) -> None:
        """Forget our published changes that can no longer be folded; count what became of them."""
        for key, ref in list(self._own.items()):
            if ref.live_in(named):
                continue
            del self._own[key]
            if named is not None and named.payload_hash == ref.new and named.slot == ref.slot:
                self.helping_stats.folded_by_helper += 1  # the helper deleted it
            else:
                self.helping_stats.deferred += 1  # replaced before anyone folded it
                self.exchange.delete_quietly(key, deadline)

    def _pick_pending(self, deadline: Deadline, spend: Spend) -> PendingRef | None:
        """One page of pending changes from a random point; one of another member's, if the budget allows."""
        members = sorted(self._members_seen)
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
        return ref if spend.allows(self._aggregate_size + ref.size, requests=3) else None

    def _fetch_pending(self, ref: PendingRef, deadline: Deadline) -> Pending | None:
        exchange = self.exchange
        try:
            got = exchange.get_tagged(ref.key, deadline)
            if got is None:
                return None
            names = exchange.expected_names if exchange.framework == "torch" else None
            return decode_pending(got[0], ref, exchange.expected, names, self.secret, exchange.framework)
        except InvalidObjectError as exc:
            exchange.reject(exc)
        except StoreError as exc:
            logger.info("node %s could not fetch %s: %s", self.node_id, ref.key, exc)
        return None

    def _publish_pending(
        self,
        named: Entry | None,
        old: list[np.ndarray] | None,
        folded: list[np.ndarray],
        entry: Entry,
        deadline: Deadline,
    ) -> None:
        """Our change since ``named`` (the entry the last read named), for another member to fold in."""
        if any(ref.live_in(named) for ref in self._own.values()):
            self.helping_stats.deferred += 1  # an older change on the same base may still land: never two
            return
        base_hash = None if named is None else named.payload_hash
        key = layout.pending_key(self.node_id, base_hash, entry.slot, entry.payload_hash)
        change = delta(old, 0.0 if named is None else named.weight, folded, entry.weight)
        data = encode_pending(self.node_id, named, entry, change, self._tensor_names, self.secret, self._framework)
        try:
            self.exchange.put(key, data, deadline)
        except StoreError as exc:
            logger.info("node %s could not publish its pending change: %s", self.node_id, exc)
            self.helping_stats.deferred += 1
            return
        self._own[key] = PendingRef(key, self.node_id, base_hash, entry.slot, entry.payload_hash, len(data))
        self.helping_stats.published += 1
        logger.info(
            "node %s: %d compare-and-swap attempts lost; its change is pending for others to fold in",
            self.node_id,
            self.max_attempts,
        )
