"""See and reset an experiment prefix: ``flwr-serverless inspect URL`` and ``flwr-serverless clean URL``."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from flwr_serverless import layout
from flwr_serverless.codec import read_header
from flwr_serverless.errors import FlwrServerlessError, ObjectNotFoundError
from flwr_serverless.membership import MemberRecord, member_state
from flwr_serverless.stores import Store

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"--older-than {text!r}: expected a duration such as 90s, 15m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class MemberView:
    node_id: str
    status: str  # live / left / expired / gone / unknown (objects without a member record)
    heartbeat_age: float | None = None
    epoch: int | None = None
    round: int | None = None
    object_age: float | None = None
    object_bytes: int = 0
    keys: list[str] = field(default_factory=list)


@dataclass
class ExperimentView:
    members: dict[str, MemberView]
    rounds: dict[int, list[str]]
    other_keys: list[str]


def inspect_experiment(store: Store, now: float | None = None) -> ExperimentView:
    """Members with status, last epoch/round, age and size of their objects; rounds present."""
    now = time.time() if now is None else now
    listing = store.list("")
    members: dict[str, MemberView] = {}
    other: list[str] = []

    def view(node: str) -> MemberView:
        return members.setdefault(node, MemberView(node, "unknown"))

    for key, info in listing.items():
        node = layout.parse_member_key(key)
        if node is not None:
            try:
                record = MemberRecord.parse(store.get(key))
            except ObjectNotFoundError:
                continue
            member = view(node)
            member.keys.append(key)
            if record is not None:
                member.status = member_state(record, now)
                member.heartbeat_age = now - record.heartbeat
            continue
        owner = layout.parse_node_key(key) or layout.parse_profile_key(key)
        parsed = layout.parse_round_key(key)
        owner = owner or (parsed.node_id if parsed else None)
        if owner is None:
            other.append(key)
            continue
        member = view(owner)
        member.keys.append(key)
        member.object_bytes += info.size
        if layout.parse_profile_key(key) is None:
            _read_header(store, key, member, now, parsed.round if parsed else None)
    rounds = {number: sorted(nodes) for number, nodes in layout.rounds_by_number(listing).items()}
    return ExperimentView(members, dict(sorted(rounds.items())), other)


def _read_header(store: Store, key: str, member: MemberView, now: float, round_number: int | None) -> None:
    """Epoch, round and age from a weights object's header (one GET; the tensors are not validated here)."""
    try:
        fields, _, _ = read_header(store.get(key), key)
    except (FlwrServerlessError, ValueError):
        return
    stamp = fields.get("timestamp")
    age = now - float(stamp) if isinstance(stamp, (int, float)) else None
    if member.object_age is None or (age is not None and age < member.object_age):
        member.object_age = age
        member.epoch = fields.get("epoch") if isinstance(fields.get("epoch"), int) else member.epoch
    if round_number is not None:
        member.round = max(member.round or 0, round_number)


def format_view(view: ExperimentView) -> str:
    def age(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:.0f}s"

    lines = [f"{'node':<24} {'status':<8} {'heartbeat':>10} {'epoch':>6} {'round':>6} {'newest obj':>10} {'MB':>8}"]
    for member in sorted(view.members.values(), key=lambda m: m.node_id):
        lines.append(
            f"{member.node_id:<24} {member.status:<8} {age(member.heartbeat_age):>10} "
            f"{'-' if member.epoch is None else member.epoch:>6} {'-' if member.round is None else member.round:>6} "
            f"{age(member.object_age):>10} {member.object_bytes / 1e6:>8.2f}"
        )
    if view.rounds:
        lines.append("rounds: " + "; ".join(f"{n}: {', '.join(nodes)}" for n, nodes in view.rounds.items()))
    if view.other_keys:
        lines.append(f"other objects: {len(view.other_keys)}")
    return "\n".join(lines)


def clean_experiment(store: Store, older_than: float | None = None, everything: bool = False,
                     now: float | None = None, dry_run: bool = False) -> list[str]:
    """Delete the objects of members that are no longer live (left, expired, gone, or unknown without objects
    newer than ``older_than``); ``everything`` empties the prefix. Returns the deleted keys."""
    if not everything and older_than is None:
        older_than = 0.0
    view = inspect_experiment(store, now)
    doomed: list[str] = []
    if everything:
        doomed = sorted(store.list(""))
    else:
        for member in view.members.values():
            if member.status == "live":
                continue
            newest = member.heartbeat_age if member.heartbeat_age is not None else member.object_age
            if newest is None or older_than is None or newest >= older_than:
                doomed.extend(member.keys)
    if not dry_run:
        for key in doomed:
            store.delete(key)
    return sorted(doomed)


def summary(deleted: list[str], dry_run: bool) -> dict[str, Any]:
    return {"deleted" if not dry_run else "would_delete": len(deleted), "keys": deleted}
