"""Top-k deltas with error feedback on a chain from a keyframe: the writer's state.

The protocol is in ``flwr_serverless.wire.compression``. The compressor holds ``R``,
the state every reader of this node holds after applying its deltas, and sends
the ``k`` largest entries of ``W - R`` per tensor. Whatever a delta leaves out
(or rounds to float16) stays in ``W - R`` and competes again next time: the
error feedback of sparsified SGD, without the reader ever summing anything but
the deltas it was sent. ``R`` only advances when the delta is in the store
(``commit``), so a failed upload never leaves the writer ahead of its readers.

In lockstep (sync and semi-sync rounds) every member ends a round holding the
same aggregate, so ``rebase`` moves ``R`` there on the writer and on every
reader: the next delta is the node's local training alone, not the pull
towards the community that aggregation applied to every weight. What the
node had not yet sent is kept in ``carry`` and added to the next candidates.

A new keyframe starts a chain: the first time, after
``keyframe_every`` deltas (a late joiner then reads at most that many small
deltas), when the tensors change shape, and when the readers' state has drifted
more than ``max_error`` (``|W - R| / |W|``) from the weights, which error
feedback normally prevents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import numpy as np

from flwr_serverless.validation import check_int, check_positive
from flwr_serverless.wire.compression import (
    SEP,
    EncodedTensor,
    apply_delta,
    compressible,
    index_dtype,
    pack_indices,
    sparse_delta,
    unpack_indices,
)
from flwr_serverless.wire.header import MAX_CHAIN, KeyframeRef

DEFAULT_KEYFRAME_EVERY = 50
DEFAULT_MAX_ERROR = 0.5

Item = np.ndarray | EncodedTensor


@dataclass
class PendingDelta:
    """A delta not yet in the store: what to publish, and how ``R`` moves once it is."""

    chain: int
    items: list[Item]
    error: float  # |W - R'| / |W| after this delta


class TopKCompressor:
    """Turns a node's weights into top-k deltas on a chain, and says when a new keyframe is due."""

    def __init__(
        self, fraction: float, keyframe_every: int = DEFAULT_KEYFRAME_EVERY, max_error: float = DEFAULT_MAX_ERROR
    ) -> None:
        if not 0.0 < fraction < 0.5:
            raise ValueError(f"top-k fraction must be in (0, 0.5) (sparse entries cost 2x dense ones), got {fraction}")
        check_int("keyframe_every", keyframe_every, 1, MAX_CHAIN)
        check_positive("max_error", max_error)
        self.fraction = fraction
        self.keyframe_every = keyframe_every
        self.max_error = max_error
        self.keyframe_ref: KeyframeRef | None = None
        self.state: list[np.ndarray] | None = None  # R: what every reader holds
        self.chain = 0  # position of R on the chain (0: the keyframe)
        self.last_error: float | None = None
        self.rebased = False  # R is a round's aggregate every member holds, not a stored object
        self.carry: list[np.ndarray] | None = None  # error feedback memory across rebases (unsent progress)

    def compress(self, arrays: Sequence[np.ndarray]) -> PendingDelta | None:
        """The next delta (publish it, then ``commit``); None when a lossless keyframe is due instead."""
        arrays = [np.asarray(a) for a in arrays]
        if not self._state_matches(arrays) or self.chain >= self.keyframe_every:
            return None
        assert self.state is not None
        items: list[Item] = []
        left = total = 0.0
        carry = self.carry if self.carry is not None else [None] * len(arrays)
        for array, state, unsent in zip(arrays, self.state, carry):
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            if not compressible(array):
                items.append(array)
                continue
            residual = array - state
            if unsent is not None:
                residual += unsent
            k = max(1, math.ceil(self.fraction * array.size))
            indices, values = sparse_delta(residual, k)
            stored, gaps = pack_indices(indices, array.size)
            items.append(
                EncodedTensor(
                    "delta",
                    array.dtype,
                    tuple(array.shape),
                    {SEP + "indices": stored, SEP + "values": values},
                    gaps=gaps,
                )
            )
            flat = residual.reshape(-1)
            flat[indices] -= values.astype(flat.dtype, copy=False)  # what stays unsent (and F16 rounding)
            left += _squared(flat)
            total += _squared(array.reshape(-1))
        error = math.sqrt(left / total) if total > 0 else 0.0
        if error > self.max_error:
            return None  # the readers' state is too far behind: a fresh keyframe costs less than a bad model
        return PendingDelta(self.chain + 1, items, error)

    def commit(self, pending: PendingDelta) -> None:
        """The delta is in the store: move ``R`` exactly as a reader applying it does."""
        assert self.state is not None and pending.chain == self.chain + 1
        for state, item in zip(self.state, pending.items):
            if isinstance(item, EncodedTensor):
                apply_delta(state, unpack_indices(item.parts[SEP + "indices"], item.gaps), item.parts[SEP + "values"])
            else:
                state[...] = item
        self.chain = pending.chain
        self.last_error = pending.error

    def set_keyframe(self, arrays: Sequence[np.ndarray], ref: KeyframeRef) -> list[Item]:
        """Start a chain at the lossless object just stored (``ref`` from ``codec.object_ref`` of its bytes);
        returns position 0 to publish at ``nodes/<id>``: an empty delta naming the keyframe."""
        self.state = [np.array(a, dtype=np.asarray(a).dtype.newbyteorder("<"), copy=True, order="C") for a in arrays]
        self.keyframe_ref = ref
        self.chain = 0
        self.last_error = 0.0
        self.rebased = False
        self.carry = None
        return [
            EncodedTensor(
                "delta",
                s.dtype,
                tuple(s.shape),
                {SEP + "indices": np.zeros(0, index_dtype(s.size)), SEP + "values": np.zeros(0, "<f2")},
            )
            if compressible(s)
            else s
            for s in self.state
        ]

    def rebase(self, arrays: Sequence[np.ndarray], ref: KeyframeRef, weights: Sequence[np.ndarray]) -> None:
        """Every reader now holds ``arrays`` for this writer too (a round's aggregate, named by ``ref``).

        ``weights`` are what the node trained before it took ``arrays``: their unsent part
        (``weights - R``) reached no one, and the node's weights no longer hold it, so it is
        kept (``carry``) and added to the next candidates: error feedback's memory.
        """
        if self.state is None or not self._state_matches([np.asarray(a) for a in arrays]):
            return  # no chain to move (a keyframe comes next anyway)
        unsent = [
            np.asarray(w, dtype=s.dtype) - s if s.dtype.kind == "f" else None for w, s in zip(weights, self.state)
        ]
        if self.carry is not None:
            unsent = [u if c is None else u + c for u, c in zip(unsent, self.carry)]
        self.carry = unsent  # type: ignore[assignment]
        self.state = [np.array(a, dtype=np.asarray(a).dtype.newbyteorder("<"), copy=True, order="C") for a in arrays]
        self.keyframe_ref = ref
        self.chain = 0
        self.rebased = True

    def reset(self) -> None:
        """Forget the chain (an upload failed or its outcome is unknown): the next call starts a new keyframe."""
        self.state = None
        self.carry = None
        self.keyframe_ref = None
        self.chain = 0

    def _state_matches(self, arrays: list[np.ndarray]) -> bool:
        return (
            self.state is not None
            and len(arrays) == len(self.state)
            and all(a.shape == s.shape and a.dtype.newbyteorder("<") == s.dtype for a, s in zip(arrays, self.state))
        )


def state_ref(round_number: int, arrays: Sequence[np.ndarray]) -> KeyframeRef:
    """Names a sync round's aggregate: every member computes the same bits, hence the same BLAKE3 hash."""
    hasher = blake3.blake3()
    for array in arrays:
        array = np.asarray(array)
        hasher.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data)
    return KeyframeRef(round_number, f"blake3:{hasher.hexdigest()}")


def _squared(flat: np.ndarray) -> float:
    wide = flat if flat.dtype.itemsize >= 4 else flat.astype(np.float32)  # float16 squares overflow
    return float(np.dot(wide, wide))
