"""Who owns a node id: one live node per id and experiment, with a lease so restarts can rejoin.

Two jobs started with the same ``node_id`` would overwrite each other's
weights under ``nodes/<id>`` and silently halve the federation, so the second
one must be refused. A node crashing and starting again under its id must not
be refused forever, though. The member object ``members/<id>`` therefore holds

    {"node_id", "owner" (random token), "host", "pid", "joined", "heartbeat", "lease"}

It is created with a create-only write. A node finding it taken may take it
over (compare-and-swap on the tag it read) when

* the owner token is its own (the node was restored from ``state_dict()``,
  or a retried create had in fact landed), or
* the owner ran on this host and its process is gone (a crash, then a restart), or
* the owner's heartbeat is older than its lease (it stopped, on any host).

Otherwise it raises ``DuplicateNodeIdError`` naming the id and the owner. A
live owner refreshes its heartbeat from its federation calls, at most every
``lease / 4`` seconds (one small PUT), so the lease must exceed the longest
gap between two federations. Backends without conditional writes cannot
decide this atomically: the node warns and writes its member object plainly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from flwr_serverless.errors import (
    ConditionalWritesUnsupportedError,
    DuplicateNodeIdError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreError,
)
from flwr_serverless.stores.base import Store

logger = logging.getLogger("flwr_serverless")

MEMBERS_PREFIX = "members/"
DEFAULT_LEASE = 300.0  # seconds without a heartbeat after which another owner may take the id over
_CLAIM_ROUNDS = 8


def new_owner_token() -> str:
    """A token unique to one node instance (kept in ``state_dict()`` so a resumed node is the same owner)."""
    return uuid.uuid4().hex


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class Membership:
    """The claim of one node on ``members/<node_id>``: join once, then keep the lease fresh."""

    def __init__(self, store: Store, node_id: str, owner: str, lease: float = DEFAULT_LEASE) -> None:
        if lease <= 0:
            raise ValueError("the member lease must be positive")
        self.store = store
        self.node_id = node_id
        self.owner = owner
        self.lease = float(lease)
        self.key = f"{MEMBERS_PREFIX}{node_id}"
        self.tag: str | None = None
        self.lost = False  # another owner took the id over while we were silent past our lease
        self._refreshed = 0.0

    def _record(self) -> bytes:
        now = time.time()
        info = {
            "node_id": self.node_id,
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "joined": now,
            "heartbeat": now,
            "lease": self.lease,
        }
        return json.dumps(info).encode()

    def join(self) -> None:
        """Claim the id. Raises ``DuplicateNodeIdError`` while another live node owns it; ``StoreError`` if down."""
        data = self._record()
        if not self.store.supports_conditional_writes:
            logger.warning(
                "store %r has no conditional writes: node %s cannot detect another node using the same id",
                self.store, self.node_id,
            )
            self.store.put(self.key, data)
            self._refreshed = time.monotonic()
            return
        for _ in range(_CLAIM_ROUNDS):
            try:
                self.tag = self.store.put_if_absent(self.key, data)
                self._refreshed = time.monotonic()
                return
            except PreconditionFailedError:
                pass
            try:
                raw, tag = self.store.get_with_tag(self.key)
            except ObjectNotFoundError:
                continue  # deleted meanwhile: try to create it again
            reason = self._takeover_reason(raw)
            try:
                self.tag = self.store.put_if_match(self.key, data, tag)
            except PreconditionFailedError:
                continue  # someone else wrote it meanwhile: look again
            if reason != "same owner":
                logger.warning("node %s takes over its node id: %s", self.node_id, reason)
            self._refreshed = time.monotonic()
            return
        raise DuplicateNodeIdError(f"node id {self.node_id!r}: {self.key} kept changing; is another node racing?")

    def _takeover_reason(self, raw: bytes) -> str:
        """Why we may take the id over; raises ``DuplicateNodeIdError`` when we may not."""
        try:
            info: dict[str, Any] = json.loads(raw)
            if not isinstance(info, dict):
                raise TypeError
        except (ValueError, TypeError):
            return "the member object was unreadable"
        if info.get("owner") == self.owner:
            return "same owner"
        host, pid = info.get("host"), info.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            return f"its previous process (pid {pid} on {host}) is gone"
        try:
            heartbeat = float(info.get("heartbeat", info.get("joined", 0.0)))
            lease = float(info.get("lease", DEFAULT_LEASE))
        except (TypeError, ValueError):
            return "the member object was unreadable"
        age = time.time() - heartbeat
        if age > lease:
            return f"the previous owner's lease expired ({age:.0f}s since its heartbeat, lease {lease:.0f}s)"
        raise DuplicateNodeIdError(
            f"node id {self.node_id!r} is already used by a live node in this experiment "
            f"(owner {info.get('owner')!s:.8}... on host {host!r}, pid {pid}, heartbeat {age:.0f}s ago, "
            f"lease {lease:.0f}s). Give this node another node_id; to resume that node, restore its "
            "state_dict() (which carries the owner token), or start again after its lease expired."
        )

    def heartbeat(self) -> None:
        """Refresh the lease if due (at most every lease/4 seconds); never raises on store faults."""
        if self.lost or time.monotonic() - self._refreshed < self.lease / 4:
            return
        data = self._record()
        try:
            if self.tag is None:
                self.store.put(self.key, data)
            else:
                self.tag = self.store.put_if_match(self.key, data, self.tag)
            self._refreshed = time.monotonic()
        except PreconditionFailedError:
            self._check_still_owner()
        except (StoreError, ConditionalWritesUnsupportedError) as exc:
            logger.info("node %s could not refresh its membership (will retry): %s", self.node_id, exc)

    def _check_still_owner(self) -> None:
        try:
            raw, tag = self.store.get_with_tag(self.key)
            owner = json.loads(raw).get("owner")
        except (StoreError, ValueError, AttributeError):
            return
        if owner == self.owner:  # our own earlier write (a retried PUT that had landed): refresh next time
            self.tag = tag
            return
        self.lost = True
        logger.error(
            "node %s: another node took over this node id (it was silent longer than its %.0fs lease); "
            "two jobs now publish as %s", self.node_id, self.lease, self.node_id,
        )
