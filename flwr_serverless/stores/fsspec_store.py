"""A store on any fsspec URL: local folders, ``memory://``, ``s3://`` (s3fs), ``gs://``...

fsspec alone gives neither atomic replacement nor compare-and-swap, so the
backends we know well get a dedicated implementation of the five primitives:

* local folders write a ``.tmp-*`` file and ``os.replace`` it (readers never see
  a half-written file); create-only uses ``os.link`` and compare-and-swap runs
  under an ``fcntl.flock`` on ``<root>/.lock``;
* ``memory://`` swaps whole objects in one dict assignment under a process lock;
* ``s3://`` (s3fs) uses single PUTs with ``If-None-Match``/``If-Match``.

Every other protocol goes through plain fsspec calls and reports
``supports_conditional_writes = False``, so the base class refuses conditional
writes loudly instead of pretending they are atomic.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from flwr_serverless.errors import (
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreConfigurationError,
    StoreError,
)
from flwr_serverless.stores.base import ObjectInfo, Store, check_prefix, s3_listing_objects

try:  # POSIX only; without it local compare-and-swap cannot be made safe across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_PREFIX = ".tmp-"
# Temp files of writers killed mid-write are removed by the next put into their folder once this old.
STALE_TEMP_SECONDS = 3600.0
_SWEEP_INTERVAL = 600.0
LOCK_NAME = ".lock"
# errno values with which link() says "this filesystem has no hard links"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
# One PUT can carry up to 5 GiB; passing this as s3fs's chunksize keeps every write a single PUT.
_S3_MAX_SINGLE_PUT = 5 * 2**30
_STREAM_CHUNK_BYTES = 1 << 20  # a streamed GET holds at most this much in memory at a time
_LOCAL_COPY_BYTES = 1 << 18  # local disk needs no big reads; several peers are copied at once
_S3_PROTOCOLS = {"s3", "s3a"}

# memory:// objects are process-global, so their write lock and tag counter are too.
_MEMORY_LOCK = threading.Lock()
_MEMORY_GENERATION = itertools.count(1)
# Local writes stamp a strictly increasing mtime so inode-mtime-size tags never repeat
# even when the kernel's coarse clock would give two writes the same timestamp.
_MTIME_LOCK = threading.Lock()
_last_mtime_ns = 0


def _backend_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the backend failed", as opposed to a bug in our code."""
    errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
    try:
        from aiohttp import ClientError as HttpClientError  # a body stream cut mid-read (s3fs)

        errors = (*errors, HttpClientError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return (*errors, BotoCoreError, ClientError)


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _client_error_info(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of the botocore ClientError behind ``exc`` (s3fs keeps it as the cause)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code, status
        current = current.__cause__ or current.__context__
    return "", 0


def _is_credentials_error(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return False
    return isinstance(exc, (NoCredentialsError, PartialCredentialsError))


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _s3fs_options(options: dict[str, Any]) -> dict[str, Any]:
    """Accept boto3-style names too, so one set of options works with both S3 backends."""
    options = dict(options)
    renames = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}
    for boto_name, s3fs_name in renames.items():
        if boto_name in options:
            options.setdefault(s3fs_name, options.pop(boto_name))
    if "region_name" in options:  # s3fs would hand it to AioSession, which rejects it
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("region_name", options.pop("region_name"))
        options["client_kwargs"] = client_kwargs
    return options


class FsspecStore(Store):
    """A weight store on any fsspec URL; see the module docstring for per-backend guarantees."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        super().__init__()
        self.url = str(url)
        options = dict(storage_options)
        # Several nodes may share one process: every handle needs its own client and fresh listings.
        options.setdefault("skip_instance_cache", True)
        options.setdefault("use_listings_cache", False)
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if scheme in _S3_PROTOCOLS:
            options = _s3fs_options(options)
        try:
            fs, root = url_to_fs(self.url, **options)
        except ImportError as exc:
            raise StoreConfigurationError(
                f"store {self.url!r}: the package for this protocol is not installed ({exc}); "
                "for s3:// install flwr-serverless[s3]"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise StoreConfigurationError(f"store {self.url!r}: cannot open this URL with fsspec: {exc}") from exc
        self.fs = fs
        protocols = _protocols(fs)
        self._impl: _Backend
        if isinstance(fs, LocalFileSystem):
            self._impl = _LocalBackend(self.url, root)
        elif isinstance(fs, MemoryFileSystem):
            self._impl = _MemoryBackend(fs, root)
        elif protocols & _S3_PROTOCOLS and type(fs).__module__.startswith("s3fs"):
            self._impl = _S3FsBackend(self.url, fs, root)
        else:
            self._impl = _GenericBackend(fs, root)
        self.supports_conditional_writes = self._impl.conditional
        self.zero_copy_get = isinstance(self._impl, _MemoryBackend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- primitives: delegate, then translate backend errors -------------------
    def _put(self, key: str, data: bytes) -> str:
        with self._errors("put", key):
            return self._impl.put(key, data)

    def _get(self, key: str) -> bytes:
        with self._errors("get", key):
            return self._impl.get(key)

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        with self._errors("get", key):
            return self._impl.get_into(key, sink)

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        check_prefix(prefix)
        with self._errors("list", prefix):
            return self._impl.list(prefix)

    def _delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._impl.delete(key)

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        operation = "put_if_absent" if if_match is None else "put_if_match"
        with self._errors(operation, key):
            return self._impl.put_conditional(operation, key, data, if_match)

    @contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        """Turn fsspec/botocore exceptions into StoreError subclasses that name the key."""
        try:
            yield
        except StoreError:
            raise
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            code, _ = _client_error_info(exc)
            if operation == "get" and code != "NoSuchBucket":
                raise ObjectNotFoundError(key) from exc
            raise StoreError(operation, key, _describe(exc)) from exc
        except PermissionError as exc:
            raise StoreError(operation, key, f"access denied (check credentials and permissions): {exc}") from exc
        except _backend_errors() as exc:
            if _is_credentials_error(exc):
                raise StoreError(operation, key, f"no usable credentials: {exc}") from exc
            raise StoreError(operation, key, _describe(exc)) from exc


class _Backend:
    """The five primitives for one kind of filesystem (errors are translated by FsspecStore)."""

    conditional = False

    def put(self, key: str, data: bytes) -> str:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def get_into(self, key: str, sink: BinaryIO) -> int:
        """Stream into ``sink``; backends that cannot stream read the object whole."""
        data = self.get(key)
        sink.write(data)
        return len(data)

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def put_conditional(self, operation: str, key: str, data: bytes, if_match: str | None) -> str:
        raise NotImplementedError  # only called when ``conditional`` is True


# -- local folders -----------------------------------------------------------------


def _stat_tag(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _next_mtime_ns() -> int:
    global _last_mtime_ns
    with _MTIME_LOCK:
        _last_mtime_ns = max(time.time_ns(), _last_mtime_ns + 1)
        return _last_mtime_ns


class _LocalBackend(_Backend):
    """A folder on a local (or mounted) filesystem."""

    conditional = fcntl is not None

    def __init__(self, url: str, root: str) -> None:
        self.root = os.path.abspath(root)
        self._lock_path = os.path.join(self.root, LOCK_NAME)
        self._thread_lock = threading.Lock()  # used only where fcntl is missing
        self._swept: dict[str, float] = {}  # directory -> monotonic time of its last stale-temp sweep
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = self._write_temp(self.root, b"probe")[0]
            os.unlink(probe)
        except OSError as exc:
            raise StoreConfigurationError(
                f"store {url!r}: local folder {self.root!r} is not writable: {_describe(exc)}"
            ) from exc

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(part.startswith(TEMP_PREFIX) or part == LOCK_NAME for part in parts):
            raise StoreError(
                "access",
                key,
                f"names starting with {TEMP_PREFIX!r} and named {LOCK_NAME!r} are reserved in local stores",
            )
        return os.path.join(self.root, *parts)

    @staticmethod
    def _write_temp(directory: str, data: bytes) -> tuple[str, str]:
        """Write ``data`` to a fresh temp file next to its destination; return (path, tag)."""
        os.makedirs(directory, exist_ok=True)
        fd, tmp = _mkstemp(directory)
        try:
            with os.fdopen(fd, "wb", buffering=0) as handle:
                view = memoryview(data)
                while view:
                    written = handle.write(view)
                    view = view[written:]
                stamp = _next_mtime_ns()
                os.utime(handle.fileno(), ns=(stamp, stamp))
                tag = _stat_tag(os.fstat(handle.fileno()))
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp, tag

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise mutations with every other handle (threads and processes) on this folder."""
        if fcntl is None:  # pragma: no cover - Windows: in-process only
            with self._thread_lock:
                yield
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _sweep_stale_temps(self, directory: str) -> None:
        """Remove ``.tmp-*`` files left by killed writers (listings already ignore them)."""
        now = time.monotonic()
        if now - self._swept.get(directory, -_SWEEP_INTERVAL) < _SWEEP_INTERVAL:
            return
        self._swept[directory] = now
        cutoff = time.time() - STALE_TEMP_SECONDS
        with suppress(OSError):
            for entry in os.scandir(directory):
                if entry.name.startswith(TEMP_PREFIX):
                    with suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)

    def put(self, key: str, data: bytes) -> str:
        final = self._path(key)
        self._sweep_stale_temps(os.path.dirname(final))
        tmp, tag = self._write_temp(os.path.dirname(final), data)
        try:
            with self._locked():  # so a replace cannot land between a CAS's compare and its swap
                os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tag

    def get(self, key: str) -> bytes:
        with open(self._path(key), "rb", buffering=0) as handle:  # the inode stays ours even if replaced
            return handle.read()

    def get_into(self, key: str, sink: BinaryIO) -> int:
        with open(self._path(key), "rb") as handle:
            shutil.copyfileobj(handle, sink, _LOCAL_COPY_BYTES)
            return handle.tell()

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        start = prefix.rpartition("/")[0]
        found: dict[str, ObjectInfo] = {}
        pending = [start]
        while pending:
            rel_dir = pending.pop()
            directory = os.path.join(self.root, *rel_dir.split("/")) if rel_dir else self.root
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(TEMP_PREFIX) or name == LOCK_NAME:  # also a nested store's lock
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        sub = key + "/"
                        if sub.startswith(prefix) or prefix.startswith(sub):
                            pending.append(key)
                        continue
                    if not key.startswith(prefix) or not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:  # deleted while we were listing
                    continue
                found[key] = ObjectInfo(key=key, tag=_stat_tag(st), size=st.st_size)
        return dict(sorted(found.items()))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._locked(), suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
            os.unlink(path)

    def put_conditional(self, operation: str, key: str, data: bytes, if_match: str | None) -> str:
        final = self._path(key)
        tmp, tag = self._write_temp(os.path.dirname(final), data)
        try:
            with self._locked():
                if if_match is None:
                    try:
                        os.link(tmp, final)  # atomic create-only: fails if the name exists
                    except FileExistsError as exc:
                        raise PreconditionFailedError(operation, key) from exc
                    except OSError as exc:
                        if exc.errno not in _NO_HARD_LINKS:
                            raise
                        # No hard links here (FAT, some FUSE/SMB mounts): every mutation holds the lock,
                        # so check-then-replace is still atomic with respect to other stores.
                        if os.path.lexists(final):
                            raise PreconditionFailedError(operation, key) from exc
                        os.replace(tmp, final)
                else:
                    try:
                        current = _stat_tag(os.stat(final))
                    except (FileNotFoundError, NotADirectoryError) as exc:
                        raise PreconditionFailedError(operation, key) from exc
                    if current != if_match:
                        raise PreconditionFailedError(operation, key)
                    os.replace(tmp, final)
        finally:
            _unlink_quietly(tmp)
        return tag


def _mkstemp(directory: str) -> tuple[int, str]:
    """Create a temp file honouring the umask (tempfile's 0600 would hide objects from other users)."""
    while True:
        path = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue


def _unlink_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


# -- memory:// -----------------------------------------------------------------------


class _MemoryBackend(_Backend):
    """fsspec's process-global in-memory filesystem; every write is one dict assignment."""

    conditional = True

    def __init__(self, fs: MemoryFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    @staticmethod
    def _tag_and_size(handle: Any) -> tuple[str, int]:
        meta = getattr(handle, "flwr_meta", None)
        if meta is not None:
            return meta
        # Written by plain fsspec calls, not by a store. (``size`` un-shares the BytesIO: one copy.)
        return f"{id(handle)}-{handle.modified.timestamp()}-{handle.size}", handle.size

    def _new_file(self, path: str, data: bytes) -> tuple[MemoryFile, str]:
        # BytesIO keeps a reference to the bytes object itself, so neither this nor getvalue() copies;
        # size and tag live beside it because MemoryFile.size would force a private copy.
        handle = MemoryFile(self.fs, path, bytes(data))
        tag = f"m{next(_MEMORY_GENERATION)}-{len(data)}"
        handle.flwr_meta = (tag, len(data))  # type: ignore[attr-defined]
        return handle, tag

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        handle, tag = self._new_file(path, data)
        with _MEMORY_LOCK:
            self.fs.store[path] = handle
        return tag

    def get(self, key: str) -> bytes:
        handle = self.fs.store.get(self._path(key))
        if handle is None:
            raise ObjectNotFoundError(key)
        return handle.getvalue()

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        start = f"{self.root}/"
        wanted = start + prefix
        found: dict[str, ObjectInfo] = {}
        for path, handle in tuple(self.fs.store.items()):
            if path.startswith(wanted):
                key = path[len(start) :]
                tag, size = self._tag_and_size(handle)
                found[key] = ObjectInfo(key=key, tag=tag, size=size)
        return dict(sorted(found.items()))

    def delete(self, key: str) -> None:
        with _MEMORY_LOCK:
            self.fs.store.pop(self._path(key), None)

    def put_conditional(self, operation: str, key: str, data: bytes, if_match: str | None) -> str:
        path = self._path(key)
        handle, tag = self._new_file(path, data)
        with _MEMORY_LOCK:
            current = self.fs.store.get(path)
            if if_match is None:
                if current is not None:
                    raise PreconditionFailedError(operation, key)
            elif current is None or self._tag_and_size(current)[0] != if_match:
                raise PreconditionFailedError(operation, key)
            self.fs.store[path] = handle
        return tag


# -- s3:// through s3fs ------------------------------------------------------------------


def _quote_etag(tag: str) -> str:
    return tag if tag.startswith('"') else f'"{tag}"'


class _S3FsBackend(_Backend):
    """S3 (or an S3-compatible service) through s3fs; each write is one PUT."""

    conditional = True

    def __init__(self, url: str, fs: Any, root: str) -> None:
        self.fs = fs
        bucket, _, prefix = root.strip("/").partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if not bucket:
            raise StoreConfigurationError(f"store {url!r}: no bucket in the URL (expected s3://bucket/prefix)")
        self._check_bucket(url)

    def _check_bucket(self, url: str) -> None:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except Exception as exc:
            raise StoreConfigurationError(f"store {url!r}: {_explain_bucket_error(self.bucket, exc)}") from exc

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._key(key)}"

    def _tag_of(self, response: dict[str, Any], key: str) -> str:
        etag = response.get("ETag")
        if etag is None:  # some S3-compatible services omit it; ask once
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(key))["ETag"]
        return str(etag).strip('"')

    def put(self, key: str, data: bytes) -> str:
        response = self.fs.pipe_file(self._path(key), data, chunksize=_S3_MAX_SINGLE_PUT)
        return self._tag_of(response or {}, key)

    def get(self, key: str) -> bytes:
        # max_concurrency=1: one GET. The default first HEADs the object and, above the block size,
        # assembles ranged GETs that could mix two versions of an object rewritten meanwhile.
        return self.fs.cat_file(self._path(key), max_concurrency=1)

    def get_into(self, key: str, sink: BinaryIO) -> int:
        # One GET, its body read by one coroutine on s3fs's event loop (get_file wants a path, not a file).
        from fsspec.asyn import sync

        async def stream() -> int:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            size = 0
            try:
                while chunk := await body.read(_STREAM_CHUNK_BYTES):
                    sink.write(chunk)  # local page cache: brief enough to do on the loop
                    size += len(chunk)
            finally:
                body.close()
            return size

        return sync(self.fs.loop, stream)

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
        found: dict[str, ObjectInfo] = {}
        while True:
            page = self.fs.call_s3("list_objects_v2", **request)
            found.update((info.key, info) for info in s3_listing_objects(page.get("Contents", []), base))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found
            request["ContinuationToken"] = token

    def delete(self, key: str) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self._key(key))

    def put_conditional(self, operation: str, key: str, data: bytes, if_match: str | None) -> str:
        if if_match is None:
            kwargs: dict[str, Any] = {"mode": "create"}
        else:
            kwargs = {"IfMatch": _quote_etag(if_match)}
        try:
            response = self.fs.pipe_file(self._path(key), data, chunksize=_S3_MAX_SINGLE_PUT, **kwargs)
        except FileExistsError as exc:  # s3fs's translation of 412 for If-None-Match
            raise PreconditionFailedError(operation, key) from exc
        except _backend_errors() as exc:
            code, status = _client_error_info(exc)
            lost_race = status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
            vanished = if_match is not None and (status == 404 or code == "NoSuchKey")
            if lost_race or vanished:
                raise PreconditionFailedError(operation, key) from exc
            raise
        return self._tag_of(response or {}, key)


