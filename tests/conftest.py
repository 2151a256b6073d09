"""Shared fixtures: a real S3 API (moto's threaded server on localhost) and one store per backend.

moto's in-process mocks are not used: every S3 test talks HTTP to a
server, as nodes do in production.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flwr_serverless.stores import Store, open_store

STORE_KINDS = ["memory", "file", "s3fs", "boto3"]

_MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that could point the tests at real AWS resources or credentials.
_MOTO_ENV_CLEARED = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_moto_writes_atomic() -> None:
    """Serialise moto's PutObject/DeleteObject handlers.

    moto checks If-Match/If-None-Match and then stores the object in two steps
    on a threaded server, so two racing conditional PUTs could in principle both
    succeed; real S3 decides them atomically. One lock restores S3's semantics so
    the compare-and-swap tests test our code, not moto's race window.
    """
    try:
        from moto.s3.responses import S3Response
    except ImportError:  # moto reorganised: run unpatched (the CAS test may then flake, never pass wrongly)
        return
    if getattr(S3Response, "_flwr_serialised", False):
        return
    lock = threading.Lock()

    def serialise(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def serialised(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                return original(self, *args, **kwargs)

        return serialised

    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name, None)
        if original is not None:
            setattr(S3Response, name, serialise(original))
    S3Response._flwr_serialised = True  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1, with fake credentials in the environment for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    _make_moto_writes_atomic()
    saved = {name: os.environ.get(name) for name in (*_MOTO_ENV, *_MOTO_ENV_CLEARED)}
    os.environ.update(_MOTO_ENV)
    for name in _MOTO_ENV_CLEARED:
        os.environ.pop(name, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_client(moto_endpoint: str) -> Any:
    """A boto3 S3 client on the moto server (for setting up and inspecting buckets)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket with a unique name."""
    name = f"flwr-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


StoreUrlFactory = Callable[[str], tuple[str, dict[str, Any]]]


@pytest.fixture
def store_url_factory(request: pytest.FixtureRequest, tmp_path: Any) -> StoreUrlFactory:
    """``make(kind) -> (url, storage_options)`` for a fresh, empty experiment on that backend.

    Each call gives a new unique prefix; pass the pair to ``open_store(url, **options)``
    as many times as you need handles on the same experiment. S3 kinds start moto lazily.
    """

    def make(kind: str) -> tuple[str, dict[str, Any]]:
        unique = uuid.uuid4().hex[:12]
        if kind == "memory":
            return f"memory://flwr-test-{unique}", {}
        if kind == "file":
            return str(tmp_path / f"store-{unique}"), {}
        if kind in ("s3fs", "boto3"):
            endpoint = request.getfixturevalue("moto_endpoint")
            bucket = request.getfixturevalue("s3_bucket")
            backend = "fsspec" if kind == "s3fs" else "boto3"
            return f"s3://{bucket}/exp-{unique}", {"endpoint_url": endpoint, "backend": backend}
        raise ValueError(f"unknown store kind {kind!r}; expected one of {STORE_KINDS}")

    return make


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, store_url_factory: StoreUrlFactory) -> tuple[str, dict[str, Any]]:
    """(url, storage_options) of a fresh experiment, once per backend."""
    return store_url_factory(request.param)


@pytest.fixture
def store(store_url: tuple[str, dict[str, Any]]) -> Iterator[Store]:
    """A fresh Store on a unique prefix, once per backend (memory, file, s3fs, boto3)."""
    url, options = store_url
    opened = open_store(url, **options)
    try:
        yield opened
    finally:
        opened.close()
