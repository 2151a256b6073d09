"""Who is in the experiment: member records (``members/<node_id>``), their lease, their run, and leaving.

A node claims its record when it first federates, rewrites it while it trains or waits (at most
every lease/4) and marks itself ``left`` at the end. Ages are store times (``StoreClock``), never
two hosts' clocks; ``member_state`` (pure) says live, left or dead. Rules: docs/operations/runs_and_liveness.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    DuplicateNodeIdError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreError,
)
from flwr_serverless.node.deadline import NO_DEADLINE, Deadline
from flwr_serverless.node.store_clock import StoreClock
from flwr_serverless.stores.base import ObjectInfo, Store
from flwr_serverless.wire import layout

logger = logging.getLogger("flwr_serverless")

MEMBERS_PREFIX = layout.MEMBERS
DEFAULT_LEASE = 300.0  # seconds without a heartbeat after which a member counts as dead
_CLAIM_ROUNDS = 8
LIVE, LEFT, EXPIRED, GONE = "live", "left", "expired", "gone"


def new_owner_token() -> str:
    """A token unique to one node instance (kept in ``state_dict()`` so a resumed node is the same owner)."""
    return uuid.uuid4().hex


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def check_lease(lease: float) -> float:
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
        raise ValueError(f"member_lease must be a positive number of seconds, got {lease!r}")
    return float(lease)


def check_run_id(run_id: object) -> str:
    """A run id is a plain name like a node id (it travels in keys' company: headers and member records)."""
    if not layout.is_valid_node_id(run_id):
        raise ValueError(
            f"run_id must be a plain name (letters, digits, '_', '-', '.'; at most 128 characters), got {run_id!r}"
        )
    return str(run_id)


@dataclass(frozen=True)
class MemberRecord:
    """The content of ``members/<node_id>``.

    ``joined``, ``heartbeat`` and ``left`` are the writer's wall clock, for logs and people. Liveness reads
    ``stamp``: when the store last wrote the record, on the store's clock (set by ``Roster``, never stored).
    """

    node_id: str
    owner: str
    host: str
    pid: int
    joined: float
    heartbeat: float
    lease: float = DEFAULT_LEASE
    status: str = "active"  # "active" or "left"
    left: float | None = None
    run: str | None = None  # the run (generation) this member belongs to; None: written before runs existed
    stamp: float | None = field(default=None, compare=False)  # store time of the last write (not stored)

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        del fields["stamp"]
        return json.dumps(fields).encode()

    @classmethod
    def parse(cls, raw: bytes) -> MemberRecord | None:
        """The record in ``raw``, or None when it is unreadable (a reader then treats the node as unknown)."""
        try:
            info = json.loads(raw)
            record = cls(
                node_id=str(info["node_id"]),
                owner=str(info.get("owner", "")),
                host=str(info.get("host", "")),
                pid=int(info.get("pid", -1)),
                joined=float(info.get("joined", 0.0)),
                heartbeat=float(info.get("heartbeat", info.get("joined", 0.0))),
                lease=float(info.get("lease", DEFAULT_LEASE)),
                status=str(info.get("status", "active")),
                left=None if info.get("left") is None else float(info["left"]),
                run=None if info.get("run") is None else str(info["run"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if record.run is not None and not layout.is_valid_node_id(record.run):
            return None
        return record if record.lease > 0 else None

    @property
    def last_seen(self) -> float:
        """When the member last wrote its record: store time when known, else its own wall clock."""
        return self.stamp if self.stamp is not None else self.heartbeat


def member_state(
    record: MemberRecord, now: float, host: str | None = None, alive: Callable[[int], bool] = pid_alive
) -> str:
    """``live``, ``left``, ``expired`` (lease ran out) or ``gone`` (its process on this host has exited).

    ``now`` is on the clock of ``record.last_seen``: the store's (``Roster.now``) when records carry stamps.
    """
    if record.status == "left":
        return LEFT
    if now - record.last_seen > record.lease:
        return EXPIRED
    here = socket.gethostname() if host is None else host
    if record.host == here and record.pid > 0 and record.pid != os.getpid() and not alive(record.pid):
        return GONE
    return LIVE


def in_run(record: MemberRecord, run: str | None, now: float) -> bool:
    """Whether the member belongs to ``run``: the same run id; a record without one (written before runs
    existed) belongs to whichever run is going on while it is live."""
    if record.run is None or run is None:
        return member_state(record, now) == LIVE
    return record.run == run


def choose_run(me: str, records: Mapping[str, MemberRecord], now: float, listing: Mapping[str, ObjectInfo]) -> str:
    """The run a node joins when no run id was given: the live members' run, or a new one.

    Joiners while members of a run are live adopt it (the one most live members share; ties: the
    smallest id). With no live member a new generation begins; its id is a hash of the member
    records as listed (keys and tags), so nodes starting together from the same state mint the same
    id, and a node that starts after another wrote its record sees it live and adopts it. (A LIST is
    one snapshot and a claim one write, so every node lists either the state before the first claim
    or a live claimant: nodes whose memberships overlap always converge.) An earlier run's records
    always differ from the state its own run started from, so a re-run never takes an earlier run's
    id, however soon after that run ended. The flip side: a peer that left before this node's first
    federation looks exactly like an earlier run, and is not joined; nodes that may not overlap need
    a ``run_id``.
    """
    live = Counter(
        record.run
        for node, record in records.items()
        if node != me and record.run is not None and member_state(record, now) == LIVE
    )
    if live:
        return min(live, key=lambda run: (-live[run], run))
    state = "\n".join(f"{key} {info.tag}" for key, info in sorted(listing.items()))
    return "g-" + hashlib.sha256(state.encode()).hexdigest()[:20]


class Membership:
    """This node's claim on ``members/<node_id>``: join once, keep the lease fresh, leave at the end."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        owner: str,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.time,
        run: str | None = None,
        store_clock: StoreClock | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.owner = owner
        self.lease = check_lease(lease)
        self.key = layout.member_key(node_id)
        self.clock = clock  # wall clock: the record's human-readable times only
        self.run = run
        self.store_clock = store_clock if store_clock is not None else StoreClock(store)
        self.tag: str | None = None
        self.joined_at: float | None = None
        self.lost = False  # another owner took the id over while we were silent past our lease
        self.left = False
        self._refreshed = 0.0

    def _record(self, **changes: Any) -> MemberRecord:
        now = self.clock()
        base = MemberRecord(
            self.node_id,
            self.owner,
            socket.gethostname(),
            os.getpid(),
            joined=self.joined_at if self.joined_at is not None else now,
            heartbeat=now,
            lease=self.lease,
            run=self.run,
        )
        return replace(base, **changes)

    def join(self, deadline: Deadline = NO_DEADLINE, before_takeover: Callable[[], None] | None = None) -> None:
        """Claim the id. Raises ``DuplicateNodeIdError`` while another live node owns it; ``StoreError`` if down.

        ``before_takeover`` runs when the id belonged to an earlier instance, before our claim is
        visible: its leftovers can be removed while readers still see them as an ended member's.
        """
        with deadline.applied():
            self._claim(before_takeover)
        self._refreshed = time.monotonic()

    def _claim(self, before_takeover: Callable[[], None] | None) -> None:
        self.joined_at = self.clock()
        data = self._record().to_bytes()
        if not self.store.supports_conditional_writes:
            logger.warning(
                "store %r has no conditional writes: node %s cannot detect another node using the same id",
                self.store,
                self.node_id,
            )
            self.store_clock.wrote(self.key, self.store.put(self.key, data))
            return
        for _ in range(_CLAIM_ROUNDS):
            try:
                self.tag = self.store.put_if_absent(self.key, data)
                self.store_clock.wrote(self.key, self.tag)
                return
            except PreconditionFailedError:
                pass
            try:
                raw, tag = self.store.get_with_tag(self.key)
            except ObjectNotFoundError:
                continue  # deleted meanwhile: try to create it again
            reason = self._takeover_reason(raw, tag)
            if reason != "same owner" and before_takeover is not None:
                before_takeover()
            try:
                self.tag = self.store.put_if_match(self.key, data, tag)
            except PreconditionFailedError:
                continue  # someone else wrote it meanwhile: look again
            self.store_clock.wrote(self.key, self.tag)
            if reason != "same owner":
                logger.warning("node %s takes over its node id: %s", self.node_id, reason)
            return
        raise DuplicateNodeIdError(f"node id {self.node_id!r}: {self.key} kept changing; is another node racing?")

    def _takeover_reason(self, raw: bytes, tag: str) -> str:
        """Why we may take the id over; raises ``DuplicateNodeIdError`` when we may not."""
        record = MemberRecord.parse(raw)
        if record is None:
            return "the member object was unreadable"
        if record.owner == self.owner:
            return "same owner"
        record, now = self._aged(record, tag)
        state = member_state(record, now)
        if state == GONE:
            return f"its previous process (pid {record.pid} on {record.host}) is gone"
        if state == LEFT:
            return "the previous owner left the experiment"
        age = now - record.last_seen
        if state == EXPIRED:
            return f"the previous owner's lease expired ({age:.0f}s since its heartbeat, lease {record.lease:.0f}s)"
        raise DuplicateNodeIdError(
            f"node id {self.node_id!r} is already used by a live node in this experiment "
            f"(owner {record.owner:.8}... on host {record.host!r}, pid {record.pid}, heartbeat {age:.0f}s ago, "
            f"lease {record.lease:.0f}s). Give this node another node_id; to resume that node, restore its "
            "state_dict() (which carries the owner token), or start again after its lease expired."
        )

    def _aged(self, record: MemberRecord, tag: str) -> tuple[MemberRecord, float]:
        """``record`` with its store stamp, and the store's time now (one LIST of the key)."""
        listing = self.store.list(self.key)
        self.store_clock.observe(listing)
        info = listing.get(self.key)
        now = self.store_clock.now()
        if info is None or info.tag != tag or info.modified is None or now is None:
            return record, self.clock()  # no store time to be had: the writers' clocks, as a last resort
        return replace(record, stamp=info.modified), now

    def heartbeat(self, deadline: Deadline = NO_DEADLINE, force: bool = False) -> None:
        """Refresh the lease if due (at most every lease/4 seconds); never raises on store faults."""
        if self.lost or self.left or (not force and time.monotonic() - self._refreshed < self.lease / 4):
            return
        self._write(self._record(), deadline, "refresh its membership")

    def rejoin(self, deadline: Deadline = NO_DEADLINE) -> None:
        """Back after ``leave`` (another ``fit``): active again, same join time; never raises on store faults."""
        if self.left and not self.lost and self._write(self._record(), deadline, "rejoin"):
            self.left = False

    def leave(self, deadline: Deadline = NO_DEADLINE) -> None:
        """Mark the record ``left`` so barriers stop waiting for this node; never raises on store faults."""
        if self.lost or self.left:
            return
        if self._write(self._record(status="left", left=self.clock()), deadline, "record that it left"):
            self.left = True

    def _write(self, record: MemberRecord, deadline: Deadline, what: str) -> bool:
        data = record.to_bytes()
        try:
            with deadline.applied():
                if self.tag is None or not self.store.supports_conditional_writes:
                    self.store_clock.wrote(self.key, self.store.put(self.key, data))
                else:
                    self.tag = self.store.put_if_match(self.key, data, self.tag)
                    self.store_clock.wrote(self.key, self.tag)
            self._refreshed = time.monotonic()
            return True
        except PreconditionFailedError:
            self._check_still_owner()
        except (StoreError, ConditionalWritesUnsupportedError) as exc:
            logger.info("node %s could not %s (will retry): %s", self.node_id, what, exc)
        return False

    def _check_still_owner(self) -> None:
        try:
            raw, tag = self.store.get_with_tag(self.key)
        except StoreError:
            return
        record = MemberRecord.parse(raw)
        if record is not None and record.owner == self.owner:  # our own earlier write (a retried PUT had landed)
            self.tag = tag
            return
        self.lost = True
        logger.error(
            "node %s: another node took over this node id (it was silent longer than its %.0fs lease); "
            "two jobs now publish as %s",
            self.node_id,
            self.lease,
            self.node_id,
        )


class Roster:
    """The member records of an experiment, read with one LIST; records are re-read only when their tag changed.

    Each record comes with its store stamp; ``now()`` is the store's time on the same clock (the
    caller's wall clock only for a backend that stamps nothing).
    """

    def __init__(self, store: Store, clock: StoreClock | None = None, wall_clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock if clock is not None else StoreClock(store)
        self.wall_clock = wall_clock
        self.listing: dict[str, ObjectInfo] = {}  # the last LIST of members/
        self._stamped = False  # whether the last listing carried store stamps
        self._cache: dict[str, tuple[str, MemberRecord | None]] = {}  # key -> (tag, record)

    def now(self) -> float:
        """The time to age the last ``read``'s records by: the store's, or (no stamps) the wall clock."""
        store_now = self.clock.now() if self._stamped else None
        return store_now if store_now is not None else self.wall_clock()

    def read(self, deadline: Deadline = NO_DEADLINE) -> dict[str, MemberRecord]:
        """node id -> record for every readable member record (raises ``StoreError`` if the LIST fails)."""
        with deadline.applied():
            listing = self.store.list(layout.MEMBERS)
            self.clock.observe(listing)
            self.listing = listing
            stamped = self.clock.now() is not None and all(info.modified is not None for info in listing.values())
            self._stamped = stamped
            records: dict[str, MemberRecord] = {}
            for key, info in listing.items():
                node_id = layout.parse_member_key(key)
                if node_id is None:
                    continue
                cached = self._cache.get(key)
                if cached is None or cached[0] != info.tag:
                    try:
                        cached = (info.tag, MemberRecord.parse(self.store.get(key)))
                    except ObjectNotFoundError:
                        continue
                    self._cache[key] = cached
                record = cached[1]
                if record is not None and record.node_id == node_id:
                    records[node_id] = replace(record, stamp=info.modified if stamped else None)
        for gone in set(self._cache) - set(listing):
            del self._cache[gone]
        return records


def live_members(records: Mapping[str, MemberRecord], now: float) -> set[str]:
    """Ids of the live members (``now`` on the records' clock: ``Roster.now()``)."""
    return {node_id for node_id, record in records.items() if member_state(record, now) == LIVE}
