"""Replicas on one song store behind nginx, all on loopback: the demo and the benchmarks.

    python -m clients.replicas demo --bundle bundles/demo --port 50051 [--store postgres]
    python -m clients.replicas bench --bundle bundles/demo --out docs/BENCHMARKS.md

``demo`` starts a song store (a SQLite file, or a throwaway PostgreSQL server), two
``python -m server`` replicas on it and nginx (``deploy/nginx/songrec.conf``) on
``--port`` in front, then waits for Ctrl-C. ``bench`` measures, on this machine: AddSongs
throughput and the lag until the other replica serves a song (SQLite and PostgreSQL);
calls per second through nginx to two replicas against direct calls to one, in one run;
a load test through nginx while one replica is SIGTERMed and restarted; RSS per replica.
It writes its tables between ``<!-- bench-replicas:start -->`` and ``:end -->`` of
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clients.benchtools import (
    ServerProcess,
    free_port,
    machine,
    replace_marked,
    shown_command,
    shown_path,
)
from clients.loadtest import LoadConfig, build_workload, run
from clients.sidecars import LocalNginx, LocalPostgres
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc

START = "<!-- bench-replicas:start -->"
END = "<!-- bench-replicas:end -->"
META = pb2.SongMetadata(genres=["GN0100"], detail_genres=["GN0105"], issue_date="20200101")


class Fleet:
    """``n`` replicas of ``bundle`` on one store (``sqlite`` or ``postgres``), each on a
    port of its own, and (``balancer``) nginx in front of them."""

    def __init__(self, bundle: Path, n: int = 2, store: str = "sqlite", *,
                 balancer: bool = True, port: int = 0, server_args: Sequence[str] = ()) -> None:
        self.bundle = bundle
        self.token = secrets.token_urlsafe(24)
        self.root = Path(tempfile.mkdtemp(prefix="songrec-fleet-"))
        self.postgres: LocalPostgres | None = None
        self.nginx: LocalNginx | None = None
        self.replicas: list[ServerProcess] = []
        self.server_args = list(server_args)
        try:
            if store == "postgres":
                self.postgres = LocalPostgres()
                self.store_url = self.postgres.create_database("songrec")
            elif store == "sqlite":
                self.store_url = f"sqlite:///{self.root / 'songs.db'}"
            else:
                raise ValueError(f"store: {store!r}; sqlite or postgres")
            self.ports = [free_port() for _ in range(n)]
            self.replicas = [self._start(i) for i in range(n)]
            if balancer:
                self.nginx = LocalNginx([f"127.0.0.1:{p}" for p in self.ports], port=port)
        except BaseException:
            self.close()
            raise

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def _start(self, i: int) -> ServerProcess:
        return ServerProcess(["--bundle", str(self.bundle), "--no-verify",
                              "--port", str(self.ports[i]), "--store", self.store_url,
                              "--data-dir", str(self.root / f"replica{i}"),
                              "--listen-after-load", *self.server_args],
                             env={"SONGREC_ADMIN_TOKEN": self.token})

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def restart(self, i: int) -> float:
        """SIGTERM replica ``i`` (a graceful drain), start it again on its port; the
        seconds it was away."""
        start = time.perf_counter()
        self.replicas[i].stop(timeout=60)
        self.replicas[i] = self._start(i)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.close()
        for server in self.replicas:
            server.kill()
        if self.postgres is not None:
            self.postgres.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serves(channel: grpc.Channel, song_id: int) -> bool:
    try:
        pb2_grpc.RecommenderStub(channel).SimilarSongs(  # type: ignore[no-untyped-call]
            pb2.SimilarSongsRequest(song_id=song_id, k=3), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return True


def rolling_restart_under_load(fleet: Fleet, calls: Sequence[Any], seconds: float = 12.0,
                               concurrency: int = 8) -> dict[str, Any]:
    """``clients.loadtest`` through nginx while replica 0 is SIGTERMed and restarted (after
    a quarter of the run); the load report plus the restart's duration."""
    assert fleet.nginx is not None
    config = LoadConfig(target=fleet.nginx.target, concurrency=concurrency,
                        duration=seconds, warmup=0.5, deadline=30.0)
    result: dict[str, Any] = {}

    def load() -> None:
        result["report"] = run(config, calls, "similar").report

    thread = threading.Thread(target=load, name="rolling-restart-load")
    thread.start()
    time.sleep(0.5 + seconds / 4)
    result["restart_s"] = fleet.restart(0)
    thread.join(seconds * 4 + 120)
    report: dict[str, Any] = result["report"]
    report["restart_s"] = result["restart_s"]
    return report


