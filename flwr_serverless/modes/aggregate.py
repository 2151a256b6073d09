"""Aggregate mode (O(1) reads per node-epoch): one shared object holds FedAvg of every member's latest contribution.

The object ``aggregate`` stores the weighted mean ``M`` of the contributions
its *table* names: per member ``[slot, seq, weight, hash]``, the slot
of ``contributions/<id>/<slot>`` holding the contribution, its seq, weight ``c``
(examples) and the first 64 bits of its payload hash (``short_hash``).

Why 64 bits are enough: the table's hash only tells which of a member's
contributions the mean includes (an accidental mismatch is a 2^-64 event).
It is no defence against a hostile writer: one who can write contributions can
rewrite the aggregate itself, table and all; the object's HMAC signature
(``secret``) is what refuses forgeries, of both. The full 256-bit digests cost
~75 bytes per member on every read (7.5 KB at N = 100).
A member replaces its own contribution with one compare-and-swap write::

    M' = (T M - c_old w_old + c_new w_new) / T'      T = sum of the table's weights, T' = T - c_old + c_new

computed in float64 (``strategy.aggregate.weighted_sum``, one slice at a time) and
stored in the model's float type (at least float32),
so ``M`` is FedAvg over the table's contributions up to one rounding per
update. Integer and boolean tensors hold the element-wise maximum of every
contribution folded so far (FedAvg keeps the maximum of such tensors; for step
counters, which only grow, that is the maximum of the latest ones).

A member whose compare-and-swap lost publishes its change as a *pending* delta
``d = c_new w_new - c_old w_old`` with the entries it replaces and adds; any
member that wins a write can fold it in with ``M' = (T M + d) / T'``
(``fold_delta``), but only while the table still names exactly that base
entry: the fold replaces it, so no delta is ever folded twice.

Everything here is pure: parsing and checking a table read from the store,
folding one contribution or delta in, rebuilding ``M`` from scratch, and the
planner of one epoch's attempt (``plan_write``: given what was read, our entry
and another member's pending change, the write to attempt). The node
(``node/aggregate_node.py``) does the reads and writes around it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.strategy.aggregate import weighted_sum
from flwr_serverless.wire import layout
from flwr_serverless.wire.header import parse_hash

TABLE = "aggregate"  # the key of the table in the aggregate object's header ``extra``
MAX_MEMBERS = 100_000
BACKOFF = 0.05  # seconds: the first retry waits up to this, doubling after each conflict
SHORT_HASH = 16  # hex digits of a payload hash kept in the table (64 bits)
_SHORT = re.compile(rf"[0-9a-f]{{{SHORT_HASH}}}")
TensorSpec = tuple[tuple[int, ...], np.dtype]


@dataclass(frozen=True)
class Entry:
    """The contribution of one member that the aggregate includes."""

    slot: int
    seq: int
    weight: float
    payload_hash: str  # short_hash() of the contribution's payload hash
    timestamp: float = field(default=0.0, compare=False)  # the writer's clock (repairs pick the newer slot)

    def to_json(self) -> list[Any]:
        """``[slot, seq, weight, hash]``: a list, as the table is read every epoch at any N."""
        weight = int(self.weight) if self.weight.is_integer() and abs(self.weight) < 2**53 else self.weight
        return [self.slot, self.seq, weight, self.payload_hash]


def short_hash(payload_hash: str) -> str:
    """``"blake3:<64 hex>"`` -> its first 16 hex digits (a short hash passes through)."""
    if _SHORT.fullmatch(payload_hash):
        return payload_hash
    return parse_hash(payload_hash, "payload_hash")[1][:SHORT_HASH]


Table = dict[str, Entry]


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """Float tensors are kept in at least float32 (a float16 running mean would drift fast)."""
    dtype = np.dtype(dtype)
    return np.promote_types(dtype, np.float32).newbyteorder("<") if dtype.kind == "f" else dtype.newbyteorder("<")


def stored_specs(model: Sequence[TensorSpec]) -> list[TensorSpec]:
    return [(tuple(shape), stored_dtype(dtype)) for shape, dtype in model]


def total_weight(table: Mapping[str, Entry]) -> float:
    return math.fsum(entry.weight for entry in table.values())


def table_json(table: Mapping[str, Entry]) -> dict[str, Any]:
    return {"members": {node: entry.to_json() for node, entry in sorted(table.items())}}


def parse_table(value: Any, key: str) -> Table:
    """Every claim of a table read from the store, checked; ``InvalidObjectError(key, reason)`` otherwise."""

    def bad(why: str) -> InvalidObjectError:
        return InvalidObjectError(key, f"aggregate table: {why}")

    if not isinstance(value, dict) or set(value) != {"members"} or not isinstance(value["members"], dict):
        raise bad("must be {'members': {node id: entry}}")
    members = value["members"]
    if len(members) > MAX_MEMBERS:
        raise bad(f"{len(members)} members, more than {MAX_MEMBERS}")
    table: Table = {}
    for node, raw in members.items():
        if not layout.is_valid_node_id(node):
            raise bad(f"member {str(node)[:40]!r} is not a plain node id")
        table[node] = parse_entry(raw, node, key, "aggregate table")
    return table


def parse_entry(raw: Any, node: str, key: str, where: str) -> Entry:
    """One ``[slot, seq, weight, hash]`` entry of ``node``, checked; ``InvalidObjectError`` otherwise."""

    def bad(why: str) -> InvalidObjectError:
        return InvalidObjectError(key, f"{where}: {why}")

    if not isinstance(raw, list) or len(raw) != 4:
        raise bad(f"entry of {node!r} must be [slot, seq, weight, hash]")
    slot, seq, weight, payload_hash = raw
    if isinstance(slot, bool) or not isinstance(slot, int) or slot not in layout.CONTRIBUTION_SLOTS:
        raise bad(f"slot of {node!r} must be one of {layout.CONTRIBUTION_SLOTS}")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 2**53:
        raise bad(f"seq of {node!r} must be an integer in [0, 2**53]")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1e300:
        raise bad(f"weight of {node!r} must be a positive finite number")
    if not (isinstance(payload_hash, str) and _SHORT.fullmatch(payload_hash)):  # or a full one (0.3 tables)
        payload_hash = parse_hash(payload_hash, key)[1][:SHORT_HASH]
    return Entry(int(slot), int(seq), float(weight), payload_hash)


def free_slot(taken: set[int], preferred: int | None = None) -> int | None:
    """A slot outside ``taken`` (the one the aggregate names, and any a live pending change may name).

    ``preferred`` (where the contribution already is) if it is free; None if every slot is taken.
    """
    if preferred is not None and preferred not in taken:
        return preferred
    return next((slot for slot in layout.CONTRIBUTION_SLOTS if slot not in taken), None)


def fold(
    mean: Sequence[np.ndarray] | None,
    table: Mapping[str, Entry],
    node: str,
    old: Sequence[np.ndarray] | None,
    new: Sequence[np.ndarray],
    entry: Entry,
) -> tuple[list[np.ndarray], Table]:
    """Replace ``node``'s contribution (``old``, the arrays its table entry names; None if it has none) by ``new``.

    Returns the new mean and table. ``mean`` is None for the first contribution ever.
    """
    if (node in table) != (old is not None):
        raise ValueError(f"node {node}: the old contribution must be given exactly when the table names one")
    updated = dict(table)
    old_weight = updated.pop(node).weight if node in updated else 0.0
    before = total_weight(updated) + old_weight
    updated[node] = entry
    after = total_weight(updated)
    if mean is None:
        return [np.ascontiguousarray(a, dtype=stored_dtype(np.asarray(a).dtype)) for a in new], updated
    out = []
    for index, (current, fresh) in enumerate(zip(mean, new)):
        current, fresh = np.asarray(current), np.asarray(fresh)
        if current.dtype.kind != "f":
            out.append(np.maximum(current, fresh.astype(current.dtype)))
            continue
        # (before * mean - old_weight * old + new_weight * new) / after, in float64 slices
        layer, scales = [current], [before]
        if old is not None:
            layer, scales = [current, np.asarray(old[index])], [before, -old_weight]
        out.append(weighted_sum([*layer, fresh], [*scales, entry.weight], current.dtype, divide_by=after))
    return out, updated


def delta(
    old: Sequence[np.ndarray] | None, old_weight: float, new: Sequence[np.ndarray], new_weight: float
) -> list[np.ndarray]:
    """A pending change: ``new_weight * new - old_weight * old`` for float tensors (in float64, stored at
    least float32), ``new`` itself for integer ones (the mean keeps their maximum)."""
    out = []
    for index, fresh in enumerate(new):
        fresh = np.asarray(fresh)
        dtype = stored_dtype(fresh.dtype)
        if dtype.kind != "f":
            out.append(np.ascontiguousarray(fresh, dtype=dtype))
            continue
        if old is None:
            out.append(weighted_sum([fresh], [new_weight], dtype))
        else:
            out.append(weighted_sum([fresh, np.asarray(old[index])], [new_weight, -old_weight], dtype))
    return out


def fold_delta(
    mean: Sequence[np.ndarray],
    table: Mapping[str, Entry],
    node: str,
    base: Entry | None,
    change: Sequence[np.ndarray],
    entry: Entry,
) -> tuple[list[np.ndarray], Table]:
    """Fold another member's pending ``change`` (see ``delta``) in: ``M' = (T M + d) / T'``.

    Only valid while the table names exactly ``base`` for ``node`` (None: no entry), which the
    caller checks; the new table names ``entry``, so the same change never matches again.
    """
    if table.get(node) != base:
        raise ValueError(f"node {node}: the pending change replaces {base}, the table names {table.get(node)}")
    updated = dict(table)
    before = total_weight(updated)
    updated[node] = entry
    after = total_weight(updated)
    out = []
    for current, d in zip(mean, change):
        current, d = np.asarray(current), np.asarray(d)
        if current.dtype.kind != "f":
            out.append(np.maximum(current, d.astype(current.dtype)))
            continue
        out.append(weighted_sum([current, d], [before, 1.0], current.dtype, divide_by=after))
    return out, updated


def rebuild(contributions: Mapping[str, tuple[Entry, Sequence[np.ndarray]]]) -> tuple[list[np.ndarray], Table]:
    """The mean and table from scratch (repair): exact FedAvg of the given contributions."""
    if not contributions:
        raise ValueError("nothing to rebuild the aggregate from")
    table = {node: entry for node, (entry, _) in contributions.items()}
    total = total_weight(table)
    ordered = [contributions[node] for node in sorted(contributions)]
    out = []
    for index, first in enumerate(ordered[0][1]):
        first = np.asarray(first)
        dtype = stored_dtype(first.dtype)
        if dtype.kind != "f":
            out.append(np.maximum.reduce([np.asarray(arrays[index]) for _, arrays in ordered]).astype(dtype))
            continue
        layer = [np.asarray(arrays[index]) for _, arrays in ordered]
        out.append(weighted_sum(layer, [entry.weight / total for entry, _ in ordered], dtype))
    return out, table


def latest_contributions(
    found: Iterable[tuple[str, Entry, Sequence[np.ndarray]]],
) -> dict[str, tuple[Entry, Sequence[np.ndarray]]]:
    """Each member's newest contribution among its slots (a repair's input to ``rebuild``).

    Newest by the writer's clock, then seq: seq restarts with the process.
    """
    best: dict[str, tuple[Entry, Sequence[np.ndarray]]] = {}
    for node, entry, arrays in found:
        if node not in best or (entry.timestamp, entry.seq) > (best[node][0].timestamp, best[node][0].seq):
            best[node] = (entry, arrays)
    return best


def stored_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of a model as the aggregate stores it (floats at least float32)."""
    return sum(a.size * stored_dtype(a.dtype).itemsize for a in map(np.asarray, arrays))


