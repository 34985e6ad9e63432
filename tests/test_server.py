"""The gRPC server's inference API against a real server on port 0 with the tiny bundle:
answers checked for content, every validation error, health, reflection and metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.config import ServerConfig
from server.engine import Engine
from server.strategies import RANKED, STRATEGIES, Query, run_strategy
from server.testing import ServerThread

Kind = pb2.Reason


@pytest.fixture(scope="module")
def live(tiny_bundle: Path) -> Any:
    metrics_port = free_port()
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, metrics_port=metrics_port,
                                   workers=2)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(live: ServerThread) -> Any:
    with live.channel() as channel:
        yield pb2_grpc.RecommenderStub(channel)


@pytest.fixture(scope="module")
def data(tiny_split: Path) -> dict[str, Any]:
    """What the training data says, computed independently of the server."""
    train = json.loads((tiny_split / "train.json").read_text())
    meta = {m["id"]: m for m in json.loads((tiny_split / "song_meta.json").read_text())}
    questions = json.loads((tiny_split / "val_questions.json").read_text())
    song_playlists: dict[int, list[int]] = defaultdict(list)
    song_tags: dict[int, set[str]] = defaultdict(set)
    for playlist in train:
        for song in playlist["songs"]:
            song_playlists[song].append(playlist["id"])
            song_tags[song].update(playlist["tags"])
    return {"train": {p["id"]: p for p in train}, "meta": meta, "questions": questions,
            "song_playlists": song_playlists, "song_tags": song_tags}


def seeded_question(data: dict[str, Any], n: int = 3) -> dict[str, Any]:
    return next(q for q in data["questions"] if len(q["songs"]) >= n)


def code_of(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined, no-any-return]


# ---------------------------------------------------------------- ContinuePlaylist


def test_continue_playlist_default_strategy_content(stub: Any, data: dict[str, Any],
                                                    tiny_bundle: Path) -> None:
    question = seeded_question(data)
    seeds = question["songs"]
    answer = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
        seed_song_ids=[*seeds, 987654321], title=question["plylst_title"]))
    ids = [s.song_id for s in answer.songs]
    assert len(ids) == 100 and len(set(ids)) == 100
    assert not set(ids) & set(seeds)
    assert list(answer.unknown_seed_ids) == [987654321]
    assert answer.strategy == RANKED  # the default of a bundle with a ranker
    assert answer.model_version == json.loads((tiny_bundle / "manifest.json").read_text())[
        "model_version"]
    scores = [s.score for s in answer.songs]
    assert scores == sorted(scores, reverse=True)
    # Each reason is true of the training data: a neighbour playlist holds its song.
    for song in answer.songs:
        kind = song.reason.kind
        assert kind != Kind.KIND_UNSPECIFIED
        if kind == Kind.PLAYLIST_NEIGHBOUR:
            assert song.song_id in data["train"][song.reason.playlist_id]["songs"]
        if kind == Kind.SEED_NEIGHBOUR:
            assert song.reason.seed_song_id in seeds
    # Tags come from the playlists of the recommended songs, ranked, none repeated.
    tags = [t.tag for t in answer.tags]
    assert len(tags) == 10 and len(set(tags)) == 10
    held = set().union(*(data["song_tags"][i] for i in ids))
    assert set(tags) <= held
    assert [t.score for t in answer.tags] == sorted((t.score for t in answer.tags),
                                                   reverse=True)


def test_continue_playlist_quota_tags_are_votes(stub: Any, data: dict[str, Any]) -> None:
    """ae-quota: each seed's share of nearest songs; every tag scores its vote count (the
    number of recommended songs whose training playlists carry it)."""
    question = seeded_question(data)
    answer = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
        seed_song_ids=question["songs"][:3], strategy="ae-quota", n_tags=5))
    ids = [s.song_id for s in answer.songs]
    assert len(set(ids)) == 100 and not set(ids) & set(question["songs"][:3])
    assert {s.reason.kind for s in answer.songs} <= {Kind.SEED_NEIGHBOUR, Kind.POPULAR}
    per_seed: dict[int, int] = defaultdict(int)
    for song in answer.songs:
        per_seed[song.reason.seed_song_id] += 1
    assert sorted(per_seed.values(), reverse=True) == [34, 33, 33]
    assert len(answer.tags) == 5
    for tag in answer.tags:
        votes = sum(tag.tag in data["song_tags"][i] for i in ids)
        assert tag.score == pytest.approx(votes)


def test_continue_playlist_matches_offline_strategy(stub: Any, data: dict[str, Any],
                                                    tiny_bundle: Path) -> None:
    """The server answers exactly what the strategy answers on the bundle in-process."""
    engine = Engine.load(tiny_bundle)
    question = seeded_question(data, 5)
    rows = np.asarray([engine.catalog.row_of_id[s] for s in question["songs"]])
    for strategy in STRATEGIES:
        expected = run_strategy(strategy, engine.catalog, engine.songs, engine.playlists,
                                Query(rows, np.zeros(0, dtype=np.int32), n_songs=50),
                                engine.ranker)
        answer = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
            seed_song_ids=question["songs"], strategy=strategy, n_songs=50))
        assert [s.song_id for s in answer.songs] == \
            engine.catalog.song_ids[expected.songs].tolist()
        assert [t.tag for t in answer.tags] == \
            [engine.catalog.tags[t] for t in expected.tags.tolist()]


def test_continue_playlist_excludes_question_tags_and_reports_unknown(
        stub: Any, data: dict[str, Any]) -> None:
    question = next(q for q in data["questions"] if q["songs"] and q["tags"])
    answer = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
        seed_song_ids=question["songs"], tags=[*question["tags"], "no-such-tag-xyz"]))
    assert not {t.tag for t in answer.tags} & set(question["tags"])
    assert list(answer.unknown_tags) == ["no-such-tag-xyz"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_continue_playlist_cold_starts(stub: Any, data: dict[str, Any],
                                       strategy: str) -> None:
    tagged = next(q for q in data["questions"] if q["tags"] and not q["songs"])
    by_tags = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(tags=tagged["tags"],
                                                                strategy=strategy))
    titled = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
        title=data["train"][next(iter(data["train"]))]["plylst_title"], strategy=strategy))
    nothing = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(strategy=strategy))
    for answer in (by_tags, titled, nothing):
        assert len({s.song_id for s in answer.songs}) == 100
        assert len({t.tag for t in answer.tags}) == 10
    assert not {t.tag for t in by_tags.tags} & set(tagged["tags"])
    assert {s.reason.kind for s in nothing.songs} == {Kind.POPULAR}
    # Nothing known: the most popular songs, most popular first.
    counts: dict[int, int] = defaultdict(int)
    for playlist in data["train"].values():
        for song in playlist["songs"]:
            counts[song] += 1
    top = [counts[s.song_id] for s in nothing.songs]
    assert top == sorted(top, reverse=True) and top[0] == max(counts.values())


def test_continue_playlist_counts_names_and_drop_future(stub: Any,
                                                        data: dict[str, Any]) -> None:
    question = seeded_question(data)
    answer = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
        seed_song_ids=question["songs"], n_songs=7, n_tags=0, include_names=True,
        updt_date="2012-06-30 10:00:00.000", drop_future=True))
    assert len(answer.songs) == 7 and len(answer.tags) == 0
    for song in answer.songs:
        meta = data["meta"][song.song_id]
        assert song.name == meta["song_name"]
        assert song.artists == ", ".join(meta["artist_name_basket"])
        assert int(meta["issue_date"]) <= 20120630
    unnamed = stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(
        seed_song_ids=question["songs"], n_songs=3))
    assert all(s.name == "" for s in unnamed.songs)


# ---------------------------------------------------------------- SimilarSongs


def test_similar_songs_are_cosine_neighbours(stub: Any, tiny_bundle: Path) -> None:
    engine = Engine.load(tiny_bundle)
    vectors = engine.songs.vectors(np.arange(engine.catalog.n_songs))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    song_id = int(engine.catalog.song_ids[10])
    answer = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=song_id, k=20))
    assert answer.song_id == song_id and len(answer.neighbours) == 20
    ids = [n.song_id for n in answer.neighbours]
    assert song_id not in ids and len(set(ids)) == 20
    sims = np.asarray([n.similarity for n in answer.neighbours])
    assert np.all(np.diff(sims) <= 1e-6)
    rows = [engine.catalog.row_of_id[i] for i in ids]
    np.testing.assert_allclose(sims, unit[rows] @ unit[10], atol=1e-4)
    # Recall against brute force, by value (identical songs tie at the same similarity).
    exact = np.sort(np.delete(unit @ unit[10], 10))[::-1][:20]
    assert np.sum(sims >= exact[-1] - 1e-5) >= 19
    # Exclusions are honoured and the list refills to k.
    fewer = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=song_id, k=20,
                                                      exclude_song_ids=ids[:5]))
    assert len(fewer.neighbours) == 20
    assert not {n.song_id for n in fewer.neighbours} & set(ids[:5])
    default = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=song_id))
    assert [n.song_id for n in default.neighbours] == ids[:10]


def test_similar_songs_concurrent_calls_agree_with_single_calls(live: ServerThread,
                                                                 stub: Any) -> None:
    """Concurrent lookups are batched into one index query; each still gets its own
    answer (own k, own exclusions)."""
    with live.channel() as channel:
        pool = pb2_grpc.RecommenderStub(channel)
        requests = [pb2.SimilarSongsRequest(song_id=i, k=3 + i % 5,
                                            exclude_song_ids=[i + 1] if i % 2 else [])
                    for i in range(40)]
        futures = [pool.SimilarSongs.future(r) for r in requests]
        answers = [f.result() for f in futures]
    for request, answer in zip(requests, answers, strict=True):
        single = stub.SimilarSongs(request)
        assert answer.song_id == request.song_id
        assert [n.song_id for n in answer.neighbours] == [n.song_id for n in single.neighbours]
        assert len(answer.neighbours) == request.k
        assert not {n.song_id for n in answer.neighbours} & set(request.exclude_song_ids)


def test_similar_songs_batch(stub: Any) -> None:
    answer = stub.SimilarSongsBatch(pb2.SimilarSongsBatchRequest(
        song_ids=[3, 999999, 7, 3], k=5, exclude_song_ids=[1], include_names=True))
    assert [r.song_id for r in answer.results] == [3, 7]
    assert list(answer.unknown_song_ids) == [999999]
    for result in answer.results:
        single = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=result.song_id, k=5,
                                                           exclude_song_ids=[1]))
        assert [n.song_id for n in result.neighbours] == \
            [n.song_id for n in single.neighbours]
        assert all(n.name for n in result.neighbours)


# ---------------------------------------------------------------- EncodeSong


def test_encode_song_reproduces_a_known_song(stub: Any, data: dict[str, Any]) -> None:
    """Encoding a bundle song's own metadata lands on that song."""
    song_id = next(iter(data["song_playlists"]))
    meta = data["meta"][song_id]
    answer = stub.EncodeSong(pb2.EncodeSongRequest(song=pb2.SongMetadata(
        genres=meta["song_gn_gnr_basket"], detail_genres=meta["song_gn_dtl_gnr_basket"],
        artist_ids=meta["artist_id_basket"], issue_date=meta["issue_date"],
        playlist_ids=data["song_playlists"][song_id],
        tags=sorted(data["song_tags"][song_id])), k=5))
    assert len(answer.code) == stub.GetModelInfo(pb2.GetModelInfoRequest()).code_dim
    assert answer.known_columns > 0
    # The song itself, or songs with exactly its input row, at similarity 1.
    assert song_id in [n.song_id for n in answer.neighbours if n.similarity > 0.999]
    assert answer.neighbours[0].similarity > 0.999
    unseen = stub.EncodeSong(pb2.EncodeSongRequest(song=pb2.SongMetadata(
        genres=["GN0100"], detail_genres=["GN0105"], issue_date="20190300")))
    assert len(unseen.neighbours) == 10 and unseen.known_columns == 2
    bare = stub.EncodeSong(pb2.EncodeSongRequest(song=pb2.SongMetadata(genres=["GN0100"]),
                                                 k=0))
    assert len(bare.neighbours) == 0 and len(bare.code) == len(answer.code)


