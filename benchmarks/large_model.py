"""Publish and fetch of a large model through our S3 stores against boto3's own floors, on SeaweedFS.

One SeaweedFS (``weed mini``) on 127.0.0.1. For a model of ``--mib`` MiB of float32
parameters (default 1024: 256M parameters) each case runs in a child process of its
own, timed around the operation only, with its peak RSS read from ``VmHWM`` (reset
just before the operation, so numpy's buffers count, which tracemalloc would miss):

- ``ours_boto3`` / ``ours_s3fs``: the node's path, ``codec.encode_parts`` + ``Store.put``
  (publish) and ``PeerSpool.fetch`` + ``codec.decode`` (fetch: hash and finiteness checks).
- ``raw``: boto3 ``put_object`` / ``get_object().read()`` of the same number of bytes.
- ``managed``: boto3 ``upload_fileobj`` / ``download_fileobj`` (to a temp file) with the same
  part size and concurrency as our store.

Ratios are against the faster floor (raw or managed) of the same run; memory is the peak
beyond the process before the model existed, minus the model (the target is <= 0.5 GiB).
``--sweep`` also times our boto3 store over part sizes x concurrency and single PUT vs
multipart over object sizes (how the defaults in ``stores/s3_multipart.py`` were chosen).
JSON, PNG and the markdown table go to benchmarks/results/ (``--quick``: 64 MiB, ``large_model_quick.*``).

    flock /work/bench.lock python benchmarks/large_model.py [--quick] [--sweep] [--repeats 3]
    python benchmarks/large_model.py --table benchmarks/results/large_model.json   # markdown for the docs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
MIB = 1 << 20
BUCKET = "large-model"
OURS = ("ours_boto3", "ours_s3fs")
FLOORS = ("raw", "managed")


# -- child side: one operation, timed, with its peak RSS ----------------------------------------------
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _model(nbytes: int) -> list[Any]:
    """A few large tensors and a few small ones, like a real network (float32)."""
    import numpy as np

    rng = np.random.default_rng(0)
    floats = nbytes // 4
    big = (floats - 3000) // 4
    sizes = [big, big, big, floats - 3 * big - 3000, 1000, 1000, 1000]
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


def _client(spec: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=spec["endpoint"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(max_pool_connections=max(10, spec["concurrency"] * 2)),
    )


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (case, direction) in this process; seconds and peak RSS beyond ``base``."""
    import numpy as np

    case, direction, nbytes, key = spec["case"], spec["direction"], spec["nbytes"], spec["key"]
    transfer = {
        "multipart_threshold": spec["threshold"],
        "multipart_chunksize": spec["chunksize"],
        "max_concurrency": spec["concurrency"],
    }
    split: dict[str, float] = {}
    if case in OURS:
        from flwr_serverless.node.spool import PeerSpool
        from flwr_serverless.stores import open_store
        from flwr_serverless.wire.codec import UpdateHeader, decode, encode_parts

        backend = "boto3" if case == "ours_boto3" else "fsspec"
        store = open_store(
            f"s3://{BUCKET}/{case}",
            backend=backend,
            endpoint_url=spec["endpoint"],
            key="testing",
            secret="testing",
            **transfer,
        )
        base = _status("VmRSS")  # after the imports and the client: what the model and the transfer add
        if direction == "put":
            arrays = _model(nbytes)
            _reset_peak()
            start = time.perf_counter()
            parts = encode_parts(arrays, UpdateHeader(node_id="n0", epoch=1, num_examples=1))
            split["codec_s"] = time.perf_counter() - start  # the payload hash, mostly
            store.put(key, parts)
        else:
            _reset_peak()
            start = time.perf_counter()
            fetched = PeerSpool().fetch(store, key)
            mark = time.perf_counter()
            decoded = decode(fetched, key)  # hash and finiteness over the whole payload
            split["codec_s"] = time.perf_counter() - mark
            assert sum(a.nbytes for a in decoded.arrays) == nbytes
    else:
        from boto3.s3.transfer import TransferConfig

        client = _client(spec)
        config = TransferConfig(
            multipart_threshold=spec["threshold"],
            multipart_chunksize=spec["chunksize"],
            max_concurrency=spec["concurrency"],
        )
        base = _status("VmRSS")
        if direction == "put":
            payload = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32).tobytes()
            _reset_peak()
            start = time.perf_counter()
            if case == "raw":
                client.put_object(Bucket=BUCKET, Key=f"{case}/{key}", Body=payload)
            else:
                client.upload_fileobj(io.BytesIO(payload), BUCKET, f"{case}/{key}", Config=config)
        else:
            _reset_peak()
            start = time.perf_counter()
            if case == "raw":
                body = client.get_object(Bucket=BUCKET, Key=f"{case}/{key}")["Body"].read()
                assert len(body) == nbytes
            else:
                with tempfile.TemporaryFile() as sink:
                    client.download_fileobj(BUCKET, f"{case}/{key}", sink, Config=config)
                    assert sink.seek(0, os.SEEK_END) == nbytes
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": _status("VmHWM"), "base_rss": base, **split}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """``run_case`` in a fresh interpreter (its own RSS)."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {spec['case']} {spec['direction']} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["extra_over_model"] = result["peak_rss"] - result["base_rss"] - spec["nbytes"]
    return result


