"""Pure aggregation math: weighted means, metrics, and the bridge to Flower strategies.

Linear strategies (FedAvg, FedProx) are averaged here directly, in float64 and
one slice of a tensor at a time, so real-valued weights are exact and memory
stays near one model (the result). Every other Flower strategy gets ``FitRes``
objects whose integer ``num_examples`` carry the real weights scaled to 2**40
(relative error < 1e-12).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg, Strategy

from flwr_serverless.wire.dtypes import bf16_to_float32, float_to_bf16, is_bf16

WEIGHT_SCALE = 2**40
CHUNK_ELEMENTS = 1 << 16  # elements per slice of a weighted sum: two 512 KiB float64 temporaries


@dataclass
class Contribution:
    """One participant's weights and how much it counts."""

    node_id: str
    arrays: Sequence[np.ndarray]
    weight: float
    num_examples: int = 0
    metrics: Mapping[str, object] = field(default_factory=dict)


def is_linear(strategy: Strategy) -> bool:
    """True when the strategy's aggregation is plain FedAvg (a weighted mean)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_fit is FedAvg.aggregate_fit


def weighted_mean(tensors: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """sum(c_k w_k) / sum(c_k) per tensor, computed in float64, cast back to each tensor's dtype.

    Integer and boolean tensors (step counters and the like) are not averaged:
    the element-wise maximum is kept, which is order-independent.
    """
    if not tensors:
        raise ValueError("nothing to aggregate")
    total = math.fsum(weights)
    if not total > 0:
        raise ValueError(f"aggregation weights must have a positive sum, got {list(weights)}")
    scales = [weight / total for weight in weights]
    result: list[np.ndarray] = []
    for layer in zip(*tensors):
        dtype = layer[0].dtype
        if dtype.kind not in "fc" and not is_bf16(dtype):
            result.append(np.maximum.reduce([np.asarray(t) for t in layer]))
            continue
        result.append(weighted_sum([np.asarray(t) for t in layer], scales, dtype))
    return result


def weighted_sum(
    layer: Sequence[np.ndarray],
    scales: Sequence[float],
    dtype: np.dtype,
    chunk: int = CHUNK_ELEMENTS,
    divide_by: float | None = None,
) -> np.ndarray:
    """sum(scale_k * tensor_k) [/ divide_by] slice by slice: float64 temporaries of one slice, not of the tensor.

    Each slice is widened by a plain copy, then scaled in place: the same bits as a
    widening multiply, in simpler (faster) loops. ``divide_by`` divides the float64 sum
    before the cast (the aggregate mode's running mean: ``(T M - c_old w_old + c_new w_new) / T'``).
    """
    bf16 = is_bf16(dtype)  # bfloat16 bits: widened slice by slice, rounded back to nearest even
    out = np.empty(layer[0].shape, dtype=dtype)
    flat_out = out.reshape(-1)
    terms = [(t.reshape(-1), scale) for t, scale in zip(layer, scales) if scale]
    if not terms:
        (flat_out.view("<u2") if bf16 else flat_out)[...] = 0
        return out
    wide = np.float64 if bf16 else np.result_type(dtype, np.float64)
    acc = np.empty(min(chunk, flat_out.size), dtype=wide)
    term = np.empty_like(acc)
    for start in range(0, flat_out.size, chunk):
        stop = min(start + chunk, flat_out.size)
        for index, (flat, scale) in enumerate(terms):
            target = acc[: stop - start] if index == 0 else term[: stop - start]
            target[...] = bf16_to_float32(flat[start:stop]) if bf16 else flat[start:stop]
            target *= scale
            if index:
                acc[: stop - start] += target
        if divide_by is not None:
            acc[: stop - start] /= divide_by
        flat_out[start:stop] = float_to_bf16(acc[: stop - start]) if bf16 else acc[: stop - start]
    return out


def mean_metrics(contributions: Sequence[Contribution]) -> dict[str, float]:
    """Example-weighted mean of each numeric metric over the participants that report it."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for c in contributions:
        n = max(c.num_examples, 1)
        for key, value in c.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + n * float(value)
            counts[key] = counts.get(key, 0.0) + n
    return {key: sums[key] / counts[key] for key in sums}


def _scaled_counts(weights: Sequence[float]) -> list[int]:
    top = max(weights)
    return [max(1, round(w / top * WEIGHT_SCALE)) if w > 0 else 0 for w in weights]


