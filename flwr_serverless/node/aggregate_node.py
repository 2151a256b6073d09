"""FedAvgAsync in a bounded number of requests per epoch, whatever the number of nodes: the aggregate mode.

Instead of reading every peer (O(N) GETs per epoch), a node reads and updates
one shared object, ``aggregate``: FedAvg of every member's latest contribution
and a table naming them (see ``flwr_serverless.modes.aggregate``). One epoch:

1. LIST one page of ``pending/`` (changes of members whose writes lost);
2. GET ``aggregate`` (S3 returns its tag with it), beside it GET one pending
   change and PUT the new contribution to a free slot ``contributions/<id>/<slot>``
   (never the slot the aggregate names, nor one a live pending change of ours names);
3. fold the pending change in if the table still names exactly its base entry,
   fold our own in (subtract the old contribution, add the new), and write the
   aggregate with ``put_if_match`` on the tag from 2 (``put_if_absent`` the first time).

A 412 (another member wrote in between) means: back off (jittered), read again,
fold again, while ``max_attempts``, ``max_requests`` (10) and ``max_models_down``
(3 model sizes) allow. Then the node trains on from the mean it would have
written and publishes its change as pending (``aggregate_pending``): the next
member to win a write folds it in, or the node's next epoch replaces it.

What to write after each read is decided by ``modes.aggregate.plan_write`` (pure,
unit-tested without a store); this module does the reads and writes around it.

Every successful write is a linearizable step from the aggregate it read, so the aggregate is always
exactly FedAvg over one contribution per member; a node killed anywhere leaves an aggregate whose
contributions can all be subtracted, and a bad aggregate is rebuilt from the contributions (O(N) GETs).
Why both hold: docs/protocol/aggregate_mode.md.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.server.strategy import Strategy

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    InvalidObjectError,
    PreconditionFailedError,
    StoreError,
)
from flwr_serverless.modes.aggregate import (
    TABLE,
    Entry,
    Pending,
    Table,
    Write,
    backoff,
    latest_contributions,
    parse_table,
    plan_write,
    rebuild,
    short_hash,
    stored_bytes,
    stored_specs,
    table_json,
    total_weight,
)
from flwr_serverless.node.aggregate_pending import RESERVED, Helping, HelpingStats, Spend
from flwr_serverless.node.base import FederatedNode
from flwr_serverless.node.deadline import Deadline
from flwr_serverless.stores import ObjectInfo, Store
from flwr_serverless.strategy.aggregate import is_linear
from flwr_serverless.validation import check_int, check_number, check_positive, check_positive_int
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import DecodedUpdate, UpdateHeader, decode, encode, object_ref
from flwr_serverless.wire.header import clean_metrics

logger = logging.getLogger("flwr_serverless")


@dataclass
class AggregateState:
    """The aggregate as read: its tag (None: absent), mean (None: empty), table and version."""

    tag: str | None
    mean: list[np.ndarray] | None
    table: Table
    version: int
    rebuilt: dict[str, list[np.ndarray]] = field(default_factory=dict)  # contributions a repair decoded


def _no_keyframes(
    key: str, data: bytes | list[bytes | memoryview]
) -> None:  # pragma: no cover - top-k is refused at construction
    raise RuntimeError("the aggregate mode publishes no keyframes")


class AggregateFederatedNode(FederatedNode):
    """FedAvgAsync over one shared aggregate kept by compare-and-swap: O(1) requests per epoch at any N.

    ``max_attempts`` (3) bounds the compare-and-swap attempts per epoch, ``max_requests``
    (10) and ``max_models_down`` (3 model sizes; None: no bound) what an epoch may spend on
    retries and on folding another member's pending change (``helping``, on by default);
    ``timeout`` bounds the whole call. Needs a store with
    conditional writes (S3, memory://, local folders) and FedAvg; ``compression``
    may be "fp16", "bf16" or "int8" (contributions must be subtractable exactly).
    """

    def __init__(
        self,
        store: Store | str | None = None,
        strategy: Strategy | str | None = None,
        *,
        max_attempts: int = 3,
        timeout: float | None = None,
        seed: int | None = None,
        helping: bool = True,
        max_models_down: float | None = 3.0,
        max_requests: int | None = 10,
        **options: Any,
    ) -> None:
        check_positive_int("max_attempts", max_attempts)
        check_number("max_models_down (model sizes)", max_models_down, 1.0, none=True)
        check_int("max_requests", max_requests, 4 + RESERVED, none=True)
        check_positive("timeout", timeout, unit="seconds", none=True)
        super().__init__(store, strategy, **options)
        if not is_linear(self.strategy):
            raise ValueError(
                f"the aggregate mode keeps a weighted mean (FedAvg); strategy "
                f"{type(self.strategy).__name__} is not one (use AsyncFederatedNode)"
            )
        if self.writer.topk is not None:
            raise ValueError(
                f"compression={self.writer.option!r} is not available in the aggregate mode "
                "(a contribution must be subtracted exactly later); use 'fp16', 'bf16' or 'int8'"
            )
        if not self.store.supports_conditional_writes:
            raise ConditionalWritesUnsupportedError(
                "put_if_match",
                layout.AGGREGATE,
                f"{self.store!r} cannot compare-and-swap, which the aggregate mode needs (use AsyncFederatedNode)",
            )
        self.max_attempts = max_attempts
        self.max_models_down, self.max_requests = max_models_down, max_requests
        self.timeout = timeout
        self.random = random.Random(seed)
        self.sleep = time.sleep  # backoff between attempts (tests inject their own)
        self.version = 0  # the aggregate version this node last wrote or saw
        self._named: Entry | None = None  # our entry in the aggregate, as of our last read or write
        self._named_known = False  # False until the first read: then where to PUT before reading is unknown
        self._slots: dict[int, tuple[str, list[np.ndarray]]] = {}  # slot -> (payload hash, arrays) we wrote there
        self.helper = Helping(self.exchange, self.random, bool(helping))  # our pending changes, others' we fold
        self._aggregate_size: int | None = None  # bytes of the last aggregate read

    @property
    def helping(self) -> bool:
        """Whether this node folds one pending change of another member into its writes."""
        return self.helper.enabled

    @property
    def helping_stats(self) -> HelpingStats:
        return self.helper.stats

    def _deadline(self) -> Deadline:
        return Deadline.after(self.timeout, self.clock)

    # -- one epoch ---------------------------------------------------------------------------
    def _federate(
        self, arrays: list[np.ndarray], header: UpdateHeader, deadline: Deadline
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        if not header.num_examples > 0:
            raise ValueError(
                f"node {self.node_id}: num_examples is the contribution's weight in the aggregate "
                f"mode and must be positive, got {header.num_examples}"
            )
        header.framework = self._framework
        data = b"".join(self.writer.encode(arrays, header, self._tensor_names, self.secret, _no_keyframes).parts)
        folded = self.writer.seen(arrays)  # what a reader of the contribution decodes: what the mean holds
        entry = Entry(
            0, header.seq, float(header.num_examples), short_hash(object_ref(data).payload_hash), header.timestamp
        )
        try:
            mean, table = self._update(data, folded, entry, deadline)
        except StoreError as exc:
            self._named_known = False  # a write may have landed: read before choosing a slot again
            self.stats.store_failures += 1
            logger.warning("node %s could not federate this epoch, keeping local weights: %s", self.node_id, exc)
            mean, table = None, {}
        self.provenance.advance(header, [header])
        self.stats.federations += 1
        metrics: dict[str, float] = {
            k: float(v) for k, v in clean_metrics(header.metrics).items() if not isinstance(v, str)
        }
        if mean is None:
            metrics.update(num_examples=float(header.num_examples), num_nodes=1.0)
            return arrays, metrics
        self.stats.peers_used += len(table) - 1
        metrics.update(num_examples=total_weight(table), num_nodes=float(len(table)))
        return [np.asarray(m).astype(a.dtype, copy=False) for m, a in zip(mean, arrays)], metrics

    def _update(
        self, data: bytes, folded: list[np.ndarray], new: Entry, deadline: Deadline
    ) -> tuple[list[np.ndarray], Table]:
        """Read, plan (``plan_write``), compare-and-swap; the last mean either way.

        Beside the read: the contribution's PUT (once the node knows a free slot), and one pending change
        listed just before. Retries stop at ``max_attempts`` or when another would pass 3 models down or
        10 requests this epoch; then the node publishes its own change as pending, for others to fold in.
        """
        spend = Spend(self.store.stats, self.stats, stored_bytes(folded), self.max_models_down, self.max_requests)
        if self._aggregate_size is None:
            self._aggregate_size = spend.model_bytes + 4096
        helper = self.helper
        guess = helper.guess_slot(self._named, self._named_known)
        last: tuple[Write, list[np.ndarray] | None] | None = None  # the last write attempted, and our old arrays
        written: int | None = None  # the slot our new contribution is in
        with ThreadPoolExecutor(max_workers=2) as pool:
            upload = None if guess is None else pool.submit(self._put_contribution, guess, data, folded, new, deadline)
            helper.load_own(deadline)  # a fresh process: changes its predecessor published may still be folded
            candidate = helper.pick(deadline, spend, self._aggregate_size)
            change: Pending | None = None
            for attempt in range(self.max_attempts):
                if attempt:
                    if not spend.allows(self._aggregate_size, requests=2):
                        break
                    self.sleep(min(backoff(attempt, self.random), deadline.remaining()))
                fetching = None if candidate is None else pool.submit(helper.fetch, candidate, deadline)
                candidate = None
                state = self._read(deadline)
                change = fetching.result() if fetching is not None else change
                state, old = self._old_contribution(state, deadline)
                if upload is not None:
                    upload.result()
                    upload, written = None, guess
                named = state.table.get(self.node_id)
                # Since this read, only our own write or a helper folding one of our live changes moves it.
                self._named, self._named_known = named, True
                helper.settle(named, deadline)
                taken = helper.taken(named)
                write = plan_write(state.mean, state.table, self.node_id, old, folded, new, taken, written, change)
                if write is None:  # a restart found changes of its predecessor that may land in every slot
                    logger.warning(
                        "node %s: every contribution slot may still be named; skipping this epoch", self.node_id
                    )
                    break
                if write.put_slot is not None:
                    self._put_contribution(write.put_slot, data, folded, new, deadline)
                    written = write.put_slot
                last = (write, old)
                if self._compare_and_swap(state, write, deadline):
                    return write.mean, write.table
        self.stats.cas_giveups += 1
        if last is not None and written is not None and last[0].changes_own:
            helper.publish(last[0].base, last[1], folded, last[0].entry, deadline, self.max_attempts)
        else:
            helper.stats.deferred += 1
        if last is None:
            raise StoreError("update", layout.AGGREGATE, "no compare-and-swap attempt was possible")
        return last[0].mean, last[0].table

    def _compare_and_swap(self, state: AggregateState, write: Write, deadline: Deadline) -> bool:
        """Write ``write`` over the aggregate ``state`` was read from; False when another member wrote first."""
        version = max(state.version, self.version) + 1
        payload = self._encode_aggregate(write.mean, write.table, version)
        try:
            if state.tag is None:
                self.exchange.put_if_absent(layout.AGGREGATE, payload, deadline)
            else:
                self.exchange.put_if_match(layout.AGGREGATE, payload, state.tag, deadline)
        except PreconditionFailedError:
            self.stats.cas_conflicts += 1
            return False
        self.version = version
        self._named = write.entry
        self.helper.settle(write.entry, deadline)  # our write replaced the base of any change still pending
        if write.helped is not None:
            self.helper.folded(write.helped, deadline)
        return True

    def _put_contribution(
        self, slot: int, data: bytes, folded: list[np.ndarray], new: Entry, deadline: Deadline
    ) -> None:
        self._slots.pop(slot, None)  # unknown while the PUT is under way (it may fail half-way)
        self.exchange.put(layout.contribution_key(self.node_id, slot), data, deadline)
        self._slots[slot] = (new.payload_hash, folded)

    def _encode_aggregate(self, mean: list[np.ndarray], table: Table, version: int) -> bytes:
        header = UpdateHeader(
            node_id=self.node_id,
            seq=version,
            base_own_seq=0,
            framework=self._framework,
            extra={TABLE: table_json(table)},
            run=self.run,
        )
        return encode(mean, header, self._tensor_names, self.secret)

    # -- reading -----------------------------------------------------------------------------
    def _read(self, deadline: Deadline) -> AggregateState:
        exchange = self.exchange
        try:
            got = exchange.get_tagged(layout.AGGREGATE, deadline)
        except InvalidObjectError as exc:  # oversized: not worth downloading
            exchange.reject(exc)
            return self._repair(self._listed_tag(deadline), deadline)
        if got is None:  # a fresh experiment (or the aggregate was deleted: members add themselves back)
            return AggregateState(None, None, {}, self.version)
        data, tag = got
        self._aggregate_size = len(data)
        try:
            names = exchange.expected_names if exchange.framework == "torch" else None
            expected = None if exchange.expected is None else stored_specs(exchange.expected)
            decoded = decode(
                data,
                layout.AGGREGATE,
                expected=expected,
                secret=self.secret,
                expected_names=names,
                framework=exchange.framework,
            )
            table = parse_table(decoded.header.extra.get(TABLE), layout.AGGREGATE)
            if not table:
                raise InvalidObjectError(layout.AGGREGATE, "aggregate table: no members")
        except InvalidObjectError as exc:
            exchange.reject(exc)
            return self._repair(tag, deadline)
        if self._other_run(decoded.header.run):  # an earlier run's mean: ours starts empty, replacing it (CAS)
            return AggregateState(tag, None, {}, decoded.header.seq)
        self.helper.members_seen = set(table)
        return AggregateState(tag, list(decoded.arrays), table, decoded.header.seq)

    def _other_run(self, run: str | None) -> bool:
        """Whether an object names a run that is not ours (objects without one predate runs: counted)."""
        if self.run is None or run in (None, self.run):
            return False
        self.stats.leftovers_skipped += 1
        logger.warning("node %s (run %s) ignores an aggregate-mode object of run %s", self.node_id, self.run, run)
        return True

    def _listed_tag(self, deadline: Deadline) -> str | None:
        info = self.exchange.list(layout.AGGREGATE, deadline).get(layout.AGGREGATE)
        return None if info is None else info.tag

    def _old_contribution(
        self, state: AggregateState, deadline: Deadline
    ) -> tuple[AggregateState, list[np.ndarray] | None]:
        """The arrays the table names as ours (memory, else one GET); a lost or changed one triggers a repair."""
        entry = state.table.get(self.node_id)
        if entry is None:
            return state, None
        if self.node_id in state.rebuilt:
            return state, state.rebuilt[self.node_id]
        held = self._slots.get(entry.slot)
        if held is not None and held[0] == entry.payload_hash:
            return state, held[1]
        key = layout.contribution_key(self.node_id, entry.slot)
        update = self.exchange.fetch(ObjectInfo(key, "", 0), deadline, node_id=self.node_id)
        if isinstance(update, DecodedUpdate) and short_hash(update.payload_hash) == entry.payload_hash:
            return state, list(update.arrays)
        logger.warning(
            "node %s: the aggregate names its contribution %s (%s), which is gone or changed; rebuilding the aggregate",
            self.node_id,
            key,
            entry.payload_hash[:18],
        )
        state = self._repair(state.tag, deadline)
        own = state.table.get(self.node_id)
        return state, None if own is None else state.rebuilt[self.node_id]

    def _repair(self, tag: str | None, deadline: Deadline) -> AggregateState:
        """Rebuild the aggregate from every member's newest valid contribution (O(N) GETs; rare)."""
        exchange = self.exchange
        listing = exchange.list(layout.CONTRIBUTIONS, deadline)
        found = [
            (info, parsed)
            for key, info in sorted(listing.items())
            if (parsed := layout.parse_contribution_key(key)) is not None
        ]
        if not found:
            return AggregateState(tag, None, {}, self.version)
        self.stats.repairs += 1
        outcomes = exchange.fetch_many([info for info, _ in found], deadline, [node for _, (node, _) in found])
        candidates = []
        for (_, (node, slot)), outcome in zip(found, outcomes):
            if (
                isinstance(outcome, DecodedUpdate)
                and outcome.header.num_examples >= 1
                and not self._other_run(outcome.header.run)
            ):
                h = outcome.header
                entry = Entry(slot, h.seq, float(h.num_examples), short_hash(outcome.payload_hash), h.timestamp)
                candidates.append((node, entry, list(outcome.arrays)))
        best = latest_contributions(candidates)
        if not best:
            return AggregateState(tag, None, {}, self.version)
        mean, table = rebuild(best)
        logger.warning("node %s rebuilt the aggregate from the contributions of %d member(s)", self.node_id, len(table))
        return AggregateState(
            tag, mean, table, self.version, {node: list(arrays) for node, (_, arrays) in best.items()}
        )
