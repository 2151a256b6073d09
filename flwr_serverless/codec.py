"""Weights to bytes and back, in a safetensors-compatible layout. Never pickle.

Layout of one object (readable by the ``safetensors`` library too)::

    8 bytes    little-endian uint64 N: length of the JSON header
    N bytes    UTF-8 JSON, padded with spaces to a multiple of 8:
               {"__metadata__": {"flwr_serverless": "<update header as JSON>"},
                "t0000": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}, ...}
    payload    the tensors back to back, little-endian, C order

The update header (see ``UpdateHeader``) carries the format version, who wrote
the object and what it was trained from, the tensor order and a SHA-256 of the
payload; with a secret it also carries an HMAC-SHA256 over header and payload.
A reader validates all of it (and finiteness) before anything reaches aggregation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import mmap
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flwr_serverless.errors import InvalidObjectError

FORMAT = "flwr-serverless/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# safetensors dtype names <-> numpy dtypes (little-endian)
_DTYPES: dict[str, np.dtype] = {
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
_NAMES = {(dt.kind, dt.itemsize): name for name, dt in _DTYPES.items()}

Scalar = bool | int | float | str


def is_valid_node_id(node_id: str) -> bool:
    """Node ids are plain names: letters, digits, '_', '-', '.'; no '/', '..' or control characters."""
    return bool(_NODE_ID.match(node_id)) and ".." not in node_id


@dataclass
class UpdateHeader:
    """Who published an update and what it was trained from (everything staleness needs)."""

    node_id: str
    epoch: int = 0  # the node's own epoch / publication counter
    round: int | None = None  # sync round, when the node is synchronous
    num_examples: int = 0  # examples trained since the last federation
    local_steps: int = 0  # cumulative optimizer steps of this node
    base_version: int = 0  # community version the local training started from
    base_steps: int = 0  # total community steps already included in that base
    timestamp: float = field(default_factory=time.time)
    metrics: dict[str, Scalar] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodedUpdate:
    header: UpdateHeader
    names: list[str]
    arrays: list[np.ndarray]  # read-only views on the object's bytes


def dtype_name(dtype: np.dtype) -> str:
    dt = np.dtype(dtype)
    name = _NAMES.get((dt.kind, dt.itemsize))
    if name is None:
        raise TypeError(f"dtype {dt} cannot be stored (supported: {', '.join(_DTYPES)})")
    return name


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _signature(secret: bytes, header_fields: Mapping[str, Any], layout: Mapping[str, Any]) -> str:
    # The header carries the payload's SHA-256, so signing header + layout covers the payload too.
    return hmac.new(secret, _canonical({"header": header_fields, "layout": layout}), hashlib.sha256).hexdigest()


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    clean: dict[str, Scalar] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, str)):
            clean[str(key)] = value
        elif isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            clean[str(key)] = value.item() if isinstance(value, np.generic) else value
    return clean


def encode(
    arrays: Sequence[np.ndarray],
    header: UpdateHeader,
    names: Sequence[str] | None = None,
    secret: bytes | None = None,
) -> bytes:
    """Serialize tensors plus header; the result is one self-describing object."""
    if not is_valid_node_id(header.node_id):
        raise ValueError(f"node id {header.node_id!r} is not a plain name")
    names = list(names) if names is not None else [f"t{i:04d}" for i in range(len(arrays))]
    if len(names) != len(arrays) or len(set(names)) != len(names):
        raise ValueError("tensor names must be unique, one per array")
    if "__metadata__" in names:
        raise ValueError("'__metadata__' is not a tensor name")

    chunks: list[memoryview] = []
    layout: dict[str, Any] = {}
    digest = hashlib.sha256()
    offset = 0
    for name, array in zip(names, arrays):
        array = np.asarray(array)
        stored = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        view = memoryview(stored.reshape(-1).view(np.uint8))
        layout[name] = {"dtype": dtype_name(array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + view.nbytes]}
        digest.update(view)
        chunks.append(view)
        offset += view.nbytes

    fields = asdict(header)
    fields["metrics"] = _clean_metrics(header.metrics)
    fields["format"] = FORMAT
    fields["tensor_names"] = names
    fields["payload_sha256"] = digest.hexdigest()
    if secret:
        fields["signature"] = _signature(secret, fields, layout)
    json_header = json.dumps({"__metadata__": {"flwr_serverless": json.dumps(fields, allow_nan=False)}, **layout})
    raw = json_header.encode()
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw, *chunks])


def read_header(data: bytes | memoryview, key: str) -> tuple[dict[str, Any], dict[str, Any], int]:
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
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        version = fields.get("format") if isinstance(fields, dict) else None
        raise InvalidObjectError(key, f"unsupported format version {version!r} (expected {FORMAT!r})")
    layout = {name: spec for name, spec in top.items() if name != "__metadata__"}
    return fields, layout, 8 + header_len


def decode(
    data: bytes | memoryview | mmap.mmap,
    key: str,
    expected: Sequence[tuple[tuple[int, ...], np.dtype]] | None = None,
    secret: bytes | None = None,
    check_finite: bool = True,
) -> DecodedUpdate:
    """Validate and decode one object. Raises ``InvalidObjectError(key, reason)`` on any problem.

    ``expected`` lists the local model's (shape, dtype) per tensor; objects that
    do not match it are rejected instead of being averaged into the model.
    """
    fields, layout, start = read_header(data, key)
    payload = memoryview(data)[start:]
    names = fields.get("tensor_names")
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(layout):
        raise InvalidObjectError(key, "tensor names in header and layout disagree")

    if secret:
        claimed = fields.pop("signature", None)
        if not isinstance(claimed, str):
            raise InvalidObjectError(key, "unsigned object in a signed experiment")
        if not hmac.compare_digest(claimed, _signature(secret, fields, layout)):
            raise InvalidObjectError(key, "bad signature (forged, or signed with another secret)")
    else:
        fields.pop("signature", None)

    arrays: list[np.ndarray] = []
    offset = 0
    for name in names:
        spec = layout[name]
        try:
            dtype = _DTYPES[spec["dtype"]]
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
        arrays.append(np.frombuffer(payload[begin:end], dtype=dtype).reshape(shape))
        offset = end
    if offset != len(payload):
        raise InvalidObjectError(key, f"payload is {len(payload)} bytes but tensors cover {offset}")

    if hashlib.sha256(payload).hexdigest() != fields.get("payload_sha256"):
        raise InvalidObjectError(key, "checksum mismatch: payload corrupted")

    if expected is not None:
        if len(expected) != len(arrays):
            raise InvalidObjectError(key, f"has {len(arrays)} tensors, the local model has {len(expected)}")
        for index, (array, (shape, dtype)) in enumerate(zip(arrays, expected)):
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype).newbyteorder("<"):
                raise InvalidObjectError(
                    key,
                    f"tensor {index} ({names[index]}) is {array.dtype}{list(array.shape)}, "
                    f"the local model has {np.dtype(dtype)}{list(shape)}",
                )
    if check_finite:
        for name, array in zip(names, arrays):
            if array.dtype.kind == "f" and not _all_finite(array):
                raise InvalidObjectError(key, f"tensor {name!r} contains NaN or Inf")

    header = _header_from_fields(fields, key)
    return DecodedUpdate(header=header, names=[str(n) for n in names], arrays=arrays)


def _all_finite(array: np.ndarray, chunk: int = 1 << 16) -> bool:
    """``np.isfinite(array).all()`` in slices, so the check allocates a small mask, not one per tensor."""
    flat = array.reshape(-1)
    return all(np.isfinite(flat[start:start + chunk]).all() for start in range(0, flat.size, chunk))


def _header_from_fields(fields: dict[str, Any], key: str) -> UpdateHeader:
    try:
        header = UpdateHeader(
            node_id=str(fields["node_id"]),
            epoch=int(fields.get("epoch", 0)),
            round=None if fields.get("round") is None else int(fields["round"]),
            num_examples=int(fields.get("num_examples", 0)),
            local_steps=int(fields.get("local_steps", 0)),
            base_version=int(fields.get("base_version", 0)),
            base_steps=int(fields.get("base_steps", 0)),
            timestamp=float(fields.get("timestamp", 0.0)),
            metrics=_clean_metrics(fields.get("metrics") or {}),
            extra=dict(fields.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError):
        raise InvalidObjectError(key, "header fields are missing or of the wrong type") from None
    if not is_valid_node_id(header.node_id):
        raise InvalidObjectError(key, f"node id {header.node_id!r} is not a plain name")
    if header.num_examples < 0 or header.local_steps < 0:
        raise InvalidObjectError(key, "negative example or step counts")
    return header
