"""The gRPC server's admin API and operations against real servers on port 0: bearer-token
auth, AddSongs (visible, idempotent, durable across restarts), ReloadModel, no-model start,
load shedding, deadlines, draining, TLS and the ``python -m server`` command."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.benchtools import ServerProcess
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.bundle import seal
from server.config import ServerConfig
from server.testing import ServerThread

ADMIN = "admin-secret-token"
INFERENCE = "inference-secret-token"
AUTH = [("authorization", f"Bearer {ADMIN}")]
ROOT = Path(__file__).resolve().parents[1]


def code_of(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined, no-any-return]


def details_of(exc: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return exc.value.details()  # type: ignore[attr-defined, no-any-return]


def stubs(channel: grpc.Channel) -> tuple[Any, Any]:
    return pb2_grpc.RecommenderStub(channel), pb2_grpc.AdminStub(channel)


def twin_of(engine_song: int, tiny_split: Path) -> pb2.SongMetadata:
    """The metadata of a bundle song, as the trainer saw it (so its code equals the song's)."""
    meta = next(m for m in json.loads((tiny_split / "song_meta.json").read_text())
                if m["id"] == engine_song)
    train = json.loads((tiny_split / "train.json").read_text())
    playlists = [p for p in train if engine_song in p["songs"]]
    return pb2.SongMetadata(genres=meta["song_gn_gnr_basket"],
                            detail_genres=meta["song_gn_dtl_gnr_basket"],
                            artist_ids=meta["artist_id_basket"], issue_date=meta["issue_date"],
                            playlist_ids=[p["id"] for p in playlists],
                            tags=sorted({t for p in playlists for t in p["tags"]}))


def popular_song(tiny_split: Path) -> int:
    counts: dict[int, int] = {}
    for playlist in json.loads((tiny_split / "train.json").read_text()):
        for song in playlist["songs"]:
            counts[song] = counts.get(song, 0) + 1
    return max(counts, key=lambda s: counts[s])


def in_flight(live: ServerThread) -> float:
    value = live.server.state.metrics.registry.get_sample_value("songrec_in_flight_requests")
    return float(value or 0.0)


@pytest.fixture
def admin_server(tiny_bundle: Path, tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, data_dir=tmp_path / "state",
                                   admin_token=ADMIN, verify=False)) as running:
        yield running


# ---------------------------------------------------------------- auth


def test_admin_rpcs_need_the_admin_token(admin_server: ServerThread) -> None:
    request = pb2.ReloadModelRequest()
    with admin_server.channel() as channel:
        recommender, admin = stubs(channel)
        with pytest.raises(grpc.RpcError) as missing:
            admin.ReloadModel(request)
        assert code_of(missing) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            admin.ReloadModel(request, metadata=[("authorization", "Bearer nope")])
        assert code_of(wrong) == grpc.StatusCode.PERMISSION_DENIED
        assert ADMIN not in details_of(wrong)
        with pytest.raises(grpc.RpcError) as malformed:
            admin.AddSongs(pb2.AddSongsRequest(), metadata=[("authorization", ADMIN)])
        assert code_of(malformed) == grpc.StatusCode.UNAUTHENTICATED
        assert admin.ReloadModel(request, metadata=AUTH).current.loaded
        # Inference needs no token on this server.
        assert recommender.GetModelInfo(pb2.GetModelInfoRequest()).loaded


def test_admin_rpcs_refused_without_a_configured_token(tiny_bundle: Path) -> None:
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, verify=False)) as live, \
            live.channel() as channel:
        _, admin = stubs(channel)
        with pytest.raises(grpc.RpcError) as exc:
            admin.ReloadModel(pb2.ReloadModelRequest(), metadata=AUTH)
        assert code_of(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert "SONGREC_ADMIN_TOKEN" in details_of(exc)


def test_inference_token(tiny_bundle: Path) -> None:
    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, token=INFERENCE,
                          verify=False)
    with ServerThread(config) as live, live.channel() as channel:
        recommender, admin = stubs(channel)
        request = pb2.SimilarSongsRequest(song_id=1, k=2)
        with pytest.raises(grpc.RpcError) as missing:
            recommender.SimilarSongs(request)
        assert code_of(missing) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            recommender.SimilarSongs(request, metadata=[("authorization", "Bearer x")])
        assert code_of(wrong) == grpc.StatusCode.PERMISSION_DENIED
        ok = recommender.SimilarSongs(request, metadata=[("authorization",
                                                          f"bearer {INFERENCE}")])
        assert len(ok.neighbours) == 2
        assert recommender.SimilarSongs(request, metadata=AUTH).neighbours == ok.neighbours
        # The inference token does not open admin RPCs; probes need no token.
        with pytest.raises(grpc.RpcError) as escalate:
            admin.ReloadModel(pb2.ReloadModelRequest(),
                              metadata=[("authorization", f"Bearer {INFERENCE}")])
        assert code_of(escalate) == grpc.StatusCode.PERMISSION_DENIED
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- AddSongs


