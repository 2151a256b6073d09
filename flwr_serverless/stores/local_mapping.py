"""Which folders a local store may memory-map in place, and the read-only map itself.

A reader may map a store's file directly (no copy) only where the filesystem
keeps a replaced or deleted file's data alive for as long as the map holds it:
local POSIX filesystems do (the inode lives on until the last reference goes).
Network filesystems may not (NFS: a file replaced by another client can become
a stale handle, and a page read from it later kills the reader with SIGBUS), so
they are read through copies unless the user says otherwise (``map_reads=True``).
"""

from __future__ import annotations

import mmap
import os
import sys

#: Filesystems on which an open (or mapped) file outlives a rename over it or an unlink.
LOCAL_FILESYSTEMS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "bcachefs",
        "zfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "nilfs2",
        "tmpfs",
        "ramfs",
        "overlay",
    }
)
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """The type of the filesystem holding ``path`` ("ext4", "nfs4"...), or None where it cannot be told."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = -1, None
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mount_point = _unescape(fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= best:  # later mounts over the same point win
            best, best_type = len(mount_point), tail[0]
    return best_type


def can_map_in_place(path: str) -> bool:
    """True when objects under ``path`` can be mapped where they lie (a local filesystem on Linux)."""
    return sys.platform.startswith("linux") and filesystem_type(path) in LOCAL_FILESYSTEMS


def map_read_only(fd: int) -> mmap.mmap:
    """Map the whole file read-only, prefaulted where the OS can (one call instead of a fault per page)."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
