"""The benchmarks' shaping proxy: one delay per HTTP request, paced streams, cut and restore (moto server behind it).

Delays are checked through the proxy's own accounting with an instant ``sleep``
injected, never by timing calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from shaping_proxy import ProxyProcess, ShapingProxy  # noqa: E402

LATENCY_S = 0.02
BANDWIDTH = 100e6


class RecordingSleep:
    """An instant ``asyncio.sleep`` stand-in that remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _client(endpoint: str, read_timeout: float = 30.0) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=read_timeout)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = f"proxy-{uuid.uuid4().hex[:8]}"
    _client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def upstream(moto_endpoint: str) -> str:
    return moto_endpoint.removeprefix("http://")


@pytest.fixture
def proxy(upstream: str) -> Iterator[tuple[ShapingProxy, RecordingSleep]]:
    sleep = RecordingSleep()
    with ShapingProxy(upstream=upstream, latency_s=LATENCY_S, bandwidth_bps=BANDWIDTH, sleep=sleep) as running:
        yield running, sleep


def test_one_delay_per_request(proxy: tuple[ShapingProxy, RecordingSleep], bucket: str) -> None:
    shaping, sleep = proxy
    client = _client(shaping.endpoint)
    client.put_object(Bucket=bucket, Key="small", Body=b"x" * 1000)
    client.put_object(Bucket=bucket, Key="large", Body=b"y" * 3_000_000)  # several chunks, maybe 100-continue
    assert client.get_object(Bucket=bucket, Key="large")["Body"].read() == b"y" * 3_000_000
    client.head_object(Bucket=bucket, Key="small")
    client.list_objects_v2(Bucket=bucket)
    stats = shaping.stats()
    assert stats["requests"] == 5
    assert stats["latency_s"] == pytest.approx(5 * LATENCY_S)
    assert sleep.calls.count(LATENCY_S) >= 5
    assert stats["bytes_up"] > 3_000_000 and stats["bytes_down"] > 3_000_000


def test_bandwidth_accounts_every_byte(proxy: tuple[ShapingProxy, RecordingSleep], bucket: str) -> None:
    shaping, _ = proxy
    client = _client(shaping.endpoint)
    client.put_object(Bucket=bucket, Key="k", Body=b"z" * 2_000_000)
    client.get_object(Bucket=bucket, Key="k")["Body"].read()
    stats = shaping.stats()
    moved = stats["bytes_up"] + stats["bytes_down"]
    assert moved > 4_000_000
    assert stats["transmission_s"] == pytest.approx(moved / BANDWIDTH)


def test_cut_fails_fast_and_restore_heals(proxy: tuple[ShapingProxy, RecordingSleep], bucket: str) -> None:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    shaping, _ = proxy
    client = _client(shaping.endpoint, read_timeout=60.0)
    client.put_object(Bucket=bucket, Key="k", Body=b"v")  # a pooled keep-alive connection is now open
    shaping.cut()
    assert shaping.stats()["reset_by_cut"] >= 1
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)) as raised:
        client.get_object(Bucket=bucket, Key="k")
    assert not isinstance(raised.value, ReadTimeoutError)  # a reset, not a 60 s wait
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        _client(shaping.endpoint).head_object(Bucket=bucket, Key="k")  # a new connection is refused too
    assert shaping.stats()["refused"] >= 1
    shaping.restore()
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    assert shaping.state == "open" and shaping.stats()["restores"] == 1


def test_blackhole_answers_nothing_until_restore(proxy: tuple[ShapingProxy, RecordingSleep], bucket: str) -> None:
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    shaping, _ = proxy
    shaping.cut("blackhole")
    with pytest.raises((ReadTimeoutError, ConnectionClosedError)):
        _client(shaping.endpoint, read_timeout=0.5).head_bucket(Bucket=bucket)
    assert shaping.stats()["blackholed"] >= 1 and shaping.stats()["requests"] == 0
    shaping.restore()
    _client(shaping.endpoint).head_bucket(Bucket=bucket)
    assert shaping.stats()["requests"] == 1


def test_options_are_validated(upstream: str) -> None:
    with pytest.raises(ValueError, match="latency_s"):
        ShapingProxy(upstream=upstream, latency_s=-1)
    with pytest.raises(ValueError, match="bandwidth_bps"):
        ShapingProxy(upstream=upstream, bandwidth_bps=0)
    with pytest.raises(ValueError, match="host:port"):
        ShapingProxy(upstream="nowhere")
    with ShapingProxy(upstream=upstream) as shaping, pytest.raises(ValueError, match="cut mode"):
        shaping.cut("drop")


def test_command_line_cut_and_restore(upstream: str) -> None:
    script = ROOT / "benchmarks" / "shaping_proxy.py"
    done = subprocess.run(
        [sys.executable, str(script), "--upstream", upstream, "--latency-ms", "5"],
        input="cut\nrestore\nquit\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["endpoint"].startswith("http://127.0.0.1:")
    assert lines[1]["state"] == "refuse" and lines[1]["cuts"] == 1
    assert lines[2]["state"] == "open" and lines[2]["restores"] == 1


def test_proxy_process_has_the_same_controls(upstream: str, bucket: str) -> None:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    with ProxyProcess(upstream=upstream, latency_s=0.001, bandwidth_bps=BANDWIDTH) as shaping:
        client = _client(shaping.endpoint)
        client.put_object(Bucket=bucket, Key="k", Body=b"v")
        stats = shaping.stats()
        assert stats["requests"] == 1 and stats["latency_s"] == pytest.approx(0.001)
        shaping.cut()
        with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
            client.get_object(Bucket=bucket, Key="k")
        shaping.restore()
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    with pytest.raises(ValueError, match="bandwidth_bps"):
        ProxyProcess(upstream=upstream, bandwidth_bps=-5)
