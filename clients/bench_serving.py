"""Serving benchmark: each RPC's throughput and latency against a gRPC echo server's,
server memory and start-up time, and the HNSW lookup against exact numpy search.

    python -m clients.bench_serving [--bundle bundles/melon] [--out docs/BENCHMARKS.md]
    python -m clients.bench_serving --bundle bundles/demo --duration 2 --out -   # quick look

The server (``python -m server`` on ``--bundle``, default flags) and the load generator
(:mod:`clients.loadtest`, one process, closed loop) share this machine's cores. Each RPC
(``SimilarSongs`` k=100, ``ContinuePlaylist`` with 1-20 seeds for 100 songs + 10 tags and
the bundle's default strategy or ``--strategy``, ``EncodeSong``) runs at every
``--concurrency`` for ``--duration`` seconds after ``--warmup``, and right after each such
cell :mod:`clients.echo_server`, answering with the real server's own response bytes, takes
the same load: Python gRPC's ceiling here, and the ratio says what the model work costs.
Cell by cell, so that a shared machine's changing speed moves both sides of a ratio alike.
Requests are drawn from the split's questions when found (``--questions``) and from the
bundle. The markdown section between ``<!-- bench-serving:start -->`` and
``<!-- bench-serving:end -->`` of ``--out`` is
replaced, and a latency histogram is drawn to ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clients.benchtools import (
    REPO,
    ServerError,
    ServerProcess,
    free_port,
    latency_histogram,
    machine,
    replace_marked,
    shown_command,
    shown_path,
)
from clients.client import NO_RETRY, TOKEN_ENV, SongRecClient
from clients.loadtest import (
    METHODS,
    Call,
    LoadConfig,
    LoadError,
    LoadResult,
    RequestShape,
    build_workload,
    run,
)
from protos.songrec.v1 import songrec_pb2 as pb2
from server.bundle import (
    SONG_INDEX,
    BundleError,
    load_codes,
    load_hnsw,
    load_neighbours,
    read_codes,
    read_manifest,
)
from server.search import HnswSearch

PROG = "python -m clients.bench_serving"
START = "<!-- bench-serving:start -->"
END = "<!-- bench-serving:end -->"
RPCS = ("similar", "continue", "encode")
RPC_TITLES = {"similar": "SimilarSongs (k=100)",
              "continue": "ContinuePlaylist (100 songs + 10 tags, 1-20 seeds)",
              "encode": "EncodeSong"}
CONCURRENCY = (1, 8, 32, 64)
RECALL_TARGET = 0.95
EF_LADDER = (50, 100, 150, 200, 300, 400, 600, 800, 1200)


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One goal of the issue: ``kind`` "ratio" (throughput / echo's, at least ``limit``)
    or "p99" (milliseconds, at most ``limit``), for ``rpc`` at ``concurrency``."""

    rpc: str
    kind: str
    limit: float
    concurrency: int

    def describe(self) -> str:
        name = RPC_TITLES[self.rpc].split(" ")[0]
        if self.kind == "ratio":
            return (f"{name} throughput >= {self.limit:.0%} of echo's at concurrency "
                    f"{self.concurrency}")
        return f"{name} p99 <= {self.limit:g} ms at concurrency {self.concurrency}"


TARGETS = (Target("similar", "ratio", 0.60, 32), Target("continue", "ratio", 0.30, 32),
           Target("continue", "p99", 50.0, 32), Target("encode", "p99", 10.0, 8))


