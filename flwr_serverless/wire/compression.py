"""Compressed tensors: half precision, int8 with per-chunk scales, sparse top-k deltas on a chain.

A node chooses ``compression`` (None | "fp16" | "bf16" | "int8" | "topk:<fraction>");
every reader decodes any of them back to each tensor's original dtype and shape,
so nodes with different settings federate together. Integer and boolean tensors
are never compressed, and neither is a tensor an encoding cannot represent (a
float32 weight beyond the float16 range stays float32 under "fp16").

How each encoding is stored (every part is a plain safetensors tensor, so the
object stays valid safetensors; ``name`` is the tensor's name):

* ``fp16``: ``name`` F16, original shape.
* ``bf16``: ``name`` U16 holding bfloat16 bits (numpy has no bfloat16;
  ``torch.from_numpy(a).view(torch.bfloat16)`` reads it), round to nearest even.
* ``int8``: ``name`` I8 (original shape) and ``name::scales`` F32, one per chunk
  of ``chunk`` consecutive elements (C order), symmetric: ``x ~ q * scale``,
  ``scale = max|x| / 127`` over the chunk.
* ``delta`` (written by ``compression="topk:<f>"``): ``name::indices`` (U16, U32
  or U64; strictly increasing flat indices; with ``"gaps": true`` in the spec,
  U16 gaps between consecutive indices, the first from 0, which the writer uses
  past 65,536 elements when every gap fits) and ``name::values`` (F16, or the
  original dtype when a value does not fit F16): a sparse change the reader
  *adds* to the writer's previous state, ``out = base.copy();
  out.flat[indices] += values``.

The header's ``encodings`` maps each compressed tensor to
``{"codec", "dtype", "shape"[, "chunk" | "gaps"]}``; readers validate it as strictly as the
rest of the object (see ``parse_spec`` and ``decode_tensor``).

Top-k deltas on a chain (the writer's side is ``flwr_serverless.wire.topk``)
-----------------------------------------------------------------------
Each writer keeps the state every reader of its objects holds, ``R``, and
sends the ``k`` largest entries of ``W - R`` (its weights minus that state):
classic error feedback, since whatever was left out (or rounded to F16) is
still in the next ``W - R``. A chain starts at a *keyframe*, a lossless object
at ``keyframes/<node_id>``; then ``R_0`` is the keyframe and delta ``c``
(``c = 1, 2, ...``) turns ``R_{c-1}`` into ``R_c``. Every delta is published
twice: at ``deltas/<node_id>/<c>`` (the log, written first) and at
``nodes/<node_id>``. The header names the chain (``keyframe``: seq and payload
hash of the keyframe object) and the position (``chain``: c; 0 is the
keyframe itself, published at ``nodes/<node_id>`` as an empty delta).

A reader keeps, per peer, the last state it decoded. ``decode(data, key,
base=state)`` raises ``KeyframeRequiredError`` (an ``InvalidObjectError``
carrying ``ref`` and ``chain``) when ``state`` is not ``R_{c-1}`` of the
object's chain; the reader then catches up: from its state if it is on that
chain, else from the keyframe, it applies the logged deltas up to ``c - 1``.
A log entry or keyframe that is not the one named (the writer started a new
chain meanwhile) skips the peer this time; its next object names the new one.
A new keyframe starts every ``keyframe_every`` deltas, so a late joiner reads
one model and at most ``keyframe_every - 1`` small deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.wire.dtypes import DTYPES, dtype_name, from_bf16_bits, to_bf16_bits

CODECS = ("fp16", "bf16", "int8", "delta")

DEFAULT_CHUNK = 4096
MAX_CHUNK = 1 << 24
MAX_ELEMENTS = 1 << 40  # no tensor claims more elements than this (a topk shape is not backed by bytes)
MAX_RANK = 32
SEP = "::"  # part names: "<tensor>::scales", "<tensor>::indices", "<tensor>::values"
_FP16_MAX = float(np.finfo(np.float16).max)
_MAX_SCALE = float(np.finfo(np.float32).max) / 127  # 127 * scale stays a finite float32
_BLOCK = 1 << 20  # elements per slice: temporaries stay a few MB whatever the tensor size
_PARTS = {"fp16": ("",), "bf16": ("",), "int8": ("", SEP + "scales"), "delta": (SEP + "indices", SEP + "values")}


@dataclass(frozen=True)
class EncodedTensor:
    """One compressed tensor: its original dtype and shape, and the stored parts by suffix."""

    codec: str
    dtype: np.dtype
    shape: tuple[int, ...]
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    chunk: int | None = None  # int8 only
    gaps: bool = False  # delta only: ``::indices`` holds U16 gaps between consecutive indices

    def spec(self) -> dict[str, Any]:
        """The header's ``encodings`` entry."""
        spec: dict[str, Any] = {"codec": self.codec, "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
        if self.chunk is not None:
            spec["chunk"] = self.chunk
        if self.gaps:
            spec["gaps"] = True
        return spec


def parse_compression(option: str | None) -> tuple[str | None, float | None]:
    """``compression=`` option -> (codec, top-k fraction); ValueError naming the option otherwise."""
    if option is None or option in ("fp16", "bf16", "int8"):
        return option, None
    if isinstance(option, str) and option.startswith("topk:"):
        try:
            fraction = float(option[5:])
        except ValueError:
            fraction = math.nan
        if 0.0 < fraction < 0.5:
            return "topk", fraction
        raise ValueError(f"compression={option!r}: the top-k fraction must be a number in (0, 0.5)")
    raise ValueError(f"compression={option!r}: use None, 'fp16', 'bf16', 'int8' or 'topk:<fraction>'")


def part_suffixes(codec: str) -> tuple[str, ...]:
    return _PARTS[codec]


def compressible(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and array.size > 0


def encode_tensor(array: np.ndarray, codec: str | None, chunk: int = DEFAULT_CHUNK) -> np.ndarray | EncodedTensor:
    """Compress one tensor with a stateless codec; returns the array itself when it must stay raw."""
    array = np.asarray(array)
    if codec is None or not compressible(array):
        return array
    shape, dtype = tuple(array.shape), array.dtype.newbyteorder("<")
    if codec == "fp16":
        if array.dtype.itemsize <= 2 or not _fits_fp16(array):
            return array
        return EncodedTensor("fp16", dtype, shape, {"": array.astype("<f2")})
    if codec == "bf16":
        if array.dtype.itemsize <= 2:
            return array
        return EncodedTensor("bf16", dtype, shape, {"": to_bf16_bits(array)})
    if codec == "int8":
        if not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"int8 chunk must be in [1, {MAX_CHUNK}], got {chunk}")
        q, scales = quantize_int8(array, chunk)
        return EncodedTensor("int8", dtype, shape, {"": q, SEP + "scales": scales}, chunk)
    raise ValueError(f"compression codec {codec!r} is not stateless (top-k deltas come from a TopKCompressor)")


def _fits_fp16(array: np.ndarray) -> bool:
    """Two reductions, no temporary array (NaN fails too: a reader would reject it anyway)."""
    return bool(float(array.max()) <= _FP16_MAX and float(array.min()) >= -_FP16_MAX)


def quantize_int8(array: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per chunk: returns (q in [-127, 127] with the array's shape, float32 scales)."""
    flat = np.asarray(array).reshape(-1)
    q = np.empty(flat.size, np.int8)
    scales = np.empty(-(-flat.size // chunk), "<f4")
    step = max(chunk, _BLOCK // chunk * chunk)
    for start in range(0, flat.size, step):
        rows = _rows(flat[start : start + step].astype(np.float32), chunk)
        scale = np.abs(rows).max(axis=1) / np.float32(127)
        inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
        block = np.clip(np.rint(rows * inverse[:, None]), -127, 127).astype(np.int8).reshape(-1)
        end = min(start + step, flat.size)
        q[start:end] = block[: end - start]
        scales[start // chunk : start // chunk + rows.shape[0]] = scale
    return q.reshape(array.shape), scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, chunk: int, dtype: np.dtype) -> np.ndarray:
    flat = q.reshape(-1)
    out = np.empty(flat.size, dtype)
    step = max(chunk, _BLOCK // chunk * chunk)
    for start in range(0, flat.size, step):
        rows = _rows(flat[start : start + step].astype(np.float32), chunk)
        block = (rows * scales[start // chunk : start // chunk + rows.shape[0], None]).reshape(-1)
        end = min(start + step, flat.size)
        out[start:end] = block[: end - start]
    return out.reshape(q.shape)


def _rows(segment: np.ndarray, chunk: int) -> np.ndarray:
    """A slice as rows of ``chunk`` elements, the last row zero-padded."""
    if segment.size % chunk:
        segment = np.concatenate([segment, np.zeros(chunk - segment.size % chunk, segment.dtype)])
    return segment.reshape(-1, chunk)


def index_dtype(size: int) -> str:
    """The narrowest unsigned type that holds every flat index of a tensor of ``size`` elements."""
    return "<u2" if size <= 1 << 16 else "<u4" if size <= 1 << 32 else "<u8"


def sparse_delta(residual: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of ``residual`` (``W - R``) by magnitude, zeros left out: (sorted flat
    indices, values as stored: F16 when every value fits, else the residual's own dtype)."""
    flat = residual.reshape(-1)
    moved = np.abs(flat)
    indices = _top(moved, k)
    indices = indices[moved[indices] > 0]
    indices.sort()
    values = flat[indices]
    if values.dtype.itemsize > 2 and values.size and float(np.abs(values).max()) <= _FP16_MAX:
        values = values.astype("<f2")
    return indices.astype(index_dtype(flat.size)), values


def pack_indices(indices: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """Sorted flat indices as stored: U16 when they fit; past 65,536 elements the U16 gaps between
    consecutive indices (the first from 0) when every gap fits, else absolute U32/U64. Returns (part, gaps)."""
    if size > 1 << 16 and indices.size:
        gaps = np.diff(indices.astype(np.int64), prepend=0)
        if int(gaps.max()) < 1 << 16:
            return gaps.astype("<u2"), True
    return indices.astype(index_dtype(size)), False


def unpack_indices(part: np.ndarray, gaps: bool) -> np.ndarray:
    """``pack_indices`` reversed: absolute flat indices."""
    return np.cumsum(part, dtype=np.uint64) if gaps else part


def apply_delta(state: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    """``state.flat[indices] += values`` in ``state``'s dtype: the writer and every reader run exactly this,
    so they hold the same bits."""
    flat = state.reshape(-1)
    flat[indices] += values.astype(state.dtype, copy=False)


def _top(moved: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest entries: a threshold from a strided sample keeps ~1.5k candidates
    (one cheap pass), and only those are partitioned; the full partition is the fallback."""
    n = moved.size
    if k >= n:
        return np.arange(n)
    sample = moved[:: max(1, n // 65536)]
    rank = min(sample.size - 1, int(sample.size * (1 - 1.5 * k / n)))
    if sample.size >= 1024 and rank > 0:
        threshold = np.partition(sample, rank)[rank]
        candidates = np.flatnonzero(moved >= threshold if threshold > 0 else moved > 0)
        if threshold == 0 and candidates.size <= k:  # fewer than k entries moved at all: all of them
            return candidates
        if candidates.size >= k:
            return candidates[np.argpartition(moved[candidates], candidates.size - k)[candidates.size - k :]]
    return np.argpartition(moved, n - k)[n - k :]


# -- reading: every claim of a hostile header checked before it is used ---------------------------------
@dataclass(frozen=True)
class Spec:
    codec: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunk: int | None
    gaps: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def parse_spec(spec: Any, key: str, name: str) -> Spec:
    """Validate one ``encodings`` entry of a header."""

    def bad(why: str) -> InvalidObjectError:
        return InvalidObjectError(key, f"tensor {name!r}: encoding {why}")

    if not isinstance(spec, dict) or spec.get("codec") not in CODECS:
        raise bad(f"must name a codec in {CODECS}, got {str(spec)[:60]}")
    codec = spec["codec"]
    allowed = {"codec", "dtype", "shape", *{"int8": ("chunk",), "delta": ("gaps",)}.get(codec, ())}
    if not set(spec) <= allowed or not {"dtype", "shape"} <= set(spec):
        raise bad(f"{codec!r} has fields {sorted(spec)}, expected {sorted(allowed)}")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None or dtype.kind != "f":
        raise bad(f"original dtype must be a float type, got {str(spec['dtype'])[:20]!r}")
    shape = spec["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS for d in shape)
        or math.prod(shape) > MAX_ELEMENTS
    ):
        raise bad(f"shape must be at most {MAX_RANK} dimensions and {MAX_ELEMENTS} elements, got {str(shape)[:60]}")
    chunk = spec.get("chunk")
    if codec == "int8" and not (isinstance(chunk, int) and not isinstance(chunk, bool) and 1 <= chunk <= MAX_CHUNK):
        raise bad(f"int8 chunk must be an integer in [1, {MAX_CHUNK}], got {str(chunk)[:20]}")
    if spec.get("gaps", True) is not True:
        raise bad(f"gaps, when present, must be true, got {str(spec['gaps'])[:20]}")
    return Spec(codec, dtype, tuple(shape), chunk, "gaps" in spec)


def decode_tensor(
    spec: Spec, parts: dict[str, np.ndarray], key: str, name: str, base: np.ndarray | None = None
) -> np.ndarray:
    """Rebuild one tensor in its original dtype from validated parts (a delta needs the state it applies to)."""

    def bad(why: str) -> InvalidObjectError:
        return InvalidObjectError(key, f"tensor {name!r} ({spec.codec}): {why}")

    def expect(suffix: str, kinds: tuple[np.dtype, ...], shape: tuple[int, ...] | None) -> np.ndarray:
        part = parts[suffix]
        if part.dtype not in kinds or (shape is not None and part.shape != shape) or (shape is None and part.ndim != 1):
            want = "/".join(dtype_name(k) for k in kinds)
            raise bad(
                f"part {name + suffix!r} is {dtype_name(part.dtype)}{list(part.shape)}, expected {want}"
                + (f"{list(shape)}" if shape is not None else " with one dimension")
            )
        return part

    if spec.codec == "fp16":
        return expect("", (DTYPES["F16"],), spec.shape).astype(spec.dtype)
    if spec.codec == "bf16":
        return from_bf16_bits(expect("", (DTYPES["U16"],), spec.shape)).astype(spec.dtype, copy=False)
    if spec.codec == "int8":
        chunk = spec.chunk or 1
        q = expect("", (DTYPES["I8"],), spec.shape)
        scales = expect(SEP + "scales", (DTYPES["F32"],), (-(-spec.size // chunk),))
        if not (np.isfinite(scales).all() and (scales >= 0).all() and (scales <= _MAX_SCALE).all()):
            raise bad(f"scales must be finite, non-negative and at most {_MAX_SCALE:.3g}")
        return dequantize_int8(q, scales, chunk, spec.dtype)
    kinds = (DTYPES["U16"],) if spec.gaps else (DTYPES["U16"], DTYPES["U32"], DTYPES["U64"])
    stored = expect(SEP + "indices", kinds, None)
    values = expect(SEP + "values", tuple(dict.fromkeys((DTYPES["F16"], spec.dtype))), (stored.size,))
    if stored.size > spec.size:
        raise bad(f"{stored.size} entries for a tensor of {spec.size} elements")
    if spec.gaps and stored.size > 1 and not (stored[1:] > 0).all():
        raise bad("index gaps after the first must be positive (no duplicates)")
    indices = unpack_indices(stored, spec.gaps)
    if indices.size and (indices[-1] >= spec.size or not (indices[1:] > indices[:-1]).all()):
        raise bad(f"indices must be strictly increasing (no duplicates) and below {spec.size}")
    if base is None or base.shape != spec.shape or base.dtype != spec.dtype:
        raise bad("the state it applies to does not match the encoding's shape and dtype")
    out = np.array(base, copy=True, order="C")
    apply_delta(out, indices, values)
    return out
