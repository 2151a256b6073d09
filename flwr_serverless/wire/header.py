"""The update header: typed fields, their JSON form, and strict validation of what a peer claims.

Format version 2 (``flwr-serverless/2``) types every field the library reads;
``extra`` only keeps fields this version does not know (written by a newer
writer), so a reader never trusts an untyped value. Version-1 objects still
decode: their ``extra["seq"]``, ``extra["base_own_seq"]``,
``extra["base_own_steps"]`` and ``extra["dataset_size"]`` become typed fields.

Every typed field is checked for type and range on decode: counters are
integers (not booleans, not floats) in ``[0, 2**53]``, so a hostile header can
neither crash arithmetic nor make a peer weigh ``1e300`` examples.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.wire import layout

FORMAT = "flwr-serverless/2"
FORMAT_V1 = "flwr-serverless/1"
FORMATS = (FORMAT, FORMAT_V1)
MAX_COUNT = 2**53  # largest integer a JSON reader in any language holds exactly
FRAMEWORKS = ("keras", "torch")  # tensor layout families: keras kernels are (in, out), torch (out, in)
_FRAMEWORK = re.compile(r"^[a-z0-9_\-]{1,32}$")
_HASH = re.compile(r"^(blake3|sha256):([0-9a-f]{64})$")
_COUNTERS = (
    "epoch",
    "num_examples",
    "local_steps",
    "base_version",
    "base_steps",
    "seq",
    "base_own_seq",
    "base_own_steps",
)
_V1_EXTRA = ("seq", "base_own_seq", "base_own_steps", "dataset_size")
# Fields the codec itself writes next to the header's own (see codec.encode).
CODEC_FIELDS = (
    "format",
    "tensor_names",
    "payload_hash",
    "payload_sha256",
    "encodings",
    "keyframe",
    "chain",
    "signature",
)
MAX_CHAIN = 1024  # deltas per top-k chain (compression.MAX_CHAIN)

Scalar = bool | int | float | str


def is_valid_node_id(node_id: str) -> bool:
    """Node ids are plain names (see ``layout.is_valid_node_id``: matched whole, no trailing newline)."""
    return layout.is_valid_node_id(node_id)


@dataclass
class UpdateHeader:
    """Who published an update and what it was trained from (everything staleness and weighting need)."""

    node_id: str
    epoch: int = 0  # the node's own epoch / publication counter
    round: int | None = None  # sync round, when the node is synchronous
    num_examples: int = 0  # examples trained since the last federation
    local_steps: int = 0  # cumulative optimizer steps of this node
    base_version: int = 0  # community version the local training started from
    base_steps: int = 0  # total community steps already included in that base
    timestamp: float = field(default_factory=time.time)
    metrics: dict[str, Scalar] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer format this version does not know
    seq: int = 0  # how many objects this node has published (1, 2, ...)
    base_own_seq: int = 0  # the node's own seq at its last aggregation
    base_own_steps: int = 0  # the node's own local_steps at its last aggregation
    dataset_size: int | None = None  # |D_k|, the semi-sync aggregation weight
    framework: str | None = None  # tensor layout family, see FRAMEWORKS
    run: str | None = None  # the run (generation) it belongs to; readers skip other runs' objects


@dataclass(frozen=True)
class KeyframeRef:
    """Names the full-precision object that starts a top-k chain: its seq and payload hash."""

    seq: int
    payload_hash: str


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    """Keep finite numbers, booleans and strings; metrics are informative, never trusted for weighting."""
    clean: dict[str, Scalar] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, str)):
            clean[str(key)] = value
        elif isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            clean[str(key)] = value.item() if isinstance(value, np.generic) else value
    return clean


def header_fields(header: UpdateHeader) -> dict[str, Any]:
    """The header as JSON-ready fields (the codec adds format, names, hash, encodings, signature)."""
    if not is_valid_node_id(header.node_id):
        raise ValueError(f"node id {header.node_id!r} is not a plain name")
    fields: dict[str, Any] = {
        "node_id": header.node_id,
        "timestamp": float(header.timestamp),
        "metrics": clean_metrics(header.metrics),
        "framework": header.framework,
        "extra": dict(header.extra),
    }
    for name in (*_COUNTERS, "round", "dataset_size"):
        value = getattr(header, name)
        fields[name] = int(value) if isinstance(value, np.integer) else value
    for name, value in fields.items():  # the writer gets the reader's checks first, as a ValueError
        if name in _COUNTERS or name in ("round", "dataset_size"):
            _check_int(
                value,
                name,
                optional=name in ("round", "dataset_size"),
                low=1 if name == "dataset_size" else 0,
                fail=ValueError,
            )
    if not 0 <= fields["timestamp"] < 1e11:  # also NaN
        raise ValueError(f"header field 'timestamp' must be seconds since the epoch, got {header.timestamp!r}")
    if header.framework is not None and not _FRAMEWORK.match(str(header.framework)):
        raise ValueError(f"framework {header.framework!r} is not a short lowercase name (e.g. {FRAMEWORKS})")
    if header.run is not None:  # absent rather than null: objects without a run read as before
        if not layout.is_valid_node_id(header.run):
            raise ValueError(f"header field 'run' must be a plain name, got {_show(header.run)}")
        fields["run"] = header.run
    return fields


def parse_header(fields: dict[str, Any], key: str) -> UpdateHeader:
    """Validate every field of a decoded header (v1 or v2) and build the typed header."""

    def bad(name: str, why: str) -> InvalidObjectError:
        return InvalidObjectError(key, f"header field {name!r} {why}, got {_show(fields.get(name))}")

    extra = fields.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("extra", "must be an object")
    extra = dict(extra)
    if fields.get("format") == FORMAT_V1:  # v1 kept these four in `extra`
        fields = {**fields, **{name: extra.pop(name) for name in _V1_EXTRA if name in extra}}
    node_id = fields.get("node_id")
    if not isinstance(node_id, str) or not is_valid_node_id(node_id):
        raise bad("node_id", "must be a plain name")
    values: dict[str, Any] = {}
    for name in (*_COUNTERS, "round", "dataset_size"):
        optional = name in ("round", "dataset_size")
        low = 1 if name == "dataset_size" else 0
        if not _check_int(fields.get(name), name, optional=optional or name not in fields, low=low):
            raise bad(name, f"must be an integer in [{low}, 2**53]" + (" or null" if optional else ""))
        values[name] = fields.get(name, None if optional else 0)
    timestamp = fields.get("timestamp", 0.0)
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not 0 <= timestamp < 1e11:
        raise bad("timestamp", "must be seconds since the epoch")
    framework = fields.get("framework")
    if framework is not None and not (isinstance(framework, str) and _FRAMEWORK.match(framework)):
        raise bad("framework", "must be null or a short lowercase name")
    run = fields.get("run")
    if run is not None and not layout.is_valid_node_id(run):
        raise bad("run", "must be null or a plain name")
    metrics = fields.get("metrics", {})
    if not isinstance(metrics, dict):
        raise bad("metrics", "must be an object")
    if values["base_own_seq"] > values["seq"] or values["base_own_steps"] > values["local_steps"]:
        raise InvalidObjectError(
            key,
            "header claims more own work at its base than in total "
            "(base_own_seq > seq or base_own_steps > local_steps)",
        )
    known = {
        *CODEC_FIELDS,
        *_COUNTERS,
        "node_id",
        "round",
        "timestamp",
        "metrics",
        "extra",
        "dataset_size",
        "framework",
        "run",
    }
    extra.update({name: value for name, value in fields.items() if name not in known})  # a newer writer's fields
    return UpdateHeader(
        node_id=node_id,
        timestamp=float(timestamp),
        metrics=clean_metrics(metrics),
        extra=extra,
        framework=framework,
        run=run,
        **values,
    )


def parse_hash(value: Any, key: str) -> tuple[str, str]:
    """``"blake3:<hex>"`` or ``"sha256:<hex>"`` -> (algorithm, hex digest)."""
    match = _HASH.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidObjectError(
            key, f"header field 'payload_hash' must be 'blake3:<hex>' or 'sha256:<hex>', got {_show(value)}"
        )
    return match.group(1), match.group(2)


def parse_keyframe(value: Any, key: str) -> KeyframeRef | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"seq", "payload_hash"} or not _check_int(value["seq"], "seq"):
        raise InvalidObjectError(key, f"header field 'keyframe' must be {{seq, payload_hash}}, got {_show(value)}")
    parse_hash(value["payload_hash"], key)
    return KeyframeRef(int(value["seq"]), value["payload_hash"])


def parse_chain(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if not _check_int(value, "chain") or value > MAX_CHAIN:
        raise InvalidObjectError(
            key, f"header field 'chain' must be an integer in [0, {MAX_CHAIN}], got {_show(value)}"
        )
    return int(value)


def _check_int(
    value: Any, name: str, optional: bool = False, low: int = 0, fail: type[Exception] | None = None
) -> bool:
    ok = (value is None and optional) or (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_COUNT
    )
    if not ok and fail is not None:
        raise fail(f"header field {name!r} must be an integer in [{low}, 2**53], got {_show(value)}")
    return ok


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
