"""Units of the server that need no running server: request checks, the write-ahead log's
framing and recovery, the readers-writer lock, the worker pool, configuration, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest
from conftest import wait_until

from protos.songrec.v1 import songrec_pb2 as pb2
from server import validation
from server.bundle import BundleError
from server.columns import SongMeta
from server.config import ConfigError, load_config
from server.errors import DeadlineExceeded, InvalidArgument, NotFound, status_for
from server.locks import RWLock
from server.logs import JsonFormatter
from server.storage import StorageFailed, StorageFull
from server.validation import NewSong
from server.wal import FILE_NAME, HEADER, MAGIC, SongLog, WalError, frame, scan
from server.workers import Workers

# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("text", "expected"), [
    ("", 0), ("2020-02-29", 20200229), ("2019-12-31 23:59:59", 20191231),
    ("2013-07-01 11:05:33.000", 20130701), ("  2001-01-01  ", 20010101),
])
def test_updt_date_formats(text: str, expected: int) -> None:
    assert validation.parse_updt_date(text) == expected


@pytest.mark.parametrize("text", ["2019-02-29", "2019-1-1", "20190101", "2019-01-01 24:00:00",
                                  "2019-01-01T", "٢٠١٩-٠١-٠١", "2019-01-01 10:00"])
def test_updt_date_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="updt_date"):
        validation.parse_updt_date(text)


def test_an_offline_question_without_a_usable_updt_date_reads_as_undated() -> None:
    from server.melon import question_updt_date

    assert question_updt_date({"updt_date": "2013-07-01 11:05:33.000"}) == 20130701
    for question in ({}, {"updt_date": None}, {"updt_date": ""}, {"updt_date": "2019-02-29"}):
        assert question_updt_date(question) == 0


def test_issue_date() -> None:
    assert validation.parse_issue_date("", "d") == 0
    assert validation.parse_issue_date("00000000", "d") == 0
    assert validation.parse_issue_date("19910000", "d") == 19910000
    # Impossible months and days are read as partial dates, as the trainer reads them.
    assert validation.parse_issue_date("19911301", "d") == 19910000
    assert validation.parse_issue_date("19910132", "d") == 19910100
    for bad in ("1991-01-01", "1991011", "١٩٩١٠١٠١"):
        with pytest.raises(InvalidArgument, match="d: "):
            validation.parse_issue_date(bad, "d")


def test_continue_params_defaults_and_folding() -> None:
    params = validation.continue_params(pb2.ContinuePlaylistRequest(
        seed_song_ids=[5, 3, 5], tags=["a", "b", "a"]))
    assert params.seed_ids == (5, 3) and params.tags == ("a", "b")
    # No strategy named: the loaded bundle decides (server.engine.Engine.default_strategy).
    assert (params.n_songs, params.n_tags, params.strategy) == (100, 10, "")
    explicit = validation.continue_params(pb2.ContinuePlaylistRequest(n_tags=0, n_songs=1))
    assert (explicit.n_songs, explicit.n_tags) == (1, 0)


# ---------------------------------------------------------------- the write-ahead log


def _song(song_id: int) -> NewSong:
    return NewSong(song_id, SongMeta(genres=("GN0100",), detail_genres=("GN0105",),
                                     artists=(7,), issue_date=20200100, playlists=(1, 2),
                                     tags=("봄",)), name="노래", artists="가수")


def test_wal_round_trip(tmp_path: Path) -> None:
    log = SongLog.open(tmp_path)
    log.append([_song(1), _song(2)])
    log.append([_song(3)])
    log.close()
    reopened = SongLog.open(tmp_path)
    assert reopened.replay.records == 2 and reopened.replay.torn_bytes == 0
    assert reopened.songs() == [_song(1), _song(2), _song(3)]
    reopened.close()


@pytest.mark.parametrize("tail", [
    b"\x05",  # a short header
    HEADER.pack(400, 0) + b"{",  # a payload that runs past the end
    HEADER.pack(3, 12345) + b"abc",  # a complete record with a bad checksum, last
    b"\x00" * 64,  # zero-filled blocks after a crash
])
def test_wal_drops_a_torn_last_record(tmp_path: Path, tail: bytes,
                                      caplog: pytest.LogCaptureFixture) -> None:
    log = SongLog.open(tmp_path)
    log.append([_song(1)])
    log.append([_song(2)])
    log.close()
    path = tmp_path / FILE_NAME
    good = path.stat().st_size
    path.write_bytes(path.read_bytes() + tail)
    with caplog.at_level(logging.WARNING):
        reopened = SongLog.open(tmp_path)
    assert reopened.songs() == [_song(1), _song(2)]
    assert reopened.replay.torn_bytes == len(tail)
    assert path.stat().st_size == good
    assert "torn" in caplog.text
    reopened.append([_song(3)])  # appends go after the last good record
    reopened.close()
    assert SongLog.open(tmp_path).songs() == [_song(1), _song(2), _song(3)]


def test_wal_refuses_corruption_before_the_tail(tmp_path: Path) -> None:
    log = SongLog.open(tmp_path)
    for i in range(3):
        log.append([_song(i)])
    log.close()
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + HEADER.size + 2] ^= 0xFF  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(WalError, match=rf"corrupt record at byte {len(MAGIC)} "):
        SongLog.open(tmp_path)


def test_wal_refuses_other_files_and_bad_content(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"not a log at all")
    with pytest.raises(WalError, match="bad magic"):
        SongLog.open(tmp_path)
    payload = b'{"songs": [{"id": "x"}]}'
    (tmp_path / FILE_NAME).write_bytes(MAGIC + frame(payload))
    with pytest.raises(WalError, match="record 0 has a valid checksum but bad content"):
        SongLog.open(tmp_path)


def test_wal_scan_frames() -> None:
    records = [b"one", b"two!"]
    data = b"".join(frame(r) for r in records)
    assert scan(data, Path("x")) == (records, len(data))
    assert HEADER.unpack(frame(b"abc")[:8]) == (3, zlib.crc32(b"abc"))


def test_wal_torn_magic_is_restarted(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(MAGIC[:3])
    log = SongLog.open(tmp_path)
    log.append([_song(1)])
    log.close()
    assert SongLog.open(tmp_path).songs() == [_song(1)]


# ---------------------------------------------------------------- locks and workers


def test_rwlock_readers_share_writers_exclude() -> None:
    lock = RWLock()
    inside: list[str] = []
    readers_in = threading.Barrier(3, timeout=5)

    def reader() -> None:
        with lock.read():
            inside.append("r")
            readers_in.wait()  # all three readers hold the lock at once

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    with lock.read():
        readers_in.wait()
    for t in threads:
        t.join()
    assert inside == ["r", "r"]
    order: list[str] = []
    trying = threading.Event()

    def write() -> None:
        trying.set()
        with lock.write():
            order.append("w")

    with lock.read():
        writer = threading.Thread(target=write)
        writer.start()
        assert trying.wait(5)
        # Deterministic, no sleep: once the lock counts the writer as waiting, it is
        # blocked on this reader (it cannot get in while a reader holds the lock).
        wait_until(lambda: lock._writers_waiting == 1, 5, "the writer waiting")
        assert order == []
    writer.join(timeout=5)
    assert order == ["w"]


def test_workers_skip_work_whose_deadline_passed() -> None:
    ran: list[int] = []

    async def scenario() -> None:
        workers = Workers(1)
        gate = threading.Event()
        blocker = asyncio.ensure_future(workers.run(gate.wait))
        late = asyncio.ensure_future(workers.run(lambda: ran.append(1),
                                                 deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.1)
        gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await late
        with pytest.raises(DeadlineExceeded):
            await workers.run(lambda: ran.append(2), deadline=time.monotonic() - 1)
        assert await workers.run(lambda: 42) == 42
        workers.shutdown()

    asyncio.run(scenario())
    assert ran == []


def test_status_mapping() -> None:
    assert status_for(InvalidArgument("k: bad")) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                     "k: bad")
    assert status_for(NotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    code, message = status_for(BundleError("/b: sha256 mismatch"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sha256" in message
    code, message = status_for(StorageFull("/d/songs.wal: append failed, no space left"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left" in message
    assert status_for(StorageFailed("/d/songs.wal: I/O error"))[0] == \
        grpc.StatusCode.UNAVAILABLE
    code, message = status_for(ZeroDivisionError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


# ---------------------------------------------------------------- configuration and logs


def test_config_flags_beat_environment(tmp_path: Path) -> None:
    env = {"SONGREC_PORT": "6000", "SONGREC_HOST": "0.0.0.0", "SONGREC_ADMIN_TOKEN": "env-tok",
           "SONGREC_METRICS_PORT": "9100", "SONGREC_VERIFY": "false"}
    config = load_config(["--port", "7000"], env)
    assert (config.port, config.host, config.metrics_port) == (7000, "0.0.0.0", 9100)
    assert config.admin_token == "env-tok" and not config.verify
    assert "env-tok" not in repr(config)
    token_file = tmp_path / "tok"
    token_file.write_text("file-tok\n")
    from_file = load_config(["--admin-token-file", str(token_file)], env)
    assert from_file.admin_token == "file-tok"
    defaults = load_config([], {})
    assert (defaults.host, defaults.port, defaults.metrics_port) == ("127.0.0.1", 50051, 0)
    assert defaults.admin_token is None and defaults.token is None


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {"SONGREC_PORT": "http"}, "SONGREC_PORT='http': not a valid value"),
    (["--workers", "0"], {}, "--workers: 0 is out of range 1..256"),
    (["--max-concurrent-rpcs", "0"], {}, "--max-concurrent-rpcs: 0"),
    (["--token-file", "/no/such/file"], {}, "token file /no/such/file: unreadable"),
    (["--grace", "-1"], {}, "--grace: -1.0 is negative"),
    (["--grace", "nan"], {}, "--grace: nan is not a finite number"),
    (["--grace", "inf"], {}, "--grace: inf is not a finite number"),
    ([], {"SONGREC_GRACE": "-inf"}, "--grace: -inf is not a finite number"),
    ([], {"SONGREC_ADMIN_TOKEN": " \n"}, "SONGREC_ADMIN_TOKEN: empty"),
    ([], {"SONGREC_TOKEN": "two words"}, "SONGREC_TOKEN: the token contains whitespace"),
])
def test_config_errors(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(argv, env)
    assert message in str(exc.value)


def test_tokens_with_surrounding_whitespace_are_stripped(tmp_path: Path) -> None:
    """A trailing newline (``export T=$(cat file)`` keeps none, an env file may) would make
    a token no client can present: clients' bearer tokens are stripped too."""
    config = load_config([], {"SONGREC_ADMIN_TOKEN": "admin-tok\n",
                              "SONGREC_TOKEN": "\tinference-tok  "})
    assert (config.admin_token, config.token) == ("admin-tok", "inference-tok")
    (tmp_path / "tok").write_text("\n file-tok \r\n")
    assert load_config(["--token-file", str(tmp_path / "tok")], {}).token == "file-tok"


