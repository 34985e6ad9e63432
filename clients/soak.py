"""Soak test: a songrec server under mixed load for a bounded time, with AddSongs throughout
and one ReloadModel half-way; reports calls, errors by code, p99 over time and the server's
RSS, and writes them into docs/BENCHMARKS.md.

    python -m clients.soak --bundle bundles/demo --duration 120 --out docs/BENCHMARKS.md

The soak starts its own server (``python -m server`` on 127.0.0.1, a free port, a fresh
data directory and a random admin token that is never printed), so it never loads anyone
else's server and can read the server's memory from ``/proc``. The load is the load test's
``mixed`` workload (ContinuePlaylist, SimilarSongs, EncodeSong drawn from the bundle) at a
fixed concurrency, closed loop. The goal: no errors other than deliberate load shedding
(``RESOURCE_EXHAUSTED``), every acknowledged song present at the end, and RSS growth below
5% between the end of the warm-up and the end of the run. Exit status 0 when the goal is
met, 1 when not, 2 on bad input or a server that does not start.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import secrets
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clients.benchtools import (
    ServerError,
    ServerProcess,
    machine,
    replace_marked,
    shown_command,
    shown_path,
)
from clients.loadtest import DEFAULT_MIX, METHODS, Call, LoadError, build_workload, parse_mix
from protos.songrec.v1 import songrec_pb2 as pb2

PROG = "python -m clients.soak"
START_MARKER = "<!-- soak:start -->"
END_MARKER = "<!-- soak:end -->"
SHED = "RESOURCE_EXHAUSTED"  # deliberate load shedding, not an error
ADD_ID_BASE = 9_000_000_000  # ids of added songs: far above any catalogue id
ADMIN = {"AddSongs": "/songrec.v1.Admin/AddSongs",
         "ReloadModel": "/songrec.v1.Admin/ReloadModel"}
INFO = "/songrec.v1.Recommender/GetModelInfo"
BATCH = "/songrec.v1.Recommender/SimilarSongsBatch"


class SoakError(RuntimeError):
    """The soak cannot run: bad input, or a server that does not start."""


# ---------------------------------------------------------------- the soak


@dataclass(frozen=True)
class SoakConfig:
    """What to run; see the module docstring."""

    bundle: Path
    duration: float = 120.0
    concurrency: int = 64
    warmup: float | None = None  # None: 15% of the duration, at most 15 s
    window: float | None = None  # p99 window; None: duration / 12, at least 2 s
    add_every: float = 1.0  # seconds between AddSongs calls
    add_batch: int = 10  # songs per AddSongs call
    reload_at: float | None = None  # None: half-way
    deadline: float = 10.0
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    server_args: tuple[str, ...] = ()
    rss_budget: float = 5.0  # percent growth after the warm-up
    seed: int = 0

    @property
    def warmup_s(self) -> float:
        return min(15.0, 0.15 * self.duration) if self.warmup is None else self.warmup

    @property
    def window_s(self) -> float:
        return max(2.0, self.duration / 12) if self.window is None else self.window

    @property
    def reload_at_s(self) -> float:
        return self.duration / 2 if self.reload_at is None else self.reload_at

    def check(self) -> None:
        """Raise :class:`SoakError` naming the option that is out of range."""
        if not self.duration > 0:
            raise SoakError(f"--duration: {self.duration}; give seconds > 0")
        if self.concurrency < 1:
            raise SoakError(f"--concurrency: {self.concurrency}; at least 1")
        if not 0 <= self.warmup_s < self.duration:
            raise SoakError(f"--warmup: {self.warmup_s}; give 0 <= seconds < --duration")
        if not self.window_s > 0:
            raise SoakError(f"--window: {self.window_s}; give seconds > 0")
        if not self.add_every > 0 or not 1 <= self.add_batch <= 1000:
            raise SoakError("--add-every must be > 0 and --add-batch within 1..1000")
        if not 0 <= self.reload_at_s <= self.duration:
            raise SoakError(f"--reload-at: {self.reload_at_s}; give 0..--duration seconds")
        if not self.deadline > 0:
            raise SoakError(f"--deadline: {self.deadline}; give seconds > 0")
        if not (self.bundle / "manifest.json").is_file():
            raise SoakError(f"--bundle {self.bundle}: not a bundle (no manifest.json)")


@dataclass
class Record:
    """Every call of the run: start (seconds since the load began), latency, RPC, code."""

    starts: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    rpcs: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)  # code -> one example message

    def add(self, start: float, seconds: float, rpc: str, code: str, detail: str = "") -> None:
        self.starts.append(start)
        self.seconds.append(seconds)
        self.rpcs.append(rpc)
        self.codes.append(code)
        if code != "OK":
            self.details.setdefault(code, detail[:200])


@dataclass
class Events:
    """What the admin side did and what the server's memory was."""

    added: list[int] = field(default_factory=list)  # acknowledged song ids
    add_calls: Counter[str] = field(default_factory=Counter)  # status code -> calls
    reload: dict[str, Any] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)


