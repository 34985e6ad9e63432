"""The song store: every song added at run time, keyed by id, shared by all replicas.

One small interface (:class:`SongStore`) and two implementations, chosen by ``--store URL``:

- ``sqlite:///PATH`` (the default, ``sqlite:///<data-dir>/songs.db``): the standard
  library's sqlite3, WAL journal, ``synchronous=FULL``; several server processes on one
  machine may share the file.
- ``postgresql://...`` (psycopg 3): replicas on several machines. A commit sends a NOTIFY,
  so followers learn of new songs at once; they also poll the last sequence number.

Each song is one row: a sequence number (``seq``, increasing in commit order), its id
(unique: adding is idempotent, and concurrent adds of one id give one row) and its
record (the JSON of :func:`server.wal.encode_song`). :meth:`SongStore.add` returns only
after its transaction commits, and a failed add leaves the store as it was. Replicas
follow the store by reading the rows past the last ``seq`` they applied.

Failures are :class:`StoreError` subclasses carrying their gRPC status: the store cannot
be reached (UNAVAILABLE), the disk is full (RESOURCE_EXHAUSTED), it is read-only
(FAILED_PRECONDITION).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.errors import ServingError
from server.validation import NewSong
from server.wal import FILE_NAME as WAL_FILE_NAME
from server.wal import SongLog, decode_song, encode_song

log = logging.getLogger(__name__)

TABLE = "songrec_songs"
CHANNEL = "songrec_songs"  # PostgreSQL NOTIFY channel: payload = the last committed seq
SQLITE_FILE = "songs.db"
READ_BATCH = 5000  # rows per read when following
# Both: how long a write may wait for another writer's lock before answering UNAVAILABLE.
LOCK_TIMEOUT_S = 10.0
PG_CONNECT_TIMEOUT_S = 3
PG_STATEMENT_TIMEOUT_MS = 15_000
# One key for pg_advisory_xact_lock: adds commit one at a time, so seq order is commit
# order and a follower that has read seq N has seen every row below it.
PG_ADD_LOCK = 0x50_6E_67_52_65_63  # "SongRec"-ish, any fixed 64-bit number


class StoreError(ServingError):
    """The store failed; the message names it and what went wrong. Retrying may work."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreUnavailable(StoreError):
    """The store cannot be reached (or is locked by another writer for too long)."""


class StoreFull(StoreError):
    """No space left for the write: nothing was written."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StoreReadOnly(StoreError):
    """The store refuses writes (read-only file system, file or database)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StoreConfigError(ValueError):
    """A ``--store`` URL that names no store this server can use."""


@dataclass(frozen=True)
class Stored:
    """A song as the store holds it: its sequence number and the song."""

    seq: int
    song: NewSong