# -- parent side --------------------------------------------------------------------------------------
def _delete(spec: dict[str, Any], keys: list[str]) -> None:
    client = _client(spec)
    for key in keys:
        client.delete_object(Bucket=BUCKET, Key=key)


def compare(endpoint: str, nbytes: int, transfer: dict[str, int], repeats: int) -> dict[str, Any]:
    """Each case's put then get, ``repeats`` rounds in turn; medians, ratios vs the faster floor."""
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for round_ in range(repeats):
        for case in (*FLOORS, *OURS):
            key = f"model-{round_}"
            spec = {"endpoint": endpoint, "case": case, "nbytes": nbytes, "key": key, **transfer}
            for direction in ("put", "get"):
                result = child({**spec, "direction": direction})
                samples.setdefault(case, {}).setdefault(direction, []).append(result)
                print(
                    f"  round {round_} {case:10s} {direction}: {result['seconds']:.2f} s, "
                    f"+{result['extra_over_model'] / MIB:.0f} MiB over the model",
                    flush=True,
                )
            _delete(spec, [f"{case}/{key}"])
    summary: dict[str, Any] = {}
    for case, by_direction in samples.items():
        summary[case] = {
            direction: {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "seconds_all": [round(r["seconds"], 3) for r in runs],
                "extra_over_model_mib": max(r["extra_over_model"] for r in runs) / MIB,
                "peak_rss_mib": max(r["peak_rss"] for r in runs) / MIB,
                **({"codec_s": statistics.median(r["codec_s"] for r in runs)} if "codec_s" in runs[0] else {}),
            }
            for direction, runs in by_direction.items()
        }
    for direction in ("put", "get"):
        floor = min(summary[f][direction]["seconds"] for f in FLOORS)
        for case in OURS:
            summary[case][direction]["ratio_vs_faster_floor"] = summary[case][direction]["seconds"] / floor
    return summary