def song_pool(calls: Sequence[Call]) -> list[pb2.SongMetadata]:
    """Metadata to describe new songs with: the workload's unseen songs (its EncodeSong
    requests), which the model knows."""
    metas = [pb2.EncodeSongRequest.FromString(c.payload).song for c in calls
             if c.rpc == "encode"]
    if not metas:
        raise SoakError("the workload has no EncodeSong requests to describe new songs")
    return metas


def new_songs(metas: Sequence[pb2.SongMetadata], start: int, n: int) -> pb2.AddSongsRequest:
    """``n`` new songs with ids from ``start``."""
    return pb2.AddSongsRequest(songs=[
        pb2.NewSong(song_id=start + i, metadata=metas[(start + i) % len(metas)],
                    name=f"soak song {start + i}", artists="soak")
        for i in range(n)])


async def run_soak(config: SoakConfig, server: ServerProcess, token: str,
                   calls: Sequence[Call]) -> tuple[Record, Events, dict[str, Any]]:
    """Drive ``server`` for ``config.duration`` seconds; returns every call, the admin
    events and RSS samples, and what the server said at the end."""
    auth = (("authorization", f"Bearer {token}"),)
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_receive_message_length", 64 << 20)]
    # A few connections, as a fleet of backends would open; one would serialize on its
    # single HTTP/2 stream scheduler.
    channels = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(4)]
    record, events = Record(), Events()
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
        stubs = [{rpc: ch.unary_unary(path) for rpc, path in METHODS.items()}
                 for ch in channels]
        admin = {name: channels[0].unary_unary(path) for name, path in ADMIN.items()}
        begin = time.perf_counter()
        end = begin + config.duration

        async def caller(w: int) -> None:
            stub = stubs[w % len(stubs)]
            j = (w * 7919) % len(calls)
            while (now := time.perf_counter()) < end:
                call = calls[j]
                j = (j + 1) % len(calls)
                try:
                    await stub[call.rpc](call.payload, timeout=config.deadline)
                    code, detail = "OK", ""
                except grpc.aio.AioRpcError as exc:
                    code, detail = exc.code().name, exc.details() or ""
                record.add(now - begin, time.perf_counter() - now, call.rpc, code, detail)

        async def adder() -> None:
            metas = song_pool(calls)
            next_id = ADD_ID_BASE
            at = begin + config.add_every / 2
            while at < end:
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                request = new_songs(metas, next_id, config.add_batch)
                next_id += config.add_batch
                start = time.perf_counter()
                try:
                    reply = await admin["AddSongs"](request.SerializeToString(),
                                                    timeout=config.deadline, metadata=auth)
                    code, detail = "OK", ""
                    events.added.extend(pb2.AddSongsResponse.FromString(reply).added_song_ids)
                except grpc.aio.AioRpcError as exc:
                    code, detail = exc.code().name, exc.details() or ""
                events.add_calls[code] += 1
                record.add(start - begin, time.perf_counter() - start, "add", code, detail)
                at += config.add_every

        async def reloader() -> None:
            await asyncio.sleep(max(0.0, begin + config.reload_at_s - time.perf_counter()))
            start = time.perf_counter()
            events.reload["at_s"] = round(start - begin, 1)
            try:
                raw = await admin["ReloadModel"](pb2.ReloadModelRequest().SerializeToString(),
                                                 timeout=120, metadata=auth)
                reply = pb2.ReloadModelResponse.FromString(raw)
                events.reload.update(code="OK", replayed=reply.replayed_songs,
                                     version=reply.current.model_version)
            except grpc.aio.AioRpcError as exc:
                events.reload.update(code=exc.code().name, detail=exc.details() or "")
            events.reload["seconds"] = round(time.perf_counter() - start, 2)

        async def sampler() -> None:
            while (now := time.perf_counter()) < end:
                rss = server.rss_bytes()
                if rss is not None:
                    events.rss.append((now - begin, rss))
                await asyncio.sleep(0.5)

        await asyncio.gather(sampler(), adder(), reloader(),
                             *(caller(w) for w in range(config.concurrency)))
        rss = server.rss_bytes()
        if rss is not None:
            events.rss.append((time.perf_counter() - begin, rss))
        final = await _final_check(channels[0], events.added)
    finally:
        for channel in channels:
            await channel.close()
    return record, events, final