def test_add_songs_visible_idempotent_and_durable(tiny_bundle: Path, tiny_split: Path,
                                                  tmp_path: Path) -> None:
    twin_song = popular_song(tiny_split)
    new = pb2.NewSong(song_id=50_000_001, metadata=twin_of(twin_song, tiny_split),
                      name="New Song", artists="New Artist")
    other = pb2.NewSong(song_id=50_000_002, metadata=pb2.SongMetadata(
        genres=["GN0100"], detail_genres=["GN0105"], issue_date="20200101"))
    config = ServerConfig(bundle=tiny_bundle, port=0, data_dir=tmp_path / "state",
                          admin_token=ADMIN, verify=False)
    with ServerThread(config) as live, live.channel() as channel:
        recommender, admin = stubs(channel)
        n = recommender.GetModelInfo(pb2.GetModelInfoRequest()).bundle_songs
        reply = admin.AddSongs(pb2.AddSongsRequest(songs=[new, other]), metadata=AUTH)
        assert list(reply.added_song_ids) == [50_000_001, 50_000_002]
        assert reply.indexed_songs == n + 2
        # The twin of a bundle song is its nearest neighbour, both ways.
        near = recommender.SimilarSongs(pb2.SimilarSongsRequest(song_id=twin_song, k=5,
                                                                include_names=True))
        twins = [n for n in near.neighbours if n.similarity > 0.999]
        assert 50_000_001 in [n.song_id for n in twins]
        assert ("New Song", "New Artist") in [(n.name, n.artists) for n in twins]
        back = recommender.SimilarSongs(pb2.SimilarSongsRequest(song_id=50_000_001, k=5))
        assert twin_song in [n.song_id for n in back.neighbours if n.similarity > 0.999]
        # New songs can seed a playlist too.
        answer = recommender.ContinuePlaylist(pb2.ContinuePlaylistRequest(
            seed_song_ids=[50_000_001]))
        assert len(answer.songs) == 100 and not answer.unknown_seed_ids
        # Idempotent: the same call, or a bundle song, changes nothing.
        again = admin.AddSongs(pb2.AddSongsRequest(songs=[new, pb2.NewSong(
            song_id=twin_song, metadata=other.metadata)]), metadata=AUTH)
        assert not again.added_song_ids
        assert list(again.existing_song_ids) == [50_000_001, twin_song]
        assert again.indexed_songs == n + 2
        info = recommender.GetModelInfo(pb2.GetModelInfoRequest())
        assert (info.added_songs, info.indexed_songs) == (2, n + 2)
    # Restart: the store (songs.db in the data directory) is replayed.
    assert (tmp_path / "state" / "songs.db").is_file()
    with ServerThread(config) as live, live.channel() as channel:
        recommender, admin = stubs(channel)
        info = recommender.GetModelInfo(pb2.GetModelInfoRequest())
        assert (info.added_songs, info.indexed_songs) == (2, n + 2)
        near = recommender.SimilarSongs(pb2.SimilarSongsRequest(song_id=twin_song, k=5,
                                                                include_names=True))
        assert ("New Song", "New Artist") in [(n.name, n.artists) for n in near.neighbours
                                              if n.similarity > 0.999]
        again = admin.AddSongs(pb2.AddSongsRequest(songs=[other]), metadata=AUTH)
        assert list(again.existing_song_ids) == [50_000_002]


