"""``python -m clients.loadtest``, the echo server and the serving benchmark's pieces: short
bounded runs against a real server on port 0 (tiny bundle) and a real echo server, with
zero errors and a well-formed report; realistic request pools; loopback only by default."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clients import bench_serving
from clients.benchtools import replace_marked
from clients.echo_server import start_echo, synthetic_responses
from clients.loadtest import (
    LoadConfig,
    LoadError,
    LoadResult,
    RequestShape,
    Samples,
    build_workload,
    is_loopback,
    main,
    run,
    split_config,
    summarize,
)
from protos.songrec.v1 import songrec_pb2 as pb2
from server.config import ServerConfig
from server.testing import ServerThread


@pytest.fixture(scope="module")
def live(tiny_bundle: Path) -> Iterator[ServerThread]:
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, workers=2,
                                   verify=False)) as running:
        yield running


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    """An echo server on its own event loop thread; yields its target."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(
        start_echo(synthetic_responses(code_dim=64)), loop).result(30)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def check_report(report: dict[str, Any], rpcs: set[str]) -> None:
    """Zero errors, every RPC present, consistent counts and ordered percentiles."""
    assert report["errors"] == {} and report["ok"] == report["requests"] > 0
    assert set(report["by_rpc"]) == rpcs
    assert sum(p["ok"] for p in report["by_rpc"].values()) == report["ok"]
    assert report["requests_per_s"] == pytest.approx(report["requests"] / report["window_s"],
                                                     rel=0.01)
    for part in [report, *report["by_rpc"].values()]:
        lat = part["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert sum(report["histogram"]["counts"]) == report["ok"]


def test_mixed_closed_loop_from_questions(live: ServerThread, tiny_split: Path,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    status = main(["--target", live.target, "--rpc", "mixed", "--questions",
                   str(tiny_split / "val_questions.json"), "--duration", "1.5", "--warmup",
                   "0.2", "--concurrency", "4", "--pool", "200", "--json-out", str(out),
                   "--plot", str(png)])
    printed = capsys.readouterr().out
    assert status == 0
    report = json.loads(out.read_text())
    check_report(report, {"continue", "similar", "encode"})
    assert report["mode"] == "closed" and report["concurrency"] == 4
    assert 1.4 <= report["window_s"] < 5
    assert printed.splitlines()[0].startswith(f"{live.target}  rpc mixed, closed loop")
    assert any(line.split()[:3] == ["all", str(report["requests"]), str(report["ok"])]
               for line in printed.splitlines())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_request_count_bound_and_bundle_source(live: ServerThread, tiny_bundle: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    assert main(["--target", live.target, "--rpc", "mixed", "--bundle", str(tiny_bundle),
                 "--requests", "60", "--concurrency", "3", "--warmup", "0",
                 "--pool", "100", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_report(report, {"continue", "similar", "encode"})
    assert report["requests"] == 60


def test_open_loop_rate(live: ServerThread, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    assert main(["--target", live.target, "--rpc", "similar", "--bundle", str(tiny_bundle),
                 "--rate", "100", "--duration", "1", "--warmup", "0", "--concurrency", "16",
                 "--pool", "50", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_report(report, {"similar"})
    assert report["mode"] == "open" and report["rate"] == 100
    assert 50 <= report["requests"] <= 160  # Poisson arrivals at 100/s for 1 s


def test_two_processes(live: ServerThread, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    assert main(["--target", live.target, "--rpc", "similar", "--bundle", str(tiny_bundle),
                 "--requests", "40", "--processes", "2", "--concurrency", "2",
                 "--warmup", "0", "--pool", "50", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_report(report, {"similar"})
    assert report["requests"] == 40 and report["processes"] == 2


def test_echo_server_answers_real_message_shapes(echo: str, tiny_bundle: Path) -> None:
    with grpc.insecure_channel(echo) as channel:
        raw = channel.unary_unary("/songrec.v1.Recommender/SimilarSongs")(b"", timeout=5)
        assert len(pb2.SimilarSongsResponse.FromString(raw).neighbours) == 100
        raw = channel.unary_unary("/songrec.v1.Recommender/ContinuePlaylist")(b"x", timeout=5)
        answer = pb2.ContinuePlaylistResponse.FromString(raw)
        assert len(answer.songs) == 100 and len(answer.tags) == 10
        raw = channel.unary_unary("/songrec.v1.Recommender/EncodeSong")(b"", timeout=5)
        assert len(pb2.EncodeSongResponse.FromString(raw).code) == 64
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/songrec.v1.Admin/AddSongs")(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    calls = build_workload("mixed", bundle=tiny_bundle, pool=60)
    result = run(LoadConfig(target=echo, concurrency=4, duration=None,
                               requests=80, warmup=0), calls, "mixed")
    check_report(result.report, {"continue", "similar", "encode"})


def test_workloads_are_realistic(tiny_split: Path, tiny_bundle: Path) -> None:
    questions = json.loads((tiny_split / "val_questions.json").read_text())
    asked = {s for q in questions for s in q["songs"]}
    calls = build_workload("continue", questions=tiny_split / "val_questions.json", pool=100,
                           shape=RequestShape(seeds=(1, 20)))
    requests = [pb2.ContinuePlaylistRequest.FromString(c.payload) for c in calls]
    assert len(requests) == 100 and len({c.payload for c in calls}) > 30
    for r in requests:
        assert 1 <= len(r.seed_song_ids) <= 20 and set(r.seed_song_ids) <= asked
        assert r.n_songs == 100 and r.n_tags == 10
    similar = [pb2.SimilarSongsRequest.FromString(c.payload)
               for c in build_workload("similar", bundle=tiny_bundle, pool=100)]
    ids = set(np.load(tiny_bundle / "arrays.npz")["song_ids"].tolist())
    assert all(r.k == 100 and r.song_id in ids for r in similar)
    assert len({r.song_id for r in similar}) > 20
    encode = [pb2.EncodeSongRequest.FromString(c.payload)
              for c in build_workload("encode", bundle=tiny_bundle, pool=50)]
    assert all(r.song.genres and all(g.endswith("00") for g in r.song.genres)
               for r in encode)
    mixed = build_workload("mixed", bundle=tiny_bundle, pool=100,
                           mix={"continue": 1, "similar": 3, "encode": 0})
    assert {c.rpc for c in mixed} == {"continue", "similar"}
    assert sum(c.rpc == "similar" for c in mixed) == 75
    with pytest.raises(LoadError, match="--questions FILE"):
        build_workload("similar")
    with pytest.raises(LoadError, match="at least 5000 songs"):
        build_workload("continue", questions=tiny_split / "val_questions.json",
                       shape=RequestShape(seeds=(5000, 5001)))


def test_refuses_remote_targets_and_bad_flags(tiny_bundle: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for target in ("localhost:1", "127.0.0.1:5", "[::1]:5", "127.1.2.3:9", "unix:/tmp/s",
                   "dns:///localhost:50051", "ipv4:127.0.0.1:1"):
        assert is_loopback(target), target
    for target in ("10.0.0.1:5", "example.com:443", "[2001:db8::1]:5", "0.0.0.0:1"):
        assert not is_loopback(target), target
    assert main(["--target", "example.com:443", "--bundle", str(tiny_bundle)]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["--target", "localhost:1", "--bundle", str(tiny_bundle),
                 "--concurrency", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("python -m clients.loadtest: --concurrency: "
                                               "0; at least 1")


def test_split_and_summarize() -> None:
    parts = split_config(LoadConfig(concurrency=5, rate=90.0, requests=7), 2)
    assert [p.concurrency for p in parts] == [3, 2]
    assert [p.requests for p in parts] == [4, 3] and [p.rate for p in parts] == [45.0, 45.0]
    assert len({p.seed for p in parts}) == 2
    a = Samples.empty(["similar"])
    a.latencies["similar"] = [0.001, 0.002, 0.003]
    a.errors["similar"]["UNAVAILABLE"] = 1
    a.started, a.finished = 100.0, 102.0
    b = Samples.empty(["similar"])
    b.latencies["similar"] = [0.004]
    b.started, b.finished = 100.5, 101.0
    result: LoadResult = summarize([a, b], LoadConfig(), "similar", 2)
    report = result.report
    assert report["window_s"] == 2.0 and report["requests"] == 5 and report["ok"] == 4
    assert report["errors"] == {"UNAVAILABLE": 1} and report["requests_per_s"] == 2.5
    assert report["latency_ms"]["max"] == 4.0 and report["latency_ms"]["p50"] == 2.5


def test_bench_serving_report(tmp_path: Path) -> None:
    def fake(rpc: str, ok_per_s: float, p99: float) -> LoadResult:
        lat = {"p50": p99 / 2, "p90": p99 * 0.8, "p99": p99, "max": p99, "mean": p99 / 2}
        return LoadResult({"ok_per_s": ok_per_s, "latency_ms": lat, "errors": {}},
                          {rpc: np.linspace(p99 / 4e3, p99 / 1e3, 10)})

    bench = bench_serving.Bench(bundle=Path("bundles/x"), model_version="v1",
                                indexed_songs=1000, code_dim=8)
    bench.server = {("similar", 32): fake("similar", 700, 20),
                    ("continue", 32): fake("continue", 200, 60),
                    ("encode", 8): fake("encode", 500, 8)}
    bench.echo = {("similar", 32): fake("similar", 1000, 10),
                  ("continue", 32): fake("continue", 1000, 10),
                  ("encode", 8): fake("encode", 1000, 5)}
    met = {goal: ok for goal, _, ok in bench_serving.check_targets(bench)}
    assert list(met.values()) == [True, False, False, True]
    text = bench_serving.render(bench, "make bench-serving")
    assert "| SimilarSongs (k=100) | 32 | 700 | 10.00 | 20.00 | 0 | 1000 | 5.00 | 10.00 | 70% |" \
        in text
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    replace_marked(doc, text, bench_serving.START, bench_serving.END)
    replace_marked(doc, "second", bench_serving.START, bench_serving.END)
    assert doc.read_text() == ("# Benchmarks\n\nintro\n\n<!-- bench-serving:start -->\n"
                               "second\n<!-- bench-serving:end -->\n")
    png = tmp_path / "lat.png"
    bench_serving.plot(bench, png, 32)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_serving_end_to_end(tiny_bundle: Path, tiny_split: Path,
                                  tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    assert bench_serving.main(["--bundle", str(tiny_bundle), "--questions",
                               str(tiny_split / "val_questions.json"), "--duration", "0.5",
                               "--warmup", "0.2", "--concurrency", "1,4", "--pool", "100",
                               "--out", str(out), "--plot", str(tmp_path / "lat.png"),
                               "--index-queries", "50", "--server-arg=--no-verify"]) == 0
    text = out.read_text()
    assert text.count("| SimilarSongs (k=100) |") == 2 and "recall@100" in text
    assert "ContinuePlaylist answered by strategy `ranked`." in text  # the bundle's default
    assert (tmp_path / "lat.png").is_file()


def test_profile_folding_counts_self_and_inclusive_time(tmp_path: Path) -> None:
    from clients.profile_server import fold

    raw = tmp_path / "x.folded"
    main, serve = "<module> (server/__main__.py:5)", "serve (server/app.py:10)"
    search, search_again = "search (server/strategies.py:40)", "search (server/strategies.py:41)"
    raw.write_text(f"{main};{serve};{search} 6\n{main};serve (server/app.py:12) 3\n"
                   f"{main};{search_again};{search} 1\ngarbage line\n")
    total, own, inclusive = fold(raw)
    assert total == 10
    assert own["search (server/strategies.py)"] == 7
    assert own["serve (server/app.py)"] == 3
    assert inclusive["search (server/strategies.py)"] == 7  # recursion counted once
    assert inclusive["<module> (server/__main__.py)"] == 10
