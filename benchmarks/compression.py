"""Bytes, time and error of compressed updates for a 10M-parameter model, against uncompressed objects.

In one run, for a float32 model of ``--params`` parameters (a few big tensors
and a few small ones), it measures per encoding (none, fp16, bf16, int8 with
4096-element chunks, top-k deltas at a few fractions):

* bytes per update (top-k: averaged over ``--updates`` updates, keyframes
  included: a keyframe update writes the full ``keyframes/<id>`` plus an empty
  delta at ``nodes/<id>``; the log entry is a copy inside the store; the reader
  decodes every object onto its state as a node would);
* encode and decode seconds (median of ``--repeat``), and their ratio to the
  uncompressed object's encode / decode (the floor);
* reconstruction error ``|R - W| / |W|`` and the largest absolute error.

Between updates the weights (scale 0.05) drift by heavy-tailed noise (Student
t, 3 degrees of freedom, scale ``--drifts``), like SGD updates; top-k also
reports the readers' error after each delta (error feedback keeps it from
growing) and the seconds of a delta when it is sent. It also times the payload hash
alone (SHA-256, BLAKE3 single- and multi-threaded) and the ``b"".join`` that
``encode`` does on top of ``encode_parts``. JSON and a PNG go to
benchmarks/results/.

    python benchmarks/compression.py [--params 10000000] [--updates 12] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from flwr_serverless.errors import KeyframeRequiredError
from flwr_serverless.node.publisher import UpdateWriter
from flwr_serverless.wire.codec import UpdateHeader, decode, encode, encode_parts

RESULTS = Path(__file__).parent / "results"


def make_model(num_params: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    big = num_params // 4
    sizes = [big, big, big, num_params - 3 * big - 3000, 1000, 1000, 1000]
    return [rng.standard_normal(n, dtype=np.float32) * 0.05 for n in sizes]


def drift(arrays: list[np.ndarray], rng: np.random.Generator, scale: float) -> list[np.ndarray]:
    return [a + (scale * rng.standard_t(3, a.size)).astype(np.float32) for a in arrays]


def timed(function: Callable[[], Any], repeat: int, warm: bool = True) -> tuple[float, Any]:
    times, result = [], function() if warm else None  # warm-up: first calls pay for imports and page faults
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def errors(decoded: list[np.ndarray], truth: list[np.ndarray]) -> tuple[float, float]:
    diff = math.sqrt(sum(float(np.sum((d.astype(np.float64) - t) ** 2)) for d, t in zip(decoded, truth)))
    norm = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in truth))
    worst = max(float(np.max(np.abs(d - t))) for d, t in zip(decoded, truth))
    return diff / norm, worst


def stateless(model: list[np.ndarray], codecs: list[str | None], repeat: int) -> list[dict[str, Any]]:
    """Encode and decode with each codec, interleaved round by round so machine load hits all alike."""
    header = UpdateHeader("bench", seq=1)
    times: dict[str | None, dict[str, list[float]]] = {c: {"encode": [], "decode": []} for c in codecs}
    objects = {c: encode(model, header, compression=c) for c in codecs}  # warm-up
    for _ in range(repeat):
        for codec in codecs:
            seconds, objects[codec] = timed(lambda c=codec: encode(model, header, compression=c), 1, warm=False)
            times[codec]["encode"].append(seconds)
            seconds, _ = timed(lambda c=codec: decode(objects[c], "nodes/bench"), 1, warm=False)
            times[codec]["decode"].append(seconds)
    rows = []
    for codec in codecs:
        relative, worst = errors(decode(objects[codec], "nodes/bench").arrays, model)
        rows.append(
            {
                "encoding": codec or "none",
                "bytes_per_update": len(objects[codec]),
                "encode_s": statistics.median(times[codec]["encode"]),
                "decode_s": statistics.median(times[codec]["decode"]),
                "relative_error": relative,
                "max_abs_error": worst,
            }
        )
    return rows


def topk(model: list[np.ndarray], fraction: float, updates: int, scale: float, seed: int) -> dict[str, Any]:
    """One writer (``UpdateWriter``, as a node runs it) publishing ``updates`` times; one reader following it."""
    rng = np.random.default_rng(seed)
    writer = UpdateWriter(f"topk:{fraction}")
    side: dict[str, bytes] = {}
    weights, state = model, None
    total_bytes, encode_times, decode_times, rel, worst = 0, [], [], [], []
    kinds: list[bool] = []  # True: that update published a keyframe
    for seq in range(1, updates + 1):
        weights = drift(weights, rng, scale)
        start = time.perf_counter()
        encoded = writer.encode(
            weights,
            UpdateHeader("bench", seq=seq),
            None,
            None,
            lambda key, blob: side.__setitem__(key, bytes(blob)),
        )
        data = b"".join(encoded.parts)
        writer.published("nodes/bench", lambda source, target: None)  # the log copy moves no bytes
        encode_times.append(time.perf_counter() - start)
        keyframe = encoded.keyframe
        total_bytes += len(data) + (len(side["keyframes/bench"]) if keyframe else 0)
        kinds.append(keyframe)
        start = time.perf_counter()
        try:
            state = decode(data, "nodes/bench", base=state)
        except KeyframeRequiredError:
            state = decode(data, "nodes/bench", base=decode(side["keyframes/bench"], "keyframes/bench"))
        decode_times.append(time.perf_counter() - start)
        if not keyframe:
            relative, largest = errors(state.arrays, weights)
            rel.append(relative)
            worst.append(largest)
    delta_encode = [t for t, kf in zip(encode_times, kinds) if not kf]
    delta_decode = [t for t, kf in zip(decode_times, kinds) if not kf]
    return {
        "encoding": f"topk:{fraction} drift {scale:g}",
        "drift": scale,
        "bytes_per_update": total_bytes / updates,
        "keyframes": sum(kinds),
        "deltas": len(delta_encode),
        "encode_s": statistics.median(delta_encode) if delta_encode else math.nan,
        "decode_s": statistics.median(delta_decode) if delta_decode else math.nan,
        "keyframe_encode_s": statistics.median([t for t, kf in zip(encode_times, kinds) if kf]),
        "keyframe_decode_s": statistics.median([t for t, kf in zip(decode_times, kinds) if kf]),
        "relative_error": max(rel, default=0.0),
        "max_abs_error": max(worst, default=0.0),
        "relative_error_per_delta": rel,
    }


def hashing(model: list[np.ndarray], repeat: int) -> dict[str, float]:
    views = [memoryview(a).cast("B") for a in model]

    def run(make: Callable[[], Any]) -> Callable[[], str]:
        def go() -> str:
            hasher = make()
            for view in views:
                hasher.update(view)
            return hasher.hexdigest()

        return go

    parts = encode_parts(model, UpdateHeader("bench"))
    cases: dict[str, Callable[[], Any]] = {
        "sha256_s": run(hashlib.sha256),
        "blake3_1_thread_s": run(lambda: blake3.blake3(max_threads=1)),
        "blake3_auto_threads_s": run(lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)),
        "encode_parts_s": lambda: encode_parts(model, UpdateHeader("bench")),
        "join_s": lambda: b"".join(parts),
        "encode_sha256_s": lambda: encode(model, UpdateHeader("bench"), payload_hash="sha256"),
        "encode_blake3_s": lambda: encode(model, UpdateHeader("bench")),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        case()  # warm-up
    for _ in range(repeat):  # interleaved, so machine load hits every case alike
        for name, case in cases.items():
            times[name].append(timed(case, 1, warm=False)[0])
    return {name: statistics.median(values) for name, values in times.items()}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["encoding"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [r["bytes_per_update"] / 1e6 for r in rows], color="tab:blue")
    axes[0].set_ylabel("MB per update")
    width = 0.4
    x = np.arange(len(rows))
    axes[1].bar(x - width / 2, [r["encode_s"] for r in rows], width, label="encode")
    axes[1].bar(x + width / 2, [r["decode_s"] for r in rows], width, label="decode")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("seconds")
    axes[1].legend()
    axes[2].bar(names, [max(r["relative_error"], 1e-12) for r in rows], color="tab:red")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("|R - W| / |W| (top-k: worst delta)")
    for ax in axes:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.suptitle(f"Compressed updates, {rows[0]['params'] / 1e6:.0f}M float32 parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fractions", default="0.01,0.05")
    parser.add_argument(
        "--drifts",
        default="1e-4,1e-3",
        help="scale of the per-update drift (weights have scale 0.05, so 1e-3 is ~3.5%% per update)",
    )
    args = parser.parse_args()

    model = make_model(args.params)
    rows = stateless(model, [None, "fp16", "bf16", "int8"], args.repeat)
    rows += [
        topk(model, float(f), args.updates, float(d), seed=1)
        for d in args.drifts.split(",")
        for f in args.fractions.split(",")
    ]
    floor = rows[0]
    for row in rows:
        row["params"] = args.params
        row["bytes_ratio"] = row["bytes_per_update"] / floor["bytes_per_update"]
        row["encode_ratio"] = row["encode_s"] / floor["encode_s"]
        row["decode_ratio"] = row["decode_s"] / floor["decode_s"]
        print(
            f"{row['encoding']:>10}: {row['bytes_per_update'] / 1e6:7.2f} MB ({row['bytes_ratio']:.3f}x)  "
            f"encode {row['encode_s']:.3f}s ({row['encode_ratio']:.2f}x)  "
            f"decode {row['decode_s']:.3f}s ({row['decode_ratio']:.2f}x)  "
            f"error {row['relative_error']:.2e} (max abs {row['max_abs_error']:.2e})"
        )
    hashes = hashing(model, args.repeat)
    print("payload hash and framing:", {k: round(v, 4) for k, v in hashes.items()})
    RESULTS.mkdir(exist_ok=True)
    out = {"params": args.params, "updates": args.updates, "encodings": rows, "hashing": hashes}
    (RESULTS / "compression.json").write_text(json.dumps(out, indent=2))
    plot(rows, RESULTS / "compression.png")
    print(f"wrote {RESULTS / 'compression.json'} and compression.png")


if __name__ == "__main__":
    main()
