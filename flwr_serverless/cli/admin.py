"""See and reset an experiment prefix: ``flwr-serverless inspect URL`` and ``flwr-serverless clean URL``."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flwr_serverless.errors import FlwrServerlessError, ObjectNotFoundError
from flwr_serverless.node.membership import MemberRecord, member_state
from flwr_serverless.stores import ObjectInfo, Store
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import read_header

#: A multipart upload still open this long is stale: a GiB-scale upload takes seconds to minutes.
STALE_UPLOAD_S = 3600.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"--older-than {text!r}: expected a duration such as 90s, 15m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


#: per-member prefixes whose keys are ``<prefix><node_id>`` or ``<prefix><node_id>/...``, with the kind inspect shows
MEMBER_PREFIXES: dict[str, str] = {
    layout.KEYFRAMES: "keyframes",
    layout.DELTAS: "deltas",
    layout.CONTRIBUTIONS: "contributions",
    layout.PENDING: "pending",
}
#: kinds whose objects are weights objects with a header (epoch, timestamp) worth one GET
_WEIGHTS_KINDS = ("nodes", "rounds", "keyframes", "contributions")
_SHOWN_NAMES = 20  # aggregate members named in full; more are counted


@dataclass
class MemberView:
    node_id: str
    status: str  # live / left / expired / gone / unknown (objects without a member record)
    run: str | None = None  # the run (generation) its member record names
    heartbeat_age: float | None = None
    epoch: int | None = None
    round: int | None = None
    object_age: float | None = None
    object_bytes: int = 0
    keys: list[str] = field(default_factory=list)
    objects: dict[str, list[int]] = field(default_factory=dict)  # kind (nodes, deltas...) -> [count, bytes]
    object_runs: set[str] = field(default_factory=set)  # runs named by the headers of its weights objects


@dataclass
class AggregateView:
    """The aggregate mode's shared object: its size, version and the members its table names."""

    size: int
    version: int | None = None
    members: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # named, but their contribution object is gone
    problem: str | None = None  # why the table could not be read


@dataclass
class ExperimentView:
    members: dict[str, MemberView]
    rounds: dict[int, list[str]]
    other_keys: list[str]
    aggregate: AggregateView | None = None
    now: float | None = None  # the store time the ages are measured from
    clock: str = "store"  # "store": ages are store times; "newest write": a lower bound; "local": no stamps

    @property
    def runs(self) -> dict[str, dict[str, list[str]]]:
        """run -> status -> member ids, from the member records (the generations present in the prefix)."""
        found: dict[str, dict[str, list[str]]] = {}
        for member in sorted(self.members.values(), key=lambda m: m.node_id):
            if member.run is not None:
                found.setdefault(member.run, {}).setdefault(member.status, []).append(member.node_id)
        return found


def owner_of(key: str) -> tuple[str, str] | None:
    """(kind, node id) of a key that belongs to one member (not ``members/``, which holds its record)."""
    node = layout.parse_node_key(key)
    if node is not None:
        return "nodes", node
    node = layout.parse_profile_key(key)
    if node is not None:
        return "profiles", node
    parsed = layout.parse_round_key(key)
    if parsed is not None:
        return "rounds", parsed.node_id
    for prefix, kind in MEMBER_PREFIXES.items():
        if key.startswith(prefix):
            node = key[len(prefix) :].split("/", 1)[0]
            if layout.is_valid_node_id(node):
                return kind, node
    return None


def store_now(store: Store, listing: Mapping[str, ObjectInfo]) -> tuple[float, str]:
    """(the store's time now, how it is known): its clock (one host, or an S3 answer's Date), else the newest
    stamp in ``listing`` (a lower bound), else this host's clock (a backend that stamps nothing)."""
    direct = store.now()
    if direct is not None:
        return direct, "store"
    stamps = [info.modified for info in listing.values() if info.modified is not None]
    return (max(stamps), "newest write") if stamps else (time.time(), "local")


