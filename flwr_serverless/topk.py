"""Top-k deltas with a keyframe: the writer's state (see ``flwr_serverless.compression`` for the protocol).

Error feedback. Each delta is measured against the keyframe, not against what
was sent last time, and it carries the *current* values of the entries it
selects. So whatever a delta left out (the residual ``r_t = (W_t - K) - S_t``)
is still part of the next candidate change ``W_{t+1} - K = (W_{t+1} - W_t) +
S_t + r_t``: nothing unsent is ever lost, and an entry whose change keeps
accumulating is sent as soon as it ranks in the top k. Adding ``r_t`` once more
would count it twice (the reader holds ``K`` plus the latest delta only, never a
sum of deltas, because ``nodes/<id>`` is overwritten and a reader may miss
objects). The compressor keeps the residual's norm per tensor, and publishes a
new keyframe when the reconstruction error ``|W - R| / |W|`` passes
``max_error`` or after ``keyframe_every`` deltas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flwr_serverless.compression import SEP, EncodedTensor, compressible, sparse_encode
from flwr_serverless.header import KeyframeRef


class TopKCompressor:
    """Turns a node's weights into top-k deltas against its last keyframe, and says when to republish it."""

    def __init__(self, fraction: float, keyframe_every: int = 10, max_error: float = 0.02,
                 min_size: int = 1024) -> None:
        if not 0.0 < fraction < 0.5:
            raise ValueError(f"top-k fraction must be in (0, 0.5) (sparse entries cost 2x dense ones), got {fraction}")
        if keyframe_every < 1:
            raise ValueError(f"keyframe_every must be at least 1, got {keyframe_every}")
        if not max_error > 0.0:  # NaN fails too
            raise ValueError(f"max_error must be a positive relative error, got {max_error}")
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.fraction = fraction
        self.keyframe_every = keyframe_every
        self.max_error = max_error
        self.min_size = min_size  # smaller float tensors (biases, norms) travel raw
        self.keyframe: list[np.ndarray] | None = None
        self.keyframe_ref: KeyframeRef | None = None
        self.deltas_since_keyframe = 0
        self.residual_norms: list[float] = []  # |what the last delta left out| per tensor
        self.last_error: float | None = None  # |W - R| / |W| of the last delta
        self.last_captured: float | None = None  # share of |W - K|^2 the last delta carried

    def compress(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray | EncodedTensor] | None:
        """Delta-encode ``arrays``; None when the node must publish a lossless keyframe instead."""
        arrays = [np.asarray(a) for a in arrays]
        if not self._keyframe_matches(arrays) or self.deltas_since_keyframe >= self.keyframe_every:
            return None
        out: list[np.ndarray | EncodedTensor] = []
        residuals: list[float] = []
        left_out = total = carried = 0.0
        for array, base in zip(arrays, self.keyframe):
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            if array.dtype.kind == "f":
                flat = array.reshape(-1) if array.dtype.itemsize >= 4 else array.reshape(-1).astype(np.float32)
                total += float(np.dot(flat, flat))
            if not compressible(array) or array.size < self.min_size:
                out.append(array)
                residuals.append(0.0)
                continue
            k = max(1, math.ceil(self.fraction * array.size))
            indices, values, sent, missed = sparse_encode(array, base, k)
            carried += sent
            parts = {SEP + "indices": indices, SEP + "values": values}
            out.append(EncodedTensor("topk", array.dtype, tuple(array.shape), parts))
            residuals.append(math.sqrt(missed))
            left_out += missed
        error = math.sqrt(left_out / total) if total > 0 else 0.0
        if error > self.max_error:
            return None  # the keyframe is too far behind: a fresh one costs less than a bad model
        self.residual_norms, self.last_error = residuals, error
        self.last_captured = carried / (carried + left_out) if carried + left_out > 0 else 1.0
        self.deltas_since_keyframe += 1
        return out

    def set_keyframe(self, arrays: Sequence[np.ndarray], ref: KeyframeRef) -> None:
        """Record the lossless object just published (``ref`` from ``codec.object_ref`` of its bytes)."""
        self.keyframe = [np.array(a, dtype=np.asarray(a).dtype.newbyteorder("<"), copy=True) for a in arrays]
        self.keyframe_ref = ref
        self.deltas_since_keyframe = 0
        self.residual_norms = [0.0] * len(self.keyframe)
        self.last_error = 0.0

    def _keyframe_matches(self, arrays: list[np.ndarray]) -> bool:
        return self.keyframe is not None and len(arrays) == len(self.keyframe) and all(
            a.shape == k.shape and a.dtype.newbyteorder("<") == k.dtype for a, k in zip(arrays, self.keyframe))