def test_add_songs_errors(admin_server: ServerThread, tiny_bundle: Path) -> None:
    good = pb2.SongMetadata(genres=["GN0100"])
    with admin_server.channel() as channel:
        _, admin = stubs(channel)
        cases = [
            (pb2.AddSongsRequest(), "songs: 0 entries, allowed 1..1000"),
            (pb2.AddSongsRequest(songs=[pb2.NewSong(song_id=-1, metadata=good)]),
             "songs[0].song_id[0]: -1 is negative"),
            (pb2.AddSongsRequest(songs=[pb2.NewSong(song_id=70_009, metadata=good)] * 2),
             "songs[1].song_id: 70009 repeats songs[0]"),
            (pb2.AddSongsRequest(songs=[pb2.NewSong(song_id=70_009)]),
             "songs[0].metadata: missing"),
            (pb2.AddSongsRequest(songs=[pb2.NewSong(song_id=70_009, metadata=good),
                                        pb2.NewSong(song_id=70_010, metadata=pb2.SongMetadata(
                                            genres=["GN9900"]))]),
             "songs[1].metadata: none of its metadata is known"),
        ]
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as exc:
                admin.AddSongs(request, metadata=AUTH)
            assert code_of(exc) == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in details_of(exc)
        # A refused call added nothing, not even its good songs.
        info = stubs(channel)[0].GetModelInfo(pb2.GetModelInfoRequest())
        assert info.added_songs == 0
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN,
                                   verify=False)) as no_dir, no_dir.channel() as channel:
        with pytest.raises(grpc.RpcError) as exc:
            stubs(channel)[1].AddSongs(pb2.AddSongsRequest(
                songs=[pb2.NewSong(song_id=9_999_999, metadata=good)]), metadata=AUTH)
        assert code_of(exc) == grpc.StatusCode.FAILED_PRECONDITION
        assert "--data-dir" in details_of(exc) and "--store" in details_of(exc)


# ---------------------------------------------------------------- ReloadModel