# ---------------------------------------------------------------- errors


def _meta(**fields: Any) -> pb2.SongMetadata:
    return pb2.SongMetadata(**{"genres": ["GN0100"], **fields})


CP, SS, SB, ES = ("ContinuePlaylist", pb2.ContinuePlaylistRequest), \
    ("SimilarSongs", pb2.SimilarSongsRequest), \
    ("SimilarSongsBatch", pb2.SimilarSongsBatchRequest), ("EncodeSong", pb2.EncodeSongRequest)
# (method and request type, request fields, what the status details must say)
BAD_REQUESTS: list[tuple[tuple[str, Any], dict[str, Any], str]] = [
    (CP, {"n_songs": 0}, "n_songs: 0 is out of range 1..1000"),
    (CP, {"n_songs": 1001}, "n_songs: 1001"),
    (CP, {"n_tags": 101}, "n_tags: 101 is out of range 0..100"),
    (CP, {"seed_song_ids": range(1001)}, "seed_song_ids: 1001 entries, allowed 0..1000"),
    (CP, {"seed_song_ids": [1, -2]}, "seed_song_ids[1]: -2 is negative"),
    (CP, {"tags": ["x"] * 257}, "tags: 257 entries"),
    (CP, {"title": "a" * 1001}, "title: 1001 characters"),
    (CP, {"updt_date": "2020-02-30"}, "updt_date: '2020-02-30' is not a date"),
    (CP, {"updt_date": "yesterday"}, "updt_date"),
    (CP, {"updt_date": "2020-01-01 25:00:00"}, "updt_date"),
    (CP, {"strategy": "best"}, "strategy: 'best' is unknown; known: ae-quota, ae-neighbours"),
    (SS, {"song_id": 1, "k": 0}, "k: 0 is out of range 1..1000"),
    (SS, {"song_id": 1, "k": 1001}, "k: 1001"),
    (SS, {"song_id": -1}, "song_id[0]: -1 is negative"),
    (SS, {"song_id": 1, "exclude_song_ids": range(1001)}, "exclude_song_ids: 1001 entries"),
    (SB, {}, "song_ids: 0 entries, allowed 1..1000"),
    (SB, {"song_ids": range(200), "k": 1000}, "song_ids x k: 200 x 1000"),
    (ES, {}, "song: missing"),
    (ES, {"song": _meta(genres=["GN0101"])}, "song.genres[0]: 'GN0101' is not a major genre"),
    (ES, {"song": _meta(detail_genres=["rock"])}, "song.detail_genres[0]: 'rock' is not a"),
    (ES, {"song": _meta(issue_date="2019-03-01")}, "song.issue_date: '2019-03-01' is not"),
    (ES, {"song": _meta(issue_date="2019130")}, "song.issue_date: '2019130' is not YYYYMMDD"),
    (ES, {"song": _meta(artist_ids=[-5])}, "song.artist_ids[0]: -5 is negative"),
    (ES, {"song": _meta(), "k": 1001}, "k: 1001 is out of range 0..1000"),
    (ES, {"song": pb2.SongMetadata(genres=["GN9900"])}, "song: none of its metadata is known"),
]


