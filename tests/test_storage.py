"""A full disk fails cleanly on the write-ahead log format: an append that fails leaves the
file exactly as before (no half record left to reach the file with a later write) and
appends work again once space returns. The song store that replaced the log for AddSongs
keeps the same contract: tests/test_store.py and tests/test_replicas.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.songrec.v1 import songrec_pb2 as pb2
from server.storage import AppendFile, StorageFailed, StorageFull

ADMIN = "storage-admin-token"
AUTH = [("authorization", f"Bearer {ADMIN}")]
Code = grpc.StatusCode


class HalfThenFail:
    """``os.pwrite`` that writes half of what it is given, then fails with ``error``."""

    def __init__(self, error: int = errno.ENOSPC) -> None:
        self.real = os.pwrite
        self.error = error
        self.calls = 0

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        self.calls += 1
        if self.calls == 1 and len(data) > 1:
            return self.real(fd, bytes(data[: len(data) // 2]), offset)
        raise OSError(self.error, os.strerror(self.error))


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "file"
    store = AppendFile.open(path)
    store.append(b"first record;")
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", HalfThenFail())
        with pytest.raises(StorageFull, match="no space left"):
            store.append(b"second record, cut half-way;")
    assert path.read_bytes() == b"first record;" and store.size == len(b"first record;")
    store.append(b"third;")  # space is back: the next write follows the last good one
    assert path.read_bytes() == b"first record;third;"
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
        with pytest.raises(StorageFailed, match="append of 7 bytes failed"):
            store.append(b"fourth;")
    assert path.read_bytes() == b"first record;third;"
    store.close()


def test_a_tail_that_could_not_be_cut_is_cut_by_the_next_append(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "file"
    store = AppendFile.open(path)
    store.append(b"good;")
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", HalfThenFail())
        patch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(
            OSError(errno.EIO, "EIO")))
        with pytest.raises(StorageFull):
            store.append(b"0123456789")
    assert path.read_bytes() == b"good;01234"  # the cut failed too
    store.append(b"next;")
    assert path.read_bytes() == b"good;next;"
    store.close()


def new_songs(first: int, n: int) -> pb2.AddSongsRequest:
    """``n`` songs the tiny bundle's model can place (known genres)."""
    return pb2.AddSongsRequest(songs=[pb2.NewSong(
        song_id=first + i, name=f"song {i}", artists="someone " * 10,
        metadata=pb2.SongMetadata(genres=["GN0100"], detail_genres=["GN0105"],
                                  issue_date="20200101", tags=[f"tag {i}"] * 3))
        for i in range(n)])


def add(admin: Any, request: pb2.AddSongsRequest) -> tuple[Code, str]:
    try:
        admin.AddSongs(request, metadata=AUTH, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[attr-defined]
    return Code.OK, ""


