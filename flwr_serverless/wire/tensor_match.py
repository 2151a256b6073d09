"""Can a peer's update be averaged into this model? A pure check that says why not, by tensor name.

The node rejects (and reports) an incompatible peer instead of averaging
garbage: a different architecture, a float16 model among float32 ones, or a
Keras model among PyTorch ones (Keras stores dense kernels as (in, out), torch
as (out, in): same numbers of weights, transposed, so a square layer would even
pass a shape check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr_serverless.wire.codec import DecodedUpdate

TensorSpec = tuple[tuple[int, ...], np.dtype]
_LAYOUTS = {"keras": "kernels (in, out)", "torch": "kernels (out, in)"}


def default_names(count: int) -> list[str]:
    """The names the codec gives tensors when the writer supplies none."""
    return [f"t{i:04d}" for i in range(count)]


def has_real_names(names: Sequence[str]) -> bool:
    return list(names) != default_names(len(names))


def check_compatible(
    update: DecodedUpdate,
    expected_specs: Sequence[TensorSpec] | None,
    expected_names: Sequence[str] | None = None,
    framework: str | None = None,
) -> str | None:
    """None when ``update`` can be averaged into the local model, else the first reason it cannot."""
    specs = [(tuple(a.shape), a.dtype) for a in update.arrays]
    return incompatibility(update.names, specs, update.header.framework, expected_specs, expected_names, framework)


def incompatibility(
    names: Sequence[str],
    specs: Sequence[TensorSpec],
    writer_framework: str | None,
    expected_specs: Sequence[TensorSpec] | None,
    expected_names: Sequence[str] | None = None,
    framework: str | None = None,
) -> str | None:
    """``check_compatible`` on an object's logical tensor list (the codec calls it before decompressing)."""
    if framework is not None and writer_framework is not None and framework != writer_framework:
        theirs = _LAYOUTS.get(writer_framework, "an unknown layout")
        ours = _LAYOUTS.get(framework, "an unknown layout")
        return (
            f"written by a {writer_framework} model ({theirs}), this node is {framework} ({ours}); "
            "refusing to mix tensor layouts"
        )
    named = has_real_names(names)
    if expected_specs is not None:
        if len(expected_specs) != len(specs):
            return f"has {len(specs)} tensors, the local model has {len(expected_specs)}"
        for index, ((shape, dtype), (want_shape, want_dtype)) in enumerate(zip(specs, expected_specs)):
            want = np.dtype(want_dtype).newbyteorder("<")
            if tuple(shape) == tuple(want_shape) and np.dtype(dtype).newbyteorder("<") == want:
                continue
            label = f"tensor {index} ({names[index]})" if named else f"tensor {index}"
            return f"{label} is {np.dtype(dtype)}{list(shape)}, the local model has {want}{list(want_shape)}" + _hint(
                shape, np.dtype(dtype), tuple(want_shape), want
            )
    if expected_names is not None and named:
        if len(expected_names) != len(names):
            return f"has {len(names)} tensors, the local model has {len(expected_names)}"
        for index, (name, want_name) in enumerate(zip(names, expected_names)):
            if name != want_name:
                return f"tensor {index} is {name!r}, the local model's is {want_name!r} (a different architecture?)"
    return None


def _hint(shape: tuple[int, ...], dtype: np.dtype, want_shape: tuple[int, ...], want: np.dtype) -> str:
    if tuple(shape) == tuple(want_shape) and dtype.kind == want.kind == "f":
        return (
            f" ({dtype} vs {want}: train every node in one precision; compression='fp16' or 'bf16' "
            "halves what travels without changing the model's dtype)"
        )
    if len(shape) == 2 and tuple(shape) == tuple(reversed(want_shape)):
        return " (transposed: a Keras (in, out) kernel against a torch (out, in) one?)"
    return ""
