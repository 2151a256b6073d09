"""What a node publishes: its weights encoded with its ``compression`` option, keyframes first for top-k.

``compression`` is None | "fp16" | "bf16" | "int8" | "topk:<fraction>" (see
``flwr_serverless.compression``). For top-k the writer follows the keyframe
protocol: when the compressor asks for one, the lossless object goes to
``keyframes/<node_id>`` *before* any delta naming it is published, so a reader
never sees a delta whose keyframe was never written. If that PUT fails (or
its outcome is unknown) the compressor forgets its keyframe and the next
publication starts with a fresh one, never a delta against an object readers
may not have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from flwr_serverless import layout
from flwr_serverless.codec import UpdateHeader, encode, encode_parts, object_ref
from flwr_serverless.compression import EncodedTensor, Spec, decode_tensor, encode_tensor, parse_compression
from flwr_serverless.topk import TopKCompressor

PutKeyframe = Callable[[str, bytes], object]


def _check_topk_option(name: str, value: object, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")


class UpdateWriter:
    """Encodes one node's weights with its compression option; remembers what peers will decode."""

    def __init__(self, compression: str | None = None, *, topk_keyframe_every: int | None = None,
                 topk_max_error: float | None = None) -> None:
        self.codec, fraction = parse_compression(compression)  # ValueError naming the option
        self.option = compression
        self.topk: TopKCompressor | None = None
        topk_options = {"topk_keyframe_every": topk_keyframe_every, "topk_max_error": topk_max_error}
        given = [name for name, value in topk_options.items() if value is not None]
        if self.codec != "topk" and given:
            raise ValueError(f"{', '.join(given)} only apply with compression='topk:<fraction>', "
                             f"not compression={compression!r}")
        if self.codec == "topk" and fraction is not None:
            options: dict[str, float] = {}
            if topk_keyframe_every is not None:
                _check_topk_option("topk_keyframe_every", topk_keyframe_every, integer=True)
                options["keyframe_every"] = topk_keyframe_every
            if topk_max_error is not None:
                _check_topk_option("topk_max_error", topk_max_error, integer=False)
                options["max_error"] = float(topk_max_error)
            self.topk = TopKCompressor(fraction, **options)  # type: ignore[arg-type]
        self.keyframes_written = 0
        self._items: list[np.ndarray | EncodedTensor] | None = None  # what the last object stored, per tensor

    def encode(self, arrays: Sequence[np.ndarray], header: UpdateHeader, names: Sequence[str] | None,
               secret: bytes | None, put_keyframe: PutKeyframe) -> list[bytes | memoryview]:
        """The object to publish as buffers (stores write them without a join); for top-k,
        ``put_keyframe(key, data)`` first when a keyframe is due."""
        if self.topk is None:
            items = [encode_tensor(np.asarray(a), self.codec) for a in arrays]
            self._items = items
            return encode_parts(items, header, names, secret)
        items_or_none = self.topk.compress(arrays)
        if items_or_none is None:
            full = encode(arrays, header, names, secret)
            try:
                put_keyframe(layout.keyframe_key(header.node_id), full)
            except BaseException:
                self.topk.keyframe = None  # it may or may not be there now: start from a fresh keyframe next time
                raise
            self.topk.set_keyframe(arrays, object_ref(full))
            self.keyframes_written += 1
            items_or_none = self.topk.compress(arrays)  # an empty delta against the keyframe just written
            if items_or_none is None:  # pragma: no cover - a fresh keyframe always admits a delta
                raise RuntimeError("top-k compressor refused a delta against its own new keyframe")
        self._items = items_or_none
        return encode_parts(items_or_none, header, names, secret, keyframe=self.topk.keyframe_ref)

    def seen(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The last published weights as every reader decodes them (bit for bit), little-endian and contiguous.

        A sync node aggregates these as its own contribution, so all members of a
        round average the same values and hold identical weights.
        """
        items = self._items if self._items is not None else list(arrays)
        keyframe = self.topk.keyframe if self.topk is not None else None
        out: list[np.ndarray] = []
        for index, item in enumerate(items):
            if isinstance(item, EncodedTensor):
                spec = Spec(item.codec, item.dtype, item.shape, item.chunk)
                base = keyframe[index] if keyframe is not None and item.codec == "topk" else None
                out.append(decode_tensor(spec, item.parts, "<own>", f"t{index}", base))
            else:
                array = np.asarray(item)
                out.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))
        return out