def _explain_bucket_error(bucket: str, exc: BaseException) -> str:
    """One sentence saying why the bucket cannot be used, for StoreConfigurationError."""
    if _is_credentials_error(exc):
        return (
            f"no AWS credentials found for bucket {bucket!r} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or AWS_PROFILE / a profile in ~/.aws): {exc}"
        )
    code, status = _client_error_info(exc)
    if isinstance(exc, FileNotFoundError) or status == 404 or code in ("NoSuchBucket", "404"):
        return f"bucket {bucket!r} does not exist"
    if isinstance(exc, PermissionError) or status == 403 or code in ("AccessDenied", "403"):
        return f"access denied to bucket {bucket!r} (check credentials): {exc}"
    if status == 301 or code in ("PermanentRedirect", "301"):
        return f"bucket {bucket!r} is in another region (set region_name): {exc}"
    return f"cannot reach bucket {bucket!r}: {_describe(exc)}"


# -- anything else fsspec can open ---------------------------------------------------------

_TAG_FIELDS = (
    "ETag",
    "etag",
    "md5Hash",
    "generation",
    "version_id",
    "mtime",
    "LastModified",
    "last_modified",
    "modified",
    "updated",
    "created",
)


def _info_tag(info: dict[str, Any]) -> str:
    for name in _TAG_FIELDS:
        value = info.get(name)
        if value in (None, ""):
            continue
        if isinstance(value, datetime):  # info() and find() may disagree on datetime vs timestamp
            value = value.timestamp()
        return f"{str(value).strip(chr(34))}-{info.get('size')}"
    return f"size-{info.get('size')}"  # nothing better: cannot see same-size rewrites


class _GenericBackend(_Backend):
    """Plain fsspec calls; atomicity of a write is whatever the filesystem's ``pipe_file`` gives."""

    conditional = False

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        try:
            self.fs.pipe_file(path, data)
        except FileNotFoundError:  # filesystems with real directories want the parent first
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            self.fs.pipe_file(path, data)
        return _info_tag(self.fs.info(path))

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        start = f"{self.root}/" if self.root else ""
        try:
            entries = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        found: dict[str, ObjectInfo] = {}
        for name, info in entries.items():
            name = self.fs._strip_protocol(name)
            if info.get("type") == "directory" or name.endswith("/") or not name.startswith(start):
                continue
            key = name[len(start) :]
            if not key.startswith(prefix) or key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                continue
            found[key] = ObjectInfo(key=key, tag=_info_tag(info), size=int(info.get("size") or 0))
        return dict(sorted(found.items()))

    def delete(self, key: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))