def inspect_experiment(store: Store, now: float | None = None) -> ExperimentView:
    """Members with status, run, last epoch/round, age and size of their objects per kind; rounds; the aggregate.

    Ages are store times (``now``, when given, is a store time too): the stamps of the records and objects.
    """
    listing = store.list("")
    clock = "store"
    if now is None:
        now, clock = store_now(store, listing)
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
                if info.modified is not None and clock != "local":
                    record = replace(record, stamp=info.modified)
                member.status = member_state(record, now)
                member.heartbeat_age = now - record.last_seen
                member.run = record.run
            continue
        owned = owner_of(key)
        if owned is None:
            if key != layout.AGGREGATE:
                other.append(key)
            continue
        kind, owner = owned
        member = view(owner)
        member.keys.append(key)
        member.object_bytes += info.size
        counts = member.objects.setdefault(kind, [0, 0])
        counts[0] += 1
        counts[1] += info.size
        if kind in _WEIGHTS_KINDS:
            parsed = layout.parse_round_key(key)
            stamp = info.modified if clock != "local" else None
            _read_header(store, key, member, now, parsed.round if parsed else None, stamp)
    rounds = {number: sorted(nodes) for number, nodes in layout.rounds_by_number(listing).items()}
    aggregate = _aggregate_view(store, listing) if layout.AGGREGATE in listing else None
    return ExperimentView(members, dict(sorted(rounds.items())), other, aggregate, now, clock)


def _aggregate_view(store: Store, listing: Mapping[str, ObjectInfo]) -> AggregateView:
    """The aggregate's table (one GET): which members it averages, and which of their contributions are gone."""
    from flwr_serverless.modes.aggregate import TABLE, parse_table

    result = AggregateView(listing[layout.AGGREGATE].size)
    try:
        fields, _, _ = read_header(store.get(layout.AGGREGATE), layout.AGGREGATE)
        extra = fields.get("extra") if isinstance(fields.get("extra"), dict) else {}
        table = parse_table(extra.get(TABLE), layout.AGGREGATE)
    except (FlwrServerlessError, ValueError) as exc:
        result.problem = str(exc)
        return result
    seq = fields.get("seq", extra.get("seq"))
    result.version = seq if isinstance(seq, int) else None
    result.members = sorted(table)
    result.missing = [
        node for node, entry in sorted(table.items()) if layout.contribution_key(node, entry.slot) not in listing
    ]
    return result


def _read_header(
    store: Store, key: str, member: MemberView, now: float, round_number: int | None, stamp: float | None
) -> None:
    """Epoch, round and run from a weights object's header (one GET; the tensors are not validated here); its
    age from the store's stamp (the writer's own ``timestamp`` only for a backend that stamps nothing)."""
    try:
        fields, _, _ = read_header(store.get(key), key)
    except (FlwrServerlessError, ValueError):
        return
    if isinstance(fields.get("run"), str):
        member.object_runs.add(fields["run"])
    if stamp is None:
        written = fields.get("timestamp")
        stamp = float(written) if isinstance(written, (int, float)) else None
    age = None if stamp is None else now - stamp
    if member.object_age is None or (age is not None and age < member.object_age):
        member.object_age = age
        member.epoch = fields.get("epoch") if isinstance(fields.get("epoch"), int) else member.epoch
    if round_number is not None:
        member.round = max(member.round or 0, round_number)


def format_view(view: ExperimentView) -> str:
    def age(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:.0f}s"

    lines = [
        f"{'node':<24} {'status':<8} {'run':<14} {'heartbeat':>10} {'epoch':>6} {'round':>6} {'newest obj':>10} "
        f"{'MB':>8}  objects"
    ]
    for member in sorted(view.members.values(), key=lambda m: m.node_id):
        objects = ", ".join(f"{kind} {count} ({_size(size)})" for kind, (count, size) in member.objects.items())
        others = sorted(member.object_runs - {member.run})
        if others:
            objects += f"; objects of run(s) {', '.join(others)}"
        lines.append(
            f"{member.node_id:<24} {member.status:<8} {_short(member.run):<14} {age(member.heartbeat_age):>10} "
            f"{'-' if member.epoch is None else member.epoch:>6} {'-' if member.round is None else member.round:>6} "
            f"{age(member.object_age):>10} {member.object_bytes / 1e6:>8.2f}  {objects or '-'}"
        )
    for run, states in view.runs.items():
        lines.append(
            f"run {run}: " + "; ".join(f"{status} {', '.join(nodes)}" for status, nodes in sorted(states.items()))
        )
    if view.clock != "store":
        lines.append(
            "ages: from the newest write in the prefix (this store tells no time)"
            if view.clock == "newest write"
            else "ages: from this host's clock (this store stamps nothing)"
        )
    if view.rounds:
        lines.append("rounds: " + "; ".join(f"{n}: {', '.join(nodes)}" for n, nodes in view.rounds.items()))
    if view.aggregate is not None:
        lines.append(_aggregate_line(view.aggregate))
    if view.other_keys:
        prefixes = Counter(key.split("/", 1)[0] + ("/" if "/" in key else "") for key in view.other_keys)
        lines.append(
            f"other objects: {len(view.other_keys)} ("
            + ", ".join(f"{prefix} {count}" for prefix, count in sorted(prefixes.items()))
            + "; clean removes them with --all only)"
        )
    return "\n".join(lines)


