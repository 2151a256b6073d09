"""safetensors dtype names <-> numpy dtypes (little-endian), shared by the codec and the compressors."""

from __future__ import annotations

import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
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
_NAMES = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype; TypeError for dtypes the format cannot hold."""
    dt = np.dtype(dtype)
    name = _NAMES.get((dt.kind, dt.itemsize))
    if name is None:
        raise TypeError(f"dtype {dt} cannot be stored (supported: {', '.join(DTYPES)})")
    return name
