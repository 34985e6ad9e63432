"""Load test of a songrec server: realistic requests, closed or open loop, latency report.

    python -m clients.loadtest --rpc similar --concurrency 32 --duration 10 \\
        --bundle bundles/demo
    python -m clients.loadtest --rpc mixed --rate 500 --duration 20 \\
        --questions data/demo-split/val_questions.json --json-out load.json --plot load.png

Requests are drawn from a questions file (a split's ``val_questions.json``: seeds, tags,
title and date of real questions; ``EncodeSong`` reads the ``song_meta.json`` beside it) or
from a bundle (training playlists, songs weighted by popularity, the model's genre and tag
vocabulary); never one repeated payload. They are serialized once up front and sent as
bytes, so the generator spends its time on gRPC, not on protobuf.

Closed loop (default): ``--concurrency`` callers each send their next request when the last
one is answered. Open loop (``--rate R``): Poisson arrivals at R per second whatever the
answers do, at most ``--concurrency`` in flight, and latency counted from each request's
scheduled time, so queueing (in the client or the server) shows instead of hiding. The run
stops after ``--duration`` seconds and/or ``--requests`` calls (whichever first; 10 s when
neither is given), after ``--warmup`` seconds that are not measured. One Python process
tops out at a few thousand calls per second: ``--processes N`` splits the load over N.

Latency percentiles cover successful calls; failures are counted by status code. Targets
other than loopback are refused unless ``--allow-remote``: a load test is not for
somebody else's production server by accident.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing as mp
import os
import queue as queue_module
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

from clients.benchtools import latency_histogram
from clients.client import (
    DEFAULT_TARGET,
    DRAIN_RETRY,
    TARGET_ENV,
    TOKEN_ENV,
    SongMetadata,
    balanced,
    continue_request,
    encode_request,
    similar_request,
)
from server import bundle as bundle_files

PROG = "python -m clients.loadtest"
METHODS = {"continue": "/songrec.v1.Recommender/ContinuePlaylist",
           "similar": "/songrec.v1.Recommender/SimilarSongs",
           "encode": "/songrec.v1.Recommender/EncodeSong"}
RPC_CHOICES = (*METHODS, "mixed")
DEFAULT_MIX = {"continue": 2.0, "similar": 2.0, "encode": 1.0}
DEFAULT_DURATION = 10.0
MAX_DURATION = 3600.0  # the bound when only --requests is given
PERCENTILES = (50, 90, 99)


class LoadError(ValueError):
    """The load test cannot run as asked (bad input, unreachable target)."""


@dataclass(frozen=True)
class Call:
    """One request ready to send: the RPC's short name and the serialized message."""

    rpc: str
    payload: bytes


# ---------------------------------------------------------------- request sources


@dataclass(frozen=True)
class RequestShape:
    """What the requests ask for: ``k`` neighbours for SimilarSongs, ``n_songs`` and
    ``n_tags`` for ContinuePlaylist, ``seeds`` the range of seed songs per playlist."""

    k: int = 100
    n_songs: int = 100
    n_tags: int = 10
    seeds: tuple[int, int] = (1, 20)
    strategy: str = ""
    encode_k: int | None = None  # None: the server's default (10)


