"""Large objects on S3: when to split, how big the parts are, and the thread pool that moves them.

S3 takes at most 5 GiB in one PUT and at most 10,000 parts of 5 MiB to 5 GiB in a
multipart upload, and one HTTP stream per object leaves most of a real link idle.
So an object of ``multipart_threshold`` bytes or more (or over the single-PUT limit,
whatever the threshold) is uploaded in parts of ``multipart_chunksize`` bytes (grown
when the object would need more than 10,000), ``max_concurrency`` at a time (but no
more than a quarter of the object), each part copied out of the encoded buffers only
while it is in flight. A download fetches
the first ``multipart_chunksize`` bytes, learns the size from ``Content-Range``, and
fetches the rest by ranges in parallel, straight to the caller's file at their offsets.

The option names are boto3's ``TransferConfig`` names; the defaults were measured
(``benchmarks/large_model.py --sweep``, see docs/frameworks/large_objects.md).
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from flwr_serverless.errors import StoreConfigurationError
from flwr_serverless.validation import check_positive_int

T = TypeVar("T")
MIB = 1 << 20
GIB = 1 << 30
#: S3's limits (module globals read at call time, so tests can shrink them instead of moving 5 GB).
MIN_PART_BYTES = 5 * MIB
MAX_PART_BYTES = 5 * GIB
MAX_SINGLE_PUT_BYTES = 5 * GIB
MAX_PARTS = 10_000
#: Defaults chosen by measurement on SeaweedFS over loopback (benchmarks/results/large_model.json, "sweep").
DEFAULT_THRESHOLD = 32 * MIB
DEFAULT_CHUNKSIZE = 16 * MIB
DEFAULT_CONCURRENCY = 8
#: An upload keeps at most 1/IN_FLIGHT_SHARE of the object in flight (clients may copy a part once more).
IN_FLIGHT_SHARE = 4
TRANSFER_OPTIONS = ("multipart_threshold", "multipart_chunksize", "max_concurrency")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class TransferOptions:
    """How an S3 store splits large objects (names as in boto3's ``TransferConfig``)."""

    multipart_threshold: int = DEFAULT_THRESHOLD
    multipart_chunksize: int = DEFAULT_CHUNKSIZE
    max_concurrency: int = DEFAULT_CONCURRENCY

    @classmethod
    def pop_from(cls, url: str, options: dict[str, Any]) -> TransferOptions:
        """Take the three transfer options out of a store's options, checked (errors name the option)."""
        given = {name: options.pop(name) for name in TRANSFER_OPTIONS if options.get(name) is not None}
        for name in TRANSFER_OPTIONS:
            options.pop(name, None)
        for name, value in given.items():
            check_positive_int(f"store {url!r}: option {name}", value, error=StoreConfigurationError)
        chunk = given.get("multipart_chunksize")
        if chunk is not None and not MIN_PART_BYTES <= chunk <= MAX_PART_BYTES:
            raise StoreConfigurationError(
                f"store {url!r}: option multipart_chunksize must be between {MIN_PART_BYTES} (5 MiB) and "
                f"{MAX_PART_BYTES} (5 GiB) bytes, S3's part size limits; got {chunk}"
            )
        if given.get("max_concurrency", 1) > 256:
            raise StoreConfigurationError(
                f"store {url!r}: option max_concurrency must be at most 256, not {given['max_concurrency']}"
            )
        return cls(**given)

    def use_multipart(self, size: int) -> bool:
        """Parts for an object this big: at the threshold, or over what one PUT may carry."""
        return size >= self.multipart_threshold or size > MAX_SINGLE_PUT_BYTES

    def part_size(self, size: int) -> int:
        """``multipart_chunksize``, grown so that ``size`` bytes fit in ``MAX_PARTS`` parts."""
        part = max(self.multipart_chunksize, -(-size // MAX_PARTS))
        if part > MAX_PART_BYTES:
            raise ValueError(f"{size} bytes exceed S3's largest object ({MAX_PARTS} parts of {MAX_PART_BYTES})")
        return part

    def upload_concurrency(self, size: int, part: int) -> int:
        """Parts in flight for an upload: ``max_concurrency``, but never more than a quarter of the object
        (each part in flight is a copy), so a publish adds well under half the model's size."""
        return max(1, min(self.max_concurrency, size // (IN_FLIGHT_SHARE * part)))


def part_ranges(size: int, part: int, start: int = 0) -> list[tuple[int, int]]:
    """``[begin, end)`` byte ranges of ``part`` bytes covering ``start..size`` (the last may be shorter)."""
    return [(begin, min(begin + part, size)) for begin in range(start, size, part)]


class BufferChain:
    """Several buffers read as one byte string, without joining them (the codec's framing and tensors)."""

    def __init__(self, buffers: Sequence[Any]) -> None:
        self.views = [memoryview(b).cast("B") for b in buffers]
        self.starts = [0, *itertools.accumulate(v.nbytes for v in self.views)]
        self.size = self.starts[-1]

    def read(self, begin: int, end: int) -> bytes:
        """Bytes ``[begin, end)``: the one copy a part costs, made only while it is in flight."""
        pieces = []
        index = bisect.bisect_right(self.starts, begin) - 1
        while begin < end:
            view, offset = self.views[index], begin - self.starts[index]
            take = min(view.nbytes - offset, end - begin)
            pieces.append(view[offset : offset + take])
            begin += take
            index += 1
        return b"".join(pieces)


def parse_content_range(value: str | None, key: str) -> tuple[int, int, int]:
    """``bytes 0-99/1000`` -> ``(0, 99, 1000)``."""
    match = _CONTENT_RANGE.fullmatch(str(value or "").strip())
    if match is None:
        raise ValueError(f"{key}: the server answered a ranged GET without a usable Content-Range ({value!r})")
    first, last, total = (int(g) for g in match.groups())
    return first, last, total


class OffsetWriter:
    """Writes chunks at given offsets of a file, from several threads at once."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.lock = threading.Lock()
        try:
            self.fd: int | None = sink.fileno()
        except (AttributeError, OSError, ValueError):  # BytesIO and friends
            self.fd = None

    def write(self, offset: int, chunk: bytes) -> None:
        if self.fd is not None:
            view = memoryview(chunk)
            while view.nbytes:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
            return
        with self.lock:
            self.sink.seek(offset)
            self.sink.write(chunk)


def run_parallel(job: Callable[[int], T], count: int, concurrency: int) -> list[T]:
    """``[job(0), ..., job(count - 1)]`` on at most ``concurrency`` threads, in order.

    A job builds its own request body when it starts, so at most ``concurrency`` bodies
    exist at once. The first failure stops the jobs not yet started; it is raised once
    the running ones have returned (so an abort that follows finds no part in flight).
    """
    if count <= 1 or concurrency == 1:
        return [job(index) for index in range(count)]
    failed = threading.Event()

    def guarded(index: int) -> T:
        if failed.is_set():
            raise _Skipped
        try:
            return job(index)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(concurrency, count), thread_name_prefix="flwr-s3-part") as pool:
        futures = [pool.submit(guarded, index) for index in range(count)]
        wait(futures, return_when=FIRST_EXCEPTION)
        if failed.is_set():
            for future in futures:
                future.cancel()
            wait(futures)
            errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
            raise next(e for e in errors if not isinstance(e, _Skipped))  # type: ignore[misc]
        return [future.result() for future in futures]


class _Skipped(Exception):
    """A job not started because another had failed."""