@pytest.mark.parametrize(("rpc", "fields", "message"), BAD_REQUESTS,
                         ids=[m[2].split(":")[0] for m in BAD_REQUESTS])
def test_invalid_arguments_name_the_field(stub: Any, rpc: tuple[str, Any],
                                          fields: dict[str, Any], message: str) -> None:
    method, request_type = rpc
    with pytest.raises(grpc.RpcError) as exc:
        getattr(stub, method)(request_type(**fields))
    assert code_of(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert message in exc.value.details()  # type: ignore[attr-defined]


def test_unknown_song_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=123456789))
    assert code_of(exc) == grpc.StatusCode.NOT_FOUND
    assert "123456789" in exc.value.details()  # type: ignore[attr-defined]


def test_oversized_message_is_resource_exhausted(tiny_bundle: Path) -> None:
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, max_message_bytes=16384,
                                   verify=False, similar_batch=0)) as small:
        with small.channel() as channel:
            stub = pb2_grpc.RecommenderStub(channel)
            with pytest.raises(grpc.RpcError) as exc:
                stub.ContinuePlaylist(pb2.ContinuePlaylistRequest(tags=["t" * 200] * 200))
            assert code_of(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The unbatched SimilarSongs path answers the same as the batched one.
            answer = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=3, k=5))
            assert len(answer.neighbours) == 5
            # An answer over the limit is refused by the server, which says why and counts
            # it as refused (gRPC alone would fail it after the metrics said OK).
            ids = small.server.state.require_model().engine.catalog.song_ids[:50].tolist()
            with pytest.raises(grpc.RpcError) as exc:
                stub.SimilarSongsBatch(pb2.SimilarSongsBatchRequest(song_ids=ids, k=100,
                                                                    include_names=True))
            assert code_of(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "16384-byte message limit" in exc.value.details()  # type: ignore[attr-defined]
            registry = small.server.state.metrics.registry
            labels = {"method": "SimilarSongsBatch", "code": "RESOURCE_EXHAUSTED"}
            # The server records the call just after the client has its answer.
            for _ in range(100):
                if registry.get_sample_value("songrec_requests_total", labels) == 1:
                    break
                time.sleep(0.02)
            assert registry.get_sample_value("songrec_requests_total", labels) == 1
            assert registry.get_sample_value("songrec_requests_total", {
                "method": "SimilarSongsBatch", "code": "OK"}) is None


# ---------------------------------------------------------------- metadata, health, ops


def test_model_info(stub: Any, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    info = stub.GetModelInfo(pb2.GetModelInfoRequest())
    assert info.loaded and info.model_version == manifest["model_version"]
    assert info.code_dim == manifest["code_dim"] == info.song_index.dim
    assert info.song_index.count == manifest["song_index"]["count"]
    assert info.bundle_songs >= info.song_index.count  # the index may fold duplicate songs
    assert info.indexed_songs == info.bundle_songs + info.added_songs
    assert dict(info.column_groups) == manifest["column_groups"]
    assert list(info.strategies) == list(STRATEGIES)
    assert info.default_strategy == RANKED  # trainer.train adds the ranker by default
    assert info.song_index.ef == manifest["song_index"]["ef"]
    assert info.song_index.m == manifest["song_index"]["m"]


def test_health(live: ServerThread) -> None:
    with live.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "songrec.v1.Recommender", "songrec.v1.Admin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as exc:
            health.Check(health_pb2.HealthCheckRequest(service="nope.Service"))
        assert code_of(exc) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_services(live: ServerThread) -> None:
    with live.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="songrec.v1.Recommender")]
        listed, described = list(stub.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {"songrec.v1.Recommender", "songrec.v1.Admin", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0])
    assert proto.package == "songrec.v1"
    assert "ContinuePlaylist" in {m.name for s in proto.service for m in s.method}


