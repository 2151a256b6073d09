"""Test helpers that forge weights objects: rewrite the header of a valid object, or build a version-1 one."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flwr_serverless.wire.dtypes import dtype_name


def split(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(update fields, whole JSON header, payload) of an encoded object."""
    (n,) = struct.unpack_from("<Q", data)
    top = json.loads(data[8 : 8 + n])
    return json.loads(top["__metadata__"]["flwr_serverless"]), top, data[8 + n :]


def frame(fields: dict[str, Any], top: dict[str, Any], payload: bytes) -> bytes:
    top = {**top, "__metadata__": {"flwr_serverless": json.dumps(fields)}}
    raw = json.dumps(top).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def rewrite(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The same object with its update fields changed in place by ``change`` (the payload hash still holds)."""
    fields, top, payload = split(data)
    change(fields)
    return frame(fields, top, payload)


def v1_object(arrays: Sequence[np.ndarray], **fields: Any) -> bytes:
    """An object as version 1 wrote it: SHA-256 as ``payload_sha256``, provenance in ``extra``."""
    layout: dict[str, Any] = {}
    offset = 0
    payload = b""
    for i, array in enumerate(arrays):
        raw = np.ascontiguousarray(array).tobytes()
        layout[f"t{i:04d}"] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        payload += raw
        offset += len(raw)
    header = {
        "node_id": "old",
        "epoch": 1,
        "round": None,
        "num_examples": 5,
        "local_steps": 7,
        "base_version": 2,
        "base_steps": 3,
        "timestamp": 1.7e9,
        "metrics": {},
        "extra": {},
        **fields,
        "format": "flwr-serverless/1",
        "tensor_names": list(layout),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return frame(header, layout, payload)