def _short(run: str | None) -> str:
    """A run id in a column: its first 14 characters tell generations apart (the runs lines give them whole)."""
    return "-" if run is None else run[:14]


def _size(num_bytes: int) -> str:
    """850 B, 12.3 kB, 4.56 MB: object sizes span delta logs of bytes to models of hundreds of MB."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    return f"{num_bytes / 1e3:.1f} kB" if num_bytes < 1_000_000 else f"{num_bytes / 1e6:.2f} MB"


def _aggregate_line(aggregate: AggregateView) -> str:
    line = f"aggregate: {_size(aggregate.size)}"
    if aggregate.problem is not None:
        return f"{line}, unreadable table ({aggregate.problem}); the next writer rebuilds it"
    names = ", ".join(aggregate.members[:_SHOWN_NAMES])
    more = len(aggregate.members) - _SHOWN_NAMES
    line += (
        f", version {aggregate.version if aggregate.version is not None else '-'}, "
        f"{len(aggregate.members)} member(s) in its table: {names}" + (f" and {more} more" if more > 0 else "")
    )
    if aggregate.missing:
        line += (
            f"; contribution object gone for {', '.join(aggregate.missing[:_SHOWN_NAMES])} (the mean keeps "
            "what they contributed until the aggregate is rebuilt or deleted)"
        )
    return line


def clean_experiment(
    store: Store,
    older_than: float | None = None,
    everything: bool = False,
    now: float | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete every key of members that are no longer live (left, expired, gone, or unknown without objects
    newer than ``older_than``): record, weights, rounds, profile, keyframe, delta log, contributions.
    ``everything`` empties the prefix (the aggregate and Keras checkpoints too). Unfinished multipart uploads
    under the prefix older than ``older_than`` (default ``STALE_UPLOAD_S``; all with ``everything``) are
    aborted. Returns the deleted keys, then one line per aborted upload.

    The aggregate is shared and stays: like a left member's ``nodes/<id>`` in FedAvgAsync, a cleaned member's
    last contribution stays in its mean until a repair rebuilds it from the contributions left (without that
    member) or ``clean --all`` deletes it.
    """
    upload_age = 0.0 if everything else (older_than if older_than is not None else STALE_UPLOAD_S)
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
    return sorted(doomed) + abort_stale_uploads(store, upload_age, now, dry_run)


def abort_stale_uploads(store: Store, older_than: float, now: float | None = None, dry_run: bool = False) -> list[str]:
    """Abort multipart uploads under the prefix started at least ``older_than`` seconds ago (a crashed
    writer's parts, which S3 keeps and bills until aborted); one line per upload. Stores without
    multipart uploads (no ``list_uploads``) have none."""
    list_uploads = getattr(store, "list_uploads", None)
    if list_uploads is None:
        return []
    now = time.time() if now is None else now
    stale = [upload for upload in list_uploads() if now - upload.initiated >= older_than]
    if not dry_run:
        for upload in stale:
            store.abort_upload(upload.key, upload.upload_id)  # type: ignore[attr-defined]
    return [f"{upload.key} (unfinished upload {upload.upload_id})" for upload in stale]


def summary(deleted: list[str], dry_run: bool) -> dict[str, Any]:
    return {"deleted" if not dry_run else "would_delete": len(deleted), "keys": deleted}
