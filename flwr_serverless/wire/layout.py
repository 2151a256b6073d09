"""Every key of the protocol under an experiment prefix, with builders and parsers.

No other module spells a prefix or slices a key: they ask this one. The docs'
layout page (docs/protocol/layout.md) is checked against ``LAYOUT`` by the test suite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MEMBERS = "members/"
NODES = "nodes/"
ROUNDS = "rounds/"
PROFILES = "profiles/"
KEYFRAMES = "keyframes/"
CHECKPOINTS = "keras/"
AGGREGATE = "aggregate"
CONTRIBUTIONS = "contributions/"
CONTRIBUTION_SLOTS = (0, 1, 2)
PENDING = "pending/"
DELTAS = "deltas/"
DELTA_DIGITS = 8
PROFILE_SUFFIX = ".json"
ROUND_DIGITS = 8

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")

#: (key pattern, what lives there), in the order docs/protocol/layout.md lists them.
LAYOUT: tuple[tuple[str, str], ...] = (
    ("members/<node_id>", "JSON member record: owner, host, pid, run, joined, heartbeat, lease, status (active/left)"),
    ("nodes/<node_id>", "async: the node's latest weights, overwritten atomically"),
    ("rounds/<round>/<node_id>", "sync and semi-sync: what the node published for that round (8-digit round)"),
    ("profiles/<node_id>.json", "semi-sync: measured seconds per batch, dataset size, batch size"),
    ("keyframes/<node_id>", "top-k compression: the full weights that start the node's chain of sparse deltas"),
    ("keras/<node_id>/", "Keras callback checkpoints: model_{before,after}_aggregation_<epoch>.h5 and metrics JSON"),
    ("aggregate", "aggregate mode: FedAvg of every member's latest contribution and the table naming them (CAS)"),
    (
        "contributions/<node_id>/<slot>",
        "aggregate mode: a member's contributions, slot 0, 1 or 2 (the one the "
        "aggregate names, the one a pending change may name, and the next)",
    ),
    (
        "pending/<node_id>/<base>.<slot>.<hash>",
        "aggregate mode: a change that lost its compare-and-swap (the "
        "weighted difference from contribution <base> to <slot>), for "
        "another member to fold in",
    ),
    ("deltas/<node_id>/<index>", "top-k compression: the node's delta log since its keyframe (8-digit index)"),
)


def is_valid_node_id(node_id: object) -> bool:
    """Plain names only: letters, digits, '_', '-', '.'; no '/', '..', control characters or trailing newline."""
    return isinstance(node_id, str) and _NODE_ID.fullmatch(node_id) is not None and ".." not in node_id


def check_node_id(node_id: object) -> str:
    """``node_id`` itself, or ``ValueError`` naming it."""
    if not is_valid_node_id(node_id):
        raise ValueError(f"node id {node_id!r} is not a plain name (letters, digits, '_', '-', '.'; at most 128)")
    return str(node_id)


def member_key(node_id: str) -> str:
    return MEMBERS + node_id


def node_key(node_id: str) -> str:
    return NODES + node_id


def round_prefix(round_number: int) -> str:
    if round_number < 0:
        raise ValueError(f"round numbers are not negative, got {round_number}")
    return f"{ROUNDS}{round_number:0{ROUND_DIGITS}d}/"


def round_key(round_number: int, node_id: str) -> str:
    return round_prefix(round_number) + node_id


def profile_key(node_id: str) -> str:
    return PROFILES + node_id + PROFILE_SUFFIX


def keyframe_key(node_id: str) -> str:
    return KEYFRAMES + node_id


def contribution_key(node_id: str, slot: int) -> str:
    if slot not in CONTRIBUTION_SLOTS:
        raise ValueError(f"contribution slots are {CONTRIBUTION_SLOTS}, got {slot!r}")
    return f"{CONTRIBUTIONS}{node_id}/{slot}"


def parse_contribution_key(key: str) -> tuple[str, int] | None:
    """``contributions/alice/1`` -> ("alice", 1); None for anything else."""
    if not key.startswith(CONTRIBUTIONS):
        return None
    node_id, sep, slot = key[len(CONTRIBUTIONS) :].partition("/")
    if not sep or slot not in ("0", "1", "2") or not is_valid_node_id(node_id):
        return None
    return node_id, int(slot)


def delta_key(node_id: str, index: int) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"delta indices are integers >= 0, got {index!r}")
    return f"{DELTAS}{node_id}/{index:0{DELTA_DIGITS}d}"


def parse_delta_key(key: str) -> tuple[str, int] | None:
    """``deltas/alice/00000003`` -> ("alice", 3); None for anything else."""
    if not key.startswith(DELTAS):
        return None
    node_id, sep, index = key[len(DELTAS) :].partition("/")
    if (
        not sep
        or len(index) != DELTA_DIGITS
        or not (index.isascii() and index.isdigit())
        or not is_valid_node_id(node_id)
    ):
        return None
    return node_id, int(index)


_HEX16 = re.compile(r"[0-9a-f]{16}")


def pending_key(node_id: str, base: str | None, slot: int, new: str) -> str:
    """``pending/<node>/<base hash or ->.<slot>.<new hash>``: a reader of a listing knows what it replaces."""
    return f"{PENDING}{node_id}/{base or '-'}.{slot}.{new}"


def parse_pending_key(key: str) -> tuple[str, str | None, int, str] | None:
    """``pending/alice/<base>.1.<new>`` -> ("alice", base or None, 1, new); None for anything else."""
    if not key.startswith(PENDING):
        return None
    node_id, sep, name = key[len(PENDING) :].partition("/")
    parts = name.split(".")
    if not sep or len(parts) != 3 or not is_valid_node_id(node_id):
        return None
    base, slot, new = parts
    if (base != "-" and not _HEX16.fullmatch(base)) or slot not in ("0", "1", "2") or not _HEX16.fullmatch(new):
        return None
    return node_id, None if base == "-" else base, int(slot), new


def _tail(key: str, prefix: str, suffix: str = "") -> str | None:
    """The node id in ``prefix<node_id>suffix``; None for any other key."""
    if not key.startswith(prefix) or not key.endswith(suffix):
        return None
    node_id = key[len(prefix) : len(key) - len(suffix)]
    return node_id if "/" not in node_id and node_id else None


def parse_member_key(key: str) -> str | None:
    return _tail(key, MEMBERS)


def parse_node_key(key: str) -> str | None:
    return _tail(key, NODES)


def parse_profile_key(key: str) -> str | None:
    return _tail(key, PROFILES, PROFILE_SUFFIX)


@dataclass(frozen=True)
class RoundKey:
    round: int
    node_id: str


def parse_round_key(key: str) -> RoundKey | None:
    """``rounds/00000003/alice`` -> RoundKey(3, "alice"); None for anything else."""
    if not key.startswith(ROUNDS):
        return None
    number, sep, node_id = key[len(ROUNDS) :].partition("/")
    if not sep or not number.isdigit() or not node_id or "/" in node_id:
        return None
    return RoundKey(int(number), node_id)


def rounds_by_number(keys: object) -> dict[int, set[str]]:
    """Group ``rounds/`` keys by round number: {round: {node ids}} (other keys are ignored)."""
    grouped: dict[int, set[str]] = {}
    for key in keys:  # type: ignore[attr-defined]
        parsed = parse_round_key(str(key))
        if parsed is not None:
            grouped.setdefault(parsed.round, set()).add(parsed.node_id)
    return grouped