def sweep(endpoint: str, nbytes: int, chunks: list[int], concurrencies: list[int]) -> dict[str, Any]:
    """Our boto3 store's put+get over part size x concurrency, and single PUT vs parts by object size."""
    grid = []
    for chunk in chunks:
        for concurrency in concurrencies:
            transfer = {"threshold": chunk, "chunksize": chunk, "concurrency": concurrency}
            spec = {"endpoint": endpoint, "case": "ours_boto3", "nbytes": nbytes, "key": "sweep", **transfer}
            put, get = (child({**spec, "direction": d}) for d in ("put", "get"))
            grid.append(
                {
                    "chunksize_mib": chunk // MIB,
                    "max_concurrency": concurrency,
                    "put_s": put["seconds"],
                    "get_s": get["seconds"],
                    "extra_over_model_mib": max(put["extra_over_model"], get["extra_over_model"]) / MIB,
                }
            )
            print(
                f"  sweep {chunk // MIB:4d} MiB x {concurrency:2d}: put {put['seconds']:.2f} s, "
                f"get {get['seconds']:.2f} s",
                flush=True,
            )
    best = min(grid, key=lambda row: row["put_s"] + row["get_s"])
    thresholds = []
    for size_mib in (8, 16, 32, 64, 128):
        row: dict[str, Any] = {"object_mib": size_mib}
        for label, threshold in (("single", 1 << 40), ("parts", 1)):
            transfer = {
                "threshold": threshold,
                "chunksize": min(best["chunksize_mib"], max(5, size_mib // 4)) * MIB,
                "concurrency": best["max_concurrency"],
            }
            spec = {"endpoint": endpoint, "case": "ours_boto3", "nbytes": size_mib * MIB, "key": "t", **transfer}
            row[f"{label}_put_s"] = statistics.median(child({**spec, "direction": "put"})["seconds"] for _ in range(3))
        thresholds.append(row)
        print(
            f"  threshold {size_mib:4d} MiB: single {row['single_put_s']:.3f} s, parts {row['parts_put_s']:.3f} s",
            flush=True,
        )
    return {"object_mib": nbytes // MIB, "grid": grid, "best": best, "single_vs_parts": thresholds}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [*FLOORS, *OURS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, direction in ((-width / 2, "put"), (width / 2, "get")):
        xs = [i + offset for i in range(len(cases))]
        left.bar(xs, [results["cases"][c][direction]["seconds"] for c in cases], width, label=direction)
        right.bar(xs, [results["cases"][c][direction]["extra_over_model_mib"] for c in cases], width, label=direction)
    for axis, title in ((left, "seconds (median)"), (right, "peak RSS beyond the model (MiB)")):
        axis.set_xticks(range(len(cases)), cases)
        axis.set_title(title)
        axis.legend()
    right.axhline(512, color="red", linestyle="--", linewidth=1, label="target")
    fig.suptitle(f"{results['model_mib']} MiB float32 model on SeaweedFS (loopback), load {results['load_before']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(results: dict[str, Any]) -> str:
    """The docs' table, rendered from a results JSON (figures are never typed by hand); a sweep's JSON
    gets the sweep's tables (``sweep_table``)."""
    if "grid" in results:
        return sweep_table(results)
    lines = [
        f"{results['model_mib']} MiB of float32 parameters, SeaweedFS on loopback, parts of "
        f"{results['transfer']['chunksize'] // MIB} MiB x {results['transfer']['concurrency']} in flight, "
        f"median of {results['repeats']}, load average {results['load_before'][0]} before / "
        f"{results['load_after'][0]} after.",
        "",
        "| case | publish s | fetch s | publish vs faster floor | fetch vs faster floor "
        "| publish MiB over model | fetch MiB over model | of which codec s (publish / fetch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in (*FLOORS, *OURS):
        put, get = results["cases"][case]["put"], results["cases"][case]["get"]
        ratios = [f"{d['ratio_vs_faster_floor']:.2f}x" if "ratio_vs_faster_floor" in d else "-" for d in (put, get)]
        codec = f"{put['codec_s']:.2f} / {get['codec_s']:.2f}" if "codec_s" in put else "-"
        lines.append(
            f"| {case} | {put['seconds']:.2f} | {get['seconds']:.2f} | {ratios[0]} | {ratios[1]} "
            f"| {put['extra_over_model_mib']:.0f} | {get['extra_over_model_mib']:.0f} | {codec} |"
        )
    return "\n".join(lines)


def sweep_table(found: dict[str, Any]) -> str:
    """The sweep's two tables (part size x concurrency; single PUT vs parts), rendered from its JSON."""
    lines = [
        f"Our boto3 store, {found['object_mib']} MiB model, SeaweedFS on loopback, load average {found['load'][0]}.",
        "",
        "| part size MiB | concurrency | publish s | fetch s | MiB over model |",
        "|---|---|---|---|---|",
    ]
    for row in found["grid"]:
        lines.append(
            f"| {row['chunksize_mib']} | {row['max_concurrency']} | {row['put_s']:.2f} | {row['get_s']:.2f} "
            f"| {row['extra_over_model_mib']:.0f} |"
        )
    lines += ["", "| object MiB | one PUT s | parts s |", "|---|---|---|"]
    for row in found["single_vs_parts"]:
        lines.append(f"| {row['object_mib']} | {row['single_put_s']:.2f} | {row['parts_put_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="model size in MiB of float32 parameters")
    parser.add_argument("--quick", action="store_true", help="64 MiB, one round (development)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also sweep part size x concurrency (256 MiB)")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep (written to large_model_sweep.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--table", help="print the markdown table of a results JSON and exit")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return

    from s3_servers import create_bucket, seaweedfs

    from flwr_serverless.stores.s3_multipart import DEFAULT_CHUNKSIZE, DEFAULT_CONCURRENCY, DEFAULT_THRESHOLD

    nbytes = (64 if args.quick else args.mib) * MIB
    repeats = 1 if args.quick else args.repeats
    transfer = {"threshold": DEFAULT_THRESHOLD, "chunksize": DEFAULT_CHUNKSIZE, "concurrency": DEFAULT_CONCURRENCY}
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weed-bench-") as folder, seaweedfs(folder) as server:
        create_bucket(server, BUCKET)
        if args.sweep or args.sweep_only:
            print("sweep (our boto3 store):", flush=True)
            found = sweep(server.endpoint, 256 * MIB, [8 * MIB, 16 * MIB, 32 * MIB, 64 * MIB], [2, 4, 8, 16])
            found["load"] = load_average()
            found["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            (RESULTS / "large_model_sweep.json").write_text(json.dumps(found, indent=2) + "\n")
            (RESULTS / "large_model_sweep.md").write_text(sweep_table(found) + "\n")
            if args.sweep_only:
                return
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        load_before = load_average()
        print(f"{nbytes // MIB} MiB model, {repeats} round(s), load {load_before}:", flush=True)
        cases = compare(server.endpoint, nbytes, transfer, repeats)
    results = {
        "model_mib": nbytes // MIB,
        "params": nbytes // 4,
        "server": "seaweedfs (weed mini, 127.0.0.1)",
        "transfer": transfer,
        "repeats": repeats,
        "uptime": uptime,
        "load_before": load_before,
        "load_after": load_average(),
        "cases": cases,
        "run_id": uuid.uuid4().hex[:8],
    }
    name = "large_model_quick" if args.quick else "large_model"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / f"{name}.png")
    (RESULTS / f"{name}.md").write_text(markdown_table(results) + "\n")
    print(markdown_table(results))
    for case in OURS:
        for direction in ("put", "get"):
            row = cases[case][direction]
            verdict = "ok" if row["ratio_vs_faster_floor"] <= 1.2 and row["extra_over_model_mib"] <= 512 else "MISS"
            print(
                f"{case} {direction}: {row['ratio_vs_faster_floor']:.2f}x the faster floor, "
                f"+{row['extra_over_model_mib']:.0f} MiB over the model [{verdict}]"
            )


if __name__ == "__main__":
    main()