def is_message_api(strategy: object) -> bool:
    """A strategy of Flower's Message API (``flwr.serverapp.strategy``): ``aggregate_train``, no ``aggregate_fit``."""
    train, fit = getattr(strategy, "aggregate_train", None), getattr(strategy, "aggregate_fit", None)
    return callable(train) and not callable(fit)


def _reply(index: int, arrays: Sequence[np.ndarray], weight: float, key: str) -> Any:
    """A train reply as the Message API's strategies read it (no SuperLink: the metadata is ours)."""
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    content = RecordDict(
        {"arrays": ArrayRecord([np.asarray(a) for a in arrays]), "metrics": MetricRecord({key: weight})}
    )
    metadata = Metadata(
        run_id=0,
        message_id=f"flwr-serverless-{index}",
        src_node_id=index + 1,
        dst_node_id=0,
        reply_to_message_id="flwr-serverless",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    # Flower's typed overloads leave out ``metadata``, which its runtime takes (and uses for replies); the public
    # ``reply_to=`` path needs a SuperLink run context that serverless nodes do not have
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def _aggregate_messages(strategy: Any, server_round: int, live: Sequence[Contribution]) -> list[np.ndarray]:
    """``aggregate_train`` over one reply per participant; strategies with a server model start from ours."""
    from flwr.app import ArrayRecord

    if hasattr(strategy, "current_arrays") and strategy.current_arrays is None:
        strategy.current_arrays = ArrayRecord([np.asarray(a) for a in live[0].arrays])
    key = str(getattr(strategy, "weighted_by_key", "num-examples"))
    replies = [_reply(i, c.arrays, float(c.weight), key) for i, c in enumerate(live)]
    record, _ = strategy.aggregate_train(server_round, replies)
    if record is None:
        raise RuntimeError(f"{type(strategy).__name__}.aggregate_train returned no arrays")
    return list(record.to_numpy_ndarrays())


def aggregate(strategy: Strategy, server_round: int, contributions: Sequence[Contribution]) -> list[np.ndarray]:
    """Aggregate with ``strategy`` (legacy or Message API); the result keeps the dtypes of the first contribution."""
    live = [c for c in contributions if c.weight > 0]
    if not live:
        raise ValueError("no contribution has a positive weight")
    if is_linear(strategy):
        return weighted_mean([c.arrays for c in live], [c.weight for c in live])
    reference = live[0].arrays
    live = [_widened(c) for c in live]  # Flower's strategies compute on numpy floats: bfloat16 bits as float32
    if is_message_api(strategy):
        arrays = _aggregate_messages(strategy, server_round, live)
        return [_like(a, r) for a, r in zip(arrays, reference)]

    ok = Status(code=Code.OK, message="")
    results = [
        (None, FitRes(status=ok, parameters=ndarrays_to_parameters(list(c.arrays)), num_examples=n, metrics={}))
        for c, n in zip(live, _scaled_counts([c.weight for c in live]))
    ]
    parameters, _ = strategy.aggregate_fit(server_round, results, [])  # type: ignore[arg-type]
    if parameters is None:
        raise RuntimeError(f"{type(strategy).__name__}.aggregate_fit returned no parameters")
    arrays = parameters_to_ndarrays(parameters) if isinstance(parameters, Parameters) else list(parameters)
    return [_like(a, r) for a, r in zip(arrays, reference)]


def _widened(contribution: Contribution) -> Contribution:
    """``contribution`` with its bfloat16 tensors as float32 (the same object when it has none)."""
    arrays = [np.asarray(a) for a in contribution.arrays]
    if not any(is_bf16(a.dtype) for a in arrays):
        return contribution
    wide = [bf16_to_float32(a) if is_bf16(a.dtype) else a for a in arrays]
    return Contribution(
        contribution.node_id, wide, contribution.weight, contribution.num_examples, contribution.metrics
    )


def _like(array: Any, reference: np.ndarray) -> np.ndarray:
    """A strategy's output in the dtype and shape of the contribution it stands for (bfloat16 rounded back)."""
    array = np.asarray(array)
    if is_bf16(reference.dtype):
        return float_to_bf16(array.astype(np.float32, copy=False)).reshape(reference.shape)
    return array.astype(reference.dtype, copy=False).reshape(reference.shape)
