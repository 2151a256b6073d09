# From kungfuai/flwr_serverless v0.2.10, tests/shared_folder/test_s3_folder.py (MIT, Copyright (c) Kungfu AI);
# see ../NOTICE.md.
import boto3
import pytest
import numpy as np
# adapted: moto's in-process S3 mock -> the moto_s3 fixture (a moto server, ../conftest.py)
from flwr_serverless.shared_folder.s3_folder import NotBytesError, S3FolderWithPickle  # adapted: NotBytesError


def test_simple_s3_get(moto_s3):  # adapted: fixture instead of the in-process mock decorator
    conn = boto3.resource("s3", region_name="us-east-1")
    # We need to create the bucket since this is all in Moto's 'virtual' AWS account
    conn.create_bucket(Bucket="mybucket")
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.put_object(Bucket="mybucket", Key="test_object", Body=b"some content")
    body = s3.get_object(Bucket="mybucket", Key="test_object")["Body"].read()
    assert body == b"some content"


def test_s3_storage_backend(moto_s3):  # adapted: fixture instead of the in-process mock decorator
    conn = boto3.resource("s3", region_name="us-east-1")
    # We need to create the bucket since this is all in Moto's 'virtual' AWS account
    conn.create_bucket(Bucket="mybucket")
    storage = S3FolderWithPickle(directory="mybucket/experiment1")
    with pytest.raises(ValueError):
        storage["test"] = None
    # adapted: lists and arrays were pickled; here they raise a clear error, their bytes round-trip
    with pytest.raises(NotBytesError, match="never pickles"):
        storage["model_1"] = [0, 1, 2]
    storage["model_1"] = bytes([0, 1, 2])
    assert storage["model_1"] == bytes([0, 1, 2])

    storage["model_1"] = bytes([0, 1, 2, 3])
    assert storage["model_1"] == bytes([0, 1, 2, 3])

    with pytest.raises(NotBytesError):
        storage["model_2"] = np.array([0, 1, 5])
    storage["model_2"] = np.array([0, 1, 5]).tobytes()
    assert np.array_equal(np.frombuffer(storage["model_2"], dtype=int), np.array([0, 1, 5]))

    keys = []
    for key, _ in storage.items():
        keys.append(key)
    assert keys == ["model_1", "model_2"]
