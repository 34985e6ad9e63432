"""Heavy-call benchmark: one-song SimilarSongs probes while the heaviest SimilarSongsBatch
calls run, heavy-call time, and how much work a heavy call whose deadline passed still does.

    python -m clients.bench_heavy --bundle bundles/demo --out docs/BENCHMARKS.md

It starts its own server (``python -m server`` on a free port, default flags plus
``--server-args``) and measures, in order:

1. a heavy call alone: ``SimilarSongsBatch`` with 1000 song ids, ``k`` 100 and 1000
   excluded ids, in two shapes: *random* (ids and exclusions drawn at random) and *deep*
   (ids and exclusions both the 1000 nearest songs of one song, so that every list must
   reach past most of the exclusions);
2. probes alone: ``SimilarSongs(k=10)`` for random songs, one at a time, ``--probe-gap``
   apart, for ``--duration`` seconds;
3. the same probes while ``--heavy`` callers (another process, one connection each) each
   send heavy calls back to back, alternating the two shapes;
4. a heavy call (deep shape) with a ``--deadline`` of 0.5 s, alone: the server's CPU time
   (``/proc``, every thread, nanoseconds) from the moment the client gets DEADLINE_EXCEEDED
   over ``--settle`` seconds, beside an idle server's over as long;
5. from the server's metrics (where it has them): how long pieces of heavy work held a
   worker, and how long light work waited for one, during step 3.

The markdown section between ``<!-- bench-heavy:start -->`` and ``<!-- bench-heavy:end
-->`` of ``--out`` is replaced (``-`` or none: only printed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import shlex
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clients.benchtools import (
    ServerError,
    ServerProcess,
    free_port,
    machine,
    replace_marked,
    shown_command,
    shown_path,
)
from clients.loadtest import BundleSource, LoadError
from protos.songrec.v1 import songrec_pb2 as pb2

PROG = "python -m clients.bench_heavy"
START = "<!-- bench-heavy:start -->"
END = "<!-- bench-heavy:end -->"
SIMILAR = "/songrec.v1.Recommender/SimilarSongs"
BATCH = "/songrec.v1.Recommender/SimilarSongsBatch"
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
HEAVY_IDS, HEAVY_K, HEAVY_EXCLUDE = 1000, 100, 1000
HEAVY_TIMEOUT = 120.0


@dataclass
class Report:
    """What one run measured (milliseconds unless named otherwise)."""

    heavy_alone_ms: dict[str, list[float]] = field(default_factory=dict)
    probe_alone_ms: list[float] = field(default_factory=list)
    probe_loaded_ms: list[float] = field(default_factory=list)
    probe_errors: dict[str, int] = field(default_factory=dict)
    heavy_loaded_ms: list[float] = field(default_factory=list)
    heavy_errors: dict[str, int] = field(default_factory=dict)
    deadline_cpu_ms: list[float] = field(default_factory=list)
    idle_cpu_ms: float = 0.0
    metrics: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- requests


def heavy_requests(target: str, source: BundleSource, rng: np.random.Generator
                   ) -> dict[str, bytes]:
    """The two heavy shapes (see the module docstring), serialized."""
    ids = rng.choice(source.song_ids, size=HEAVY_IDS, replace=False)
    excluded = rng.choice(source.song_ids, size=HEAVY_EXCLUDE, replace=False)
    random_shape = pb2.SimilarSongsBatchRequest(song_ids=ids.tolist(), k=HEAVY_K,
                                                exclude_song_ids=excluded.tolist())
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        similar = channel.unary_unary(SIMILAR, response_deserializer=(
            pb2.SimilarSongsResponse.FromString))
        centre = int(source.song_ids[int(np.argmax(source.popularity))])
        near = similar(pb2.SimilarSongsRequest(song_id=centre, k=HEAVY_IDS - 1).
                       SerializeToString(), timeout=HEAVY_TIMEOUT)
    cluster = [centre, *[n.song_id for n in near.neighbours]][:HEAVY_IDS]
    deep = pb2.SimilarSongsBatchRequest(song_ids=cluster, k=HEAVY_K, exclude_song_ids=cluster)
    return {"random": random_shape.SerializeToString(), "deep": deep.SerializeToString()}


# ---------------------------------------------------------------- load


def _heavy_caller(target: str, payloads: list[bytes], seconds: float, callers: int,
                  out: Any) -> None:
    """Another process: ``callers`` concurrent heavy calls back to back for ``seconds``;
    puts (latencies in ms, error counts) on ``out``."""

    async def run() -> tuple[list[float], dict[str, int]]:
        channels = [grpc.aio.insecure_channel(target, options=OPTIONS)
                    for _ in range(callers)]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        end = time.monotonic() + seconds

        async def caller(i: int) -> None:
            call = channels[i].unary_unary(BATCH)
            j = i
            while time.monotonic() < end:
                start = time.perf_counter()
                try:
                    await call(payloads[j % len(payloads)], timeout=HEAVY_TIMEOUT)
                    latencies.append((time.perf_counter() - start) * 1000)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                j += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
        for channel in channels:
            await channel.close()
        return latencies, errors

    out.put(asyncio.run(run()))


def probe(target: str, ids: np.ndarray, seconds: float, gap: float,
          rng: np.random.Generator) -> tuple[list[float], dict[str, int]]:
    """One-song SimilarSongs(k=10) calls, one at a time, ``gap`` seconds apart."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.unary_unary(SIMILAR)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            request = pb2.SimilarSongsRequest(song_id=int(rng.choice(ids)), k=10)
            start = time.perf_counter()
            try:
                call(request.SerializeToString(), timeout=30)
                latencies.append((time.perf_counter() - start) * 1000)
            except grpc.RpcError as exc:
                name = exc.code().name
                errors[name] = errors.get(name, 0) + 1
            time.sleep(gap)
    return latencies, errors


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, all its threads (``/proc/PID/task/*/schedstat``, in
    nanoseconds: utime and stime count whole clock ticks of 10 ms)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return total / 1e9


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's Prometheus samples, by name and labels (empty when it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode("utf-8")
    except OSError:
        return {}
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def lane_histogram(before: dict[Any, float], after: dict[Any, float], name: str,
                   lane: str) -> tuple[int, list[tuple[float, int]]]:
    """Observations of histogram ``name`` for ``lane`` between two scrapes: the count and
    the cumulative count at each finite upper bound."""
    count_key = (f"{name}_count", (("lane", lane),))
    count = int(after.get(count_key, 0.0) - before.get(count_key, 0.0))
    cumulative = []
    for key, value in after.items():
        sample, labels = key
        bounds = dict(labels)
        if sample == f"{name}_bucket" and bounds.get("lane") == lane \
                and bounds.get("le") not in (None, "+Inf"):
            cumulative.append((float(bounds["le"]), int(value - before.get(key, 0.0))))
    return count, sorted(cumulative)


def share_within(count: int, cumulative: list[tuple[float, int]], bound: float) -> str:
    """The share of observations at most ``bound`` seconds."""
    within = next((n for b, n in cumulative if b == bound), None)
    return "-" if not count or within is None else f"{100 * within / count:.1f}%"


def deadline_work(target: str, pid: int, payload: bytes, deadline: float,
                  settle: float) -> float:
    """Server CPU seconds spent after a heavy call's client deadline passed, over
    ``settle`` seconds."""
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.unary_unary(BATCH)
        try:
            call(payload, timeout=deadline)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        else:
            return 0.0  # done within the deadline: nothing left to stop
        before = cpu_seconds(pid)
        time.sleep(settle)
        return cpu_seconds(pid) - before


# ---------------------------------------------------------------- the run


def bench(args: argparse.Namespace) -> Report:
    source = BundleSource.load(args.bundle)
    rng = np.random.default_rng(args.seed)
    report = Report()
    metrics_port = free_port()
    server_args = ["--bundle", str(args.bundle), "--metrics-port", str(metrics_port),
                   *shlex.split(args.server_args)]
    with ServerProcess(server_args) as server:
        payloads = heavy_requests(server.target, source, rng)
        with grpc.insecure_channel(server.target, options=OPTIONS) as channel:
            call = channel.unary_unary(BATCH)
            for name, payload in payloads.items():
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    call(payload, timeout=HEAVY_TIMEOUT)
                    times.append((time.perf_counter() - start) * 1000)
                report.heavy_alone_ms[name] = times
        report.probe_alone_ms, _ = probe(server.target, source.song_ids, args.duration,
                                         args.probe_gap, rng)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        load = context.Process(target=_heavy_caller, args=(
            server.target, list(payloads.values()), args.duration + 2.0, args.heavy,
            results))
        load.start()
        time.sleep(1.0)  # the heavy calls are under way
        before = scrape(metrics_port)
        report.probe_loaded_ms, report.probe_errors = probe(
            server.target, source.song_ids, args.duration, args.probe_gap, rng)
        after = scrape(metrics_port)
        pieces, held = lane_histogram(before, after, "songrec_work_piece_seconds", "heavy")
        waits, waited = lane_histogram(before, after, "songrec_work_wait_seconds", "light")
        if pieces:
            report.metrics = {
                "heavy pieces": str(pieces),
                "heavy pieces <= 20 / 30 / 50 ms": " / ".join(
                    share_within(pieces, held, b) for b in (0.02, 0.03, 0.05)),
                "light work that waited <= 10 / 25 / 50 ms for a worker": " / ".join(
                    share_within(waits, waited, b) for b in (0.01, 0.025, 0.05))}
        report.heavy_loaded_ms, report.heavy_errors = results.get(timeout=600)
        load.join(timeout=60)
        time.sleep(1.0)
        idle_from = cpu_seconds(server.pid)
        time.sleep(args.settle)
        report.idle_cpu_ms = (cpu_seconds(server.pid) - idle_from) * 1000
        for _ in range(args.repeat):
            report.deadline_cpu_ms.append(1000 * deadline_work(
                server.target, server.pid, payloads["deep"], args.deadline, args.settle))
            time.sleep(0.5)
        server.stop(timeout=60)
    return report


def _q(values: Sequence[float], q: float) -> str:
    return f"{np.percentile(values, q):.1f}" if len(values) else "-"


def render(report: Report, args: argparse.Namespace, command: str) -> str:
    lines = [f"`{command}` on a {machine()}, {dt.date.today().isoformat()}. Bundle "
             f"`{shown_path(args.bundle)}`; server flags: "
             f"`{args.server_args or '(defaults)'}`. Heavy "
             f"call: `SimilarSongsBatch` with {HEAVY_IDS} ids, k {HEAVY_K}, {HEAVY_EXCLUDE} "
             f"excluded ids (*random*: drawn at random; *deep*: ids and exclusions both "
             f"the {HEAVY_IDS} nearest songs of the most popular song). Probe: "
             f"`SimilarSongs(k=10)` of a random song, one at a time, {args.probe_gap * 1000:g}"
             f" ms apart, {args.duration:g} s.",
             "",
             "| measure | calls | p50 ms | p90 ms | p99 ms | max ms | errors |",
             "|---|---:|---:|---:|---:|---:|---|"]

    def row(name: str, values: Sequence[float], errors: dict[str, int] | None = None) -> None:
        errs = ", ".join(f"{k} {v}" for k, v in sorted((errors or {}).items())) or "0"
        top = f"{max(values):.1f}" if len(values) else "-"
        lines.append(f"| {name} | {len(values)} | {_q(values, 50)} | {_q(values, 90)} | "
                     f"{_q(values, 99)} | {top} | {errs} |")

    for name, times in report.heavy_alone_ms.items():
        row(f"heavy call alone ({name})", times)
    row("probe alone", report.probe_alone_ms)
    row(f"probe while {args.heavy} heavy calls run", report.probe_loaded_ms,
        report.probe_errors)
    row(f"heavy calls, {args.heavy} at once", report.heavy_loaded_ms, report.heavy_errors)
    cpu = report.deadline_cpu_ms
    lines += ["",
              f"A deep heavy call with a {args.deadline:g} s deadline, alone: server CPU "
              f"after the client's DEADLINE_EXCEEDED, over {args.settle:g} s: "
              + ", ".join(f"{c:.1f}" for c in cpu)
              + f" ms (idle server over as long: {report.idle_cpu_ms:.1f} ms)."]
    if report.metrics:
        lines += ["", f"Server metrics while the {args.heavy} heavy calls ran (step 3):", "",
                  "| measure | value |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in report.metrics.items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    p.add_argument("--heavy", type=int, default=4, help="concurrent heavy callers")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of probes")
    p.add_argument("--probe-gap", type=float, default=0.02, help="seconds between probes")
    p.add_argument("--deadline", type=float, default=0.5, help="the heavy call's deadline")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of server CPU counted after the deadline")
    p.add_argument("--repeat", type=int, default=3, help="heavy calls alone, per shape")
    p.add_argument("--server-args", default="", help="more server flags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose bench-heavy section is replaced; - prints only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = bench(args)
    except (ServerError, LoadError, OSError, grpc.RpcError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    command = shown_command(PROG, [
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    body = render(report, args, command)
    print(body)
    if args.out is not None and str(args.out) != "-":
        replace_marked(args.out, body, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
