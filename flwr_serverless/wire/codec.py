"""Weights to bytes and back, in a safetensors-compatible layout. Never pickle.

Layout of one object (readable by the ``safetensors`` library too)::

    8 bytes    little-endian uint64 N: length of the JSON header
    N bytes    UTF-8 JSON, padded with spaces to a multiple of 8:
               {"__metadata__": {"flwr_serverless": "<update header as JSON>"},
                "dense/kernel": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}, ...}
    payload    the stored tensors back to back, little-endian, C order

The update header (``flwr_serverless.wire.header``) carries the format version, who
wrote the object and what it was trained from, the tensor names in model order,
how compressed tensors are stored (``compression.py``), the chain position of a
top-k delta (its keyframe and index), and a hash of the payload (BLAKE3 by default, SHA-256
accepted). With a secret it also carries an HMAC-SHA256 over the header and
layout, which covers the payload through its hash. A reader validates all of it
(and finiteness) before anything reaches aggregation; version-1 objects
(``flwr-serverless/1``, SHA-256) still decode.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from flwr_serverless.errors import InvalidObjectError, KeyframeRequiredError
from flwr_serverless.wire.compression import (
    SEP,
    EncodedTensor,
    Spec,
    decode_tensor,
    encode_tensor,
    parse_compression,
    parse_spec,
    part_suffixes,
)
from flwr_serverless.wire.dtypes import DTYPES, bf16_finite, dtype_name, is_bf16
from flwr_serverless.wire.header import (
    FORMAT,
    FORMAT_V1,
    FORMATS,
    MAX_CHAIN,
    KeyframeRef,
    UpdateHeader,
    header_fields,
    is_valid_node_id,
    parse_chain,
    parse_hash,
    parse_header,
    parse_keyframe,
)
from flwr_serverless.wire.tensor_match import TensorSpec, check_compatible, default_names, incompatibility

_blake3: ModuleType | None
try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; SHA-256 keeps working without it
    _blake3 = None

__all__ = [
    "FORMAT",
    "FORMAT_V1",
    "DecodedUpdate",
    "KeyframeRef",
    "KeyframeRequiredError",
    "UpdateHeader",
    "check_compatible",
    "decode",
    "dtype_name",
    "encode",
    "encode_parts",
    "is_valid_node_id",
    "object_ref",
    "read_header",
]

MAX_HEADER_BYTES = 16 * 1024 * 1024
HASHES = ("blake3", "sha256")
_THREADED_HASH_BYTES = 8 << 20  # below this, BLAKE3's worker threads cost more than they save


@dataclass
class DecodedUpdate:
    header: UpdateHeader
    names: list[str]  # the writer's tensor names (``t0000``... when it supplied none)
    arrays: list[np.ndarray]  # uncompressed tensors: read-only views on the object's bytes
    payload_hash: str = ""  # "blake3:<hex>" / "sha256:<hex>": names this object as a keyframe
    keyframe: KeyframeRef | None = None  # the chain a top-k delta is on
    encodings: dict[str, str] = field(default_factory=dict)  # compressed tensor name -> codec
    chain: int | None = None  # a top-k delta's position on its chain (0: the keyframe itself)

    @property
    def lossless(self) -> bool:
        """Every tensor is exactly what the writer had (no compressed encoding)."""
        return not self.encodings

    def position(self) -> tuple[KeyframeRef, int] | None:
        """Where on its writer's chain this state is: a delta's (keyframe, chain); any other object can start a
        chain as a keyframe, at (itself, 0)."""
        if self.keyframe is not None and self.chain is not None:
            return self.keyframe, self.chain
        if self.chain is None and self.payload_hash:
            return KeyframeRef(self.header.seq, self.payload_hash), 0
        return None


def _hasher(algorithm: str, size: int) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    if _blake3 is None:
        raise RuntimeError("BLAKE3 objects need the 'blake3' package (pip install blake3)")
    threads = _blake3.blake3.AUTO if size >= _THREADED_HASH_BYTES else 1
    return _blake3.blake3(max_threads=threads)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _signature(secret: bytes, header_fields: dict[str, Any], layout: dict[str, Any]) -> str:
    # The header carries the payload's hash, so signing header + layout covers the payload too.
    return hmac.new(secret, _canonical({"header": header_fields, "layout": layout}), hashlib.sha256).hexdigest()


def encode_parts(
    arrays: Sequence[np.ndarray | EncodedTensor],
    header: UpdateHeader,
    names: Sequence[str] | None = None,
    secret: bytes | None = None,
    *,
    compression: str | None = None,
    keyframe: KeyframeRef | None = None,
    chain: int | None = None,
    payload_hash: str = "blake3",
) -> list[bytes | memoryview]:
    """``encode`` as a list of buffers (framing, then each tensor's bytes), for stores that can write them
    without joining: the tensors are not copied."""
    fields = header_fields(header)
    names = list(names) if names is not None else default_names(len(arrays))
    if len(names) != len(arrays) or len(set(names)) != len(names):
        raise ValueError("tensor names must be unique, one per array")
    if payload_hash not in HASHES:
        raise ValueError(f"payload_hash must be one of {HASHES}, got {payload_hash!r}")
    codec, _ = parse_compression(compression)
    if codec == "topk":
        raise ValueError("compression='topk:...' needs a TopKCompressor: pass its deltas as arrays")

    stored: list[tuple[str, np.ndarray]] = []
    encodings: dict[str, Any] = {}
    for name, item in zip(names, arrays):
        item = item if isinstance(item, EncodedTensor) else encode_tensor(np.asarray(item), codec)
        if isinstance(item, EncodedTensor):
            encodings[name] = item.spec()
            stored += [(name + suffix, item.parts[suffix]) for suffix in part_suffixes(item.codec)]
        else:
            stored.append((name, item))
    part_names = [name for name, _ in stored]
    if "__metadata__" in part_names or len(set(part_names)) != len(part_names):
        raise ValueError("a tensor name is '__metadata__' or collides with another tensor's stored part name")
    if any(spec["codec"] == "delta" for spec in encodings.values()) and (keyframe is None or chain is None):
        raise ValueError("top-k deltas need keyframe= and chain= (the compressor's keyframe_ref and position)")
    if chain is not None and (isinstance(chain, bool) or not isinstance(chain, int) or not 0 <= chain <= MAX_CHAIN):
        raise ValueError(f"chain must be an integer in [0, {MAX_CHAIN}], got {chain!r}")

    chunks: list[memoryview] = []
    layout: dict[str, Any] = {}
    total = sum(np.asarray(a).nbytes for _, a in stored)
    digest = _hasher(payload_hash, total)
    offset = 0
    for name, array in stored:
        array = np.asarray(array)
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        view = data.reshape(-1).view(np.uint8).data
        layout[name] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        digest.update(view)
        chunks.append(view)
        offset += view.nbytes

    fields.update(
        format=FORMAT,
        tensor_names=names,
        payload_hash=f"{payload_hash}:{digest.hexdigest()}",
        encodings=encodings,
        keyframe=None if keyframe is None else {"seq": keyframe.seq, "payload_hash": keyframe.payload_hash},
        chain=chain,
    )
    if secret:
        fields["signature"] = _signature(secret, fields, layout)
    meta = {"__metadata__": {"flwr_serverless": json.dumps(fields, allow_nan=False)}}
    raw = json.dumps({**meta, **layout}).encode()
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)), raw, *chunks]


def encode(
    arrays: Sequence[np.ndarray | EncodedTensor],
    header: UpdateHeader,
    names: Sequence[str] | None = None,
    secret: bytes | None = None,
    **options: Any,
) -> bytes:
    """Serialize tensors plus header into one self-describing object.

    ``compression`` ("fp16", "bf16", "int8") compresses float tensors; top-k
    deltas come from ``TopKCompressor`` (pass them as ``arrays`` with
    ``keyframe=`` and ``chain=``). ``payload_hash`` is "blake3" (default) or "sha256".
    """
    return b"".join(encode_parts(arrays, header, names, secret, **options))


def read_header(data: bytes | memoryview | mmap.mmap, key: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Parse and sanity-check the framing; returns (update fields, tensor layout, payload start)."""
    if len(data) < 8:
        raise InvalidObjectError(key, f"truncated: {len(data)} bytes is shorter than the 8-byte length prefix")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > MAX_HEADER_BYTES:
        raise InvalidObjectError(
            key, f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES}); not a weights object"
        )
    if 8 + header_len > len(data):
        raise InvalidObjectError(key, f"truncated: header claims {header_len} bytes but only {len(data) - 8} follow")
    try:
        top = json.loads(bytes(data[8 : 8 + header_len]))
        fields = json.loads(top["__metadata__"]["flwr_serverless"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InvalidObjectError(key, f"not a flwr-serverless weights object ({type(exc).__name__})") from None
    if not isinstance(fields, dict) or fields.get("format") not in FORMATS:
        version = fields.get("format") if isinstance(fields, dict) else None
        raise InvalidObjectError(
            key, f"unsupported format version {str(version)[:40]!r} (this reader reads {', '.join(FORMATS)})"
        )
    layout = {name: spec for name, spec in top.items() if name != "__metadata__"}
    return fields, layout, 8 + header_len


def object_ref(data: bytes | memoryview, key: str = "<encoded>") -> KeyframeRef:
    """The (seq, payload hash) naming an encoded object, for ``TopKCompressor.set_keyframe``."""
    fields, _, _ = read_header(data, key)
    algorithm, digest = parse_hash(fields.get("payload_hash"), key)
    return KeyframeRef(parse_header(fields, key).seq, f"{algorithm}:{digest}")


def decode(
    data: bytes | memoryview | mmap.mmap,
    key: str,
    expected: Sequence[TensorSpec] | None = None,
    secret: bytes | None = None,
    check_finite: bool = True,
    *,
    base: DecodedUpdate | None = None,
    expected_names: Sequence[str] | None = None,
    framework: str | None = None,
) -> DecodedUpdate:
    """Validate and decode one object. Raises ``InvalidObjectError(key, reason)`` on any problem.

    ``expected`` lists the local model's (shape, dtype) per tensor (and
    ``expected_names`` / ``framework`` its names and layout family, see
    ``tensor_match.check_compatible``); objects that do not match are rejected
    instead of being averaged into the model. A top-k delta at chain position
    ``c`` needs ``base``, the writer's state at ``c - 1`` (its keyframe for
    ``c <= 1``), else ``KeyframeRequiredError``.
    """
    fields, layout, start = read_header(data, key)
    names = fields.get("tensor_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise InvalidObjectError(key, "header field 'tensor_names' must be a list of distinct strings")
    if secret:
        claimed = fields.pop("signature", None)
        if not isinstance(claimed, str):
            raise InvalidObjectError(key, "unsigned object in a signed experiment")
        if not hmac.compare_digest(claimed, _signature(secret, fields, layout)):
            raise InvalidObjectError(key, "bad signature (forged, or signed with another secret)")
    else:
        fields.pop("signature", None)
    v1 = fields["format"] == FORMAT_V1
    algorithm, digest = ("sha256", fields.get("payload_sha256")) if v1 else parse_hash(fields.get("payload_hash"), key)
    header = parse_header(fields, key)
    specs = _encodings(fields, names, key)
    ref = None if v1 else parse_keyframe(fields.get("keyframe"), key)
    chain = None if v1 else parse_chain(fields.get("chain"), key)

    expected_parts = [(n + s, n) for n in names for s in (part_suffixes(specs[n].codec) if n in specs else ("",))]
    if sorted(part for part, _ in expected_parts) != sorted(layout):
        raise InvalidObjectError(key, "tensor names in header and layout disagree")
    payload = memoryview(data)[start:]
    parts = _views(layout, [part for part, _ in expected_parts], payload, key)
    hasher = _hasher(algorithm, len(payload))
    hasher.update(payload)
    if not isinstance(digest, str) or not hmac.compare_digest(hasher.hexdigest(), digest):
        raise InvalidObjectError(key, "checksum mismatch: payload corrupted")

    logical = [(specs[n].shape, specs[n].dtype) if n in specs else (parts[n].shape, parts[n].dtype) for n in names]
    reason = incompatibility(names, logical, header.framework, expected, expected_names, framework)
    if reason is not None:
        raise InvalidObjectError(key, reason)
    arrays = _rebuild(names, specs, parts, header, (ref, chain), base, key)
    if check_finite:
        for name, array in zip(names, arrays):
            if (array.dtype.kind == "f" and not _all_finite(array)) or (
                is_bf16(array.dtype) and not bf16_finite(array)
            ):
                raise InvalidObjectError(key, f"tensor {name!r} contains NaN or Inf")
    return DecodedUpdate(
        header=header,
        names=list(names),
        arrays=arrays,
        payload_hash=f"{algorithm}:{digest}",
        keyframe=ref if chain is not None else None,
        chain=chain,
        encodings={n: s.codec for n, s in specs.items()},
    )


def _encodings(fields: dict[str, Any], names: list[str], key: str) -> dict[str, Spec]:
    encodings = fields.get("encodings", {})
    if fields["format"] == FORMAT_V1 or encodings is None:
        return {}
    if not isinstance(encodings, dict) or not set(encodings) <= set(names):
        raise InvalidObjectError(key, "header field 'encodings' must map tensor names to encodings")
    return {name: parse_spec(spec, key, name) for name, spec in encodings.items()}


def _views(layout: dict[str, Any], order: list[str], payload: memoryview, key: str) -> dict[str, np.ndarray]:
    """Zero-copy views of the stored tensors, each checked against its bytes and stored back to back."""
    views: dict[str, np.ndarray] = {}
    offset = 0
    for name in order:
        spec = layout[name]
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidObjectError(key, f"tensor {name!r} has a malformed layout entry") from None
        if any(d < 0 for d in shape) or begin != offset or end < begin:
            raise InvalidObjectError(key, f"tensor {name!r} has inconsistent shape or offsets")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise InvalidObjectError(key, f"tensor {name!r}: shape {shape} does not fit {end - begin} bytes")
        if end > len(payload):
            raise InvalidObjectError(key, f"truncated: payload is {len(payload)} bytes, tensor {name!r} ends at {end}")
        views[name] = np.frombuffer(payload[begin:end], dtype=dtype).reshape(shape)
        offset = end
    if offset != len(payload):
        raise InvalidObjectError(key, f"payload is {len(payload)} bytes but tensors cover {offset}")
    return views


def _rebuild(
    names: list[str],
    specs: dict[str, Spec],
    parts: dict[str, np.ndarray],
    header: UpdateHeader,
    at: tuple[KeyframeRef | None, int | None],
    base: DecodedUpdate | None,
    key: str,
) -> list[np.ndarray]:
    """Uncompressed tensors as they are; compressed ones back in their original dtype (deltas onto ``base``)."""
    ref, chain = at
    deltas = [name for name, spec in specs.items() if spec.codec == "delta"]
    if (ref is None) != (chain is None) or (deltas and ref is None):
        raise InvalidObjectError(key, "a top-k delta needs both 'keyframe' and 'chain' in the header")
    if deltas:
        assert ref is not None and chain is not None
        if chain == 0 and any(parts[name + SEP + "indices"].size for name in deltas):
            raise InvalidObjectError(key, "chain position 0 is the keyframe itself: its delta must be empty")
        if base is None or base.position() != (ref, max(chain - 1, 0)):
            raise KeyframeRequiredError(key, ref, chain)
        if base.header.node_id != header.node_id or len(base.arrays) != len(names):
            raise InvalidObjectError(key, "the state given is not one of the same node and model")
    arrays = []
    for index, name in enumerate(names):
        if name not in specs:
            arrays.append(parts[name])
            continue
        own = {suffix: parts[name + suffix] for suffix in part_suffixes(specs[name].codec)}
        state = base.arrays[index] if base is not None and specs[name].codec == "delta" else None
        arrays.append(decode_tensor(specs[name], own, key, name, state))
    return arrays


def _all_finite(array: np.ndarray, chunk: int = 1 << 18) -> bool:
    """``np.isfinite(array).all()`` in slices, so the check allocates a small mask, not one per tensor."""
    flat = array.reshape(-1)
    return all(np.isfinite(flat[start : start + chunk]).all() for start in range(0, flat.size, chunk))
