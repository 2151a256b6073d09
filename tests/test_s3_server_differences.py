"""Where moto and SeaweedFS answer differently, pinned, and the one outcome our Store API gives on both.

- ``If-Match`` on a missing key: moto answers 404 NoSuchKey, SeaweedFS 412 PreconditionFailed
  (AWS S3 documents 404). A compare-and-swap on an object that is gone lost a race either way:
  ``is_lost_race`` reads both as :class:`PreconditionFailedError`, never as a missing object.
- Racing ``If-None-Match: *`` creates: moto (serialised by the suite) answers at once; SeaweedFS
  makes losers wait for its lock, up to ~3 s, then answers 412. One winner, every loser a
  PreconditionFailedError, and no retry of ours spent either way.
- A zero-byte ``folder/`` object (made by consoles and other tools) is listed by both; we skip it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from flwr_serverless.errors import PreconditionFailedError
from flwr_serverless.stores import open_store
from flwr_serverless.stores.s3_common import split_s3_url
from tests.s3_servers import client_for

#: The raw HTTP status of PUT If-Match on a key that does not exist (another server: either).
RAW_IF_MATCH_ON_MISSING = {"moto": 404, "seaweedfs": 412}


def _status(call: Any) -> int:
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


def test_if_match_on_a_missing_key_is_a_lost_race_on_every_server(s3_kind: str, store_url_factory: Any) -> None:
    url, options = store_url_factory(s3_kind)
    bucket, prefix = split_s3_url(url)
    server = s3_kind.partition("-")[0]
    raw = _status(lambda: client_for(options).put_object(Bucket=bucket, Key=f"{prefix}/raw", Body=b"x", IfMatch='"0"'))
    assert raw == RAW_IF_MATCH_ON_MISSING.get(server, raw) and raw in (404, 412)
    store = open_store(url, **options)
    with pytest.raises(PreconditionFailedError, match="never-written"):
        store.put_if_match("never-written", b"x", "0123456789abcdef0123456789abcdef")
    tag = store.put_if_absent("lease", b"a")
    store.delete("lease")
    with pytest.raises(PreconditionFailedError, match="lease"):  # the object we compared against is gone
        store.put_if_match("lease", b"b", tag)
    assert store.list() == {} and store.stats.retries == 0


def test_racing_creates_have_one_winner_and_every_loser_a_precondition_failure(
    s3_kind: str, store_url_factory: Any
) -> None:
    url, options = store_url_factory(s3_kind)
    handles = [open_store(url, **options) for _ in range(6)]
    for attempt in range(2):
        key = f"members/claim-{attempt}"
        start = threading.Barrier(len(handles))
        outcomes: dict[int, str] = {}

        def claim(index: int, key: str = key, start: threading.Barrier = start, outcomes: dict = outcomes) -> None:
            start.wait(30)
            try:
                handles[index].put_if_absent(key, str(index).encode())
                outcomes[index] = "won"
            except PreconditionFailedError:
                outcomes[index] = "lost"
            except BaseException as exc:  # reported below
                outcomes[index] = repr(exc)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(handles))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)  # SeaweedFS's losers wait for its lock (seconds), then lose
        assert len(outcomes) == len(handles), f"claims still running: {set(range(len(handles))) - set(outcomes)}"
        winners = [i for i, what in outcomes.items() if what == "won"]
        assert len(winners) == 1 and sorted(set(outcomes.values())) == ["lost", "won"], outcomes
        assert handles[0].get(key) == str(winners[0]).encode()
    assert sum(handle.stats.retries for handle in handles) == 0
    for handle in handles:
        handle.close()


def test_folder_placeholders_are_listed_by_the_server_and_skipped_by_the_store(
    s3_kind: str, store_url_factory: Any
) -> None:
    url, options = store_url_factory(s3_kind)
    bucket, prefix = split_s3_url(url)
    client = client_for(options)
    client.put_object(Bucket=bucket, Key=f"{prefix}/folder/", Body=b"")
    client.put_object(Bucket=bucket, Key=f"{prefix}/folder/real", Body=b"data")
    listed = {item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]}
    assert listed == {f"{prefix}/folder/", f"{prefix}/folder/real"}
    assert set(open_store(url, **options).list()) == {"folder/real"}
