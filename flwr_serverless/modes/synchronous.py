"""Synchronous mode: a round completes when every live member has published it.

All functions here are pure: the node lists ``rounds/<r>/`` and ``members/``
and asks ``barrier`` whether to go on. A member counts for the experiment when
its record names this node's run (``membership.in_run``), live or ended (left,
lease expired, process gone); members of other runs are leftovers, and so are
their round objects. ``now`` is on the records' clock (``Roster.now()``).
``num_nodes`` is how many must be there to start; ``min_nodes`` how few may
still make a round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr_serverless.node.membership import LIVE, MemberRecord, in_run, member_state
from flwr_serverless.validation import check_int, check_positive_int


def check_counts(num_nodes: object, min_nodes: object) -> tuple[int, int | None]:
    """Validate ``num_nodes`` (required) and ``min_nodes`` at construction, naming the option."""
    if num_nodes is None:
        raise TypeError("num_nodes is required for synchronous nodes: how many nodes must join to start")
    count = check_positive_int("num_nodes", num_nodes)
    return count, check_int(f"min_nodes (with num_nodes={count})", min_nodes, 1, count, none=True)


@dataclass(frozen=True)
class Barrier:
    """The state of one round as seen by one node."""

    complete: bool
    counted: frozenset[str]  # publishers of this round that belong to the experiment (aggregated)
    waiting_for: frozenset[str]  # live members that have not published yet
    dropped: frozenset[str]  # members that died (lease or process) without publishing: no longer awaited
    departed: frozenset[str]  # members that left without publishing this round
    leftovers: frozenset[str]  # publishers from an earlier run (ignored)
    members_seen: int  # current members plus publishers: what counts towards ``num_nodes``


def current_members(records: Mapping[str, MemberRecord], now: float, run: str | None) -> dict[str, str]:
    """node id -> state for the members of ``run`` (live or ended)."""
    return {node: member_state(record, now) for node, record in records.items() if in_run(record, run, now)}


def barrier(
    me: str,
    published: set[str],
    records: Mapping[str, MemberRecord],
    *,
    now: float,
    run: str | None,
    num_nodes: int,
    min_nodes: int | None,
    started: bool,
) -> Barrier:
    """Whether round r can be aggregated, given its publishers and the member records.

    Complete when the experiment has started (``started``, or ``num_nodes`` members
    seen), every live member has published, and at least ``min_nodes`` (default 1) did.
    Publishers without a member record count (stores without membership, or a record
    not yet visible); publishers whose record names another run do not.
    """
    states = current_members(records, now, run)
    leftovers = {node for node in published if node in records and node not in states and node != me}
    counted = (published - leftovers) | ({me} & published)
    live = {node for node, state in states.items() if state == LIVE} | {me}
    waiting = live - counted
    ended = {node for node, state in states.items() if state != LIVE} - counted
    dropped = {node for node in ended if states[node] != "left"}
    seen = len(counted | live | {node for node in states if states[node] != LIVE})
    enough = len(counted) >= (min_nodes or 1)
    complete = (started or seen >= num_nodes) and not waiting and enough
    return Barrier(
        complete,
        frozenset(counted),
        frozenset(waiting),
        frozenset(dropped),
        frozenset(ended - dropped),
        frozenset(leftovers),
        seen,
    )


def entry_round(me: str, rounds: Mapping[int, set[str]], current: set[str], my_round: int) -> tuple[int, bool]:
    """(round to publish next, whether the experiment is already under way) for a node (re)joining.

    The latest round holding another current member's object is where peers wait
    (or have just been): enter it, or the next one if we had published it already.
    Round objects of leftover nodes are ignored. Peers past round 0 have met
    ``num_nodes`` once: the experiment is under way and needs no quorum again.
    """
    for number in sorted(rounds, reverse=True):
        others = (rounds[number] & current) - {me}
        if others:
            target = number + 1 if me in rounds[number] else number
            return max(my_round, target), number > 0
    return my_round, False
