"""Replicas behind a balancer: nginx (deploy/nginx/songrec.conf) keeps a load test free of
failures while a replica restarts; the client balances over several addresses itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.client import ClientError, SongRecClient, balanced
from clients.loadtest import build_workload, is_loopback
from clients.replicas import Fleet, rolling_restart_under_load, serves
from clients.sidecars import LocalNginx
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.config import ServerConfig
from server.testing import ServerThread


@pytest.mark.slow  # ~45 s. A call that reaches a replica in the instant its drain begins
# is answered CANCELLED, which nginx passes on: the load test's channel retries it
# (DRAIN_RETRY; docs/OPERATIONS.md, Replicas).
def test_load_through_nginx_survives_a_rolling_restart(tiny_bundle: Path,
                                                       nginx_available: None) -> None:
    calls = build_workload("similar", bundle=tiny_bundle, pool=300, seed=3)
    with Fleet(tiny_bundle, 2, "sqlite") as fleet:
        assert fleet.nginx is not None
        # A song added through nginx is served through nginx, whichever replica answers.
        with grpc.insecure_channel(fleet.nginx.target) as channel:
            pb2_grpc.AdminStub(channel).AddSongs(pb2.AddSongsRequest(songs=[pb2.NewSong(
                song_id=86_000_001, metadata=pb2.SongMetadata(genres=["GN0100"]))]),
                metadata=fleet.auth, timeout=30)
        report = rolling_restart_under_load(fleet, calls, seconds=8.0, concurrency=4)
        assert report["ok"] > 100
        assert report["errors"] == {}, report["error_examples"]
        assert report["requests"] == report["ok"]
        # The restarted replica replayed the store.
        with grpc.insecure_channel(fleet.target(0)) as channel:
            assert serves(channel, 86_000_001)


def test_client_balances_over_several_addresses(tiny_bundle: Path) -> None:
    config = ServerConfig(bundle=tiny_bundle, port=0, verify=False, workers=1)
    with ServerThread(config) as a, ServerThread(config) as b:
        target = f"{a.target},localhost:{b.port}"
        with SongRecClient(target) as client:
            for song in range(20):
                client.similar(song, k=3)
        counts = [live.server.state.metrics.registry.get_sample_value(
            "songrec_requests_total", {"method": "SimilarSongs", "code": "OK"}) or 0
            for live in (a, b)]
        assert sum(counts) == 20 and min(counts) >= 5, counts  # round_robin: both used
        with SongRecClient(f"dns:///localhost:{a.port}") as client:
            assert client.similar(1, k=3).neighbours


def test_balanced_targets() -> None:
    assert balanced("localhost:5") == ("localhost:5", [])
    assert balanced("dns:///songrec:50051")[1] == [("grpc.lb_policy_name", "round_robin")]
    target, options = balanced("127.0.0.1:1, 127.0.0.2:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.2:2" and options
    assert balanced("[::1]:7,[::1]:8")[0] == "ipv6:[::1]:7,[::1]:8"
    with pytest.raises(ValueError, match="is not host:port"):
        balanced("127.0.0.1:1,nope")
    with pytest.raises(ValueError, match="mixes IPv4 and IPv6"):
        balanced("127.0.0.1:1,[::1]:2")
    assert is_loopback("127.0.0.1:1,localhost:2")
    assert not is_loopback("127.0.0.1:1,10.1.2.3:2")


@pytest.fixture
def cancels_once() -> Iterator[tuple[int, list[int]]]:
    """A real server that answers the first SimilarSongs CANCELLED, as a draining grpc.aio
    server answers a call it accepted but never started, and GetModelInfo always
    INVALID_ARGUMENT: its port and the song ids it was asked for."""
    seen: list[int] = []
    lock = threading.Lock()

    def similar(request: Any, context: grpc.ServicerContext) -> pb2.SimilarSongsResponse:
        with lock:
            seen.append(request.song_id)
            first = len(seen) == 1
        if first:
            context.abort(grpc.StatusCode.CANCELLED, "Server Shutdown")
        return pb2.SimilarSongsResponse(song_id=request.song_id)

    def model_info(request: Any, context: grpc.ServicerContext) -> pb2.ModelInfo:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not retried")

    handler = grpc.method_handlers_generic_handler("songrec.v1.Recommender", {
        "SimilarSongs": grpc.unary_unary_rpc_method_handler(
            similar, request_deserializer=pb2.SimilarSongsRequest.FromString,
            response_serializer=pb2.SimilarSongsResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            model_info, request_deserializer=pb2.GetModelInfoRequest.FromString,
            response_serializer=pb2.ModelInfo.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(None)


def _retries_cancelled_only(target: str, seen: list[int]) -> None:
    with SongRecClient(target) as client:
        assert client.similar(7, k=3).song_id == 7
        assert seen == [7, 7]  # CANCELLED once, then answered
        with pytest.raises(ClientError) as info:
            client.model_info()
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_client_retries_a_draining_replicas_cancelled(
        cancels_once: tuple[int, list[int]]) -> None:
    port, seen = cancels_once
    _retries_cancelled_only(f"127.0.0.1:{port}", seen)


def test_client_retries_a_cancelled_that_nginx_passes_on(
        cancels_once: tuple[int, list[int]], nginx_available: None) -> None:
    # nginx answers the client with the replica's status, as a normal answer it does not
    # retry itself; the client's channel can still retry it (nothing but the status came).
    port, seen = cancels_once
    with LocalNginx([f"127.0.0.1:{port}"]) as nginx:
        _retries_cancelled_only(nginx.target, seen)
