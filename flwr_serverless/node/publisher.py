"""What a node publishes: its weights encoded with its ``compression`` option; for top-k, the chain's side objects.

``compression`` is None | "fp16" | "bf16" | "int8" | "topk:<fraction>" (see
``flwr_serverless.wire.compression``). For top-k the writer follows the chain
protocol: a due keyframe goes to ``keyframes/<node_id>`` *before* the object
naming it is published; once a delta is published, ``published`` copies it
inside the store to the log ``deltas/<node_id>/<index>`` (no second upload) and
only then moves the chain. A delta whose publication failed, or whose outcome is
unknown, is never built on: the next publication starts a new keyframe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flwr_serverless.errors import StoreError
from flwr_serverless.validation import check_choice, check_positive, check_positive_int
from flwr_serverless.wire import layout
from flwr_serverless.wire.codec import UpdateHeader, encode, encode_parts, object_ref
from flwr_serverless.wire.compression import (
    EncodedTensor,
    Spec,
    decode_tensor,
    encode_tensor,
    parse_compression,
)
from flwr_serverless.wire.header import MAX_CHAIN, KeyframeRef
from flwr_serverless.wire.topk import PendingDelta, TopKCompressor

logger = logging.getLogger("flwr_serverless")

KEYFRAME_CODECS = ("lossless", "fp16", "bf16", "int8")
DEFAULT_KEYFRAME_CODEC = "int8"

PutFirst = Callable[[str, bytes | list[bytes | memoryview]], object]


@dataclass(frozen=True)
class Encoded:
    """What ``UpdateWriter.encode`` produced: the object's buffers, and whether it starts a new top-k chain
    (its keyframe was PUT first)."""

    parts: list[bytes | memoryview]
    keyframe: bool = False


class UpdateWriter:
    """Encodes one node's weights with its compression option; remembers what peers will decode."""

    def __init__(
        self,
        compression: str | None = None,
        *,
        topk_keyframe_every: int | None = None,
        topk_max_error: float | None = None,
        topk_keyframe: str | None = None,
    ) -> None:
        self.codec, fraction = parse_compression(compression)  # ValueError naming the option
        self.option = compression
        self.topk: TopKCompressor | None = None
        if topk_keyframe is not None and topk_keyframe not in KEYFRAME_CODECS:
            check_choice("topk_keyframe", topk_keyframe, KEYFRAME_CODECS)
        # A keyframe only starts a chain: error feedback sends what its encoding rounded, so int8 is the default.
        self.keyframe_codec = None if topk_keyframe == "lossless" else (topk_keyframe or DEFAULT_KEYFRAME_CODEC)
        topk_options = {
            "topk_keyframe_every": topk_keyframe_every,
            "topk_max_error": topk_max_error,
            "topk_keyframe": topk_keyframe,
        }
        given = [name for name, value in topk_options.items() if value is not None]
        if self.codec != "topk" and given:
            raise ValueError(
                f"{', '.join(given)} only apply with compression='topk:<fraction>', not compression={compression!r}"
            )
        if self.codec == "topk" and fraction is not None:
            options: dict[str, float] = {}
            if topk_keyframe_every is not None:
                check_positive_int("topk_keyframe_every", topk_keyframe_every)
                if topk_keyframe_every > MAX_CHAIN:
                    raise ValueError(
                        f"topk_keyframe_every must be at most {MAX_CHAIN} (readers refuse longer chains), "
                        f"got {topk_keyframe_every}"
                    )
                options["keyframe_every"] = topk_keyframe_every
            if topk_max_error is not None:
                options["max_error"] = check_positive("topk_max_error", topk_max_error)
            self.topk = TopKCompressor(fraction, **options)  # type: ignore[arg-type]
        self.keyframes_written = 0
        self.deltas_logged = 0
        self._pending: PendingDelta | None = None  # a delta encoded but not yet published and logged
        self._restart = False  # no delta may build on the current chain (a log copy failed, or a peer diverged)
        self._node_id = ""
        self._published: list[np.ndarray] | None = None  # top-k: the chain state of the last publication
        self._items: list[np.ndarray | EncodedTensor] | None = None  # what the last object stored, per tensor

    def encode(
        self,
        arrays: Sequence[np.ndarray],
        header: UpdateHeader,
        names: Sequence[str] | None,
        secret: bytes | None,
        put_first: PutFirst,
    ) -> Encoded:
        """The object to publish as buffers (stores write them without a join); for top-k, a due keyframe is
        stored with ``put_first(key, data)`` before. Call ``published`` once the object is in the store."""
        if self.topk is None:
            items = [encode_tensor(np.asarray(a), self.codec) for a in arrays]
            self._items = items
            return Encoded(encode_parts(items, header, names, secret))
        topk = self.topk
        if self._pending is not None or self._restart:  # the last delta was not (certainly) published and logged
            topk.reset()
            self._pending, self._restart = None, False
        pending = topk.compress(arrays)
        if pending is None:
            stored = [encode_tensor(np.asarray(a), self.keyframe_codec) for a in arrays]
            full = encode(stored, header, names, secret)
            try:
                put_first(layout.keyframe_key(header.node_id), full)
            except BaseException:
                topk.reset()  # it may or may not be there now: start a new chain next time
                raise
            items = topk.set_keyframe(_as_read(stored), object_ref(full))
            self._published = topk.state
            self.keyframes_written += 1
            self._items = items
            return Encoded(encode_parts(items, header, names, secret, keyframe=topk.keyframe_ref, chain=0), True)
        self._pending, self._node_id = pending, header.node_id
        self._items = pending.items
        parts = encode_parts(pending.items, header, names, secret, keyframe=topk.keyframe_ref, chain=pending.chain)
        return Encoded(parts)

    def published(self, key: str, copy: Callable[[str, str], object]) -> None:
        """The object last encoded is at ``key``: log a top-k delta there with ``copy(key, log_key)`` (a copy
        inside the store) and move the chain. If the copy fails, readers still hold what they read, but no
        later delta may need this link: the next publication starts a new keyframe."""
        pending, self._pending = self._pending, None
        if pending is None or self.topk is None:
            return
        if self.topk.rebased:  # on a round's aggregate: a reader without it cannot use a log either
            self.topk.commit(pending)
            self._published = self.topk.state
            return
        log_key = layout.delta_key(self._node_id, pending.chain)
        try:
            copy(key, log_key)
        except StoreError as exc:
            self._restart = True
            logger.warning(
                "node %s could not log its top-k delta at %s (its next update starts a new keyframe): %s",
                self._node_id,
                log_key,
                exc,
            )
        self.topk.commit(pending)  # readers of ``key`` hold this state now, logged or not
        self._published = self.topk.state  # a rebase replaces the list, a commit changes it: kept until then
        self.deltas_logged += 0 if self._restart else 1

    def rebase(self, arrays: Sequence[np.ndarray], ref: KeyframeRef, weights: Sequence[np.ndarray]) -> None:
        """A sync round ended with every member holding ``arrays`` (we trained ``weights`` before): the next
        delta is against them, plus what of ``weights`` was never sent."""
        if self.topk is not None and self._pending is None and not self._restart:
            self.topk.rebase(arrays, ref, weights)

    def restart(self) -> None:
        """Some peer could not follow (or we could not follow a peer): the next publication is a keyframe."""
        if self.topk is not None:
            self._restart = True

    def seen(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The last published weights as every reader decodes them (bit for bit), little-endian and contiguous.

        A sync node aggregates these as its own contribution, so all members of a
        round average the same values and hold identical weights.
        """
        if self.topk is not None:  # R as published, what readers decoded (the arrays if nothing yet)
            state = self._published if self._published is not None and self._items is not None else arrays
            return [np.array(a, dtype=np.asarray(a).dtype.newbyteorder("<"), copy=True, order="C") for a in state]
        return _as_read(self._items if self._items is not None else list(arrays))


def _as_read(items: Sequence[np.ndarray | EncodedTensor]) -> list[np.ndarray]:
    """Stored items (not top-k deltas) as every reader decodes them: little-endian, contiguous, bit for bit."""
    out: list[np.ndarray] = []
    for index, item in enumerate(items):
        if isinstance(item, EncodedTensor):
            spec = Spec(item.codec, item.dtype, item.shape, item.chunk)
            out.append(decode_tensor(spec, item.parts, "<own>", f"t{index}"))
        else:
            array = np.asarray(item)
            out.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))
    return out