# -- pending changes and the write to attempt -----------------------------------------------------
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

    def applies_to(self, table: Mapping[str, Entry]) -> bool:
        return table.get(self.ref.node) == self.base


def taken_slots(named: Entry | None, own: Iterable[PendingRef]) -> set[int]:
    """Slots the aggregate may name for a member at its next read: the named one and those of its live changes."""
    return ({named.slot} if named is not None else set()) | {ref.slot for ref in own if ref.live_in(named)}


@dataclass(frozen=True)
class Write:
    """The compare-and-swap write to attempt after one read.

    ``mean`` and ``table`` are what to write; ``base`` is the entry the read named for the
    writer, ``entry`` the one the write names; the writer's contribution must first be PUT
    to ``put_slot`` (None: it is already in place); ``helped`` is the pending change folded in.
    """

    mean: list[np.ndarray]
    table: Table
    base: Entry | None
    entry: Entry
    put_slot: int | None = None
    helped: Pending | None = None

    @property
    def changes_own(self) -> bool:
        """The write replaces the writer's entry: if every attempt loses, its change is worth publishing."""
        return self.entry != self.base


def plan_write(
    mean: Sequence[np.ndarray] | None,
    table: Mapping[str, Entry],
    node: str,
    old: Sequence[np.ndarray] | None,
    contribution: Sequence[np.ndarray],
    new: Entry,
    taken: set[int],
    written: int | None = None,
    helper: Pending | None = None,
) -> Write | None:
    """The write to attempt, given what was read, our new entry and another member's pending change.

    ``mean`` and ``table`` were read (``mean`` None: empty), ``old`` are the arrays the table names
    as ``node``'s; ``contribution`` and ``new`` (its slot is chosen here) replace them. ``taken``
    are slots the aggregate may name for ``node`` (``taken_slots``), ``written`` the slot the new
    contribution is already in. ``helper`` is folded in when the table names exactly its base.
    None: every slot may still be named (a restart found its predecessor's changes), skip the epoch.
    """
    named = table.get(node)
    if (
        named is not None
        and mean is not None
        and (named.seq, named.weight, named.payload_hash)
        == (
            new.seq,
            new.weight,
            new.payload_hash,
        )
    ):
        return Write(list(mean), dict(table), named, named)  # a repair already folded this very contribution in
    slot = free_slot(taken, written)
    if slot is None:
        return None
    entry = replace(new, slot=slot)
    helped = helper if helper is not None and mean is not None and helper.applies_to(table) else None
    if helped is not None and mean is not None:
        mean, table = fold_delta(mean, table, helped.ref.node, helped.base, helped.change, helped.entry)
    folded, updated = fold(mean, table, node, old, contribution, entry)
    return Write(folded, updated, named, entry, None if written == slot else slot, helped)


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): jittered, doubling after each conflict."""
    return rng.uniform(0, BACKOFF * 2 ** (attempt - 1))