# ---------------------------------------------------------------- benchmarks


def propagation(fleet: Fleet, songs: int, first_id: int) -> dict[str, Any]:
    """AddSongs of one song at a time on replica 0, then wait until replica 1 serves it:
    ack latency and propagation lag per song."""
    acks, lags = [], []
    with grpc.insecure_channel(fleet.target(0)) as a, grpc.insecure_channel(
            fleet.target(1)) as b:
        admin = pb2_grpc.AdminStub(a)  # type: ignore[no-untyped-call]
        for i in range(songs):
            song = pb2.NewSong(song_id=first_id + i, metadata=META)
            start = time.perf_counter()
            admin.AddSongs(pb2.AddSongsRequest(songs=[song]), metadata=fleet.auth, timeout=30)
            acked = time.perf_counter()
            while not serves(b, first_id + i):
                if time.perf_counter() - acked > 30:
                    raise RuntimeError(f"song {first_id + i} not on replica 1 within 30 s")
                time.sleep(0.002)
            acks.append(acked - start)
            lags.append(time.perf_counter() - acked)
    return {"ack_ms": _pcts(acks), "lag_ms": _pcts(lags)}


def throughput(fleet: Fleet, seconds: float, batch: int, concurrency: int,
               first_id: int) -> dict[str, Any]:
    """Closed-loop AddSongs of ``batch`` new songs per call, ``concurrency`` callers spread
    over both replicas, for ``seconds``."""

    async def drive() -> tuple[int, int]:
        channels = [grpc.aio.insecure_channel(fleet.target(i)) for i in range(2)]
        stubs = [pb2_grpc.AdminStub(c) for c in channels]  # type: ignore[no-untyped-call]
        next_id = first_id
        done = failed = 0
        end = time.perf_counter() + seconds

        async def caller(w: int) -> None:
            nonlocal next_id, done, failed
            while time.perf_counter() < end:
                ids = range(next_id, next_id + batch)
                next_id += batch
                request = pb2.AddSongsRequest(songs=[pb2.NewSong(song_id=i, metadata=META)
                                                     for i in ids])
                try:
                    await stubs[w % 2].AddSongs(request, metadata=fleet.auth, timeout=30)
                    done += 1
                except grpc.aio.AioRpcError:
                    failed += 1

        await asyncio.gather(*(caller(w) for w in range(concurrency)))
        for c in channels:
            await c.close()
        return done, failed

    start = time.perf_counter()
    done, failed = asyncio.run(drive())
    window = time.perf_counter() - start
    return {"calls_per_s": round(done / window, 1),
            "songs_per_s": round(done * batch / window, 1), "failed": failed}


def _pcts(seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(values, 50)), 1),
            "p99": round(float(np.percentile(values, 99)), 1),
            "max": round(float(values.max()), 1)}


def bench(bundle: Path, seconds: float, songs: int) -> dict[str, Any]:
    calls = build_workload("similar", bundle=bundle, pool=2000, seed=1)
    out: dict[str, Any] = {"machine": machine(), "bundle": shown_path(bundle),
                           "date": time.strftime("%Y-%m-%d"), "stores": {}}
    for kind in ("sqlite", "postgres"):
        with Fleet(bundle, 2, kind, balancer=False) as fleet:
            row = propagation(fleet, songs, 90_000_000)
            row["throughput_1"] = throughput(fleet, seconds, 1, 4, 91_000_000)
            row["throughput_100"] = throughput(fleet, seconds, 100, 4, 92_000_000)
            out["stores"][kind] = row
            print(kind, json.dumps(row), file=sys.stderr)
    with Fleet(bundle, 2, "sqlite") as fleet:
        assert fleet.nginx is not None
        load: dict[str, Any] = {}
        for name, target in (("direct to one replica", fleet.target(0)),
                             ("nginx to two replicas", fleet.nginx.target)):
            config = LoadConfig(target=target, concurrency=16, duration=seconds, warmup=1.0)
            load[name] = run(config, calls, "similar").report
            print(name, load[name]["ok_per_s"], file=sys.stderr)
        out["load"] = {name: {"ok_per_s": r["ok_per_s"], "errors": r["errors"],
                              "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"]}
                       for name, r in load.items()}
        out["rss_mb"] = [round((s.rss_bytes() or 0) / 2**20, 1) for s in fleet.replicas]
        rolling = rolling_restart_under_load(fleet, calls, seconds=max(seconds, 12.0))
        out["rolling"] = {"requests": rolling["requests"], "ok": rolling["ok"],
                          "errors": rolling["errors"], "restart_s": round(rolling["restart_s"], 1),
                          "p99": rolling["latency_ms"]["p99"]}
    return out