async def _final_check(channel: grpc.aio.Channel, added: Sequence[int]) -> dict[str, Any]:
    """Is every acknowledged song served (through the reload)?"""
    info = pb2.ModelInfo.FromString(await channel.unary_unary(INFO)(
        pb2.GetModelInfoRequest().SerializeToString(), timeout=30))
    missing: list[int] = []
    for start in range(0, len(added), 1000):
        chunk = list(added[start:start + 1000])
        raw = await channel.unary_unary(BATCH)(pb2.SimilarSongsBatchRequest(
            song_ids=chunk, k=1).SerializeToString(), timeout=30)
        missing.extend(pb2.SimilarSongsBatchResponse.FromString(raw).unknown_song_ids)
    return {"added_songs": info.added_songs, "model_version": info.model_version,
            "missing": missing}


# ---------------------------------------------------------------- the report


def _ms(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 2) if len(values) else None


def summarize(config: SoakConfig, record: Record, events: Events, final: Mapping[str, Any],
              exit_status: int | None, exit_seconds: float | None) -> dict[str, Any]:
    """The run as a JSON-ready report, with the verdict against the goal."""
    starts = np.asarray(record.starts)
    seconds = np.asarray(record.seconds)
    rpcs = np.asarray(record.rpcs)
    codes = np.asarray(record.codes)
    ok = codes == "OK"
    by_code = Counter(c for c in record.codes if c != "OK")
    errors = {c: n for c, n in by_code.items() if c != SHED}
    by_rpc = {}
    for rpc in sorted(set(record.rpcs)):
        mine = rpcs == rpc
        good = seconds[mine & ok]
        by_rpc[rpc] = {"calls": int(mine.sum()), "ok": int(len(good)),
                       "p50_ms": _ms(good, 50), "p99_ms": _ms(good, 99),
                       "max_ms": round(float(good.max()) * 1e3, 2) if len(good) else None}
    windows = []
    width = config.window_s
    rss = events.rss
    for i in range(int(np.ceil(config.duration / width))):
        low, high = i * width, min((i + 1) * width, config.duration)
        inside = (starts >= low) & (starts < high)
        good = seconds[inside & ok]
        in_rss = [b for t, b in rss if low <= t < high]
        windows.append({"from_s": round(low, 1), "to_s": round(high, 1),
                        "calls": int(inside.sum()), "errors": int((inside & ~ok).sum()),
                        "p50_ms": _ms(good, 50), "p99_ms": _ms(good, 99),
                        "rss_mb": round(in_rss[-1] / 2**20, 1) if in_rss else None})
    warm = [b for t, b in rss if t >= config.warmup_s]
    rss_start = rss[0][1] if rss else None
    rss_warm = warm[0] if warm else None
    rss_end = rss[-1][1] if rss else None
    growth = (100.0 * (rss_end - rss_warm) / rss_warm) if rss_warm and rss_end else None
    acked = len(events.added)
    missing = list(final.get("missing", []))
    problems = []
    if errors:
        problems.append("errors: " + ", ".join(f"{c} x{n}" for c, n in sorted(errors.items())))
    if events.reload.get("code") != "OK":
        problems.append(f"ReloadModel: {events.reload.get('code', 'not run')}")
    if missing:
        problems.append(f"{len(missing)} acknowledged songs missing")
    if growth is not None and growth >= config.rss_budget:
        problems.append(f"RSS grew {growth:.1f}% (budget {config.rss_budget:g}%)")
    if exit_status not in (0, None):
        problems.append(f"server exit status {exit_status}")
    measured = float(starts.max()) if len(starts) else config.duration
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "bundle": shown_path(config.bundle), "duration_s": config.duration,
        "concurrency": config.concurrency, "mix": dict(config.mix),
        "warmup_s": config.warmup_s, "window_s": width,
        "add_every_s": config.add_every, "add_batch": config.add_batch,
        "server_args": list(config.server_args),
        "calls": len(record.codes), "calls_per_s": round(len(record.codes) /
                                                         max(measured, 1e-9), 1),
        "ok": int(ok.sum()), "shed": by_code.get(SHED, 0), "errors": errors,
        "error_examples": record.details,
        "p50_ms": _ms(seconds[ok], 50), "p99_ms": _ms(seconds[ok], 99),
        "by_rpc": by_rpc, "windows": windows,
        "add_calls": dict(events.add_calls), "added_songs": acked,
        "served_added_songs": final.get("added_songs"), "missing_songs": len(missing),
        "reload": events.reload,
        "rss_mb": {"start": _mb(rss_start), "after_warmup": _mb(rss_warm),
                   "end": _mb(rss_end), "peak": _mb(max((b for _, b in rss), default=None))},
        "rss_growth_pct": None if growth is None else round(growth, 2),
        "rss_budget_pct": config.rss_budget,
        "server_exit": exit_status,
        "server_exit_s": None if exit_seconds is None else round(exit_seconds, 2),
        "passed": not problems, "problems": problems,
    }


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value}"


