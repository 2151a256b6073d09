"""Staleness: how out of date a peer's model is, and how much that should cost it in aggregation.

Provenance (set by every node before it publishes, see ``Provenance.stamp``)
--------------------------------------------------------------------------
Each object's header carries

* ``local_steps``: the publisher's cumulative optimizer steps;
* ``seq``: how many objects the publisher has published (1, 2, ...);
* ``base_version``: the publisher's *community version* when it last aggregated,
  defined as the sum of ``seq`` over the objects it aggregated then (its own
  included), i.e. the number of distinct updates, of all nodes, already folded
  into the weights it continued training from;
* ``base_steps``: the sum of ``local_steps`` over those same objects, i.e. the
  community steps already folded into that base;
* ``base_own_seq`` / ``base_own_steps``: its own ``seq`` and
  ``local_steps`` at that aggregation, so a reader can tell the publisher's own
  new work apart from the community's.

Staleness ``u`` of a peer update, seen by a reader
--------------------------------------------------
The reader sums over the latest object it holds of every node (its own current
one included): ``V = sum(seq)``, ``S = sum(local_steps)``. Then

* unit ``versions`` (FedAsync): ``u = V - base_version - (seq - base_own_seq)``,
  the number of *other* nodes' updates published after the peer's base that the
  peer had not seen when it published;
* unit ``steps`` (FedRec): ``u = S - base_steps - (local_steps - base_own_steps)``,
  the optimizer steps other nodes contributed after the peer's base that the
  peer did not see.

Both are clipped at 0. A fast node that publishes 4 small updates while a slow
one makes 1 large update makes the slow update 4 versions stale but only as
many steps stale as the fast node's own latest update is (the slow node's
steps), which is why step-based staleness is fairer to slow nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from flwr_serverless.strategy.aggregate import weighted_sum
from flwr_serverless.validation import check_choice, check_fraction, check_positive_int
from flwr_serverless.wire.codec import UpdateHeader

STALENESS_UNITS = ("steps", "versions")


# -- staleness functions ------------------------------------------------------------
@dataclass(frozen=True)
class Constant:
    """s(u) = 1: staleness is ignored (plain FedAvgAsync)."""

    def __call__(self, u: float) -> float:
        return 1.0


@dataclass(frozen=True)
class Polynomial:
    """s(u) = (u + 1)^-a: smooth decay (FedAsync's polynomial function)."""

    a: float = 0.5

    def __call__(self, u: float) -> float:
        return float((max(u, 0.0) + 1.0) ** -self.a)


@dataclass(frozen=True)
class Hinge:
    """s(u) = 1 for u <= b, else 1 / (a (u - b) + 1): tolerate a little staleness, then decay."""

    a: float = 10.0
    b: float = 4.0

    def __call__(self, u: float) -> float:
        return 1.0 if u <= self.b else 1.0 / (self.a * (u - self.b) + 1.0)


StalenessFunction = Callable[[float], float]


def parse_staleness(spec: str | StalenessFunction | None) -> StalenessFunction:
    """Accept a function or a spec: ``"constant"``, ``"poly"``, ``"poly:0.5"``, ``"hinge"``, ``"hinge:10,4"`` (a,b)."""
    if spec is None:
        return Constant()
    if callable(spec):
        return spec
    name, _, args = str(spec).strip().lower().partition(":")
    try:
        values = [float(v) for v in args.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"staleness {spec!r}: parameters must be numbers") from None
    if name == "constant" and not values:
        return Constant()
    if name in ("poly", "polynomial") and len(values) <= 1:
        return Polynomial(*values)
    if name == "hinge" and len(values) in (0, 2):
        return Hinge(*values)
    raise ValueError(f"unknown staleness {spec!r}; use constant, poly[:a] or hinge[:a,b]")


# -- provenance ---------------------------------------------------------------------
@dataclass
class Provenance:
    """What a node's next object was trained from; advanced at every aggregation."""

    seq: int = 0
    base_version: int = 0
    base_steps: int = 0
    base_own_seq: int = 0
    base_own_steps: int = 0

    def stamp(self, header: UpdateHeader) -> None:
        """Count one more publication and write the provenance into the header about to be published."""
        self.seq += 1
        header.base_version = self.base_version
        header.base_steps = self.base_steps
        header.seq, header.base_own_seq, header.base_own_steps = self.seq, self.base_own_seq, self.base_own_steps

    def advance(self, own: UpdateHeader, participants: Iterable[UpdateHeader]) -> None:
        """The node now continues from an aggregate of ``participants`` (its own object included)."""
        headers = list(participants)
        self.base_version = sum(h.seq for h in headers)
        self.base_steps = sum(h.local_steps for h in headers)
        self.base_own_seq = own.seq
        self.base_own_steps = own.local_steps


@dataclass(frozen=True)
class CommunityView:
    """What the reader knows right now: totals over the latest object of every node it holds."""

    version: int
    steps: int

    @classmethod
    def of(cls, headers: Iterable[UpdateHeader]) -> CommunityView:
        headers = list(headers)
        return cls(sum(h.seq for h in headers), sum(h.local_steps for h in headers))


def staleness(header: UpdateHeader, view: CommunityView, unit: str = "steps") -> float:
    """u of one update relative to ``view`` (see the module docstring for the exact formulas)."""
    if unit == "versions":
        own_new = header.seq - header.base_own_seq
        return float(max(0, view.version - header.base_version - own_new))
    if unit == "steps":
        own_new = header.local_steps - header.base_own_steps
        return float(max(0, view.steps - header.base_steps - own_new))
    raise ValueError(f"staleness unit must be one of {', '.join(STALENESS_UNITS)}, got {unit!r}")


def new_updates(header: UpdateHeader, last_seen_seq: int) -> int:
    """How many objects a peer published since the one we last aggregated (>= 1 when its object changed)."""
    seq = header.seq
    return max(seq - last_seen_seq, 1) if seq else 1


def mix(local: Sequence[np.ndarray], aggregate: Sequence[np.ndarray], alpha_t: float) -> list[np.ndarray]:
    """FedAsync's update: (1 - alpha_t) local + alpha_t aggregate; integer tensors take the aggregate's value."""
    if not 0.0 <= alpha_t <= 1.0 or math.isnan(alpha_t):
        raise ValueError(f"mixing weight must be in [0, 1], got {alpha_t}")
    out: list[np.ndarray] = []
    for w_local, w_agg in zip(local, aggregate):
        w_agg = np.asarray(w_agg)
        if w_agg.dtype.kind not in "fc":
            out.append(w_agg)
            continue
        # The sliced weighted sum of aggregation.py: float64 math, temporaries of one slice only.
        out.append(weighted_sum([np.asarray(w_local), w_agg], [1.0 - alpha_t, alpha_t], w_agg.dtype))
    return out


# -- the async node's policy ----------------------------------------------------------
class AsyncPolicy:
    """Options of ``AsyncFederatedNode`` beyond FedAvgAsync, kept out of the node's I/O code.

    * ``staleness`` / ``staleness_unit``: each participant is weighted by
      ``num_examples * s(u)``, u as in the module docstring (the node's own
      object included: it is stale by the peer work it has not yet seen).
    * ``alpha``: FedAsync mixing, ``w <- (1 - alpha_t) w_local + alpha_t w_aggregate``
      with ``alpha_t = alpha * s(u_agg)``; ``u_agg`` is the aggregation-weight
      mean of the peers' staleness, i.e. how out of date, on average, the
      foreign part of the aggregate is relative to the fresh local model.
    * ``buffer_size`` K (FedBuff): aggregate only once at least K new peer
      updates arrived since the last aggregation (the node still publishes).
    * ``participation`` C: each call federates with probability C (seeded RNG).
    """

    def __init__(
        self,
        staleness: str | StalenessFunction | None = None,
        unit: str = "steps",
        alpha: float | None = None,
        buffer_size: int | None = None,
        participation: float = 1.0,
        seed: int | None = None,
    ) -> None:
        check_choice("staleness_unit", unit, STALENESS_UNITS)
        check_fraction("alpha", alpha, none=True)
        check_positive_int("buffer_size", buffer_size, none=True)
        check_fraction("participation", participation)
        self.function = parse_staleness(staleness)
        self.unit = unit
        self.alpha = alpha
        self.buffer_size = buffer_size
        self.participation = participation
        self.rng = np.random.default_rng(seed)
        self.last_view: CommunityView | None = None  # a record of the last aggregation's view (never read here)
        self.last_seen: dict[str, int] = {}  # peer id -> seq of its update in our last aggregation
        self.new_updates_log: list[int] = []  # new peer updates folded in, per aggregation
        self.skipped = 0  # calls that did not federate (participation)
        self.buffered = 0  # calls that published but kept local weights (FedBuff)

    def participates(self) -> bool:
        if self.participation >= 1.0 or self.rng.random() < self.participation:
            return True
        self.skipped += 1
        return False

    def count_new(self, updates: Sequence[object]) -> int:
        """New peer updates since the last aggregation, counting overwritten ones via ``seq``."""
        total = 0
        for update in updates:
            header: UpdateHeader = update.header  # type: ignore[attr-defined]
            last = self.last_seen.get(header.node_id)
            if last is None or header.seq != last:
                total += new_updates(header, last or 0)
        return total

    def ready(self, fresh: int) -> bool:
        if self.buffer_size is None or fresh >= self.buffer_size:
            return True
        self.buffered += 1
        return False

    def aggregated(self, updates: Sequence[object], fresh: int, view: CommunityView | None = None) -> None:
        self.last_view = view
        for update in updates:
            header: UpdateHeader = update.header  # type: ignore[attr-defined]
            self.last_seen[header.node_id] = header.seq
        self.new_updates_log.append(fresh)

    def staleness_of(self, header: UpdateHeader, view: CommunityView | None) -> float:
        """u of ``header`` against ``view`` (the headers being aggregated); 0 without a view."""
        return staleness(header, view, self.unit) if view is not None else 0.0

    def factor(self, header: UpdateHeader, view: CommunityView | None) -> float:
        return float(self.function(self.staleness_of(header, view)))

    def mix(
        self,
        local: Sequence[np.ndarray],
        aggregate: list[np.ndarray],
        peer_headers: Sequence[UpdateHeader],
        peer_weights: Sequence[float],
        view: CommunityView | None,
    ) -> list[np.ndarray]:
        if self.alpha is None:
            return aggregate
        total = math.fsum(peer_weights)
        u_agg = (
            math.fsum(w * self.staleness_of(h, view) for h, w in zip(peer_headers, peer_weights)) / total
            if total > 0
            else 0.0
        )
        return mix(local, aggregate, self.alpha * float(self.function(u_agg)))
