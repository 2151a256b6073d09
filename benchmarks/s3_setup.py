"""Where a benchmark's S3 server comes from: moto or SeaweedFS on 127.0.0.1, optionally behind the shaping proxy.

Shared by aggregate_mode.py and store_overhead.py so a shaped run and a loopback
run differ only in their options (``--server``, ``--latency-ms``, ``--bandwidth-mbps``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# moto decides If-Match in two steps on a threaded server; the test suite's patch serialises its PUTs
# (see tests/conftest.py) so that, as on S3, exactly one of two racing conditional writes wins.
SERVER = (
    "import sys; sys.path.insert(0, {root!r}); from tests.conftest import _make_moto_writes_atomic; "
    "_make_moto_writes_atomic(); from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", choices=("moto", "seaweedfs"), default="moto")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="shaping proxy: added per HTTP request")
    parser.add_argument(
        "--bandwidth-mbps", type=float, default=0.0, help="shaping proxy: MB/s per TCP stream (0: none)"
    )


def shaped(args: argparse.Namespace) -> bool:
    for name in ("latency_ms", "bandwidth_mbps"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args.latency_ms > 0 or args.bandwidth_mbps > 0


def start_server() -> tuple[subprocess.Popen[bytes], str, Any]:
    import boto3

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(root=str(ROOT), port=port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(400):  # until the server answers
        try:
            client.list_buckets()
            return server, endpoint, client
        except Exception:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("the moto server did not start")


@contextlib.contextmanager
def s3_endpoint(args: argparse.Namespace) -> Iterator[tuple[str, Any, str, Any]]:
    """(endpoint the nodes use, a setup client, a description, the proxy or None): moto or SeaweedFS, maybe shaped.

    With ``--latency-ms``/``--bandwidth-mbps`` the nodes talk to the server through
    benchmarks/shaping_proxy.py (a delay per HTTP request, a cap per TCP stream), run as
    a child process so it never waits for the GIL of the node threads;
    the setup client (bucket creation) goes to the server directly.
    """
    with contextlib.ExitStack() as stack:
        if args.server == "seaweedfs":
            sys.path.insert(0, str(ROOT / "tests"))
            from s3_servers import boto3_client, create_bucket, seaweedfs

            server = stack.enter_context(seaweedfs())
            for name, value in (
                ("AWS_ACCESS_KEY_ID", server.access_key),
                ("AWS_SECRET_ACCESS_KEY", server.secret_key),
                ("AWS_DEFAULT_REGION", "us-east-1"),
            ):
                os.environ[name] = value
            create_bucket(server, "warm-up")  # a fresh SeaweedFS refuses buckets until its volumes are up
            endpoint, client, store = server.endpoint, boto3_client(server), "SeaweedFS (weed mini) process"
        else:
            process, endpoint, client = start_server()
            stack.callback(process.wait)
            stack.callback(process.kill)
            store = "moto S3 server process"
        proxy = None
        if shaped(args):
            from shaping_proxy import ProxyProcess

            proxy = ProxyProcess(
                upstream=endpoint,
                latency_s=args.latency_ms / 1000,
                bandwidth_bps=args.bandwidth_mbps * 1e6 if args.bandwidth_mbps > 0 else None,
            )
            stack.enter_context(proxy)
            endpoint = proxy.endpoint
            store += (
                f", through shaping_proxy ({args.latency_ms:g} ms per request, {args.bandwidth_mbps:g} MB/s per stream)"
            )
        yield endpoint, client, store, proxy


def load_average() -> list[float]:
    """``uptime``'s 1, 5 and 15 minute load averages (2 cores shared with other jobs here)."""
    return [round(x, 2) for x in os.getloadavg()]
