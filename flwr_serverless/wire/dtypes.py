"""safetensors dtype names <-> numpy dtypes (little-endian), shared by the codec and the compressors.

numpy has no bfloat16. A bf16 tensor is held as its raw bits in ``BF16``, a one-field
structured dtype over ``<u2``: it travels as safetensors' ``BF16`` without being widened,
and it can never pass for an integer tensor (whose aggregation keeps the maximum).
Arithmetic widens it with ``bf16_to_float32`` and narrows back with ``float_to_bf16``.
"""

from __future__ import annotations

import numpy as np

#: bfloat16 bits (see the module docstring); ``torch.from_numpy(a.view("<i2")).view(torch.bfloat16)`` reads it.
BF16 = np.dtype([("bfloat16", "<u2")])

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BF16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items() if dt.kind != "V"}


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype; TypeError for dtypes the format cannot hold."""
    dt = np.dtype(dtype)
    name = "BF16" if is_bf16(dt) else _NAMES.get((dt.kind, dt.itemsize))  # no other structured dtype
    if name is None:
        raise TypeError(f"dtype {dt} cannot be stored (supported: {', '.join(DTYPES)})")
    return name


def is_bf16(dtype: np.dtype) -> bool:
    dt = np.dtype(dtype)
    return dt.kind == "V" and dt.newbyteorder("<") == BF16


def is_float(dtype: np.dtype) -> bool:
    """Float tensors, bfloat16 included: those that are averaged (and must be finite)."""
    return np.dtype(dtype).kind == "f" or is_bf16(dtype)


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits as uint16, rounding to nearest even (the rounding torch and TPUs use)."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype("<u2")


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << np.uint32(16)).view("<f4")


def bf16_to_float32(array: np.ndarray) -> np.ndarray:
    """A ``BF16`` array as float32 (exact: every bfloat16 is a float32)."""
    return from_bf16_bits(np.ascontiguousarray(array).view("<u2"))


def float_to_bf16(array: np.ndarray) -> np.ndarray:
    """A float array as a ``BF16`` array, rounding to nearest even."""
    return to_bf16_bits(array).view(BF16)


def bf16_finite(array: np.ndarray) -> bool:
    """No NaN or Inf among ``BF16`` values (exponent bits all ones)."""
    return bool(((np.ascontiguousarray(array).view("<u2") & np.uint16(0x7F80)) != np.uint16(0x7F80)).all())