def render(report: Mapping[str, Any], command: str) -> str:
    """The report as the markdown section of docs/BENCHMARKS.md."""
    mix = ":".join(f"{v:g}" for v in report["mix"].values())
    names = "/".join(report["mix"])
    rss = report["rss_mb"]
    reload = report["reload"]
    reload_text = (f"at {reload.get('at_s')} s: {reload.get('code')} in "
                   f"{reload.get('seconds')} s, {reload.get('replayed', 0)} logged songs "
                   f"re-added" if reload else "not run")
    errors = ", ".join(f"{c} x{n}" for c, n in sorted(report["errors"].items())) or "none"
    verdict = ("**goal met**: no errors but shedding, every acknowledged song served, RSS "
               f"growth {report['rss_growth_pct']}% < {report['rss_budget_pct']:g}%"
               if report["passed"] else "**goal missed**: " + "; ".join(report["problems"]))
    lines = [
        "## Soak (`make soak`)",
        "",
        f"`{command}` on {report['date']} ({report['machine']}); server and load generator "
        f"share the machine, over loopback. {report['concurrency']} callers in a closed loop "
        f"send the load test's mixed workload ({names} = {mix}) for "
        f"{report['duration_s']:g} s; meanwhile AddSongs adds {report['add_batch']} songs "
        f"every {report['add_every_s']:g} s and one ReloadModel reloads the bundle "
        f"half-way. RSS is the server process's; growth counts from the end of the "
        f"{report['warmup_s']:g} s warm-up.",
        "",
        "| | |",
        "|---|---|",
        f"| calls | {report['calls']} ({report['calls_per_s']}/s), p50 "
        f"{_cell(report['p50_ms'])} ms, p99 {_cell(report['p99_ms'])} ms |",
        f"| errors by code | {errors}; shed (RESOURCE_EXHAUSTED): {report['shed']} |",
        f"| AddSongs | {sum(report['add_calls'].values())} calls "
        f"({', '.join(f'{c} x{n}' for c, n in sorted(report['add_calls'].items()))}), "
        f"{report['added_songs']} songs acknowledged, {report['missing_songs']} missing at "
        f"the end |",
        f"| ReloadModel | {reload_text} |",
        f"| server RSS (MB) | start {_cell(rss['start'])}, after warm-up "
        f"{_cell(rss['after_warmup'])}, end {_cell(rss['end'])} "
        f"({_cell(report['rss_growth_pct'])}%), peak {_cell(rss['peak'])} |",
        f"| SIGTERM at the end | exit status {_cell(report['server_exit'])} after "
        f"{_cell(report['server_exit_s'])} s |",
        f"| verdict | {verdict} |",
        "",
        "| RPC | calls | ok | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rpc, row in report["by_rpc"].items():
        lines.append(f"| {rpc} | {row['calls']} | {row['ok']} | {_cell(row['p50_ms'])} | "
                     f"{_cell(row['p99_ms'])} | {_cell(row['max_ms'])} |")
    lines += ["", "p99 over time (a window holds the calls that started in it):", "",
              "| window (s) | calls | errors | p50 ms | p99 ms | RSS MB | |",
              "|---|---:|---:|---:|---:|---:|---|"]
    at = reload.get("at_s")
    for w in report["windows"]:
        mark = "ReloadModel" if at is not None and w["from_s"] <= at < w["to_s"] else ""
        lines.append(f"| {w['from_s']:g}-{w['to_s']:g} | {w['calls']} | {w['errors']} | "
                     f"{_cell(w['p50_ms'])} | {_cell(w['p99_ms'])} | {_cell(w['rss_mb'])} | "
                     f"{mark} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace the soak section of ``path`` (appended when missing)."""
    replace_marked(path, body, START_MARKER, END_MARKER)


# ---------------------------------------------------------------- command line


def soak(config: SoakConfig) -> dict[str, Any]:
    """Start a server, soak it, stop it; the summarized report."""
    config.check()
    calls = build_workload("mixed", bundle=config.bundle, pool=2000, seed=config.seed,
                           mix=config.mix)
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="songrec-soak-") as state:
        args = ["--bundle", str(config.bundle), "--data-dir", state, *config.server_args]
        with ServerProcess(args, env={"SONGREC_ADMIN_TOKEN": token}) as server:
            record, events, final = asyncio.run(run_soak(config, server, token, calls))
            start = time.perf_counter()
            status = server.stop(timeout=60)
            exit_seconds = time.perf_counter() - start
    return summarize(config, record, events, final, status, exit_seconds)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory to serve")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=64, help="callers (closed loop)")
    p.add_argument("--mix", default="continue=2,similar=2,encode=1",
                   help="weights of the inference RPCs")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default 15%% of --duration, "
                        "at most 15)")
    p.add_argument("--window", type=float, default=None,
                   help="seconds per p99 window (default --duration / 12)")
    p.add_argument("--add-every", type=float, default=1.0,
                   help="seconds between AddSongs calls")
    p.add_argument("--add-batch", type=int, default=10, help="songs per AddSongs call")
    p.add_argument("--reload-at", type=float, default=None,
                   help="seconds into the run of the ReloadModel (default: half-way)")
    p.add_argument("--deadline", type=float, default=10.0, help="seconds per call")
    p.add_argument("--rss-budget", type=float, default=5.0,
                   help="allowed RSS growth after the warm-up, in percent")
    p.add_argument("--server-args", default="",
                   help="more server flags, e.g. '--workers 2 --similar-batch 0'")
    p.add_argument("--seed", type=int, default=0, help="random seed of the request draw")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose soak section is replaced (e.g. "
                        "docs/BENCHMARKS.md); none or - only prints it")
    p.add_argument("--json-out", type=Path, default=None, help="write the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; 0 when the goal is met, 1 when not, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        config = SoakConfig(bundle=args.bundle, duration=args.duration,
                            concurrency=args.concurrency, warmup=args.warmup,
                            window=args.window, add_every=args.add_every,
                            add_batch=args.add_batch, reload_at=args.reload_at,
                            deadline=args.deadline, mix=parse_mix(args.mix),
                            server_args=tuple(shlex.split(args.server_args)),
                            rss_budget=args.rss_budget, seed=args.seed)
        print(f"{PROG}: {config.duration:g} s at concurrency {config.concurrency} against "
              f"a fresh server on {config.bundle} ...", file=sys.stderr)
        report = soak(config)
    except (SoakError, ServerError, LoadError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    command = shown_command("python -m clients.soak", [
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    body = render(report, command)
    print(body)
    if args.out is not None and str(args.out) != "-":
        write_section(args.out, body)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
