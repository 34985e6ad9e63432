"""Durable writes for every store of the server: all-or-nothing fsynced appends, and the two
ways a write fails (no space; the storage failing), each mapped to its status in one place
(:func:`server.errors.status_for`).

The contract a store keeps (the write-ahead log now, any store that replaces it later):
a write returns only once it is durable, or raises :class:`StorageError` having left the
store exactly as before the call, in memory and on disk, so that a caller may retry and
nothing of a failed write reappears later. :class:`AppendFile` is that contract for an
append-only file: it writes with ``pwrite`` at the end of the last good record (no
user-space buffer that could keep a failed tail and flush it with the next write), and a
failed append is cut off again before the error is raised.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FULL = (errno.ENOSPC, errno.EDQUOT)


class StorageError(RuntimeError):
    """A durable write failed; nothing of it was kept."""


class StorageFull(StorageError):
    """No space (or quota) left: writes work again once space is freed."""


class StorageFailed(StorageError):
    """The storage failed otherwise (I/O error, read-only file system, ...)."""


def storage_error(exc: OSError, path: Path, action: str) -> StorageError:
    """The :class:`StorageError` for ``exc`` raised while doing ``action`` on ``path``."""
    if exc.errno in FULL:
        return StorageFull(f"{path}: {action} failed, no space left on its file system "
                           f"({exc.strerror}); nothing of it was kept, and writes work "
                           f"again once space is freed")
    return StorageFailed(f"{path}: {action} failed ({exc.strerror or exc}); nothing of it "
                         f"was kept")


class AppendFile:
    """A file that grows by whole records, each fsynced before :meth:`append` returns, or
    not there at all. Thread-safe."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self._size = size  # the end of the last complete record
        self._dirty = False  # a failed append's tail could not be cut off yet
        self._lock = threading.Lock()

    @staticmethod
    def open(path: Path) -> AppendFile:
        """Open (creating it, durably, if needed) ``path``; raises ``OSError``."""
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if created:
                fsync_dir(path.parent)
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return AppendFile(path, fd, size)

    @property
    def size(self) -> int:
        return self._size

    def read(self) -> bytes:
        """The whole file."""
        with self._lock:
            return os.pread(self._fd, self._size, 0)

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes, durably (recovery of a torn tail); ``OSError``."""
        with self._lock:
            self._cut(size)

    def append(self, data: bytes) -> None:
        """Write ``data`` at the end and fsync; on failure cut it off again and raise
        :class:`StorageError` (:class:`StorageFull` for no space)."""
        with self._lock:
            if self._dirty:
                try:
                    self._cut(self._size)
                except OSError as exc:
                    raise storage_error(exc, self.path, "cutting off an earlier failed "
                                        "append") from None
            start = self._size
            view = memoryview(data)
            try:
                written = 0
                while written < len(data):
                    n = os.pwrite(self._fd, view[written:], start + written)
                    if n <= 0:
                        raise OSError(errno.EIO, "write returned no progress")
                    written += n
                os.fsync(self._fd)
            except OSError as exc:
                self._dirty = True
                try:
                    self._cut(start)
                except OSError as cut:
                    # The next append cuts it first; a restart's recovery drops it as a
                    # torn tail (it is the last thing in the file).
                    log.error("%s: could not cut off a failed append (%s)", self.path,
                              cut.strerror)
                error = storage_error(exc, self.path, f"append of {len(data)} bytes")
                log.error("%s", error)
                raise error from None
            self._size = start + len(data)

    def _cut(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self._size = size
        self._dirty = False

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a new file is not durable until its directory is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