def test_data_dir_that_is_a_file_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--data-dir .*file: not a directory"):
        load_config(["--data-dir", str(tmp_path / "file")], {})


def test_empty_token_file_refused(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(["--admin-token-file", str(tmp_path / "tok")], {})


def test_json_log_lines() -> None:
    record = logging.makeLogRecord({"name": "server.app", "levelname": "INFO",
                                    "msg": "loaded %s", "args": ("모델",), "model": "v1"})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "loaded 모델" and line["level"] == "INFO"
    assert line["logger"] == "server.app" and line["model"] == "v1"
    assert line["ts"].endswith("Z")


def test_numba_kernels_are_cached_per_version_of_every_kernel_file(tmp_path: Path) -> None:
    """A change to any file holding kernels moves the cache (numba alone would reuse a
    kernel that calls a changed kernel of another file)."""
    import numba

    import server

    package = Path(server.__file__).parent
    assert numba.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"]
    assert os.environ["NUMBA_CACHE_DIR"] == str(server.kernel_cache_dir())
    for name in server.KERNEL_FILES:
        (tmp_path / name).write_bytes((package / name).read_bytes())
    first = server.kernel_cache_dir(tmp_path)
    assert first is not None and first.parent == tmp_path / "__pycache__"
    for name in server.KERNEL_FILES:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n# changed\n")
        assert server.kernel_cache_dir(tmp_path) != first, name
        (tmp_path / name).write_bytes(original)
    assert server.kernel_cache_dir(tmp_path) == first
    (tmp_path / "wire.py").unlink()
    assert server.kernel_cache_dir(tmp_path) is None