def redact(url: str) -> str:
    """A URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def song_record(song: NewSong) -> str:
    """The stored text of a song (one JSON object)."""
    return json.dumps(encode_song(song), ensure_ascii=False, separators=(",", ":"))


def _decode(seq: int, song_id: int, record: Any, where: str) -> Stored | None:
    try:
        raw = json.loads(record) if isinstance(record, (str, bytes)) else record
        song = decode_song(raw)
    except (ValueError, KeyError, TypeError) as exc:
        # Skipped, not fatal: one unreadable row must not stop a replica from following.
        log.error("song store %s: row seq %d (song %d) is unreadable (%r); skipped", where,
                  seq, song_id, exc)
        return None
    return Stored(seq, song)


class SongStore(ABC):
    """Songs added at run time. Thread-safe; every method blocks (call off the loop)."""

    url: str  # redacted, for messages
    kind: str  # "sqlite" or "postgresql"
    poll_s: float  # how often a follower polls the last seq

    def __init__(self) -> None:
        self._stopping = threading.Event()

    @abstractmethod
    def add(self, songs: Sequence[NewSong]) -> list[Stored]:
        """Store the songs whose ids are not stored yet, in one transaction; returns those
        it stored (a song already there, added by anyone, is not in the list). Returns
        after the commit; raises :class:`StoreError` with nothing written."""

    @abstractmethod
    def since(self, seq: int, limit: int = READ_BATCH) -> list[Stored]:
        """Up to ``limit`` songs stored after ``seq``, in seq order."""

    def last_seq(self) -> int:
        """The seq of the last stored song (0: none)."""
        return self._scalar(f"SELECT COALESCE(MAX(seq), 0) FROM {TABLE}")

    def count(self) -> int:
        """How many songs are stored."""
        return self._scalar(f"SELECT COUNT(*) FROM {TABLE}")

    @abstractmethod
    def _scalar(self, query: str) -> int:
        """The one integer ``query`` answers; raises :class:`StoreError`."""

    def wait(self, timeout: float) -> None:
        """Block until another writer may have stored songs, or ``timeout`` seconds."""
        self._stopping.wait(timeout)

    def interrupt(self) -> None:
        """Wake a :meth:`wait` early, and every later one at once (shutdown)."""
        self._stopping.set()

    @abstractmethod
    def close(self) -> None:
        """Release connections (idempotent)."""

    def all(self) -> list[Stored]:
        """Every stored song, in seq order."""
        out: list[Stored] = []
        while True:
            part = self.since(out[-1].seq if out else 0)
            if not part:
                return out
            out.extend(part)


def default_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data directory."""
    return f"sqlite:///{data_dir / SQLITE_FILE}"