def read_json_list(path: Path, what: str) -> list[Any]:
    try:
        raw = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise LoadError(f"{what} {path}: unreadable ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise LoadError(f"{what} {path}: not JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise LoadError(f"{what} {path}: expected a non-empty JSON list")
    return raw


def _seed_count(rng: np.random.Generator, available: int, shape: RequestShape) -> int:
    low, high = shape.seeds
    return int(rng.integers(low, min(high, available) + 1))


def continue_from_questions(questions: Sequence[Mapping[str, Any]], n: int,
                            rng: np.random.Generator, shape: RequestShape) -> list[bytes]:
    """ContinuePlaylist requests from questions with at least ``shape.seeds[0]`` songs:
    their first 1-20 (``shape.seeds``) songs, their tags, title and date."""
    usable = [q for q in questions if len(q.get("songs") or ()) >= shape.seeds[0]]
    if not usable:
        raise LoadError(f"no question has at least {shape.seeds[0]} songs")
    out = []
    for i in rng.integers(0, len(usable), n):
        q = usable[int(i)]
        songs = list(q.get("songs") or ())
        seeds = songs[:_seed_count(rng, len(songs), shape)] if songs else []
        out.append(continue_request(seeds, q.get("tags") or (), str(q.get("plylst_title", "")),
                                    str(q.get("updt_date", "")), shape.n_songs, shape.n_tags,
                                    shape.strategy).SerializeToString())
    return out


def similar_from_ids(ids: np.ndarray, n: int, rng: np.random.Generator,
                     shape: RequestShape, weights: np.ndarray | None = None) -> list[bytes]:
    """SimilarSongs requests for songs drawn from ``ids`` (by ``weights`` when given)."""
    if len(ids) == 0:
        raise LoadError("no songs to ask SimilarSongs about")
    p = None if weights is None else weights / weights.sum()
    chosen = rng.choice(ids, size=n, p=p)
    return [similar_request(int(song), shape.k).SerializeToString() for song in chosen]


def encode_from_song_meta(records: Sequence[Mapping[str, Any]], n: int,
                          rng: np.random.Generator, shape: RequestShape) -> list[bytes]:
    """EncodeSong requests for songs of ``song_meta.json`` (their genres, artists and issue
    date: what an unseen song comes with)."""
    out = []
    for i in rng.integers(0, len(records), n):
        record = records[int(i)]
        try:
            meta = SongMetadata.from_song_meta({k: v for k, v in record.items()
                                               if k not in ("playlist_ids", "tags")})
        except ValueError as exc:
            raise LoadError(f"song_meta record {int(i)}: {exc}") from None
        out.append(encode_request(meta, shape.encode_k).SerializeToString())
    return out


@dataclass
class BundleSource:
    """What a bundle says about realistic requests, read without the model itself."""

    song_ids: np.ndarray
    popularity: np.ndarray
    issue_dates: np.ndarray
    playlist_songs: tuple[np.ndarray, np.ndarray]  # indptr, song rows
    playlist_tags: tuple[np.ndarray, np.ndarray]  # indptr, tag indices
    tags: list[str]
    columns: dict[str, list[str]]  # column group -> keys

    @classmethod
    def load(cls, bundle: Path) -> BundleSource:
        try:
            get = bundle_files.load_arrays(bundle, (
                "song_ids", "popularity", "issue_dates", "playlist_songs_indptr",
                "playlist_songs_indices", "playlist_tags_indptr", "playlist_tags_indices",
                "tag_blob", "tag_offsets"))
            columns = bundle_files.load_columns(bundle)
        except bundle_files.BundleError as exc:
            raise LoadError(f"bundle {bundle}: {exc}") from None
        tags = bundle_files.unpack_strings(get["tag_blob"], get["tag_offsets"])
        groups = {g["name"]: [str(k) for k in g["keys"]] for g in columns.get("groups", [])}
        return cls(get["song_ids"], get["popularity"].astype(np.float64),
                   get["issue_dates"],
                   (get["playlist_songs_indptr"], get["playlist_songs_indices"]),
                   (get["playlist_tags_indptr"], get["playlist_tags_indices"]), tags, groups)

    def continue_requests(self, n: int, rng: np.random.Generator,
                          shape: RequestShape) -> list[bytes]:
        """1-20 songs (``shape.seeds``) and the tags of random training playlists."""
        indptr, rows = self.playlist_songs
        tag_ptr, tag_idx = self.playlist_tags
        sizes = np.diff(indptr)
        usable = np.nonzero(sizes >= max(shape.seeds[0], 1))[0]
        if len(usable) == 0:
            raise LoadError("the bundle has no training playlist with songs")
        out = []
        for p in rng.choice(usable, size=n):
            songs = rows[indptr[p]:indptr[p + 1]]
            seeds = self.song_ids[rng.permutation(songs)[:_seed_count(rng, len(songs), shape)]]
            tags = [self.tags[t] for t in tag_idx[tag_ptr[p]:tag_ptr[p + 1]][:3]]
            out.append(continue_request(seeds.tolist(), tags, n_songs=shape.n_songs,
                                        n_tags=shape.n_tags,
                                        strategy=shape.strategy).SerializeToString())
        return out

    def similar_requests(self, n: int, rng: np.random.Generator,
                         shape: RequestShape) -> list[bytes]:
        """Songs weighted by popularity + 1: hits follow plays, and every song can come."""
        return similar_from_ids(self.song_ids, n, rng, shape, self.popularity + 1.0)

    def encode_requests(self, n: int, rng: np.random.Generator,
                        shape: RequestShape) -> list[bytes]:
        """Unseen songs: 1-2 detailed genres of the model's vocabulary, their major genre,
        a real issue date, an artist id when the model knows artists."""
        detail = self.columns.get("detail_genres") or []
        major = set(self.columns.get("genres") or [])
        artists = self.columns.get("artists") or []
        if not detail and not major:
            raise LoadError("the bundle's columns have no genres to describe songs with")
        out = []
        for _ in range(n):
            details = sorted({detail[int(i)] for i in rng.integers(0, len(detail),
                                                                   int(rng.integers(1, 3)))}
                             ) if detail else []
            genres = sorted({d[:4] + "00" for d in details} & major) or (
                [sorted(major)[int(rng.integers(0, len(major)))]] if major else [])
            date = int(self.issue_dates[int(rng.integers(0, len(self.issue_dates)))])
            artist = [int(artists[int(rng.integers(0, len(artists)))])] if artists else []
            meta = SongMetadata(genres=tuple(genres), detail_genres=tuple(details),
                                artist_ids=tuple(artist),
                                issue_date=f"{date:08d}" if date > 0 else "")
            out.append(encode_request(meta, shape.encode_k).SerializeToString())
        return out


def parse_mix(text: str) -> dict[str, float]:
    """"continue=2,similar=2,encode=1" -> weights (every RPC named once, weights >= 0)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in METHODS:
            raise LoadError(f"--mix: {name!r} is not one of {', '.join(METHODS)}")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise LoadError(f"--mix: {part!r} is not NAME=WEIGHT") from None
        if not mix[name] >= 0:
            raise LoadError(f"--mix: {part!r}: weights are >= 0")
    if not mix or sum(mix.values()) <= 0:
        raise LoadError("--mix: give at least one positive weight")
    return mix


def build_workload(rpc: str, *, questions: Path | None = None, bundle: Path | None = None,
                   pool: int = 2000, seed: int = 0, shape: RequestShape = RequestShape(),
                   mix: Mapping[str, float] = DEFAULT_MIX) -> list[Call]:
    """``pool`` requests for ``rpc`` (or a ``mixed`` set in ``mix`` proportions), shuffled.

    ContinuePlaylist and SimilarSongs are drawn from ``questions`` when given, else from
    ``bundle``; EncodeSong from ``bundle`` when given, else from the ``song_meta.json``
    beside ``questions``. Raises :class:`LoadError` when neither source can serve.
    """
    if rpc not in RPC_CHOICES:
        raise LoadError(f"--rpc: {rpc!r} is not one of {', '.join(RPC_CHOICES)}")
    if questions is None and bundle is None:
        raise LoadError("give --questions FILE (e.g. a split's val_questions.json) or "
                        "--bundle DIR to draw realistic requests from")
    if pool < 1:
        raise LoadError(f"--pool: {pool}; at least 1")
    low, high = shape.seeds
    if not 0 <= low <= high or high < 1:
        raise LoadError(f"--seeds: {low}-{high} is not a range LOW-HIGH with 0 <= LOW <= HIGH")
    rng = np.random.default_rng(seed)
    weights = {rpc: 1.0} if rpc != "mixed" else {k: v for k, v in mix.items() if v > 0}
    total = sum(weights.values())
    counts = {name: max(1, round(pool * w / total)) for name, w in weights.items()}
    source = BundleSource.load(bundle) if bundle is not None else None
    asked = read_json_list(questions, "questions") if questions is not None else None
    calls: list[Call] = []
    for name, n in counts.items():
        if name == "continue":
            payloads = (continue_from_questions(asked, n, rng, shape) if asked is not None
                        else _need(source).continue_requests(n, rng, shape))
        elif name == "similar":
            if asked is not None:
                ids = np.fromiter((s for q in asked for s in q.get("songs") or ()),
                                  dtype=np.int64)
                payloads = similar_from_ids(ids, n, rng, shape)
            else:
                payloads = _need(source).similar_requests(n, rng, shape)
        else:
            if source is not None:
                payloads = source.encode_requests(n, rng, shape)
            else:
                assert questions is not None
                meta = questions.parent / "song_meta.json"
                if not meta.is_file():
                    raise LoadError(f"EncodeSong requests need --bundle, or {meta} beside "
                                    f"the questions")
                payloads = encode_from_song_meta(read_json_list(meta, "song_meta"), n, rng,
                                                 shape)
        calls.extend(Call(name, p) for p in payloads)
    order = rng.permutation(len(calls))
    return [calls[int(i)] for i in order]


def _need(source: BundleSource | None) -> BundleSource:
    if source is None:
        raise LoadError("these requests need --bundle")
    return source


# ---------------------------------------------------------------- driving the load


@dataclass(frozen=True)
class LoadConfig:
    """How to load the target; see the module docstring for the closed and open loops."""

    target: str = DEFAULT_TARGET
    concurrency: int = 8
    duration: float | None = DEFAULT_DURATION
    requests: int | None = None
    rate: float | None = None
    warmup: float = 1.0
    deadline: float = 10.0
    token: str | None = field(default=None, repr=False)
    root_certificates: bytes | None = field(default=None, repr=False)
    tls: bool = False
    channels: int = 1
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`LoadError` naming the flag that is out of range."""
        if self.concurrency < 1:
            raise LoadError(f"--concurrency: {self.concurrency}; at least 1")
        if self.duration is not None and not self.duration > 0:
            raise LoadError(f"--duration: {self.duration}; give seconds > 0")
        if self.requests is not None and self.requests < 1:
            raise LoadError(f"--requests: {self.requests}; at least 1")
        if self.rate is not None and not self.rate > 0:
            raise LoadError(f"--rate: {self.rate}; give calls per second > 0")
        if self.warmup < 0:
            raise LoadError(f"--warmup: {self.warmup}; give seconds >= 0")
        if not self.deadline > 0:
            raise LoadError(f"--deadline: {self.deadline}; give seconds > 0")
        if self.channels < 1:
            raise LoadError(f"--channels: {self.channels}; at least 1")

    @property
    def time_limit(self) -> float:
        if self.duration is not None:
            return self.duration
        return MAX_DURATION if self.requests is not None else DEFAULT_DURATION


@dataclass
class Samples:
    """What one load process saw in its measured window."""

    latencies: dict[str, list[float]]  # rpc -> seconds, successful calls
    errors: dict[str, Counter[str]]  # rpc -> status code name -> count
    started: float = 0.0  # wall clock (time.time) of the window
    finished: float = 0.0
    error_details: dict[str, str] = field(default_factory=dict)  # code -> one example

    @classmethod
    def empty(cls, rpcs: Sequence[str]) -> Samples:
        return cls({r: [] for r in rpcs}, {r: Counter() for r in rpcs})


def _channel(config: LoadConfig, index: int) -> grpc.aio.Channel:
    # A distinct subchannel pool per channel: otherwise gRPC shares one connection.
    options: list[tuple[str, Any]] = (
        [("grpc.use_local_subchannel_pool", 1)] if config.channels > 1 else [])
    options.append(("grpc.max_receive_message_length", 64 << 20))
    options.append(DRAIN_RETRY)  # as SongRecClient: a draining replica's CANCELLED, again
    target, balancing = balanced(config.target)  # several replicas: round_robin
    options.extend(balancing)
    if config.tls or config.root_certificates is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=config.root_certificates)
        return grpc.aio.secure_channel(target, creds, options=options)
    return grpc.aio.insecure_channel(target, options=options)


