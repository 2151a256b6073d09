"""A store in a local (or mounted) folder, with plain OS calls.

Readers never see a half-written object: a write goes to a ``.tmp-*`` file in
the destination folder and is ``os.replace``d over the old one, so a writer
killed at any moment (even ``kill -9``) leaves the old object or the new one.
Create-only uses ``os.link`` (or, without hard links, a check under the lock);
compare-and-swap and every replace run under an ``fcntl.flock`` on
``<root>/.lock``, so they are atomic across threads and processes. Tags are
inode-mtime-size with an mtime that strictly increases per process, so two
writes never share a tag even on a coarse filesystem clock.

Because objects are only ever replaced, never rewritten in place, a reader on a
local filesystem maps an object's file directly (``open_mapped``): the mapped
inode stays intact even when its writer replaces or deletes the object. Only
files of the reader's own user that nobody else may write are mapped, so no
other participant can change (or truncate, which would be SIGBUS) bytes that
were already validated. Writes take a list of buffers (``codec.encode_parts``)
and write them one after another.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO

from flwr_serverless.errors import PreconditionFailedError, StoreConfigurationError, StoreError
from flwr_serverless.stores.backend_errors import describe, translated
from flwr_serverless.stores.base import Buffer, ObjectInfo, Payload, Store, check_prefix, refuse_options
from flwr_serverless.stores.local_mapping import can_map_in_place, map_read_only
from flwr_serverless.validation import check_bool

try:  # POSIX only; without it local compare-and-swap cannot be made safe across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("flwr_serverless")

TEMP_PREFIX = ".tmp-"
# Temp files of writers killed mid-write are removed by the next put into their folder once this old.
STALE_TEMP_SECONDS = 3600.0
_SWEEP_INTERVAL = 600.0
LOCK_NAME = ".lock"
LOCAL_SCHEMES = ("file", "local")
# errno values with which link() says "this filesystem has no hard links"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
_COPY_BYTES = 1 << 18  # local disk needs no big reads; several peers are copied at once

# Local writes stamp a strictly increasing mtime so inode-mtime-size tags never repeat
# even when the kernel's coarse clock would give two writes the same timestamp.
_MTIME_LOCK = threading.Lock()
_last_mtime_ns = 0


def local_path(url: str) -> str:
    """``/p``, ``p``, ``~/p``, ``file:///p`` or ``local:///p`` -> an absolute path (as fsspec reads them)."""
    scheme, sep, rest = str(url).partition("://")
    path = rest if sep and scheme.lower() in LOCAL_SCHEMES else str(url)
    return os.path.abspath(os.path.expanduser(path))


def _stat_tag(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _next_mtime_ns() -> int:
    global _last_mtime_ns
    with _MTIME_LOCK:
        _last_mtime_ns = max(time.time_ns(), _last_mtime_ns + 1)
        return _last_mtime_ns


def _mkstemp(directory: str) -> tuple[int, str]:
    """Create a temp file honouring the umask (tempfile's 0600 would hide objects from other users).

    Never group- or world-writable: objects are replaced, not rewritten, so nobody needs to write into one,
    and a reader may then map a file of its own user's without anyone changing it underneath (``open_mapped``).
    """
    while True:
        path = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644), path
        except FileExistsError:
            continue