def open_store(url: str) -> SongStore:
    """Open (creating the schema if needed) the store a URL names.

    Raises :class:`StoreConfigError` for a URL of no known kind, :class:`StoreError` when
    the store cannot be opened."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise StoreConfigError(f"--store {url}: no file path after sqlite:///")
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise StoreConfigError(f"--store {redact(url)}: not a store URL; use sqlite:///PATH "
                           f"(relative; sqlite:////PATH for an absolute path) or "
                           f"postgresql://USER@HOST:PORT/DATABASE")


def import_log(store: SongStore, data_dir: Path) -> tuple[int, int, int] | None:
    """Import the write-ahead log of ``data_dir`` (the format before the store) once:
    every song in it is added (idempotently) and the log is renamed ``songs.wal.imported``.
    Returns (songs in the log, songs new to the store, torn bytes dropped), or None when
    there is no log. A crash before the rename imports again, which adds nothing twice."""
    path = data_dir / WAL_FILE_NAME
    if not path.is_file():
        return None
    wal = SongLog.open(data_dir)  # drops a torn tail, refuses corruption (WalError)
    try:
        songs = wal.songs()
        torn = wal.replay.torn_bytes
    finally:
        wal.close()
    new = 0
    for start in range(0, len(songs), 1000):
        new += len(store.add(songs[start:start + 1000]))
    done = path.with_name(WAL_FILE_NAME + ".imported")
    path.rename(done)
    log.info("imported the write-ahead log %s into the song store %s: %d songs, %d of them "
             "new; the log is kept as %s", path, store.url, len(songs), new, done.name)
    return len(songs), new, torn


# ---------------------------------------------------------------- SQLite

SQLITE_FULL, SQLITE_READONLY, SQLITE_BUSY, SQLITE_LOCKED = 13, 8, 5, 6
SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_CORRUPT, SQLITE_NOTADB = 10, 14, 11, 26


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _sqlite_error(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    what = f"song store sqlite:///{path}: {doing} failed ({exc})"
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_IOERR) and _read_only_fs(path):
        return StoreReadOnly(f"{what}: {path.parent} is on a read-only file system; nothing "
                             f"was written")
    if code == SQLITE_FULL:
        return StoreFull(f"{what}: no space left; nothing was written, retry once there "
                         f"is room")
    if code == SQLITE_READONLY:
        return StoreReadOnly(f"{what}: the store is read-only; nothing was written")
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return StoreUnavailable(f"{what}: another writer held the lock for over "
                                f"{LOCK_TIMEOUT_S:.0f} s; retry")
    return StoreUnavailable(what)


class SqliteStore(SongStore):
    """A SQLite file (WAL journal, synchronous FULL). One connection, one lock."""

    kind = "sqlite"
    poll_s = 0.2

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.url = f"sqlite:///{path}"
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level None: transactions are the explicit BEGIN/COMMIT below.
            self._conn = sqlite3.connect(str(path), timeout=LOCK_TIMEOUT_S,
                                         isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, path, "opening") from None
        except OSError as exc:
            raise StoreUnavailable(f"song store {self.url}: cannot open ({exc})") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ("
                               "seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                               "song_id INTEGER NOT NULL UNIQUE, "
                               "song TEXT NOT NULL, "
                               "added_at REAL NOT NULL)")
        except sqlite3.Error as exc:
            self._conn.close()
            raise _sqlite_error(exc, self.path, "opening") from None

    def add(self, songs: Sequence[NewSong]) -> list[Stored]:
        if not songs:
            return []
        records = [(s.song_id, song_record(s)) for s in songs]
        stored: list[Stored] = []
        with self._lock:
            try:
                # IMMEDIATE: take the write lock now, so seq order is commit order.
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    now = time.time()
                    for song, (song_id, record) in zip(songs, records, strict=True):
                        row = self._conn.execute(
                            f"INSERT INTO {TABLE} (song_id, song, added_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (song_id) DO NOTHING RETURNING seq",
                            (song_id, record, now)).fetchone()
                        if row is not None:
                            stored.append(Stored(int(row[0]), song))
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, self.path, f"adding {len(songs)} songs") from None
        return stored

    def since(self, seq: int, limit: int = READ_BATCH) -> list[Stored]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    f"SELECT seq, song_id, song FROM {TABLE} WHERE seq > ? ORDER BY seq "
                    "LIMIT ?", (seq, limit)).fetchall()
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, self.path, "reading") from None
        return [s for s in (_decode(r[0], r[1], r[2], self.url) for r in rows) if s]

    def _scalar(self, query: str) -> int:
        with self._lock:
            try:
                return int(self._conn.execute(query).fetchone()[0])
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, self.path, "reading") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ---------------------------------------------------------------- PostgreSQL


class PostgresStore(SongStore):
    """A PostgreSQL database (psycopg 3). One connection for reads and writes, one that
    LISTENs; both reconnect on the next call after a failure."""

    kind = "postgresql"
    poll_s = 0.5  # the fallback when a NOTIFY is lost (listener reconnecting)

    def __init__(self, url: str) -> None:
        super().__init__()
        self._dsn = url
        self.url = redact(url)
        self._lock = threading.Lock()
        self._listen_lock = threading.Lock()
        self._conn: Any = None
        self._listener: Any = None
        self._closed = False
        with self._lock:
            conn = self._connection("opening")
            try:
                with conn.transaction():
                    # Two servers starting at once would race on CREATE TABLE.
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_ADD_LOCK,))
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ("
                                 "seq BIGSERIAL PRIMARY KEY, "
                                 "song_id BIGINT NOT NULL UNIQUE, "
                                 "song JSONB NOT NULL, "
                                 "added_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            except Exception as exc:  # noqa: BLE001 - classified below
                raise self._failed(exc, "creating the table") from None

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S,
                               options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}")
        return conn

    def _connection(self, doing: str) -> Any:
        """The read/write connection, (re)connected if needed (call with the lock)."""
        if self._closed:
            raise StoreUnavailable(f"song store {self.url}: closed")
        if self._conn is None or self._conn.closed:
            try:
                self._conn = self._connect()
            except Exception as exc:  # noqa: BLE001 - classified below
                self._conn = None
                raise self._failed(exc, doing) from None
        return self._conn

    def _failed(self, exc: Exception, doing: str) -> StoreError:
        """The :class:`StoreError` for a psycopg exception; drops a broken connection."""
        import psycopg
        from psycopg import errors

        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._conn = None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"song store {self.url}: {doing} failed ({detail})"
        if isinstance(exc, errors.DiskFull | errors.OutOfMemory | errors.InsufficientResources):
            return StoreFull(f"{what}: no space left; nothing was written, retry once "
                             f"there is room")
        if isinstance(exc, errors.ReadOnlySqlTransaction | errors.InsufficientPrivilege):
            return StoreReadOnly(f"{what}: the store refuses writes; nothing was written")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return StoreUnavailable(f"{what}: the store is unreachable; inference goes on, "
                                    f"retry later")
        return StoreUnavailable(what)

    def add(self, songs: Sequence[NewSong]) -> list[Stored]:
        if not songs:
            return []
        ids = [s.song_id for s in songs]
        by_id = {s.song_id: s for s in songs}
        records = [song_record(s) for s in songs]
        with self._lock:
            conn = self._connection(f"adding {len(songs)} songs")
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_ADD_LOCK,))
                    rows = conn.execute(
                        f"INSERT INTO {TABLE} (song_id, song) "
                        "SELECT i, s::jsonb FROM unnest(%s::bigint[], %s::text[]) "
                        "WITH ORDINALITY AS t(i, s, n) ORDER BY n "
                        "ON CONFLICT (song_id) DO NOTHING RETURNING seq, song_id",
                        (ids, records)).fetchall()
                    if rows:
                        # Delivered at commit, to every LISTENing replica.
                        conn.execute("SELECT pg_notify(%s, %s)",
                                     (CHANNEL, str(max(r[0] for r in rows))))
            except Exception as exc:  # noqa: BLE001 - classified below
                raise self._failed(exc, f"adding {len(songs)} songs") from None
        return sorted((Stored(int(seq), by_id[int(i)]) for seq, i in rows),
                      key=lambda s: s.seq)

    def since(self, seq: int, limit: int = READ_BATCH) -> list[Stored]:
        with self._lock:
            conn = self._connection("reading")
            try:
                rows = conn.execute(f"SELECT seq, song_id, song FROM {TABLE} WHERE seq > %s "
                                    "ORDER BY seq LIMIT %s", (seq, limit)).fetchall()
            except Exception as exc:  # noqa: BLE001 - classified below
                raise self._failed(exc, "reading") from None
        return [s for s in (_decode(r[0], r[1], r[2], self.url) for r in rows) if s]

    def _scalar(self, query: str) -> int:
        with self._lock:
            conn = self._connection("reading")
            try:
                return int(conn.execute(query).fetchone()[0])
            except Exception as exc:  # noqa: BLE001 - classified below
                raise self._failed(exc, "reading") from None

    def wait(self, timeout: float) -> None:
        """Block until a NOTIFY arrives on the channel or ``timeout`` passes. Raises
        :class:`StoreUnavailable` when the listening connection cannot be (re)made."""
        with self._listen_lock:
            if self._closed:
                return
            listener = self._listener
            if listener is None or listener.closed:
                try:
                    listener = self._connect()
                    listener.execute(f"LISTEN {CHANNEL}")
                except Exception as exc:  # noqa: BLE001 - classified below
                    raise self._failed(exc, "listening") from None
                self._listener = listener
        try:
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                break
        except Exception as exc:  # noqa: BLE001 - a lost connection: reconnect next time
            with self._listen_lock:
                self._listener = None
            try:
                listener.close()
            except Exception:  # noqa: BLE001, S110 - already broken
                pass
            if not self._closed:
                raise self._failed(exc, "listening") from None

    def interrupt(self) -> None:
        with self._listen_lock:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.cancel_safe(timeout=1.0)
            except Exception:  # noqa: BLE001, S110 - best effort at shutdown
                pass

    def close(self) -> None:
        self.interrupt()
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