async def drive(config: LoadConfig, calls: Sequence[Call],
                ready: Callable[[], None] | None = None) -> Samples:
    """Run the load of one process: connect, call ``ready`` (e.g. a barrier), warm up,
    then measure. Raises :class:`LoadError` when the target cannot be reached."""
    if not calls:
        raise LoadError("no requests to send")
    metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
    channels = [_channel(config, i) for i in range(config.channels)]
    try:
        for channel in channels:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=config.deadline)
            except asyncio.TimeoutError:
                raise LoadError(f"cannot reach {config.target} within {config.deadline:.0f} s"
                                ) from None
        stubs = [{rpc: ch.unary_unary(path) for rpc, path in METHODS.items()}
                 for ch in channels]
        if ready is not None:
            await asyncio.to_thread(ready)
        rpcs = sorted({c.rpc for c in calls})
        if config.warmup > 0:
            await _phase(config, calls, stubs, metadata, Samples.empty(rpcs), config.warmup,
                         None, offset=config.seed + 1)
        samples = Samples.empty(rpcs)
        samples.started = time.time()
        await _phase(config, calls, stubs, metadata, samples, config.time_limit,
                     config.requests, offset=config.seed)
        samples.finished = time.time()
        return samples
    finally:
        for channel in channels:
            await channel.close()


