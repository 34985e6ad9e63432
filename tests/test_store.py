"""The song store on its own: SQLite and a real PostgreSQL server (tests/conftest.py starts
one): idempotent adds, concurrent duplicates, failures that write nothing, the import of an
old write-ahead log."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.columns import SongMeta
from server.store import (
    SongStore,
    SqliteStore,
    StoreConfigError,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
    default_url,
    import_log,
    open_store,
    redact,
)
from server.validation import NewSong
from server.wal import FILE_NAME, HEADER, SongLog


def song(song_id: int, genre: str = "GN0100") -> NewSong:
    meta = SongMeta(genres=(genre,), detail_genres=(genre[:4] + "01",), artists=(7, 8),
                    issue_date=20200101, playlists=(3,), tags=("여름", "tag"))
    return NewSong(song_id, meta, f"name {song_id}", "Artist")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return default_url(tmp_path / "state")
    return str(request.getfixturevalue("pg_url"))


def test_add_is_idempotent_and_reads_back_in_order(store_url: str) -> None:
    store = open_store(store_url)
    try:
        first = store.add([song(1), song(2)])
        assert [s.song for s in first] == [song(1), song(2)]
        assert first[0].seq < first[1].seq
        again = store.add([song(2), song(3, "GN0200"), song(1)])
        assert [s.song.song_id for s in again] == [3]  # 1 and 2 are stored once
        assert store.count() == 3 and store.last_seq() == again[0].seq
        assert [s.song for s in store.all()] == [song(1), song(2), song(3, "GN0200")]
        assert [s.song.song_id for s in store.since(first[0].seq)] == [2, 3]
        assert store.since(store.last_seq()) == []
        assert store.add([]) == []
    finally:
        store.close()
    # Durable across a reopen, and a second opener shares the rows.
    reopened = open_store(store_url)
    try:
        assert [s.song.song_id for s in reopened.all()] == [1, 2, 3]
    finally:
        reopened.close()


def test_concurrent_duplicate_adds_give_one_row(store_url: str) -> None:
    """Two stores (as two replicas have) add overlapping songs at once: each id is stored
    once, by exactly one of them, and seq order has no holes a follower could skip."""
    replicas = [open_store(store_url) for _ in range(2)]
    ids = list(range(1000, 1400))
    got: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def run(number: int) -> None:
        store = replicas[number]
        start.wait()
        for i in range(0, len(ids), 20):
            # Each adds the same ids, in opposite orders: the worst case for conflicts.
            chunk = ids[i:i + 20] if number == 0 else list(reversed(ids[i:i + 20]))
            got[number].extend(s.song.song_id for s in store.add([song(x) for x in chunk]))

    try:
        threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(got[0] + got[1]) == ids  # every id by exactly one of them
        assert replicas[0].count() == len(ids)
        rows = replicas[1].all()
        assert sorted(s.song.song_id for s in rows) == ids
        # A follower reading past any seq it has seen misses nothing.
        middle = rows[len(rows) // 2].seq
        assert [s.song.song_id for s in replicas[0].since(middle)] == \
            [s.song.song_id for s in rows if s.seq > middle]
    finally:
        for store in replicas:
            store.close()


def test_sqlite_full_writes_nothing_and_recovers(tmp_path: Path) -> None:
    """The store at its size limit (SQLite's max_page_count: a full disk as SQLite sees
    it): RESOURCE_EXHAUSTED, nothing of the call stored, and writes work again once there
    is room."""
    store = SqliteStore(tmp_path / "songs.db")
    try:
        store.add([song(i) for i in range(10)])
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")
        before = store.all()
        big = [NewSong(100 + i, song(0).meta, "x" * 4000) for i in range(50)]
        with pytest.raises(StoreFull) as exc:
            store.add(big)
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no space left" in str(exc.value) and "nothing was written" in str(exc.value)
        assert store.all() == before
        store._conn.execute("PRAGMA max_page_count = 1073741823")
        assert len(store.add(big)) == 50
        assert store.count() == 60
    finally:
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_sqlite_on_a_full_then_read_only_file_system(tmp_path: Path) -> None:
    """A real full disk (a 4 MiB tmpfs) and a real read-only remount."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        store = SqliteStore(mount / "songs.db")
        try:
            store.add([song(1)])
            ballast = mount / "ballast"
            # Fill the disk, so the next add cannot get room.
            fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
            big = [NewSong(100 + i, song(0).meta, "y" * 4000) for i in range(100)]
            with pytest.raises(StoreFull):
                store.add(big)
            assert [s.song.song_id for s in store.all()] == [1]
            ballast.unlink()  # space returns: so do writes
            assert len(store.add(big)) == 100
        finally:
            store.close()
        # Read-only: a server restarted on it (a remount needs the files closed).
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(StoreReadOnly, match="read-only file system") as exc:
            SqliteStore(mount / "songs.db").add([song(5000)])
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        store = SqliteStore(mount / "songs.db")
        assert store.count() == 101
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_postgres_read_only_and_unreachable(pg_url: str, postgres: Any) -> None:
    store = open_store(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    try:
        store.add([song(1)])
        import psycopg

        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        with pytest.raises(StoreUnavailable):  # its connection was cut
            store.add([song(2)])
        with pytest.raises(StoreReadOnly) as exc:  # reconnected: read-only
            store.add([song(2)])
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert store.count() == 1
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        with pytest.raises(StoreUnavailable):
            store.add([song(2)])
        assert [s.song.song_id for s in store.add([song(2)])] == [2]
    finally:
        store.close()


def test_postgres_unreachable_then_back(pg_url: str, postgres: Any) -> None:
    store = open_store(pg_url)
    try:
        store.add([song(1)])
        postgres.stop()
        for _ in range(2):  # the broken connection, then a refused reconnect
            with pytest.raises(StoreUnavailable) as exc:
                store.add([song(2)])
            assert exc.value.code == grpc.StatusCode.UNAVAILABLE
            assert "unreachable" in str(exc.value) and "127.0.0.1" in str(exc.value)
        with pytest.raises(StoreUnavailable):
            store.wait(0.1)
        postgres.start()
        assert [s.song.song_id for s in store.add([song(2)])] == [2]
        assert store.count() == 2
    finally:
        store.close()


def test_postgres_notify_wakes_a_waiting_follower(pg_url: str) -> None:
    writer, follower = open_store(pg_url), open_store(pg_url)
    try:
        follower.wait(0.01)  # LISTEN from now on
        timer = threading.Timer(0.3, lambda: writer.add([song(1)]))
        timer.start()
        import time

        began = time.monotonic()
        follower.wait(10.0)
        assert time.monotonic() - began < 5.0  # woken by the NOTIFY, not the timeout
        timer.join()
        assert [s.song.song_id for s in follower.since(0)] == [1]
    finally:
        writer.close()
        follower.close()


def test_import_of_a_write_ahead_log(store_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    wal = SongLog.open(data_dir)
    wal.append([song(1), song(2)])
    wal.append([song(3)])
    wal.close()
    with (data_dir / FILE_NAME).open("ab") as fh:  # a torn record: a crash mid-append
        fh.write(HEADER.pack(500, 0) + b'{"songs": [')
    store = open_store(store_url)
    try:
        store.add([song(2)])  # already there: not added twice
        imported = import_log(store, data_dir)
        assert imported is not None
        total, new, torn = imported
        assert (total, new) == (3, 2) and torn > 0
        assert sorted(s.song.song_id for s in store.all()) == [1, 2, 3]
        assert not (data_dir / FILE_NAME).exists()
        assert (data_dir / (FILE_NAME + ".imported")).is_file()
        assert import_log(store, data_dir) is None  # once
    finally:
        store.close()


def test_urls() -> None:
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(StoreConfigError, match="not a store URL"):
        open_store("mysql://x")
    with pytest.raises(StoreConfigError, match="no file path"):
        open_store("sqlite:///")
    assert default_url(Path("/var/lib/songrec")) == "sqlite:////var/lib/songrec/songs.db"
    with pytest.raises(StoreUnavailable, match="cannot open"):
        SqliteStore(Path("/proc/no/such/dir/songs.db"))


def test_unreadable_rows_are_skipped_not_fatal(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    store: SongStore = SqliteStore(tmp_path / "songs.db")
    try:
        store.add([song(1)])
        raw = sqlite3.connect(str(tmp_path / "songs.db"))
        raw.execute("INSERT INTO songrec_songs (song_id, song, added_at) VALUES (2, 'nope', 0)")
        raw.commit()
        raw.close()
        store.add([song(3)])
        with caplog.at_level("ERROR"):
            assert [s.song.song_id for s in store.all()] == [1, 3]
        assert any("unreadable" in r.getMessage() for r in caplog.records)
    finally:
        store.close()