def render(result: dict[str, Any], command: str) -> str:
    lines = ["## Replicas on one song store (`make bench-replicas`)", "",
             f"{result['machine']}; bundle `{result['bundle']}`; {result['date']}. Command: "
             f"`{command}`. Everything (replicas, store, nginx, load) shares this machine's "
             f"cores, so the absolute numbers are those of 2 shared cores.", "",
             "AddSongs on replica A, one song per call, then SimilarSongs on replica B "
             "until it serves the song (polled every 2 ms): the acknowledgement latency and "
             "the propagation lag from A's acknowledgement. Throughput: 4 callers spread over "
             "both replicas, closed loop. On SQLite a follower polls every 0.2 s, and each "
             "song here is added just after B applied the previous one, so the lag is about "
             "one full poll interval (for songs arriving at random times it averages half "
             "of one); on PostgreSQL the NOTIFY of the commit wakes B at once.", "",
             "| store | ack p50 ms | ack p99 ms | lag A→B p50 ms | lag A→B p99 ms | "
             "AddSongs/s (1 song) | songs/s (100 per call) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, row in result["stores"].items():
        lines.append(f"| {kind} | {row['ack_ms']['p50']} | {row['ack_ms']['p99']} | "
                     f"{row['lag_ms']['p50']} | {row['lag_ms']['p99']} | "
                     f"{row['throughput_1']['calls_per_s']} | "
                     f"{row['throughput_100']['songs_per_s']} |")
    lines += ["", "SimilarSongs (k 100), closed loop, concurrency 16, one run, one after the "
              "other against the same replicas. The load generator, nginx and both replicas "
              "share the same cores, so a second replica adds no cores here: what this "
              "shows is nginx's cost per call, not the scaling of separate machines.", "",
              "| path | calls/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---|"]
    for name, row in result["load"].items():
        lines.append(f"| {name} | {row['ok_per_s']} | {row['p50']} | {row['p99']} | "
                     f"{row['errors'] or 'none'} |")
    r = result["rolling"]
    lines += ["", f"RSS per replica after the load: "
              f"{', '.join(f'{m} MB' for m in result['rss_mb'])}.", "",
              f"Rolling restart through nginx: replica A SIGTERMed and started again "
              f"({r['restart_s']} s away) during a load test at concurrency 8: "
              f"{r['ok']} of {r['requests']} calls OK, errors {r['errors'] or 'none'}, "
              f"p99 {r['p99']} ms."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def demo(bundle: Path, port: int, store: str) -> int:
    with Fleet(bundle, 2, store, port=port) as fleet:
        assert fleet.nginx is not None
        print(f"songrec: 2 replicas ({fleet.target(0)}, {fleet.target(1)}) on the song store "
              f"{fleet.store_url}, nginx on {fleet.nginx.target}. Ctrl-C stops all.")
        print(f"  try:  python -m clients --target {fleet.nginx.target} similar 1 -k 10")
        print(f"        python -m clients --target {fleet.target(0)},{fleet.target(1)} info")
        print(f"  admin token (SONGREC_TOKEN for add-songs): {fleet.token}")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.replicas",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="two replicas, one store, nginx; until Ctrl-C")
    d.add_argument("--bundle", type=Path, required=True)
    d.add_argument("--port", type=int, default=50051, help="nginx's port")
    d.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    b = sub.add_parser("bench", help="the replica benchmarks, into --out")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--seconds", type=float, default=10.0, help="per load measurement")
    b.add_argument("--songs", type=int, default=200, help="songs for the lag measurement")
    b.add_argument("--out", type=Path, default=None, help="markdown file to update")
    args = p.parse_args(argv)
    if args.command == "demo":
        return demo(args.bundle, args.port, args.store)
    result = bench(args.bundle, args.seconds, args.songs)
    command = shown_command("python -m clients.replicas",
                            list(argv if argv is not None else sys.argv[1:]))
    body = render(result, command)
    print(body)
    if args.out is not None:
        replace_marked(args.out, body, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