# ---------------------------------------------------------------- small helpers


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process now (VmRSS: RssAnon, its own, plus RssFile, mapped
    files such as the bundle's codes, reclaimable) and at its peak (VmHWM), in MB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return out


def token() -> str | None:
    """The inference token the server (started with this environment) will ask for."""
    return os.environ.get(TOKEN_ENV) or None


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,8,32,64") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


# ---------------------------------------------------------------- processes


class Child:
    """A subprocess (server or echo server) with its stderr in a file, stopped by SIGTERM."""

    def __init__(self, argv: Sequence[str], log: Path, stdout: int | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(self.argv, stdout=stdout, stderr=self._log,
                                     cwd=REPO)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def start_server(bundle: Path, port: int, extra: Sequence[str], timeout: float
                 ) -> ServerProcess:
    """Start ``python -m server`` on ``port``; returns once it is SERVING (its
    ``startup_s``: the seconds from spawn to SERVING)."""
    try:
        return ServerProcess(["--bundle", str(bundle), "--port", str(port), *extra],
                             host=None, ready_timeout=timeout)
    except ServerError as exc:
        raise LoadError(str(exc)) from None


def start_echo(responses: Path, code_dim: int, log: Path) -> tuple[Child, int]:
    """Start ``python -m clients.echo_server --port 0``; returns it and its port."""
    argv = [sys.executable, "-m", "clients.echo_server", "--port", "0", "--responses",
            str(responses), "--code-dim", str(code_dim)]
    child = Child(argv, log, stdout=subprocess.PIPE)
    assert child.proc.stdout is not None
    line = child.proc.stdout.readline().decode()
    if not line.startswith("listening on "):
        child.stop()
        raise LoadError(f"the echo server did not start:\n{child.tail()}")
    return child, int(line.rsplit(":", 1)[1])


def capture_responses(target: str, workloads: Mapping[str, Sequence[Call]],
                      out: Path) -> dict[str, int]:
    """Ask the real server each workload's first request and keep the answer as
    ``<Method>.bin`` for the echo server; returns the response sizes in bytes."""
    sizes = {}
    with grpc.insecure_channel(target) as channel:
        for rpc, calls in workloads.items():
            method = METHODS[rpc]
            metadata = [("authorization", f"Bearer {token()}")] if token() else None
            answer = channel.unary_unary(method)(calls[0].payload, timeout=30,
                                                 metadata=metadata)
            name = method.rsplit("/", 1)[1]
            (out / f"{name}.bin").write_bytes(answer)
            sizes[rpc] = len(answer)
    return sizes


def load_grid(targets: Mapping[str, str], workloads: Mapping[str, Sequence[Call]],
              concurrency: Sequence[int], duration: float, warmup: float,
              channels: int = 1) -> dict[str, dict[tuple[str, int], LoadResult]]:
    """Every RPC at every concurrency, one closed-loop run each, against each of
    ``targets`` (name -> host:port) in turn, cell by cell: a server's cell and the echo
    server's for the same RPC and concurrency run back to back, so that their ratio is
    not skewed by the shared machine speeding up or slowing down between two grids."""
    results: dict[str, dict[tuple[str, int], LoadResult]] = {name: {} for name in targets}
    for rpc, calls in workloads.items():
        for c in concurrency:
            for name, target in targets.items():
                config = LoadConfig(target=target, concurrency=c, duration=duration,
                                    warmup=warmup, deadline=30.0, token=token(),
                                    channels=channels)
                result = run(config, calls, rpc)
                results[name][(rpc, c)] = result
                lat = result.report["latency_ms"]
                print(f"  {name:<6} {rpc:<9} c={c:<3} {result.report['ok_per_s']:8.1f} req/s"
                      f"  p50 {lat['p50'] or 0:7.2f} ms  p99 {lat['p99'] or 0:7.2f} ms  "
                      f"errors {sum(result.report['errors'].values())}", flush=True)
    return results


# ---------------------------------------------------------------- HNSW against numpy


def index_comparison(bundle: Path, n_queries: int = 1000, k: int = 100,
                     seed: int = 0) -> dict[str, Any]:
    """The song search against exact cosine search over the same vectors (one thread, one
    query at a time, as a server worker runs it), leave-one-out: each query is an indexed
    song's code, and the song itself counts neither in the truth nor in the answer, so the
    song's own precomputed list cannot answer for it (as for a song the index lacks).
    Measured for the graph alone and, when the bundle has the neighbour table and codes,
    for the graph plus one hop over the table (``HnswSearch._refine``), at the manifest's
    ``ef`` and smaller and larger ones until recall@k reaches 0.95."""
    manifest = read_manifest(bundle, verify=False)
    index = load_hnsw(bundle, manifest.song_index, SONG_INDEX)
    labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
    unit = read_codes(index, labels)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(labels), size=min(n_queries, len(labels) - 1),
                                replace=False))
    queries = unit[picked].copy()
    k = min(k, len(labels) - 1)
    truth = np.empty((len(picked), k), dtype=np.int64)
    start = time.perf_counter()
    for lo in range(0, len(picked), 256):
        sims = queries[lo : lo + 256] @ unit.T
        sims[np.arange(len(sims)), picked[lo : lo + 256]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        truth[lo : lo + 256] = labels[top]
    batched_ms = (time.perf_counter() - start) / len(picked) * 1e3
    start = time.perf_counter()
    for q in queries[:50]:
        sims = unit @ q
        np.argpartition(-sims, k)[: k + 1]
    single_ms = (time.perf_counter() - start) / min(50, len(queries)) * 1e3
    del unit
    dim = int(queries.shape[1])
    skip = labels[picked]
    index.set_num_threads(1)
    searches = {"graph": HnswSearch(index)}
    table, codes = load_neighbours(bundle, manifest), load_codes(bundle, manifest)
    if table is not None and codes is not None:
        searches["graph + table hop"] = HnswSearch(index, table=table, codes=codes)
    runs = []
    ladder = sorted({max(e, k) for e in (manifest.song_index.ef, *EF_LADDER)})
    for name, search in searches.items():
        for ef in ladder:
            index.set_ef(ef)
            start = time.perf_counter()
            got = [search.search(q[None, :], k, skip=skip[i : i + 1])[0][0]
                   for i, q in enumerate(queries)]
            per_query = (time.perf_counter() - start) / len(queries) * 1e3
            recall = float(np.mean([len(np.intersect1d(g, t)) / k
                                    for g, t in zip(got, truth, strict=True)]))
            runs.append({"search": name, "ef": ef, "recall": round(recall, 4),
                         "hnsw_ms": round(per_query, 4)})
            if recall >= RECALL_TARGET and ef >= manifest.song_index.ef:
                break
    index.set_ef(manifest.song_index.ef)
    return {"items": int(len(labels)), "dim": dim, "k": k,
            "queries": int(len(queries)), "manifest_ef": manifest.song_index.ef,
            "m": manifest.song_index.m, "exact_single_ms": round(single_ms, 3),
            "exact_batched_ms": round(batched_ms, 3), "runs": runs,
            "table_depth": 0 if table is None else int(table["rows"].shape[1])}


# ---------------------------------------------------------------- the report


@dataclass
class Bench:
    """Everything one benchmark run measured (``server`` and ``echo``: results by RPC and
    concurrency)."""

    bundle: Path
    model_version: str = ""
    indexed_songs: int = 0
    code_dim: int = 0
    startup_s: float = 0.0
    memory_idle: dict[str, float] = field(default_factory=dict)
    memory_after: dict[str, float] = field(default_factory=dict)
    response_bytes: dict[str, int] = field(default_factory=dict)
    strategy: str = ""  # the strategy that answered ContinuePlaylist
    server: dict[tuple[str, int], LoadResult] = field(default_factory=dict)
    echo: dict[tuple[str, int], LoadResult] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)