def test_metrics_endpoint(live: ServerThread, stub: Any) -> None:
    stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=1, k=3))
    with pytest.raises(grpc.RpcError):
        stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=1, k=0))
    port = live.server.metrics_port
    assert port == live.config.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    body = text.decode()
    assert 'songrec_requests_total{code="OK",method="SimilarSongs"}' in body
    assert 'songrec_requests_total{code="INVALID_ARGUMENT",method="SimilarSongs"}' in body
    assert 'songrec_request_seconds_bucket{code="OK",le="0.005",method="SimilarSongs"}' \
        in body
    version = stub.GetModelInfo(pb2.GetModelInfoRequest()).model_version
    assert f'songrec_model_info{{model_version="{version}"}} 1.0' in body
    indexed = stub.GetModelInfo(pb2.GetModelInfoRequest()).indexed_songs
    assert f"songrec_indexed_songs {float(indexed)}" in body
    assert "songrec_similar_batch_size_count" in body


def test_ef_overrides_are_served_and_reported(tiny_bundle: Path) -> None:
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, verify=False,
                                   song_ef=37, playlist_ef=23)) as server:
        with server.channel() as channel:
            info = pb2_grpc.RecommenderStub(channel).GetModelInfo(pb2.GetModelInfoRequest())
        assert info.song_index.ef == 37
        assert info.playlist_index.ef == 23
        model = server.server.state.require_model()
        assert model.engine.songs.index.ef == 37
        assert model.engine.playlists.index.ef == 23
    from server.config import load_config

    for flag in ("--song-ef", "--playlist-ef"):
        with pytest.raises(Exception, match=flag):
            load_config([flag, "-1"], environ={})
    assert load_config(["--playlist-ef", "64"], environ={}).playlist_ef == 64
