"""Fixtures replacing what the original tests took from elsewhere: moto's in-process mock, the MNIST download.

``moto_s3`` stands in for ``moto's in-process S3 mock``: boto3 clients created without an endpoint
(as the original's folders and tests create them) reach the session's moto server
through ``AWS_ENDPOINT_URL``, and the server starts empty, as each ``in-process mock`` did.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest


def _reset(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


Fresh = Callable[[], AbstractContextManager[None]]


@pytest.fixture
def moto_s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fresh]:
    """An empty moto S3 server for default boto3 clients; calling it (``with moto_s3():``) empties it again."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    _reset(moto_endpoint)

    @contextlib.contextmanager
    def fresh() -> Iterator[None]:
        _reset(moto_endpoint)
        yield

    yield fresh
    _reset(moto_endpoint)
