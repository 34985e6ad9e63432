"""The write-ahead log of songs added at run time: framed, checksummed, fsynced records.

File layout: an 8-byte magic, then records. Each record is a little-endian uint32 payload
length, a uint32 CRC-32 of the payload, and the payload (UTF-8 JSON: ``{"songs": [...]}``,
one record per acknowledged ``AddSongs`` call). A crash can leave the last record torn
(short, or with a bad checksum); opening the log detects that, reports it, truncates the
tail and keeps every complete record. A bad record *followed by* good data is corruption,
not a torn write, and is refused rather than silently dropping acknowledged songs.

Appends go through :class:`server.storage.AppendFile`: a failed one (a full disk) raises
:class:`server.storage.StorageError` and leaves the file and the logged songs as they were.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.columns import SongMeta
from server.storage import AppendFile, StorageError
from server.validation import NewSong

log = logging.getLogger(__name__)

MAGIC = b"SRWAL01\n"
HEADER = struct.Struct("<II")  # payload length, crc32(payload)
MAX_RECORD = 256 << 20  # a larger length field can only be garbage
FILE_NAME = "songs.wal"


class WalError(RuntimeError):
    """The log is unreadable or corrupt somewhere other than its tail."""


@dataclass(frozen=True)
class Replay:
    """What opening a log found."""

    records: int
    songs: list[NewSong]
    torn_bytes: int  # bytes of a torn last record that were dropped (0: none)


def encode_song(song: NewSong) -> dict[str, Any]:
    """A song as a JSON-able record entry."""
    m = song.meta
    return {"id": song.song_id, "genres": list(m.genres),
            "detail_genres": list(m.detail_genres), "artists": list(m.artists),
            "issue_date": m.issue_date, "playlists": list(m.playlists), "tags": list(m.tags),
            "name": song.name, "artist_names": song.artists}


def decode_song(raw: dict[str, Any]) -> NewSong:
    """The inverse of :func:`encode_song` (raises KeyError/TypeError/ValueError if malformed)."""
    meta = SongMeta(genres=tuple(str(g) for g in raw["genres"]),
                    detail_genres=tuple(str(g) for g in raw["detail_genres"]),
                    artists=tuple(int(a) for a in raw["artists"]),
                    issue_date=int(raw["issue_date"]),
                    playlists=tuple(int(p) for p in raw["playlists"]),
                    tags=tuple(str(t) for t in raw["tags"]))
    return NewSong(int(raw["id"]), meta, str(raw.get("name", "")),
                   str(raw.get("artist_names", "")))


def frame(payload: bytes) -> bytes:
    """One record: header + payload."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def scan(data: bytes, where: Path) -> tuple[list[bytes], int]:
    """Payloads of the complete records in ``data`` (the file after the magic), and the
    length of the valid prefix. A bad record is tolerated only as the torn tail."""
    payloads: list[bytes] = []
    pos = 0
    while pos < len(data):
        problem = None
        if len(data) - pos < HEADER.size:
            problem = "short header"
            end = len(data)
        else:
            length, crc = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if length == 0 or length > MAX_RECORD:
                problem = f"impossible length {length}"
                end = len(data)
            elif end > len(data):
                problem = f"record of {length} bytes runs past the end"
                end = len(data)
            elif zlib.crc32(data[pos + HEADER.size : end]) != crc:
                problem = "checksum mismatch"
        if problem is None:
            payloads.append(data[pos + HEADER.size : end])
            pos = end
            continue
        if end >= len(data) or not any(data[pos:]):
            return payloads, pos  # the torn tail of an interrupted append
        offset = len(MAGIC) + pos
        raise WalError(f"{where}: corrupt record at byte {offset} ({problem}) followed by "
                       f"{len(data) - end} more bytes; refusing to drop acknowledged songs. "
                       f"Keep a copy, then truncate the file at byte {offset} to start")
    return payloads, pos


class SongLog:
    """Append-only, fsynced log of added songs in ``data_dir``.

    Open with :meth:`open`, which replays it; :meth:`append` returns only after the record
    and (for a new file) its directory entry are on disk, or raises
    :class:`~server.storage.StorageError` with the log as it was.
    """

    def __init__(self, path: Path, file: AppendFile, replay: Replay) -> None:
        self.path = path
        self._file = file
        self._lock = threading.Lock()
        self.replay = replay
        self._songs: list[NewSong] = list(replay.songs)

    @staticmethod
    def open(data_dir: Path) -> SongLog:
        """Open (creating if needed) the log in ``data_dir``, drop a torn tail, replay it.
        Raises :class:`WalError` naming the path and the problem."""
        path = data_dir / FILE_NAME
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            file = AppendFile.open(path)
        except OSError as exc:
            where = exc.filename or path
            raise WalError(f"{where}: cannot open the write-ahead log there "
                           f"({exc.strerror or exc})") from None
        try:
            replay = SongLog._recover(path, file)
        except (OSError, StorageError) as exc:
            file.close()
            raise WalError(f"{path}: cannot prepare the write-ahead log ("
                           f"{exc.strerror if isinstance(exc, OSError) else exc})") from None
        except BaseException:
            file.close()
            raise
        return SongLog(path, file, replay)

    @staticmethod
    def _recover(path: Path, file: AppendFile) -> Replay:
        raw = file.read()
        if not raw:
            file.append(MAGIC)
            return Replay(0, [], 0)
        if not raw.startswith(MAGIC):
            if MAGIC.startswith(raw):  # torn while writing the magic itself
                file.truncate(0)
                return SongLog._recover(path, file)
            raise WalError(f"{path}: not a songrec write-ahead log (bad magic)")
        payloads, valid = scan(raw[len(MAGIC) :], path)
        songs: list[NewSong] = []
        for number, payload in enumerate(payloads):
            try:
                record = json.loads(payload.decode("utf-8"))
                songs.extend(decode_song(s) for s in record["songs"])
            except (ValueError, KeyError, TypeError) as exc:
                raise WalError(f"{path}: record {number} has a valid checksum but bad "
                               f"content ({exc!r})") from None
        torn = len(raw) - len(MAGIC) - valid
        if torn:
            log.warning("write-ahead log %s: dropped a torn last record (%d bytes) left by "
                        "an interrupted write; %d complete records kept", path, torn,
                        len(payloads))
            file.truncate(len(MAGIC) + valid)
        return Replay(len(payloads), songs, torn)

    def songs(self) -> list[NewSong]:
        """Every song logged so far, in order (replayed ones first)."""
        with self._lock:
            return list(self._songs)

    def __len__(self) -> int:
        return len(self._songs)

    def append(self, songs: Sequence[NewSong]) -> None:
        """Write one record holding ``songs`` and fsync it (blocking: call off the loop).
        Raises :class:`~server.storage.StorageError`, the log unchanged, when the write
        fails (:class:`~server.storage.StorageFull`: no space)."""
        payload = json.dumps({"songs": [encode_song(s) for s in songs]},
                             ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        with self._lock:
            self._file.append(frame(payload))
            self._songs.extend(songs)

    def close(self) -> None:
        with self._lock:
            self._file.close()
