"""Who is in the experiment: member records, their lease, and leaving.

``members/<node_id>`` holds one small JSON record per node: owner token, host,
pid, when it joined, its last heartbeat, its lease and its status (``active``
or ``left``). A node claims its record when it first federates, refreshes the
heartbeat while it trains or waits (at most every lease/4), and marks itself
``left`` when training ends. Readers classify each record with ``member_state``
(pure, clock injected): a member is live, has left, or is dead (lease expired,
or its process is gone on the same host). Barriers wait for live members only;
objects of members that left or died a full lease before a reader joined are
leftovers of an earlier run and are not aggregated.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    DuplicateNodeIdError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreError,
)
from flwr_serverless.node.deadline import NO_DEADLINE, Deadline
from flwr_serverless.stores.base import Store
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


@dataclass(frozen=True)
class MemberRecord:
    """The content of ``members/<node_id>`` (wall-clock times: hosts need clocks synced well within a lease)."""

    node_id: str
    owner: str
    host: str
    pid: int
    joined: float
    heartbeat: float
    lease: float = DEFAULT_LEASE
    status: str = "active"  # "active" or "left"
    left: float | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

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
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        return record if record.lease > 0 else None


def member_state(
    record: MemberRecord, now: float, host: str | None = None, alive: Callable[[int], bool] = pid_alive
) -> str:
    """``live``, ``left``, ``expired`` (lease ran out) or ``gone`` (its process on this host has exited)."""
    if record.status == "left":
        return LEFT
    if now - record.heartbeat > record.lease:
        return EXPIRED
    here = socket.gethostname() if host is None else host
    if record.host == here and record.pid > 0 and record.pid != os.getpid() and not alive(record.pid):
        return GONE
    return LIVE


def ended_before(record: MemberRecord, moment: float) -> bool:
    """True when the member had left, or gone silent, a full lease before ``moment``: an earlier run's.

    A peer that left just before we joined (a fast node finishing first) is part of our run: its
    last weights still count. The lease is the grace, for leaving as for silence.
    """
    last_seen = record.left if record.status == "left" and record.left is not None else record.heartbeat
    return last_seen + record.lease < moment


class Membership:
    """This node's claim on ``members/<node_id>``: join once, keep the lease fresh, leave at the end."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        owner: str,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.owner = owner
        self.lease = check_lease(lease)
        self.key = layout.member_key(node_id)
        self.clock = clock
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
            self.store.put(self.key, data)
            return
        for _ in range(_CLAIM_ROUNDS):
            try:
                self.tag = self.store.put_if_absent(self.key, data)
                return
            except PreconditionFailedError:
                pass
            try:
                raw, tag = self.store.get_with_tag(self.key)
            except ObjectNotFoundError:
                continue  # deleted meanwhile: try to create it again
            reason = self._takeover_reason(raw)
            if reason != "same owner" and before_takeover is not None:
                before_takeover()
            try:
                self.tag = self.store.put_if_match(self.key, data, tag)
            except PreconditionFailedError:
                continue  # someone else wrote it meanwhile: look again
            if reason != "same owner":
                logger.warning("node %s takes over its node id: %s", self.node_id, reason)
            return
        raise DuplicateNodeIdError(f"node id {self.node_id!r}: {self.key} kept changing; is another node racing?")

    def _takeover_reason(self, raw: bytes) -> str:
        """Why we may take the id over; raises ``DuplicateNodeIdError`` when we may not."""
        record = MemberRecord.parse(raw)
        if record is None:
            return "the member object was unreadable"
        if record.owner == self.owner:
            return "same owner"
        state = member_state(record, self.clock())
        if state == GONE:
            return f"its previous process (pid {record.pid} on {record.host}) is gone"
        if state == LEFT:
            return "the previous owner left the experiment"
        age = self.clock() - record.heartbeat
        if state == EXPIRED:
            return f"the previous owner's lease expired ({age:.0f}s since its heartbeat, lease {record.lease:.0f}s)"
        raise DuplicateNodeIdError(
            f"node id {self.node_id!r} is already used by a live node in this experiment "
            f"(owner {record.owner:.8}... on host {record.host!r}, pid {record.pid}, heartbeat {age:.0f}s ago, "
            f"lease {record.lease:.0f}s). Give this node another node_id; to resume that node, restore its "
            "state_dict() (which carries the owner token), or start again after its lease expired."
        )

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
                    self.store.put(self.key, data)
                else:
                    self.tag = self.store.put_if_match(self.key, data, self.tag)
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
    """The member records of an experiment, read with one LIST; records are re-read only when their tag changed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[str, MemberRecord | None]] = {}  # key -> (tag, record)

    def read(self, deadline: Deadline = NO_DEADLINE) -> dict[str, MemberRecord]:
        """node id -> record for every readable member record (raises ``StoreError`` if the LIST fails)."""
        with deadline.applied():
            listing = self.store.list(layout.MEMBERS)
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
                if cached[1] is not None and cached[1].node_id == node_id:
                    records[node_id] = cached[1]
        for gone in set(self._cache) - set(listing):
            del self._cache[gone]
        return records


def live_members(records: Mapping[str, MemberRecord], now: float) -> set[str]:
    return {node_id for node_id, record in records.items() if member_state(record, now) == LIVE}