async def _phase(config: LoadConfig, calls: Sequence[Call], stubs: list[dict[str, Any]],
                 metadata: tuple[tuple[str, str], ...], samples: Samples, seconds: float,
                 limit: int | None, offset: int) -> None:
    deadline = config.deadline
    latencies, errors, details = samples.latencies, samples.errors, samples.error_details

    async def one(call: Call, stub: Any, start: float) -> None:
        try:
            await stub[call.rpc](call.payload, timeout=deadline, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            errors[call.rpc][code] += 1
            details.setdefault(code, exc.details() or "")
            return
        latencies[call.rpc].append(time.perf_counter() - start)

    n = len(calls)
    end = time.perf_counter() + seconds
    if config.rate is None:
        issued = 0

        async def caller(w: int) -> None:
            nonlocal issued
            # Callers start at spread-out points of the shuffled pool.
            j = (offset * 7919 + w * (n // config.concurrency + 1)) % n
            stub = stubs[w % len(stubs)]
            while time.perf_counter() < end and (limit is None or issued < limit):
                issued += 1
                await one(calls[j], stub, time.perf_counter())
                j = (j + 1) % n

        await asyncio.gather(*(caller(w) for w in range(config.concurrency)))
        return

    rng = random.Random(offset)
    gate = asyncio.Semaphore(config.concurrency)
    pending: set[asyncio.Task[None]] = set()

    async def scheduled(call: Call, stub: Any, at: float) -> None:
        async with gate:
            await one(call, stub, at)  # latency from the scheduled time: queueing counts

    at, sent = time.perf_counter(), 0
    while at < end and (limit is None or sent < limit):
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(scheduled(calls[(offset + sent) % n],
                                             stubs[sent % len(stubs)], at))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
        at += rng.expovariate(config.rate)
    if pending:
        await asyncio.gather(*pending)


def split_config(config: LoadConfig, processes: int) -> list[LoadConfig]:
    """The share of each of ``processes`` load processes (concurrency, rate and request
    count divided, at least one caller each; distinct seeds)."""
    def share(total: int, i: int) -> int:
        return total // processes + (1 if i < total % processes else 0)

    return [replace(config, concurrency=max(1, share(config.concurrency, i)),
                    rate=None if config.rate is None else config.rate / processes,
                    requests=(None if config.requests is None
                              else max(1, share(config.requests, i))),
                    seed=config.seed + 1000 * i)
            for i in range(processes)]


def _child(config: LoadConfig, calls: Sequence[Call], barrier: Any, results: Any) -> None:
    try:
        samples = asyncio.run(drive(config, calls, ready=lambda: barrier.wait(120)))
        results.put(("ok", samples))
    except BaseException as exc:  # reported to the parent, which decides
        try:
            barrier.abort()
        finally:
            results.put(("error", f"{exc.__class__.__name__}: {exc}"))


def collect(config: LoadConfig, calls: Sequence[Call], processes: int = 1) -> list[Samples]:
    """Run the load in this process (``processes`` 1) or in N spawned processes that
    start their measured windows together; one :class:`Samples` per process."""
    config.check()
    if processes < 1:
        raise LoadError(f"--processes: {processes}; at least 1")
    if processes == 1:
        return [asyncio.run(drive(config, calls))]
    ctx = mp.get_context("spawn")  # fork and gRPC's threads do not mix
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [ctx.Process(target=_child, args=(part, list(calls), barrier, results),
                           daemon=True) for part in split_config(config, processes)]
    for worker in workers:
        worker.start()
    budget = config.time_limit + config.warmup + config.deadline + 180
    out: list[Samples] = []
    failures: list[str] = []
    try:
        for _ in workers:
            try:
                status, value = results.get(timeout=budget)
            except queue_module.Empty:
                raise LoadError(f"a load process did not report within {budget:.0f} s"
                                ) from None
            if status == "ok":
                out.append(value)
            else:
                failures.append(value)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
    if failures:
        raise LoadError(f"{len(failures)} of {processes} load processes failed: {failures[0]}")
    return out


# ---------------------------------------------------------------- the report


def latency_stats(seconds: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/max/mean in milliseconds (None when there are no samples)."""
    if len(seconds) == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "mean": None}
    ms = seconds * 1e3
    values = np.percentile(ms, PERCENTILES)
    out: dict[str, float | None] = {f"p{p}": round(float(v), 3)
                                    for p, v in zip(PERCENTILES, values, strict=True)}
    out["max"] = round(float(ms.max()), 3)
    out["mean"] = round(float(ms.mean()), 3)
    return out


def histogram(seconds: np.ndarray, bins: int = 40) -> dict[str, list[float] | list[int]]:
    """Log-spaced latency histogram in milliseconds."""
    if len(seconds) == 0:
        return {"edges_ms": [], "counts": []}
    ms = seconds * 1e3
    low, high = max(float(ms.min()), 1e-3), max(float(ms.max()), 1e-3)
    edges = np.geomspace(low, high * 1.0001 if high > low else low * 2, bins + 1)
    counts, _ = np.histogram(ms, edges)
    return {"edges_ms": [round(float(e), 4) for e in edges],
            "counts": [int(c) for c in counts]}


@dataclass
class LoadResult:
    """The JSON-ready ``report`` and the raw latencies (seconds) per RPC, for plots."""

    report: dict[str, Any]
    latencies: dict[str, np.ndarray]


def summarize(parts: Sequence[Samples], config: LoadConfig, rpc: str,
              processes: int) -> LoadResult:
    """Merge the processes' samples into one report."""
    rpcs = sorted({r for s in parts for r in s.latencies})
    window = max(s.finished for s in parts) - min(s.started for s in parts)
    window = max(window, 1e-9)
    latencies = {r: np.asarray([x for s in parts for x in s.latencies.get(r, [])],
                               dtype=np.float64) for r in rpcs}
    by_rpc: dict[str, Any] = {}
    all_errors: Counter[str] = Counter()
    details: dict[str, str] = {}
    for s in parts:
        for code, text in s.error_details.items():
            details.setdefault(code, text)
    for r in rpcs:
        errors: Counter[str] = Counter()
        for s in parts:
            errors.update(s.errors.get(r, Counter()))
        all_errors.update(errors)
        ok = len(latencies[r])
        total = ok + sum(errors.values())
        by_rpc[r] = {"requests": total, "ok": ok, "errors": dict(sorted(errors.items())),
                     "requests_per_s": round(total / window, 2),
                     "ok_per_s": round(ok / window, 2),
                     "latency_ms": latency_stats(latencies[r])}
    everything = (np.concatenate(list(latencies.values())) if latencies
                  else np.empty(0, dtype=np.float64))
    ok = len(everything)
    total = ok + sum(all_errors.values())
    report = {
        "target": config.target, "rpc": rpc,
        "mode": "closed" if config.rate is None else "open",
        "concurrency": config.concurrency, "rate": config.rate, "processes": processes,
        "channels": config.channels, "duration_s": config.duration,
        "requests_limit": config.requests, "warmup_s": config.warmup,
        "deadline_s": config.deadline,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(
            min(s.started for s in parts))),
        "window_s": round(window, 6), "requests": total, "ok": ok,
        "errors": dict(sorted(all_errors.items())), "error_examples": details,
        "requests_per_s": round(total / window, 2), "ok_per_s": round(ok / window, 2),
        "latency_ms": latency_stats(everything), "by_rpc": by_rpc,
        "histogram": histogram(everything)}
    return LoadResult(report, latencies)


def run(config: LoadConfig, calls: Sequence[Call], rpc: str = "mixed",
        processes: int = 1) -> LoadResult:
    """Run a load test and summarize it (the library entry point; see :func:`collect`)."""
    return summarize(collect(config, calls, processes), config, rpc, processes)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table."""
    mode = ("closed loop" if report["mode"] == "closed"
            else f"open loop at {report['rate']:g}/s")
    head = (f"{report['target']}  rpc {report['rpc']}, {mode}, concurrency "
            f"{report['concurrency']} over {report['processes']} process(es), "
            f"{report['window_s']:.1f} s measured after {report['warmup_s']:g} s warm-up")
    headers = ["rpc", "requests", "ok", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms",
               "max ms"]
    rows = []
    for name, part in [*report["by_rpc"].items(), ("all", report)]:
        lat = part["latency_ms"]
        rows.append([name, str(part["requests"]), str(part["ok"]),
                     str(sum(part["errors"].values())), f"{part['requests_per_s']:.1f}",
                     _ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]), _ms(lat["max"])])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [head, "", "  ".join(h.rjust(w) if i else h.ljust(w)
                                 for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    for r in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    if report["errors"]:
        lines.append("")
        lines.append("errors by status: " + ", ".join(f"{k} {v}"
                                                       for k, v in report["errors"].items()))
        for code, text in report["error_examples"].items():
            lines.append(f"  {code}: {text[:200]}")
    return "\n".join(lines)


def plot(latencies: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    """Latency histograms (log-spaced bins, one step line per RPC) into a PNG."""
    try:  # matplotlib comes with the 'train' extra; only --plot needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoadError("--plot needs matplotlib (pip install matplotlib, or the project's "
                        "'train' extra)") from None
    present = {k: v * 1e3 for k, v in latencies.items() if len(v)}
    if not present:
        raise LoadError("--plot: no successful calls to draw")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    latency_histogram(ax, dict(sorted(present.items())), counts=True)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine (localhost, 127.0.0.0/8, ::1, unix:); a
    list of addresses (``host1:port,host2:port``) only if every one does."""
    text = target.strip()
    if "," in text and not text.startswith(("unix:", "unix-abstract:")):
        scheme = next((s for s in ("ipv4:", "ipv6:") if text.startswith(s)), "")
        return all(is_loopback(part) for part in text[len(scheme):].split(","))
    if text.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if text.startswith(scheme):
            text = text[len(scheme):]
            break
    if text.startswith("["):
        host = text[1:text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        host = text.rsplit(":", 1)[0]
    else:
        host = text
    if host.lower() in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _seeds(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH, e.g. 1-20") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--target", default=None,
                   help=f"host:port, dns:///host:port or host1:port,host2:port (several "
                        f"replicas, round_robin; default: {TARGET_ENV} or {DEFAULT_TARGET})")
    p.add_argument("--rpc", choices=RPC_CHOICES, default="mixed")
    p.add_argument("--mix", default="continue=2,similar=2,encode=1",
                   help="weights of the RPCs in --rpc mixed")
    p.add_argument("--concurrency", type=int, default=8,
                   help="callers (closed loop) or most calls in flight (open loop)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"measured seconds (default {DEFAULT_DURATION:g} unless --requests)")
    p.add_argument("--requests", type=int, default=None, help="measured calls at most")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: Poisson arrivals per second over all processes")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--questions", type=Path, default=None,
                   help="questions JSON (a split's val_questions.json) to draw requests from")
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle directory to draw requests from")
    p.add_argument("--pool", type=int, default=2000, help="distinct requests prepared")
    p.add_argument("-k", "--k", type=int, default=100, help="SimilarSongs k (default 100)")
    p.add_argument("--n-songs", type=int, default=100, help="ContinuePlaylist n_songs")
    p.add_argument("--n-tags", type=int, default=10, help="ContinuePlaylist n_tags")
    p.add_argument("--seeds", type=_seeds, default=(1, 20), metavar="LOW-HIGH",
                   help="seed songs per ContinuePlaylist request (default 1-20)")
    p.add_argument("--strategy", default="", help="ContinuePlaylist strategy (default: "
                                                  "the server's)")
    p.add_argument("--processes", type=int, default=1, help="load processes (default 1)")
    p.add_argument("--channels", type=int, default=1,
                   help="gRPC channels (connections) per process")
    p.add_argument("--deadline", type=float, default=10.0, help="seconds per call")
    p.add_argument("--token", default=None, help=f"bearer token (default: {TOKEN_ENV})")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca-cert", type=Path, default=None, help="PEM roots (implies --tls)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the request draw")
    p.add_argument("--json-out", type=Path, default=None, help="write the report as JSON")
    p.add_argument("--plot", type=Path, default=None, help="latency histogram PNG")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a target that is not this machine")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; 0 when at least one call succeeded, 1 when none did, 2 on bad
    input or an unreachable target."""
    args = build_parser().parse_args(argv)
    target = args.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    try:
        if not args.allow_remote and not is_loopback(target):
            raise LoadError(f"--target {target} is not this machine; pass --allow-remote to "
                            f"load it anyway")
        roots = args.ca_cert.read_bytes() if args.ca_cert is not None else None
        config = LoadConfig(target=target, concurrency=args.concurrency,
                            duration=args.duration, requests=args.requests, rate=args.rate,
                            warmup=args.warmup, deadline=args.deadline,
                            token=args.token if args.token is not None
                            else os.environ.get(TOKEN_ENV) or None,
                            root_certificates=roots, tls=args.tls, channels=args.channels,
                            seed=args.seed)
        config.check()
        shape = RequestShape(k=args.k, n_songs=args.n_songs, n_tags=args.n_tags,
                             seeds=args.seeds, strategy=args.strategy)
        calls = build_workload(args.rpc, questions=args.questions, bundle=args.bundle,
                               pool=args.pool, seed=args.seed, shape=shape,
                               mix=parse_mix(args.mix))
        result = run(config, calls, args.rpc, args.processes)
        print(render(result.report))
        if args.json_out is not None:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result.report, indent=2, ensure_ascii=False)
                                     + "\n", encoding="utf-8")
        if args.plot is not None:
            plot(result.latencies, args.plot,
                 f"{args.rpc} on {target}, concurrency {config.concurrency}"
                 + (f", {config.rate:g}/s" if config.rate else ""))
    except (LoadError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return 0 if result.report["ok"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
