"""A full disk fails cleanly: a durable write that fails answers RESOURCE_EXHAUSTED (no space)
or UNAVAILABLE, leaves the store exactly as before the call (no half record left to reach
the file with a later write), and writes work again once space returns. With an injected
ENOSPC (half a record written, then the error) and, as root, on a real, small tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.config import ServerConfig
from server.storage import AppendFile, StorageFailed, StorageFull
from server.testing import ServerThread
from server.wal import FILE_NAME, MAGIC, SongLog

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


def served(channel: grpc.Channel) -> int:
    info = pb2_grpc.RecommenderStub(channel).GetModelInfo(pb2.GetModelInfoRequest())
    return int(info.added_songs)


def logged(data_dir: Path) -> int:
    log = SongLog.open(data_dir)
    try:
        return len(log)
    finally:
        log.close()


def test_add_songs_on_a_full_disk_injected(tiny_bundle: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    config = ServerConfig(bundle=tiny_bundle, port=0, data_dir=state, admin_token=ADMIN,
                          verify=False)
    with ServerThread(config) as live, live.channel() as channel:
        admin = pb2_grpc.AdminStub(channel)
        assert add(admin, new_songs(80_000_000, 5)) == (Code.OK, "")
        size = (state / FILE_NAME).stat().st_size
        for error, status in ((errno.ENOSPC, Code.RESOURCE_EXHAUSTED),
                              (errno.EIO, Code.UNAVAILABLE)):
            with monkeypatch.context() as patch:
                patch.setattr(os, "pwrite", HalfThenFail(error))
                code, details = add(admin, new_songs(80_000_100, 50))
            assert code is status, details
            assert f"not stored: {state / FILE_NAME}: append of" in details
            assert (state / FILE_NAME).stat().st_size == size
            assert served(channel) == 5
        # Space is back: the same call now works, and later ones follow it.
        assert add(admin, new_songs(80_000_100, 50)) == (Code.OK, "")
        assert add(admin, new_songs(80_000_200, 5)) == (Code.OK, "")
        assert served(channel) == 60
    assert logged(state) == 60  # exactly the acknowledged songs, nothing of the failed
    assert not [r for r in caplog.records if r.exc_info]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only; skipped otherwise)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                           str(mount_point)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        block = b"\0" * 4096
        while True:
            try:
                fh.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        for size in (1024, 256, 64, 16, 4, 1):  # the last partial page
            while True:
                try:
                    fh.write(b"\0" * size)
                except OSError:
                    break
    return filler


def test_add_songs_on_a_full_tmpfs(tiny_bundle: Path, small_tmpfs: Path) -> None:
    state = small_tmpfs / "state"
    config = ServerConfig(bundle=tiny_bundle, port=0, data_dir=state, admin_token=ADMIN,
                          verify=False)
    with ServerThread(config) as live, live.channel() as channel:
        admin = pb2_grpc.AdminStub(channel)
        assert add(admin, new_songs(81_000_000, 5)) == (Code.OK, "")
        size = (state / FILE_NAME).stat().st_size
        filler = fill(small_tmpfs)
        for attempt in range(3):  # a record of 50 songs needs pages the disk lacks
            code, details = add(admin, new_songs(81_000_100 + 100 * attempt, 50))
            assert code is Code.RESOURCE_EXHAUSTED, details
            assert "no space left" in details
            assert (state / FILE_NAME).stat().st_size == size
        assert served(channel) == 5
        filler.unlink()
        assert add(admin, new_songs(81_000_100, 50)) == (Code.OK, "")
        assert served(channel) == 55
    assert logged(state) == 55
    assert (state / FILE_NAME).read_bytes().startswith(MAGIC)