def test_reload_model_success_and_failure(admin_server: ServerThread, copy_bundle: Any,
                                          tiny_split: Path) -> None:
    fresh = copy_bundle("next")
    manifest = json.loads((fresh / "manifest.json").read_text())
    manifest["model_version"] = "reloaded-v2"
    (fresh / "manifest.json").write_text(json.dumps(seal(manifest)))
    broken = copy_bundle("broken")
    data = bytearray((broken / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong checksum
    (broken / "arrays.npz").write_bytes(bytes(data))
    twin = twin_of(popular_song(tiny_split), tiny_split)
    with admin_server.channel() as channel:
        recommender, admin = stubs(channel)
        old = recommender.GetModelInfo(pb2.GetModelInfoRequest()).model_version
        admin.AddSongs(pb2.AddSongsRequest(songs=[pb2.NewSong(song_id=60_000_001,
                                                              metadata=twin)]), metadata=AUTH)
        for path, message in ((broken, "sha256 mismatch"),
                              (fresh.parent / "missing", "bundle directory not found")):
            with pytest.raises(grpc.RpcError) as exc:
                admin.ReloadModel(pb2.ReloadModelRequest(bundle_path=str(path)),
                                  metadata=AUTH)
            assert code_of(exc) == grpc.StatusCode.FAILED_PRECONDITION
            assert f"still serving {old}" in details_of(exc) and message in details_of(exc)
            # The old model serves on, added songs included.
            assert recommender.SimilarSongs(pb2.SimilarSongsRequest(
                song_id=60_000_001, k=3)).model_version == old
        reply = admin.ReloadModel(pb2.ReloadModelRequest(bundle_path=str(fresh)),
                                  metadata=AUTH)
        assert reply.previous.model_version == old
        assert reply.current.model_version == "reloaded-v2"
        assert reply.replayed_songs == 1 and reply.current.added_songs == 1
        answer = recommender.SimilarSongs(pb2.SimilarSongsRequest(song_id=60_000_001, k=3))
        assert answer.model_version == "reloaded-v2"
        assert recommender.ContinuePlaylist(pb2.ContinuePlaylistRequest(
            seed_song_ids=[1, 2])).model_version == "reloaded-v2"
        # An empty path reloads the bundle being served.
        again = admin.ReloadModel(pb2.ReloadModelRequest(skip_verify=True), metadata=AUTH)
        assert again.current.model_version == "reloaded-v2"
        registry = admin_server.server.state.metrics.registry
        assert registry.get_sample_value("songrec_reloads_total", {"result": "failed"}) == 2


def test_start_without_a_model(tiny_bundle: Path, tmp_path: Path) -> None:
    config = ServerConfig(port=0, admin_token=ADMIN, data_dir=tmp_path / "d")
    with ServerThread(config) as live, live.channel() as channel:
        recommender, admin = stubs(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        info = recommender.GetModelInfo(pb2.GetModelInfoRequest())
        assert not info.loaded and list(info.strategies)
        calls = [(recommender.ContinuePlaylist, pb2.ContinuePlaylistRequest()),
                 (recommender.SimilarSongs, pb2.SimilarSongsRequest(song_id=1)),
                 (recommender.SimilarSongsBatch, pb2.SimilarSongsBatchRequest(song_ids=[1])),
                 (recommender.EncodeSong, pb2.EncodeSongRequest(
                     song=pb2.SongMetadata(genres=["GN0100"])))]
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as exc:
                call(request)
            assert code_of(exc) == grpc.StatusCode.FAILED_PRECONDITION
            assert "no model loaded" in details_of(exc)
        with pytest.raises(grpc.RpcError) as exc:
            admin.ReloadModel(pb2.ReloadModelRequest(), metadata=AUTH)
        assert code_of(exc) == grpc.StatusCode.FAILED_PRECONDITION
        reply = admin.ReloadModel(pb2.ReloadModelRequest(bundle_path=str(tiny_bundle)),
                                  metadata=AUTH)
        assert not reply.previous.loaded and reply.current.loaded
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert len(recommender.SimilarSongs(pb2.SimilarSongsRequest(song_id=1)).neighbours)


# ---------------------------------------------------------------- load, deadlines, drain


def test_load_shedding_and_deadlines(tiny_bundle: Path) -> None:
    config = ServerConfig(bundle=tiny_bundle, port=0, max_concurrent_rpcs=1, workers=1,
                          verify=False)
    with ServerThread(config) as live, live.channel() as channel:
        recommender, _ = stubs(channel)
        model = live.server.state.model
        assert model is not None
        request = pb2.ContinuePlaylistRequest(seed_song_ids=[1, 2, 3])
        with model.lock.write():  # the index is "being written": queries wait
            first = recommender.ContinuePlaylist.future(request)
            wait_until(lambda: in_flight(live) == 1)
            with pytest.raises(grpc.RpcError) as shed:
                recommender.GetModelInfo(pb2.GetModelInfoRequest())
            assert code_of(shed) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 1" in details_of(shed)
            health = health_pb2_grpc.HealthStub(channel)  # probes are never shed
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert len(first.result(timeout=10).songs) == 100
        wait_until(lambda: in_flight(live) == 0)
        with model.lock.write():
            with pytest.raises(grpc.RpcError) as late:
                recommender.ContinuePlaylist(request, timeout=0.3)
            assert code_of(late) == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: in_flight(live) == 0)
        assert len(recommender.ContinuePlaylist(request).songs) == 100
        registry = live.server.state.metrics.registry
        assert registry.get_sample_value("songrec_requests_total", {
            "method": "GetModelInfo", "code": "RESOURCE_EXHAUSTED"}) == 1
        assert registry.get_sample_value("songrec_requests_total", {
            "method": "ContinuePlaylist", "code": "DEADLINE_EXCEEDED"}) == 1


def test_drain_finishes_in_flight_calls(tiny_bundle: Path) -> None:
    live = ServerThread(ServerConfig(bundle=tiny_bundle, port=0, verify=False, grace_s=10))
    try:
        channel = live.channel()
        recommender, _ = stubs(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        model = live.server.state.model
        assert model is not None
        with model.lock.write():
            in_progress = recommender.ContinuePlaylist.future(
                pb2.ContinuePlaylistRequest(seed_song_ids=[1]))
            wait_until(lambda: in_flight(live) == 1)
            stopping = live.submit(live.server.stop())
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with grpc.insecure_channel(live.target) as late_channel:
                with pytest.raises(grpc.RpcError) as refused:
                    stubs(late_channel)[0].GetModelInfo(pb2.GetModelInfoRequest(), timeout=5)
                assert code_of(refused) == grpc.StatusCode.UNAVAILABLE
            assert not stopping.done()
        assert len(in_progress.result(timeout=10).songs) == 100
        stopping.result(timeout=5)  # no waiting out the grace period: nothing is left
        assert list(watch) == []  # the watch stream ended with the drain
        channel.close()
    finally:
        live.stop()


# ---------------------------------------------------------------- TLS


def test_tls(tiny_bundle: Path, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    config = ServerConfig(bundle=tiny_bundle, port=0, tls_cert=cert, tls_key=key,
                          verify=False)
    with ServerThread(config) as live:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{live.port}", credentials) as channel:
            info = stubs(channel)[0].GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
            assert info.loaded
        with live.channel() as plain:
            with pytest.raises(grpc.RpcError) as exc:
                stubs(plain)[0].GetModelInfo(pb2.GetModelInfoRequest(), timeout=5)
            assert code_of(exc) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- the command


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_command_serves_logs_json_and_drains_on_sigterm(tiny_bundle: Path,
                                                        tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    env = {**os.environ, "SONGREC_TOKEN": INFERENCE, "SONGREC_LOG_FORMAT": "json",
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--bundle", str(tiny_bundle), "--port", "0",
         "--admin-token-file", str(token_file), "--data-dir", str(tmp_path / "state"),
         "--no-verify"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
                continue
            seen.append(line)
            message = json.loads(line)["msg"]
            if message.startswith("listening on"):
                port = int(message.split()[2].rsplit(":", 1)[1])
        assert port is not None, "".join(seen)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
            recommender, admin = stubs(channel)
            reply = recommender.SimilarSongs(pb2.SimilarSongsRequest(song_id=1, k=2),
                                             metadata=[("authorization",
                                                        f"Bearer {INFERENCE}")])
            assert len(reply.neighbours) == 2
            assert admin.ReloadModel(pb2.ReloadModelRequest(skip_verify=True),
                                     metadata=AUTH).current.loaded
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    rest = process.stderr.read() if process.stderr else ""  # type: ignore[union-attr]
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen) + rest
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    messages = [r["msg"] for r in records]
    assert any(m.startswith("shutting down") for m in messages)
    assert messages[-1] == "stopped"
    assert ADMIN not in output and INFERENCE not in output


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port: 70000 is out of range 0..65535"),
    (["--bundle", "/no/such/bundle"], "--bundle /no/such/bundle: no such directory"),
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
])
def test_command_refuses_bad_configuration(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def run_server(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", "--port", "0", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_unusable_data_dir_is_one_line_and_status_2(tmp_path: Path) -> None:
    """A --data-dir naming a file, or on a read-only file system (root: a read-only
    tmpfs), stops the start with one line naming it (not a traceback and status 1)."""
    (tmp_path / "file").write_text("")
    cases = [(tmp_path / "file", "not a directory")]
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
        capture_output=True, timeout=30).returncode == 0
    if mounted:
        cases += [(read_only, "read-only file system"),
                  (read_only / "sub", "read-only file system")]
    try:
        for data_dir, message in cases:
            result = run_server(["--data-dir", str(data_dir), "--log-level", "ERROR"])
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stderr
            assert len(lines) == 1 and str(data_dir) in lines[0], result.stderr
            assert message in lines[0].lower(), \
                result.stderr
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(read_only)], capture_output=True, timeout=30)
    if not mounted:
        pytest.skip("the read-only case needs root and mount (a read-only tmpfs)")


def test_sighup_drains_like_sigterm(tiny_bundle: Path) -> None:
    with ServerProcess(["--bundle", str(tiny_bundle), "--no-verify"],
                       env={"OMP_NUM_THREADS": "1"}) as server, \
            grpc.insecure_channel(server.target) as channel:
        reply = pb2_grpc.RecommenderStub(channel).SimilarSongs(
            pb2.SimilarSongsRequest(song_id=1, k=2), timeout=30)
        assert len(reply.neighbours) == 2
        server.signal(signal.SIGHUP)
        assert server.wait(timeout=30) == 0
    messages = server.messages()
    assert any(m.startswith("shutting down") for m in messages) and messages[-1] == "stopped"


def test_port_in_use_is_a_clear_error() -> None:
    from server.config import ConfigError

    with ServerThread(ServerConfig(port=0)) as first:
        with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{first.port}"):
            ServerThread(ServerConfig(port=first.port))
