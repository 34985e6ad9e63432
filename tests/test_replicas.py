"""Several servers on one song store, as replicas behind a balancer run: songs added on one
are served by the others, survive kill -9, and a store outage fails writes only. Real
servers, real PostgreSQL (tests/conftest.py starts it), real SQLite files."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port, wait_until

from clients.benchtools import ServerProcess
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.columns import SongMeta
from server.config import ServerConfig
from server.store import open_store
from server.testing import ServerThread
from server.validation import NewSong

ADMIN = "replica-admin-token"
AUTH = [("authorization", f"Bearer {ADMIN}")]
META = pb2.SongMetadata(genres=["GN0100"], detail_genres=["GN0105"], issue_date="20200101")


def new_songs(first: int, n: int) -> list[pb2.NewSong]:
    return [pb2.NewSong(song_id=first + i, metadata=META, name=f"song {first + i}")
            for i in range(n)]


def serves(target: str, song_id: int) -> bool:
    """Whether the server at ``target`` answers SimilarSongs for ``song_id``."""
    with grpc.insecure_channel(target) as channel:
        try:
            pb2_grpc.RecommenderStub(channel).SimilarSongs(
                pb2.SimilarSongsRequest(song_id=song_id, k=3), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return False
            raise
    return True


def add(target: str, songs: list[pb2.NewSong]) -> pb2.AddSongsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb2_grpc.AdminStub(channel).AddSongs(pb2.AddSongsRequest(songs=songs),
                                                    metadata=AUTH, timeout=30)


def gauge(live: ServerThread, name: str) -> float | None:
    value = live.server.state.metrics.registry.get_sample_value(name)
    return None if value is None else float(value)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'songs.db'}"
    return str(request.getfixturevalue("pg_url"))


def replica(bundle: Path, store: str, tmp_path: Path, name: str) -> ServerThread:
    return ServerThread(ServerConfig(bundle=bundle, port=0, store=store, admin_token=ADMIN,
                                     data_dir=tmp_path / name, verify=False, workers=2))


def test_a_song_added_on_one_replica_is_served_by_the_other(tiny_bundle: Path, store_url: str,
                                                            tmp_path: Path) -> None:
    with replica(tiny_bundle, store_url, tmp_path, "a") as a, \
            replica(tiny_bundle, store_url, tmp_path, "b") as b:
        assert not serves(b.target, 80_000_001)
        reply = add(a.target, new_songs(80_000_001, 3))
        assert list(reply.added_song_ids) == [80_000_001, 80_000_002, 80_000_003]
        assert serves(a.target, 80_000_001)  # at once on the replica that acknowledged
        lag = wait_until(lambda: all(serves(b.target, 80_000_001 + i) for i in range(3)), 1.0,
                       "B serving the songs added on A")
        assert lag <= 1.0
        # And the other way round; B's answer names its own names for them.
        add(b.target, new_songs(80_000_010, 1))
        wait_until(lambda: serves(a.target, 80_000_010), 1.0, "A serving B's song")
        with grpc.insecure_channel(b.target) as channel:
            info = pb2_grpc.RecommenderStub(channel).GetModelInfo(pb2.GetModelInfoRequest())
        assert info.added_songs == 4
        assert gauge(b, "songrec_store_applied_seq") == gauge(a, "songrec_store_applied_seq")


def test_concurrent_duplicate_adds_on_two_replicas_give_one_row(
        tiny_bundle: Path, store_url: str, tmp_path: Path) -> None:
    with replica(tiny_bundle, store_url, tmp_path, "a") as a, \
            replica(tiny_bundle, store_url, tmp_path, "b") as b:
        songs = new_songs(81_000_000, 40)
        replies: dict[str, pb2.AddSongsResponse] = {}
        barrier = threading.Barrier(2)

        def run(name: str, target: str, order: list[pb2.NewSong]) -> None:
            barrier.wait()
            replies[name] = add(target, order)

        threads = [threading.Thread(target=run, args=("a", a.target, songs)),
                   threading.Thread(target=run, args=("b", b.target, songs[::-1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        added_a, added_b = set(replies["a"].added_song_ids), set(replies["b"].added_song_ids)
        assert not added_a & added_b  # no id stored by both
        assert added_a | added_b == {s.song_id for s in songs}
        # Each replica serves all 40 once it answered, whoever stored them.
        for live in (a, b):
            assert all(serves(live.target, s.song_id) for s in songs)
        store = open_store(store_url)
        try:
            assert store.count() == 40
        finally:
            store.close()


def test_unplaceable_stored_songs_are_logged_and_counted(
        tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store written by a model with other inputs: songs this model cannot encode are
    named in the log and counted in a metric, the rest served."""
    url = f"sqlite:///{tmp_path / 'songs.db'}"
    store = open_store(url)
    unknown = SongMeta(genres=("GN9900",), detail_genres=(), artists=(), issue_date=0,
                       playlists=(), tags=())
    known = SongMeta(genres=("GN0100",), detail_genres=(), artists=(), issue_date=0,
                     playlists=(), tags=())
    store.add([NewSong(82_000_001, unknown), NewSong(82_000_002, known)])
    with caplog.at_level("WARNING"), replica(tiny_bundle, url, tmp_path, "a") as a:
        assert serves(a.target, 82_000_002) and not serves(a.target, 82_000_001)
        assert gauge(a, "songrec_store_unplaceable_songs") == 1
        store.add([NewSong(82_000_003, unknown)])  # another model's server adds one more
        wait_until(lambda: gauge(a, "songrec_store_unplaceable_songs") == 2, 5, "the metric")
    store.close()
    warnings = [r.getMessage() for r in caplog.records if "knows none" in r.getMessage()]
    assert any("82000001" in m for m in warnings) and any("82000003" in m for m in warnings)


