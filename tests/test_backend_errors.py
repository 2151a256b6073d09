"""One classifier for backend errors, and retry layers that do not multiply (boto3, s3fs on the moto server)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from flwr_serverless.errors import ObjectNotFoundError, PreconditionFailedError, StoreError
from flwr_serverless.stores import RetryPolicy, S3FsStore, S3Store, open_store
from flwr_serverless.stores.backend_errors import (
    as_store_error,
    error_info,
    explain_bucket_error,
    is_credentials_error,
    is_denied,
    is_lost_race,
    is_not_found,
    is_transient,
    translated,
)

aiohttp = pytest.importorskip("aiohttp")
s3fs_errors = pytest.importorskip("s3fs.errors")


def client_error(code: str, status: int, **error: str) -> ClientError:
    return ClientError({"Error": {"Code": code, **error}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def as_s3fs_raises(exc: ClientError) -> BaseException:
    """What s3fs raises for ``exc``: a Python exception whose cause is the ClientError."""
    return s3fs_errors.translate_boto_error(exc)


def wrapped(exc: BaseException) -> StoreError:
    try:
        raise StoreError("put", "k", str(exc)) from exc
    except StoreError as outer:
        return outer


def test_code_and_status_are_found_through_the_chain() -> None:
    slow = client_error("SlowDown", 503)
    assert error_info(slow) == ("SlowDown", 503)
    assert error_info(wrapped(as_s3fs_raises(slow))) == ("SlowDown", 503)
    assert error_info(ValueError("no response")) == ("", 0)


@pytest.mark.parametrize(
    "exc",
    [
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("RequestTimeout", 400),
        client_error("Throttling", 429),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectionResetError(),
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("body cut"),
    ],
    ids=repr,
)
def test_transient_faults(exc: BaseException) -> None:
    assert is_transient(exc) and is_transient(wrapped(exc))


def test_transient_through_s3fs_translation() -> None:
    assert is_transient(wrapped(as_s3fs_raises(client_error("SlowDown", 503))))
    assert not is_transient(wrapped(as_s3fs_raises(client_error("AccessDenied", 403))))


@pytest.mark.parametrize(
    "exc",
    [
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        client_error("PreconditionFailed", 412),
        ObjectNotFoundError("k"),
        PreconditionFailedError("put_if_match", "k"),
        NoCredentialsError(),
        ValueError("a bug"),
    ],
    ids=repr,
)
def test_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc) and not is_transient(wrapped(exc))


def test_not_found_means_the_object_not_the_bucket() -> None:
    assert is_not_found(client_error("NoSuchKey", 404))
    assert is_not_found(client_error("404", 404))  # HEAD responses carry only the status
    assert is_not_found(as_s3fs_raises(client_error("NoSuchKey", 404)))
    assert is_not_found(FileNotFoundError()) and is_not_found(IsADirectoryError())
    assert not is_not_found(client_error("NoSuchBucket", 404))
    assert not is_not_found(as_s3fs_raises(client_error("NoSuchBucket", 404)))  # also a FileNotFoundError
    assert not is_not_found(client_error("AccessDenied", 403))


def test_denied_and_credentials() -> None:
    for exc in (client_error("AccessDenied", 403), client_error("InvalidAccessKeyId", 403), PermissionError()):
        assert is_denied(exc)
    assert is_denied(as_s3fs_raises(client_error("SignatureDoesNotMatch", 403)))
    assert not is_denied(client_error("NoSuchKey", 404))
    assert is_credentials_error(NoCredentialsError()) and is_credentials_error(wrapped(NoCredentialsError()))
    assert not is_credentials_error(client_error("AccessDenied", 403))


def test_lost_race() -> None:
    failed_create = client_error("PreconditionFailed", 412, Condition="If-None-Match")
    assert is_lost_race(failed_create, compare_and_swap=False)
    assert isinstance(as_s3fs_raises(failed_create), FileExistsError)
    assert is_lost_race(as_s3fs_raises(failed_create), compare_and_swap=False)
    assert is_lost_race(as_s3fs_raises(client_error("PreconditionFailed", 412)), compare_and_swap=True)
    assert is_lost_race(client_error("ConditionalRequestConflict", 409), compare_and_swap=True)
    # If-Match on a deleted object is a lost race; a missing bucket or a create-only 404 is not.
    assert is_lost_race(client_error("NoSuchKey", 404), compare_and_swap=True)
    assert not is_lost_race(client_error("NoSuchKey", 404), compare_and_swap=False)
    assert not is_lost_race(client_error("NoSuchBucket", 404), compare_and_swap=True)
    assert not is_lost_race(client_error("SlowDown", 503), compare_and_swap=True)


def test_bucket_check_explanations() -> None:
    bucket = "my-bucket"
    assert "does not exist" in explain_bucket_error(bucket, client_error("404", 404))
    assert "does not exist" in explain_bucket_error(bucket, as_s3fs_raises(client_error("NoSuchBucket", 404)))
    assert "access denied" in explain_bucket_error(bucket, client_error("403", 403))
    assert "another region" in explain_bucket_error(bucket, client_error("301", 301))
    assert "no AWS credentials found" in explain_bucket_error(bucket, NoCredentialsError())
    unreachable = explain_bucket_error(bucket, EndpointConnectionError(endpoint_url="http://x"))
    assert unreachable.startswith("cannot reach bucket 'my-bucket'")


def test_translation_into_store_errors() -> None:
    missing = as_store_error("get", "nodes/a", client_error("NoSuchKey", 404))
    assert isinstance(missing, ObjectNotFoundError) and missing.key == "nodes/a"
    assert type(as_store_error("put", "nodes/a", FileNotFoundError())) is StoreError  # only a GET is "not found"
    assert "access denied" in str(as_store_error("list", "p/", PermissionError("no")))
    assert "no usable credentials" in str(as_store_error("put", "k", NoCredentialsError()))
    with pytest.raises(StoreError) as info, translated("delete", "k"):
        raise OSError(errno.EIO, "disk on fire")
    assert info.value.operation == "delete" and isinstance(info.value.__cause__, OSError)
    with pytest.raises(KeyError), translated("get", "k"):  # bugs are not backend errors
        raise KeyError("a bug")


# -- retry layers -----------------------------------------------------------------------------------


def botocore_attempts(client: Any) -> int:
    return int(client.meta.config.retries["total_max_attempts"])


def test_boto3_retry_layer_is_sized_by_ours(moto_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/layers"
    with_ours = open_store(url, endpoint_url=moto_endpoint)
    alone = open_store(url, endpoint_url=moto_endpoint, retry=False)
    explicit = open_store(url, endpoint_url=moto_endpoint, max_attempts=1)
    assert isinstance(with_ours, S3Store)
    assert (botocore_attempts(with_ours.client), botocore_attempts(alone.client)) == (2, 5)
    assert botocore_attempts(explicit.client) == 1
    assert botocore_attempts(S3Store(s3_bucket, "layers", endpoint_url=moto_endpoint).client) == 2


def test_s3fs_retry_layers_are_capped_while_ours_are_on(moto_endpoint: str, s3_bucket: str) -> None:
    url, options = f"s3://{s3_bucket}/layers", {"endpoint_url": moto_endpoint, "backend": "fsspec"}
    with_ours = open_store(url, **options)
    alone = open_store(url, **options, retry=False)
    explicit = open_store(url, **options, retries=3, max_attempts=4)
    assert isinstance(with_ours, S3FsStore)
    assert (with_ours.fs.retries, with_ours.fs.config_kwargs["retries"]["total_max_attempts"]) == (1, 2)
    assert (alone.fs.retries, alone.fs.config_kwargs["retries"]["total_max_attempts"]) == (5, 5)
    assert (explicit.fs.retries, explicit.fs.config_kwargs["retries"]["total_max_attempts"]) == (3, 4)
    assert botocore_attempts(with_ours.fs.s3) == 2  # what aiobotocore's client actually got


@pytest.mark.parametrize("ours", [True, False])
def test_s3fs_requests_per_failing_get(moto_endpoint: str, s3_bucket: str, ours: bool) -> None:
    """A GET that keeps failing with 503 costs our attempts (s3fs's loop once each), or s3fs's 5 alone."""
    policy = RetryPolicy(attempts=3, max_time=10.0, base_delay=0.0, max_delay=0.0) if ours else False
    store = open_store(f"s3://{s3_bucket}/layers", endpoint_url=moto_endpoint, backend="fsspec", retry=policy)
    calls = []

    async def get_object(**params: Any) -> Any:  # stands in for the aiobotocore call (botocore's own retries)
        calls.append(params["Key"])
        raise client_error("SlowDown", 503)

    store.fs.s3.get_object = get_object
    with pytest.raises(StoreError, match="SlowDown"):
        store.get("nodes/a")
    assert len(calls) == (3 if ours else 5)
    assert calls[0] == "layers/nodes/a"


def test_s3_conditional_write_races_are_precondition_failures_on_both_backends(
    moto_endpoint: str, s3_bucket: str
) -> None:
    for backend in ("boto3", "fsspec"):
        store = open_store(f"s3://{s3_bucket}/race-{backend}", endpoint_url=moto_endpoint, backend=backend)
        tag = store.put_if_absent("lease", b"a")
        with pytest.raises(PreconditionFailedError):
            store.put_if_absent("lease", b"b")
        store.delete("lease")
        with pytest.raises(PreconditionFailedError):  # If-Match on a deleted object: 404 from S3
            store.put_if_match("lease", b"c", tag)
        assert store.stats.retries == 0
