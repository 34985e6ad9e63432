"""``--processes N``: servers forked after the load share the port, the work and the model's
answers; a dead one stops the rest; writes and reloads are refused with the reason."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import free_port

from clients.benchtools import ServerProcess
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.config import ConfigError, load_config
from server.live import LiveModel
from server.validation import similar_params

ADMIN = "processes-admin-token"


def two_free_ports() -> int:
    """A port p with p + 1 free too (the second process's metrics port)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def start(tiny_bundle: Path, *more: str) -> ServerProcess:
    server = ServerProcess(["--bundle", str(tiny_bundle), "--no-verify", "--processes", "2",
                            "--port", str(free_port()), "--log-level", "DEBUG", *more],
                           env={"SONGREC_ADMIN_TOKEN": ADMIN})
    end = time.monotonic() + 60
    while sum(m.startswith("serving model") for m in server.messages()) < 2:
        assert time.monotonic() < end, server.tail()
        time.sleep(0.1)
    return server


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_processes_share_the_port_and_give_the_same_answers(tiny_bundle: Path) -> None:
    reference = LiveModel.load(tiny_bundle, verify=False, capacity=10, threads=1)
    songs = reference.engine.catalog.song_ids[:6].tolist()
    want = {s: reference.similar_one(similar_params(pb2.SimilarSongsRequest(song_id=s, k=5)))
            for s in songs}
    metrics_port = two_free_ports()
    server = start(tiny_bundle, "--metrics-port", str(metrics_port))
    try:
        forked = children(server.pid)
        assert len(forked) == 2
        for i in range(30):  # a connection each: the kernel spreads them over both
            song = songs[i % len(songs)]
            with grpc.insecure_channel(server.target) as channel:
                got = pb2_grpc.RecommenderStub(channel).SimilarSongs(
                    pb2.SimilarSongsRequest(song_id=song, k=5), timeout=30)
            assert [n.song_id for n in got.neighbours] == want[song].ids
            np.testing.assert_allclose([n.similarity for n in got.neighbours],
                                       want[song].similarities, rtol=1e-6)
        served_by = {json.loads(line)["pid"] for line in server.log_lines()
                     if '"rpc SimilarSongs OK' in line}
        assert served_by == set(forked)
        # Each process counts its own calls on its own metrics port: 30 between them.
        counted = 0.0
        for port in (metrics_port, metrics_port + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                body = page.read().decode()
            line = next(x for x in body.splitlines() if x.startswith(
                'songrec_requests_total{code="OK",method="SimilarSongs"}'))
            counted += float(line.split()[-1])
        assert counted == 30
        with grpc.insecure_channel(server.target) as channel:
            admin = pb2_grpc.AdminStub(channel)
            auth = [("authorization", f"Bearer {ADMIN}")]
            # A reload would reach one process; AddSongs needs a store (none here).
            for call, request, why in (
                    (admin.AddSongs, pb2.AddSongsRequest(songs=[pb2.NewSong(
                        song_id=10**9, metadata=pb2.SongMetadata(genres=["GN0100"]))]),
                     "needs a song store"),
                    (admin.ReloadModel, pb2.ReloadModelRequest(), "--processes 2")):
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, metadata=auth, timeout=30)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert why in refused.value.details()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in forked)
    finally:
        server.kill()


def test_a_process_that_dies_stops_the_server(tiny_bundle: Path) -> None:
    server = start(tiny_bundle)
    try:
        first, second = children(server.pid)
        os.kill(first, signal.SIGKILL)
        assert server.wait(timeout=60) == 1
        assert not alive(second)
        assert any("stopping the others" in m for m in server.messages())
    finally:
        server.kill()


@pytest.mark.parametrize("args, problem", [
    (["--processes", "2", "--port", "5000"], "needs --bundle"),
    (["--processes", "2", "--bundle", "b", "--port", "0"], "fixed --port"),
    (["--processes", "0"], "--processes: 0 is out of range"),
])
def test_processes_flag_is_checked(args: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(args, environ={})
