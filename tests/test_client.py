"""The typed clients (sync and asyncio) against a real server on port 0 with the tiny bundle:
every method's answer, errors mapped to :class:`ClientError` with code and message,
deadlines, and retries of UNAVAILABLE only (against real gRPC servers, nothing mocked)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port

from clients.client import (
    NO_RETRY,
    AsyncSongRecClient,
    ClientError,
    NewSong,
    RetryPolicy,
    SongMetadata,
    SongRecClient,
)
from protos.songrec.v1 import songrec_pb2 as pb2
from server.config import ServerConfig
from server.testing import ServerThread

ADMIN = "client-test-admin"
INFERENCE = "client-test-inference"
UNKNOWN = 987_654_321
REASONS = {"seed_neighbour", "playlist_neighbour", "tag", "title", "popular", "als", "artist"}


@pytest.fixture(scope="module")
def live(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, token=INFERENCE,
                          data_dir=tmp_path_factory.mktemp("client-wal"), workers=2,
                          verify=False)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(live: ServerThread) -> Iterator[SongRecClient]:
    with SongRecClient(live.target, token=INFERENCE) as c:
        yield c


@pytest.fixture(scope="module")
def meta(tiny_split: Path) -> dict[int, dict[str, Any]]:
    return {m["id"]: m for m in json.loads((tiny_split / "song_meta.json").read_text())}


@pytest.fixture(scope="module")
def question(tiny_split: Path) -> dict[str, Any]:
    questions = json.loads((tiny_split / "val_questions.json").read_text())
    return next(q for q in questions if len(q["songs"]) >= 3)


# ---------------------------------------------------------------- every method


def test_similar_names_and_exclusion(client: SongRecClient, question: dict[str, Any],
                                     meta: dict[int, dict[str, Any]]) -> None:
    song = question["songs"][0]
    result = client.similar(song, k=5, include_names=True)
    ids = [n.song_id for n in result.neighbours]
    assert result.song_id == song and len(ids) == 5 == len(set(ids)) and song not in ids
    sims = [n.similarity for n in result.neighbours]
    assert sims == sorted(sims, reverse=True) and all(-1.001 <= s <= 1.001 for s in sims)
    for n in result.neighbours:  # names come from the bundle's copy of song_meta
        assert n.name == meta[n.song_id]["song_name"]
        assert n.artists == ", ".join(meta[n.song_id]["artist_name_basket"])
    without = client.similar(song, k=5, exclude=[ids[0]])
    assert ids[0] not in [n.song_id for n in without.neighbours]
    assert [n.name for n in without.neighbours] == [""] * 5  # no names unless asked
    assert result.model_version == client.model_info().model_version


def test_similar_batch_reports_unknown(client: SongRecClient,
                                       question: dict[str, Any]) -> None:
    a, b = question["songs"][:2]
    batch = client.similar_batch([a, UNKNOWN, b], k=3)
    assert [r.song_id for r in batch.results] == [a, b]
    assert batch.unknown_song_ids == (UNKNOWN,)
    assert batch.results[0].neighbours == client.similar(a, k=3).neighbours


def test_continue_playlist(client: SongRecClient, question: dict[str, Any],
                           meta: dict[int, dict[str, Any]]) -> None:
    seeds = question["songs"][:3]
    result = client.continue_playlist([*seeds, UNKNOWN], ["no-such-tag-xyz"],
                                      question["plylst_title"], include_names=True)
    ids = [s.song_id for s in result.songs]
    assert len(ids) == 100 == len(set(ids)) and not set(ids) & set(seeds)
    assert result.unknown_seed_ids == (UNKNOWN,)
    assert result.unknown_tags == ("no-such-tag-xyz",)
    assert result.strategy == client.model_info().default_strategy
    assert {s.reason.kind for s in result.songs} <= REASONS
    for s in result.songs:
        assert s.name == meta[s.song_id]["song_name"]
        if s.reason.kind in ("seed_neighbour", "artist"):
            assert s.reason.source in seeds
    assert len(result.tags) == 10 == len({t.tag for t in result.tags})
    short = client.continue_playlist(seeds, n_songs=7, n_tags=0, strategy="ae-quota")
    assert len(short.songs) == 7 and short.tags == () and short.strategy == "ae-quota"


def test_encode_song(client: SongRecClient, question: dict[str, Any],
                     meta: dict[int, dict[str, Any]]) -> None:
    record = meta[question["songs"][0]]
    song = SongMetadata.from_song_meta(record)
    assert song.genres == tuple(record["song_gn_gnr_basket"])
    result = client.encode(song, k=4)
    info = client.model_info()
    assert len(result.code) == info.code_dim and result.known_columns > 0
    assert len(result.neighbours) == 4
    assert client.encode(song, k=0).neighbours == ()


def test_model_info_matches_manifest(client: SongRecClient, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    info = client.model_info()
    assert info.loaded and info.model_version == manifest["model_version"]
    assert info.code_dim == manifest["code_dim"] and info.input_dim == manifest["input_dim"]
    assert info.column_groups == manifest["column_groups"]
    assert info.song_index.count == manifest["song_index"]["count"]
    assert info.song_index.ef == manifest["song_index"]["ef"]
    assert info.default_strategy in info.strategies
    assert info.indexed_songs == info.bundle_songs + info.added_songs


def test_health(client: SongRecClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("songrec.v1.Recommender") == "SERVING"
    with pytest.raises(ClientError) as err:
        client.health("no.such.Service")
    assert err.value.code is grpc.StatusCode.NOT_FOUND
    assert client.wait_serving(timeout=5) < 5


def test_add_songs_admin_and_idempotent(live: ServerThread, client: SongRecClient,
                                        meta: dict[int, dict[str, Any]]) -> None:
    record = dict(next(iter(meta.values())), id=8_000_001, song_name="새 노래")
    song = NewSong.from_song_meta(record)
    with pytest.raises(ClientError) as err:
        client.add_songs([song])  # the inference token does not grant admin RPCs
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.method == "AddSongs" and err.value.attempts == 1
    with SongRecClient(live.target, token=ADMIN) as admin:
        first = admin.add_songs([song])
        again = admin.add_songs([song])
    assert first.added_song_ids == (8_000_001,) and first.existing_song_ids == ()
    assert again.added_song_ids == () and again.existing_song_ids == (8_000_001,)
    assert again.indexed_songs == first.indexed_songs
    found = client.similar(8_000_001, k=3, include_names=True)
    assert len(found.neighbours) == 3
    assert client.similar(found.neighbours[0].song_id, k=50, include_names=True)


def test_reload_model(live: ServerThread) -> None:
    with SongRecClient(live.target, token=ADMIN) as admin:
        before = admin.model_info()
        reloaded = admin.reload_model(skip_verify=True)
    assert reloaded.previous.model_version == before.model_version
    assert reloaded.current.model_version == before.model_version
    assert reloaded.seconds > 0


# ---------------------------------------------------------------- errors and deadlines


def test_errors_keep_code_and_message(live: ServerThread, client: SongRecClient) -> None:
    with pytest.raises(ClientError) as err:
        client.similar(UNKNOWN)
    assert err.value.code is grpc.StatusCode.NOT_FOUND
    assert str(UNKNOWN) in err.value.message and err.value.attempts == 1
    assert str(err.value).startswith("SimilarSongs: NOT_FOUND: ")
    with pytest.raises(ClientError) as err:
        client.similar(1, k=0)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("k: 0 is out of range")
    with pytest.raises(ClientError) as err:
        client.continue_playlist(updt_date="yesterday")
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "updt_date" in err.value.message
    with SongRecClient(live.target, token="") as anonymous:
        with pytest.raises(ClientError) as err:
            anonymous.model_info()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_token_from_environment(live: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SONGREC_TOKEN", INFERENCE)
    monkeypatch.setenv("SONGREC_TARGET", live.target)
    with SongRecClient() as c:
        assert c.target == live.target and c.model_info().loaded


class Slow(grpc.GenericRpcHandler):
    """GetModelInfo answers after ``delay`` seconds; counts its calls."""

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, 0

    def service(self, details: Any) -> Any:
        if details.method != "/songrec.v1.Recommender/GetModelInfo":
            return None

        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            time.sleep(self.delay)
            return pb2.ModelInfo(loaded=True, model_version="slow-1").SerializeToString()

        return grpc.unary_unary_rpc_method_handler(behaviour)


def test_deadline_exceeded_is_not_retried() -> None:
    handler = Slow(0.5)
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with SongRecClient(f"127.0.0.1:{port}", deadline=0.1) as hasty:
            start = time.monotonic()
            with pytest.raises(ClientError) as err:
                hasty.model_info()
            assert time.monotonic() - start < 0.45
            assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert err.value.attempts == 1 and handler.calls == 1
            # A per-call deadline overrides the client's default.
            assert hasty.model_info(deadline=5).model_version == "slow-1"
    finally:
        server.stop(0)


def test_unavailable_is_retried_with_backoff() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(attempts=3, initial=0.1, maximum=0.1)
    with SongRecClient(target, retry=policy, deadline=10) as c:
        start = time.monotonic()
        with pytest.raises(ClientError) as err:
            c.model_info()
        elapsed = time.monotonic() - start
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3
    assert elapsed >= 0.1  # two pauses of 0.05-0.1 s
    with SongRecClient(target, retry=NO_RETRY) as c:
        with pytest.raises(ClientError) as err:
            c.model_info()
    assert err.value.attempts == 1
    # The deadline bounds the retries too: no pause past it.
    slow = RetryPolicy(attempts=10, initial=5.0, maximum=5.0)
    with SongRecClient(target, retry=slow, deadline=1.0) as c:
        start = time.monotonic()
        with pytest.raises(ClientError) as err:
            c.model_info()
    assert time.monotonic() - start < 1.5 and err.value.attempts == 1


class Flaky(grpc.GenericRpcHandler):
    """GetModelInfo fails with ``code`` for the first ``failures`` calls, then answers."""

    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures, self.code, self.calls = failures, code, 0

    def service(self, details: Any) -> Any:
        if details.method != "/songrec.v1.Recommender/GetModelInfo":
            return None

        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            if self.calls <= self.failures:
                context.abort(self.code, f"try {self.calls} fails")
            return pb2.ModelInfo(loaded=True, model_version="flaky-1").SerializeToString()

        return grpc.unary_unary_rpc_method_handler(behaviour)


@pytest.mark.parametrize(("code", "calls"), [(grpc.StatusCode.UNAVAILABLE, 3),
                                             (grpc.StatusCode.INTERNAL, 1),
                                             (grpc.StatusCode.RESOURCE_EXHAUSTED, 1)])
def test_only_unavailable_is_retried(code: grpc.StatusCode, calls: int) -> None:
    handler = Flaky(2, code)
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with SongRecClient(f"127.0.0.1:{port}",
                           retry=RetryPolicy(attempts=4, initial=0.01)) as c:
            if code is grpc.StatusCode.UNAVAILABLE:
                assert c.model_info().model_version == "flaky-1"
            else:
                with pytest.raises(ClientError) as err:
                    c.model_info()
                assert err.value.code is code and err.value.message == "try 1 fails"
    finally:
        server.stop(0)
    assert handler.calls == calls


# ---------------------------------------------------------------- asyncio, TLS, parsing


def test_async_client(live: ServerThread, question: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with AsyncSongRecClient(live.target, token=INFERENCE) as c:
            song = question["songs"][0]
            similar, info = await asyncio.gather(c.similar(song, k=4), c.model_info())
            assert len(similar.neighbours) == 4 and info.loaded
            batch = await c.similar_batch([song], k=4)
            assert batch.results[0].neighbours == similar.neighbours
            cont = await c.continue_playlist(question["songs"][:2], n_songs=9)
            assert len(cont.songs) == 9
            encoded = await c.encode(SongMetadata(genres=("GN0100",)), k=2)
            assert len(encoded.code) == info.code_dim
            assert await c.health() == "SERVING"
            with pytest.raises(ClientError) as err:
                await c.similar(UNKNOWN)
            assert err.value.code is grpc.StatusCode.NOT_FOUND
            with pytest.raises(ClientError) as err:
                await c.add_songs([NewSong(1, SongMetadata(genres=("GN0100",)))])
            assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
        async with AsyncSongRecClient(f"127.0.0.1:{free_port()}",
                                      retry=RetryPolicy(attempts=2, initial=0.01)) as dead:
            with pytest.raises(ClientError) as err:
                await dead.model_info()
            assert err.value.code is grpc.StatusCode.UNAVAILABLE and err.value.attempts == 2

    asyncio.run(scenario())


def test_tls(tiny_bundle: Path, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    config = ServerConfig(bundle=tiny_bundle, port=0, tls_cert=cert, tls_key=key,
                          verify=False, workers=1)
    with ServerThread(config) as live:
        with SongRecClient(f"localhost:{live.port}", root_certificates=cert.read_bytes()) as c:
            assert c.model_info().loaded
        with SongRecClient(f"localhost:{live.port}", retry=NO_RETRY, deadline=5) as plain:
            with pytest.raises(ClientError) as err:
                plain.model_info()  # plaintext to a TLS port
            assert err.value.code is grpc.StatusCode.UNAVAILABLE


def test_song_meta_parsing() -> None:
    record = {"id": 5, "song_name": "노래", "artist_id_basket": [1, 2],
              "artist_name_basket": ["가", "나"], "song_gn_gnr_basket": ["GN0100"],
              "song_gn_dtl_gnr_basket": ["GN0101"], "issue_date": "20190301",
              "album_id": 3}
    song = NewSong.from_song_meta(record)
    assert song == NewSong(5, SongMetadata(("GN0100",), ("GN0101",), (1, 2), "20190301"),
                           "노래", "가, 나")
    for bad, field in [({"id": -1}, "id"), ({"id": "5"}, "id"),
                       ({"id": 1, "artist_id_basket": ["x"]}, "artist_id_basket"),
                       ({"id": 1, "song_gn_gnr_basket": "GN0100"}, "song_gn_gnr_basket"),
                       ({"id": 1, "issue_date": 2019.5}, "issue_date")]:
        with pytest.raises(ValueError, match=field):
            NewSong.from_song_meta(bad)
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="deadline"):
        SongRecClient("127.0.0.1:1", deadline=0)