def test_store_outage_fails_writes_only_and_followers_catch_up(
        tiny_bundle: Path, pg_url: str, postgres: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="server"), \
            replica(tiny_bundle, pg_url, tmp_path, "a") as a, \
            replica(tiny_bundle, pg_url, tmp_path, "b") as b:
        add(a.target, new_songs(83_000_001, 1))
        wait_until(lambda: serves(b.target, 83_000_001), 1.0, "B before the outage")
        postgres.stop()
        try:
            with pytest.raises(grpc.RpcError) as exc:
                add(a.target, new_songs(83_000_002, 1))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "unreachable" in exc.value.details()  # type: ignore[attr-defined]
            # Inference goes on, added songs included; nothing half-added.
            for live in (a, b):
                assert serves(live.target, 83_000_001)
                assert not serves(live.target, 83_000_002)
            wait_until(lambda: gauge(b, "songrec_store_up") == 0, 10, "B noticing the outage")
        finally:
            postgres.start()
        # Writes work again (the server reconnects on the call), and B catches up.
        reply = add(a.target, new_songs(83_000_002, 2))
        assert list(reply.added_song_ids) == [83_000_002, 83_000_003]
        wait_until(lambda: serves(b.target, 83_000_003), 15, "B catching up after the outage")
        wait_until(lambda: gauge(b, "songrec_store_up") == 1, 15, "B's store gauge")
    messages = [r.getMessage() for r in caplog.records]
    assert any("song store unreachable, retrying" in m for m in messages)
    assert any("answers again" in m for m in messages)


def test_kill_9_right_after_the_ack(tiny_bundle: Path, store_url: str, tmp_path: Path) -> None:
    """A acknowledges, then dies at once (SIGKILL): B serves the songs, and so does A
    restarted on the same store."""
    args = ["--bundle", str(tiny_bundle), "--no-verify", "--store", store_url]
    env = {"SONGREC_ADMIN_TOKEN": ADMIN}
    with ServerProcess(args + ["--data-dir", str(tmp_path / "a")], env=env) as a, \
            ServerProcess(args + ["--data-dir", str(tmp_path / "b")], env=env) as b:
        reply = add(a.target, new_songs(84_000_001, 5))
        a.process.send_signal(signal.SIGKILL)
        a.wait(30)
        assert len(reply.added_song_ids) == 5
        wait_until(lambda: all(serves(b.target, 84_000_001 + i) for i in range(5)), 1.0,
                 "B serving the songs A acknowledged before dying")
        with ServerProcess(args + ["--data-dir", str(tmp_path / "a")], env=env) as again:
            assert all(serves(again.target, 84_000_001 + i) for i in range(5))


def test_processes_accept_add_songs_and_all_serve_them(tiny_bundle: Path,
                                                       tmp_path: Path) -> None:
    """--processes 2 on a data directory: AddSongs reaches one process, the other follows
    the store; 20 new connections (spread over both by the kernel) all find the song."""
    server = ServerProcess(["--bundle", str(tiny_bundle), "--no-verify", "--processes", "2",
                            "--port", str(free_port()), "--data-dir", str(tmp_path / "state"),
                            "--log-level", "DEBUG"], env={"SONGREC_ADMIN_TOKEN": ADMIN})
    try:
        wait_until(lambda: sum(m.startswith("serving model") for m in server.messages()) == 2,
                 60, "both processes serving")
        pids = {json.loads(line)["pid"] for line in server.log_lines()
                if "serving model" in line}
        reply = add(server.target, new_songs(85_000_001, 1))
        assert list(reply.added_song_ids) == [85_000_001]
        time.sleep(1.0)  # the other process's poll interval is 0.2 s
        for _ in range(20):
            assert serves(server.target, 85_000_001)
        served_by = {json.loads(line)["pid"] for line in server.log_lines()
                     if '"rpc SimilarSongs OK' in line}
        assert served_by == pids
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()


def test_add_songs_on_a_full_store_writes_nothing_and_recovers(tiny_bundle: Path,
                                                               tmp_path: Path) -> None:
    """The store cannot grow (SQLite's page limit: a full disk as SQLite sees it):
    AddSongs answers RESOURCE_EXHAUSTED, serves and stores none of the call's songs, and
    works again once there is room. Inference goes on throughout."""
    url = f"sqlite:///{tmp_path / 'songs.db'}"
    with replica(tiny_bundle, url, tmp_path, "a") as a:
        add(a.target, new_songs(87_000_000, 1))
        store = a.server.state.store
        conn = store._conn  # type: ignore[union-attr]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        big = [pb2.NewSong(song_id=87_000_100 + i, metadata=META, name="n" * 900)
               for i in range(100)]
        with pytest.raises(grpc.RpcError) as exc:
            add(a.target, big)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "no space left" in exc.value.details()  # type: ignore[attr-defined]
        assert not serves(a.target, 87_000_100) and serves(a.target, 87_000_000)
        assert store.count() == 1  # type: ignore[union-attr]
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert len(add(a.target, big).added_song_ids) == 100
        assert serves(a.target, 87_000_199)