def _only_we_can_rewrite(st: os.stat_result) -> bool:
    """Our own file, writable by nobody else: only our user (who could do anything to us anyway) can change it."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and st.st_uid == geteuid() and not st.st_mode & 0o022


def _unlink_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


class LocalStore(Store):
    """Objects as files under one folder (created if missing); ``url`` is a path or ``file://`` URL.

    ``map_reads``: whether ``open_mapped`` maps objects where they lie. The default
    (None) does so on local Linux filesystems only; pass True for a shared filesystem
    known to keep replaced files readable while mapped (Lustre, GPFS), False to
    always read through copies.
    """

    supports_conditional_writes = fcntl is not None

    def __init__(self, url: str, *, map_reads: bool | None = None, **options: Any) -> None:
        super().__init__()
        refuse_options(url, options, "a local folder")
        check_bool(f"store {url!r}: map_reads", map_reads, none=True, error=StoreConfigurationError)
        if map_reads and os.name != "posix":
            raise StoreConfigurationError(
                f"store {url!r}: map_reads=True needs POSIX (a mapped file cannot be replaced on Windows)"
            )
        self.url = str(url)
        self.root = local_path(self.url)
        self._lock_path = os.path.join(self.root, LOCK_NAME)
        self._thread_lock = threading.Lock()  # used only where fcntl is missing
        self._swept: dict[str, float] = {}  # directory -> monotonic time of its last stale-temp sweep
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = self._write_temp(self.root, b"probe")[0]
            os.unlink(probe)
        except OSError as exc:
            raise StoreConfigurationError(
                f"store {self.url!r}: local folder {self.root!r} is not writable: {describe(exc)}"
            ) from exc
        self.map_reads = can_map_in_place(self.root) if map_reads is None else map_reads

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

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
    def _write_temp(directory: str, data: Payload) -> tuple[str, str]:
        """Write ``data`` (one buffer or several, back to back) to a fresh temp file next to its destination;
        return (path, tag)."""
        os.makedirs(directory, exist_ok=True)
        fd, tmp = _mkstemp(directory)
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            with os.fdopen(fd, "wb", buffering=0) as handle:
                for part in parts:
                    view = memoryview(part).cast("B")
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

    # -- primitives ---------------------------------------------------------------------
    def _put_parts(self, key: str, parts: Sequence[Buffer]) -> str:
        return self._put(key, parts)

    def _put(self, key: str, data: Payload) -> str:
        final = self._path(key)
        with translated("put", key):
            self._sweep_stale_temps(os.path.dirname(final))
            tmp, tag = self._write_temp(os.path.dirname(final), data)
            try:
                with self._locked():  # so a replace cannot land between a CAS's compare and its swap
                    os.replace(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            return tag

    def _copy(self, source: str, destination: str) -> str:
        """A hard link to the source's file (objects are never rewritten in place: a put replaces the file),
        moved over the destination atomically; a plain copy where links are not supported."""
        src, final = self._path(source), self._path(destination)
        directory = os.path.dirname(final)
        with translated("get", source):
            os.stat(src)
        with translated("copy", destination):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = _mkstemp(directory)
            os.close(fd)
            try:
                os.unlink(tmp)
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
                tag = _stat_tag(os.stat(tmp))
                with self._locked():
                    os.replace(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            return tag

    def _get(self, key: str) -> bytes:
        path = self._path(key)
        with translated("get", key), open(path, "rb", buffering=0) as handle:  # the inode stays ours if replaced
            return handle.read()

    def _get_into(self, key: str, sink: BinaryIO) -> int:
        path = self._path(key)
        with translated("get", key), open(path, "rb") as handle:
            shutil.copyfileobj(handle, sink, _COPY_BYTES)
            return handle.tell()

    def _open_mapped(self, key: str) -> mmap.mmap | bytes | None:
        if not self.map_reads:
            return None
        path = self._path(key)
        with translated("get", key), open(path, "rb", buffering=0) as handle:  # the map keeps the inode
            st = os.fstat(handle.fileno())
            if not _only_we_can_rewrite(st):
                return None  # another user could truncate or rewrite it under our map: read a private copy
            if st.st_size == 0:
                return b""
            try:
                return map_read_only(handle.fileno())
            except (OSError, ValueError) as exc:  # this filesystem cannot map files: copy from now on
                logger.info("store %s cannot map objects in place (%s); reading through copies", self.url, exc)
                self.map_reads = False
                return None

    def now(self) -> float:
        """A folder seen by one host: file mtimes are stamped with this clock."""
        return time.time()

    def _list(self, prefix: str) -> dict[str, ObjectInfo]:
        check_prefix(prefix)
        with translated("list", prefix):
            return self._scan(prefix)

    def _scan(self, prefix: str) -> dict[str, ObjectInfo]:
        """Walk only the folders that can hold keys starting with ``prefix``."""
        found: dict[str, ObjectInfo] = {}
        pending = [prefix.rpartition("/")[0]]
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
                found[key] = ObjectInfo(key=key, tag=_stat_tag(st), size=st.st_size, modified=st.st_mtime)
        return dict(sorted(found.items()))

    def _delete(self, key: str) -> None:
        path = self._path(key)
        gone = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
        with translated("delete", key), self._locked(), suppress(*gone):
            os.unlink(path)

    def _put_conditional(self, key: str, data: bytes, if_match: str | None) -> str:
        operation = "put_if_absent" if if_match is None else "put_if_match"
        final = self._path(key)
        with translated(operation, key):
            tmp, tag = self._write_temp(os.path.dirname(final), data)
            try:
                with self._locked():
                    self._swap(operation, key, tmp, final, if_match)
            finally:
                _unlink_quietly(tmp)
            return tag

    @staticmethod
    def _swap(operation: str, key: str, tmp: str, final: str, if_match: str | None) -> None:
        """Move ``tmp`` to ``final`` if the condition holds (caller holds the lock)."""
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
            return
        try:
            current = _stat_tag(os.stat(final))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PreconditionFailedError(operation, key) from exc
        if current != if_match:
            raise PreconditionFailedError(operation, key)
        os.replace(tmp, final)