def ratio(bench: Bench, rpc: str, c: int) -> float | None:
    """The server's successful calls per second over the echo server's (None: not run)."""
    real, echo = bench.server.get((rpc, c)), bench.echo.get((rpc, c))
    if real is None or echo is None or not echo.report["ok_per_s"]:
        return None
    return float(real.report["ok_per_s"]) / float(echo.report["ok_per_s"])


def check_targets(bench: Bench) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) per target; met is None when not measured."""
    out: list[tuple[str, str, bool | None]] = []
    for t in TARGETS:
        if t.kind == "ratio":
            value = ratio(bench, t.rpc, t.concurrency)
            out.append((t.describe(), "-" if value is None else f"{value:.0%}",
                        None if value is None else value >= t.limit))
        else:
            result = bench.server.get((t.rpc, t.concurrency))
            p99 = None if result is None else result.report["latency_ms"]["p99"]
            out.append((t.describe(), "-" if p99 is None else f"{p99:.1f} ms",
                        None if p99 is None else p99 <= t.limit))
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(bench: Bench, command: str) -> str:
    """The markdown section."""
    lines = [
        "## Serving",
        "",
        f"`{command}` on a {machine()}, {dt.date.today().isoformat()}. Bundle "
        f"`{shown_path(bench.bundle)}` (model {bench.model_version}, {bench.indexed_songs:,} songs "
        f"indexed, code dim {bench.code_dim}). Server `{bench.config.get('server', '')}`; "
        f"load: one `clients.loadtest` process "
        f"({bench.config.get('channels', 1)} gRPC connection(s)), closed loop, "
        f"{bench.config.get('duration', 0):g} s per cell after "
        f"{bench.config.get('warmup', 0):g} s warm-up, server and load generator on the same "
        f"cores. Echo: `clients.echo_server` answering the real responses' bytes, each "
        f"cell right after the server's "
        f"({', '.join(f'{k} {v} B' for k, v in bench.response_bytes.items())}). "
        f"Throughput counts successful calls."
        + (f" ContinuePlaylist answered by strategy `{bench.strategy}`." if bench.strategy
           else ""),
        "",
        "| RPC | concurrency | req/s | p50 ms | p99 ms | errors | echo req/s | echo p50 ms "
        "| echo p99 ms | ratio to echo |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (rpc, c), result in bench.server.items():
        r = result.report
        echo = bench.echo.get((rpc, c))
        e = echo.report if echo is not None else None
        share = ratio(bench, rpc, c)
        echo_cells = (["-", "-", "-"] if e is None else
                      [f"{e['ok_per_s']:.0f}", _f(e["latency_ms"]["p50"], 2),
                       _f(e["latency_ms"]["p99"], 2)])
        cells = [RPC_TITLES[rpc], str(c), f"{r['ok_per_s']:.0f}",
                 _f(r["latency_ms"]["p50"], 2), _f(r["latency_ms"]["p99"], 2),
                 str(sum(r["errors"].values())), *echo_cells,
                 "-" if share is None else f"{share:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for goal, measured, met in check_targets(bench):
        lines.append(f"| {goal} | {measured} | "
                     f"{'-' if met is None else ('yes' if met else '**no**')} |")
    lines += ["", "| measure | value |", "|---|---|",
              f"| start-up to SERVING (spawn to health SERVING, checksums "
              f"{'off' if '--no-verify' in bench.config.get('server', '') else 'on'}) | "
              f"{bench.startup_s:.1f} s |",
              f"| server RSS when SERVING, idle (anonymous + mapped files) | "
              f"{_f(bench.memory_idle.get('VmRSS'), 0)} MB "
              f"({_f(bench.memory_idle.get('RssAnon'), 0)} + "
              f"{_f(bench.memory_idle.get('RssFile'), 0)}) |",
              f"| server RSS after the load (anonymous + mapped files) / peak | "
              f"{_f(bench.memory_after.get('VmRSS'), 0)} MB "
              f"({_f(bench.memory_after.get('RssAnon'), 0)} + "
              f"{_f(bench.memory_after.get('RssFile'), 0)}) / "
              f"{_f(bench.memory_after.get('VmHWM'), 0)} MB |"]
    if bench.index is not None:
        ix = bench.index
        lines += ["", f"Song search against exact search, recall@{ix['k']} leave-one-out "
                  f"over {ix['queries']} random indexed songs (M {ix['m']}, one thread; the "
                  f"table hop re-scores the graph's hits plus the {ix['table_depth']}-song "
                  f"lists of its 10 best hits):", "",
                  "| search | ef | recall | time per query |", "|---|---:|---:|---:|"]
        for run_ in ix["runs"]:
            lines.append(f"| {run_.get('search', 'graph')} | {run_['ef']} | "
                         f"{run_['recall']:.4f} | {run_['hnsw_ms']:.3f} ms |")
        lines += ["", "| measure | value |", "|---|---|"]
        lines.append(f"| exact numpy search over {ix['items']:,} x {ix['dim']} codes, per "
                     f"query: one at a time / in blocks of 256 | {ix['exact_single_ms']:.2f} "
                     f"ms / {ix['exact_batched_ms']:.2f} ms |")
    if bench.config.get("plot"):
        lines += ["", f"![Latency histograms]({bench.config['plot']})"]
    return "\n".join(lines) + "\n"


def plot(bench: Bench, path: Path, concurrency: int) -> None:
    """Per RPC, the latency histograms of the server and of the echo server."""
    import matplotlib  # the 'train' extra; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({c for _, c in bench.server})
    if not levels:
        return
    if concurrency not in levels:  # the nearest level that ran
        concurrency = min(levels, key=lambda c: (abs(c - concurrency), c))
    rpcs = [rpc for rpc in RPCS if (rpc, concurrency) in bench.server]
    fig, axes = plt.subplots(1, len(rpcs), figsize=(5 * len(rpcs), 4), squeeze=False)
    for ax, rpc in zip(axes[0], rpcs, strict=True):
        series = {}
        for label, table in (("server", bench.server), ("echo", bench.echo)):
            result = table.get((rpc, concurrency))
            if result is not None and len(result.latencies.get(rpc, [])):
                series[label] = result.latencies[rpc] * 1e3
        if not series:
            continue
        latency_histogram(ax, series, digits=1)
        ax.set_title(f"{RPC_TITLES[rpc]}, concurrency {concurrency}", fontsize=9)
        ax.set_xlabel("latency (ms)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(bench: Bench) -> dict[str, Any]:
    """Every number of the run, JSON-ready (raw latencies and histograms left out)."""
    def reports(table: Mapping[tuple[str, int], LoadResult]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.report.items() if k != "histogram"}
                for r in table.values()]

    return {"bundle": str(bench.bundle), "model_version": bench.model_version,
            "indexed_songs": bench.indexed_songs, "startup_s": bench.startup_s,
            "memory_idle_mb": bench.memory_idle, "memory_after_mb": bench.memory_after,
            "response_bytes": bench.response_bytes, "strategy": bench.strategy,
            "server": reports(bench.server),
            "echo": reports(bench.echo), "index": bench.index,
            "targets": [{"goal": g, "measured": m, "met": ok}
                        for g, m, ok in check_targets(bench)],
            "config": bench.config}


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "melon",
                   help="bundle to serve (default bundles/melon, from `make bench-train`)")
    p.add_argument("--questions", type=Path, default=None,
                   help="questions to draw requests from (default: the melon split's "
                        "val_questions.json when --bundle is the default and it exists)")
    p.add_argument("--rpcs", default=",".join(RPCS), help="comma-separated subset of "
                                                          + ", ".join(RPCS))
    p.add_argument("--concurrency", type=int_list, default=CONCURRENCY,
                   help="comma-separated levels (default 1,8,32,64)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per cell")
    p.add_argument("--strategy", default="", help="ContinuePlaylist strategy (default: the "
                   "bundle's, ranked when it has a ranker)")
    p.add_argument("--pool", type=int, default=2000, help="distinct requests per RPC")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for python -m server (repeat), e.g. --server-arg=--workers=2")
    p.add_argument("--channels", type=int, default=1,
                   help="gRPC connections of the load generator, to the server and to the "
                        "echo server alike (with --server-arg=--processes=N, the kernel "
                        "spreads connections, not calls, over the processes)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--skip-echo", action="store_true")
    p.add_argument("--skip-index", action="store_true",
                   help="skip the HNSW against exact search comparison")
    p.add_argument("--index-queries", type=int, default=1000)
    p.add_argument("--out", default="docs/BENCHMARKS.md",
                   help="markdown file whose bench-serving section is replaced, or - to "
                        "print only")
    p.add_argument("--plot", default="docs/bench-serving-latency.png",
                   help="latency histogram PNG ('' for none)")
    p.add_argument("--plot-concurrency", type=int, default=32)
    p.add_argument("--json-out", type=Path, default=None, help="every number as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when done, 2 on bad input or a server that does not start."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rpcs = [r.strip() for r in args.rpcs.split(",") if r.strip()]
    try:
        unknown = [r for r in rpcs if r not in RPCS]
        if unknown or not rpcs:
            raise LoadError(f"--rpcs: {','.join(unknown) or '(empty)'}; choose from "
                            f"{', '.join(RPCS)}")
        return bench(args, rpcs, argv)
    except (LoadError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace, rpcs: Sequence[str], argv: Sequence[str]) -> int:
    """Server grid, echo grid, index comparison, then the report (see the module doc)."""

    bundle: Path = args.bundle
    try:
        manifest = read_manifest(bundle, verify=False)
    except BundleError as exc:
        hint = " (make bench-train writes bundles/melon)" if "melon" in str(bundle) else ""
        raise LoadError(f"{exc}{hint}") from None
    questions = args.questions
    if questions is None and bundle == REPO / "bundles" / "melon":
        default = REPO / "data" / "melon-split" / "val_questions.json"
        questions = default if default.is_file() else None
    print(f"preparing {args.pool} requests per RPC from "
          f"{questions or 'the bundle'} ...", flush=True)
    workloads = {rpc: build_workload(rpc, questions=questions, bundle=bundle,
                                     pool=args.pool, seed=0,
                                     shape=RequestShape(k=100, strategy=args.strategy))
                 for rpc in rpcs}
    command = ("make bench-serving" if not argv
               else shown_command(PROG, [shlex.quote(a) for a in argv]))
    if args.plot and args.out != "-":
        # The image link is relative to the markdown file that shows it.
        plot_link = os.path.relpath(Path(args.plot).resolve(), Path(args.out).resolve().parent)
    else:
        plot_link = ""
    server_flags = list(args.server_arg)
    result = Bench(bundle=bundle, model_version=manifest.model_version,
                   indexed_songs=manifest.song_index.count, code_dim=manifest.code_dim)
    result.config = {"server": "python -m server " + shlex.join(["--bundle",
                                                                  shown_path(bundle),
                                                                  *server_flags]),
                     "duration": args.duration, "warmup": args.warmup,
                     "channels": args.channels,
                     "concurrency": list(args.concurrency),
                     "questions": shown_path(questions) if questions else "None",
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
                     "plot": plot_link}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        target = f"127.0.0.1:{port}"
        print(f"starting the server on {bundle} ...", flush=True)
        server = start_server(bundle, port, server_flags, args.startup_timeout)
        result.startup_s = server.startup_s
        echo: Child | None = None
        try:
            print(f"SERVING after {result.startup_s:.1f} s", flush=True)
            with SongRecClient(target, retry=NO_RETRY) as client:
                result.indexed_songs = client.model_info().indexed_songs
            result.memory_idle = memory_mb(server.pid)
            responses = tmp / "responses"
            responses.mkdir()
            result.response_bytes = capture_responses(target, workloads, responses)
            if (responses / "ContinuePlaylist.bin").exists():
                result.strategy = pb2.ContinuePlaylistResponse.FromString(
                    (responses / "ContinuePlaylist.bin").read_bytes()).strategy
            targets = {"server": target}
            if not args.skip_echo:
                # Up beside the server (idle while the other is measured): the echo
                # answers the real responses' bytes.
                echo, echo_port = start_echo(responses, manifest.code_dim, tmp / "echo.log")
                targets["echo"] = f"127.0.0.1:{echo_port}"
            grids = load_grid(targets, workloads, args.concurrency, args.duration,
                              args.warmup, args.channels)
            result.server = grids["server"]
            result.echo = grids.get("echo", {})
            result.memory_after = memory_mb(server.pid)
        finally:
            server.stop()
            if echo is not None:
                echo.stop()
    del workloads
    if not args.skip_index:
        print("HNSW against exact search ...", flush=True)
        result.index = index_comparison(bundle, args.index_queries)
    body = render(result, command)
    print()
    print(body)
    if args.out != "-":
        replace_marked(Path(args.out), body, START, END)
        print(f"wrote the bench-serving section of {args.out}")
    if args.plot:
        try:
            plot(result, Path(args.plot), args.plot_concurrency)
        except ImportError:
            print(f"{PROG}: no matplotlib, no plot (it comes with the 'train' extra)",
                  file=sys.stderr)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(to_json(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
