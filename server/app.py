"""The songrec gRPC server (grpc.aio): pure response builders, the serving state, the
``Recommender`` and ``Admin`` servicers, then ``create_server``, ``serve`` and ``main``."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server import validation, wire
from server.batching import SimilarBatcher
from server.bundle import BundleError, IndexParams
from server.config import ConfigError, ServerConfig, load_config
from server.errors import FailedPrecondition
from server.interceptors import Gate, Tokens
from server.live import Continuation, Encoded, LiveModel, Neighbours
from server.logs import setup_logging
from server.metrics import Metrics
from server.ranking import REASON_ALS, REASON_ARTIST
from server.store import (
    SongStore,
    StoreConfigError,
    StoreError,
    import_log,
    open_store,
)
from server.strategies import (
    DEFAULT_STRATEGY,
    REASON_PLAYLIST,
    REASON_POPULAR,
    REASON_SEED,
    REASON_TAG,
    REASON_TITLE,
    STRATEGIES,
)
from server.validation import NewSong
from server.wal import WalError
from server.wire import WireMessage, similar_responses
from server.workers import Budget, Workers, deadline_of

log = logging.getLogger(__name__)

T = TypeVar("T")

RECOMMENDER = pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = pb2.DESCRIPTOR.services_by_name["Admin"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Each drains: SIGHUP too, which a closed terminal or a process manager may send, and
# which by default would end the process without draining.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_REASON_KINDS = {REASON_SEED: pb2.Reason.SEED_NEIGHBOUR,
                 REASON_PLAYLIST: pb2.Reason.PLAYLIST_NEIGHBOUR,
                 REASON_TAG: pb2.Reason.TAG, REASON_TITLE: pb2.Reason.TITLE,
                 REASON_POPULAR: pb2.Reason.POPULAR, REASON_ALS: pb2.Reason.ALS,
                 REASON_ARTIST: pb2.Reason.ARTIST}


# With --processes N, each process holds its own model: a reload taken by one would not
# reach the others. (Added songs do: every process follows the song store.)
_ONE_PROCESS = ("{rpc}: this server runs {n} processes (--processes {n}), and a change "
                "made in one would be missing from the others; restart it with the new "
                "bundle, or run one process to change the model in place")
FOLLOW_BACKOFF_S = (0.1, 5.0)  # first and longest wait before retrying an unreachable store


# ---------------------------------------------------------------- pure response builders


def continuation_pb(answer: Continuation, version: str) -> pb2.ContinuePlaylistResponse:
    """A ``ContinuePlaylist`` answer as its response message."""
    response = pb2.ContinuePlaylistResponse(unknown_seed_ids=answer.unknown_seed_ids,
                                            unknown_tags=answer.unknown_tags,
                                            strategy=answer.strategy, model_version=version)
    songs = response.songs
    # Fields are set in place: building a Reason and passing it to add() copies it, and
    # empty name fields cost as much as the rest (upb), so both are skipped.
    for i, (song_id, score, (kind, source)) in enumerate(zip(
            answer.song_ids, answer.song_scores, answer.reasons, strict=True)):
        song = songs.add(song_id=song_id, score=score)
        reason = song.reason
        reason.kind = _REASON_KINDS.get(kind, pb2.Reason.KIND_UNSPECIFIED)
        if kind in (REASON_SEED, REASON_ARTIST) and isinstance(source, int):
            reason.seed_song_id = source
        elif kind == REASON_PLAYLIST and isinstance(source, int):
            reason.playlist_id = source
        elif kind == REASON_TAG and isinstance(source, str):
            reason.tag = source
        if answer.names is not None:
            song.name, song.artists = answer.names[i]
    for tag, score in zip(answer.tags, answer.tag_scores, strict=True):
        response.tags.add(tag=tag, score=score)
    return response


def fill_neighbours(target: Any, found: Neighbours) -> None:
    """Append ``found`` to a repeated ``Neighbour`` field."""
    if found.names is None:
        # Without the empty name fields: a third of the cost per neighbour (upb).
        for song_id, similarity in zip(found.ids, found.similarities, strict=True):
            target.add(song_id=song_id, similarity=similarity)
        return
    for song_id, similarity, (name, artists) in zip(found.ids, found.similarities,
                                                    found.names, strict=True):
        target.add(song_id=song_id, similarity=similarity, name=name, artists=artists)


def neighbours_pb(found: Neighbours, version: str) -> pb2.SimilarSongsResponse:
    """One song's neighbours as a ``SimilarSongsResponse``."""
    response = pb2.SimilarSongsResponse(song_id=found.song_id, model_version=version)
    fill_neighbours(response.neighbours, found)
    return response


def similar_responses_of(answers: Sequence[Neighbours], version: str
                         ) -> list[pb2.SimilarSongsResponse | WireMessage]:
    """Responses of a batch of lookups: encoded together straight to wire bytes (names
    need the protobuf runtime: such answers are built as messages)."""
    if any(found.names is not None for found in answers):
        return [neighbours_pb(found, version) for found in answers]
    ids = np.fromiter(itertools.chain.from_iterable(found.ids for found in answers),
                      dtype=np.int64)
    sims = np.fromiter(itertools.chain.from_iterable(found.similarities for found in answers),
                       dtype=np.float32)
    bounds = [0, *itertools.accumulate(len(found.ids) for found in answers)]
    return list(similar_responses([found.song_id for found in answers], version, ids, sims,
                                  bounds))


def batch_pb(results: Sequence[Neighbours], unknown: Sequence[int],
             version: str) -> pb2.SimilarSongsBatchResponse:
    """Many songs' neighbours as a ``SimilarSongsBatchResponse``."""
    response = pb2.SimilarSongsBatchResponse(model_version=version)
    add_batch_results(response, results, unknown)
    return response


def add_batch_results(response: pb2.SimilarSongsBatchResponse, results: Sequence[Neighbours],
                      unknown: Sequence[int]) -> None:
    """Append some songs' neighbours (and unknown ids) to a ``SimilarSongsBatchResponse``."""
    response.unknown_song_ids.extend(unknown)
    for found in results:
        item = response.results.add(song_id=found.song_id, model_version=response.model_version)
        fill_neighbours(item.neighbours, found)


def encoded_pb(encoded: Encoded, version: str) -> pb2.EncodeSongResponse:
    """An unseen song's code and neighbours as an ``EncodeSongResponse``."""
    response = pb2.EncodeSongResponse(code=encoded.code, known_columns=encoded.known_columns,
                                      model_version=version)
    fill_neighbours(response.neighbours, encoded.neighbours)
    return response


def index_params_pb(params: IndexParams) -> pb2.IndexParams:
    return pb2.IndexParams(space=params.space, dim=params.dim, m=params.m,
                           ef_construction=params.ef_construction, ef=params.ef,
                           count=params.count)


def model_info_pb(model: LiveModel | None) -> pb2.ModelInfo:
    """What is served; ``loaded=False`` (with the strategies) when nothing is."""
    if model is None:
        return pb2.ModelInfo(loaded=False, strategies=STRATEGIES,
                             default_strategy=DEFAULT_STRATEGY)
    info = model.info()
    return pb2.ModelInfo(
        loaded=True, model_version=info["model_version"], created=info["created"],
        data_fingerprint=info["data_fingerprint"], code_dim=info["code_dim"],
        input_dim=info["input_dim"], column_groups=info["column_groups"],
        bundle_songs=info["bundle_songs"], added_songs=info["added_songs"],
        indexed_songs=info["indexed_songs"], playlists=info["playlists"], tags=info["tags"],
        strategies=info["strategies"], default_strategy=info["default_strategy"],
        song_index=index_params_pb(info["song_index"]),
        playlist_index=index_params_pb(info["playlist_index"]))


def metadata_fields(songs: Sequence[NewSong], request_order: Sequence[NewSong]) -> list[str]:
    """Request field names (``songs[i].metadata``) of a subset of a request's songs."""
    position = {song.song_id: pos for pos, song in enumerate(request_order)}
    return [f"songs[{position[song.song_id]}].metadata" for song in songs]


def release_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc's
    ``malloc_trim``; a no-op elsewhere). Models are loaded in worker threads, whose malloc
    arenas glibc does not shrink by itself: without this, each reload of the demo bundle
    left the RSS ~20 MB higher, up to ~60% above the start after ten reloads; with it the
    RSS returns to within 2% of the start after each."""
    gc.collect()
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers (malloc.h)


def pin_mmap_threshold(limit: int = 256 << 10) -> None:
    """Fix glibc's mmap threshold: by default it rises (up to 32 MB) each time a mapped
    block is freed, so after a reload frees the old model's arrays, every later
    request-sized buffer comes from the per-thread heaps, which fragment and keep the RSS
    up. A fixed threshold keeps big buffers in their own mappings, returned on free."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, limit)


def _glibc(name: str) -> Callable[..., int] | None:
    """A glibc function, or None elsewhere."""
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None
    return function


# ---------------------------------------------------------------- health


class Health(health_aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 whose ``Watch`` streams end once a drain begins (after telling the
    watcher NOT_SERVING): the stock servicer keeps them open, and an open stream holds
    ``server.stop(grace)`` for the whole grace period. Otherwise the stock ``Watch``."""

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]


# ---------------------------------------------------------------- serving state


class ServingState:
    """What the servicers share: the model (swapped whole on reload), the song store, the
    worker pool, health and metrics. Index writes, reloads and the follower's catch-ups run
    one at a time, each in a shielded task, so a caller that gives up cannot leave one half
    done."""

    def __init__(self, config: ServerConfig, workers: Workers, metrics: Metrics,
                 health: Health, store: SongStore | None) -> None:
        self.config = config
        self.workers = workers
        self.metrics = metrics
        self.health = health
        self.store = store
        self.batcher = (SimilarBatcher(workers, metrics, similar_responses_of,
                                      config.similar_batch)
                        if config.similar_batch else None)
        self.model: LiveModel | None = None
        self.bundle = config.bundle
        self._write_lock = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()

    async def in_pieces(self, step: Callable[[Budget], bool], cost: int,
                        context: grpc.aio.ServicerContext) -> None:
        """Run a call's work a piece at a time (``server.workers``), in the heavy lane
        from the start when the cost model says it is heavy."""
        await self.workers.run_pieces(step, deadline_of(context),
                                      heavy=cost > validation.HEAVY_COST)

    def require_model(self) -> LiveModel:
        """The served model; :class:`FailedPrecondition` when none is loaded."""
        model = self.model
        if model is None:
            raise FailedPrecondition("no model loaded: start the server with --bundle or "
                                     "load one with Admin.ReloadModel")
        return model

    async def exclusive(self, fn: Callable[[], T], deadline: float | None,
                        after: Callable[[T], Awaitable[None]] | None = None) -> T:
        """Run ``fn`` in a worker with no other write or reload running, then ``after`` on
        the loop. Shielded: once started it finishes even if the caller is cancelled."""

        async def critical() -> T:
            async with self._write_lock:
                result = await self.workers.run(fn, deadline)
                if after is not None:
                    await after(result)
                return result

        task = asyncio.ensure_future(critical())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for shielded writes still running, e.g. during shutdown."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)

    def build(self, path: Path, verify: bool) -> tuple[LiveModel, int]:
        """Load a bundle and add the store's songs to it (blocking)."""
        try:
            model = LiveModel.configured(self.config, path, verify)
        except OSError as exc:
            # A path the file system refuses (a name too long, no permission): the bundle
            # is unusable, the server is not broken, and the old model serves on.
            raise BundleError(f"{path}: unreadable ({exc.strerror or exc})") from None
        except BundleError:
            raise
        except Exception as exc:
            # A check the loader lacks (a bug, logged with its traceback): the bundle is
            # still refused, and the old model serves on.
            log.exception("loading %s failed unexpectedly", path)
            raise BundleError(f"{path}: cannot load ({exc!r})") from None
        replayed = 0
        if self.store is not None:
            replayed = catch_up(model, self.store)
            if replayed or model.unplaceable:
                log.info("added %d songs from the song store %s to model %s", replayed,
                         self.store.url, model.version)
        return model, replayed

    def apply_store(self) -> int:
        """Serve the songs stored since the served model last looked (blocking; run it
        with :meth:`exclusive`). Returns how many were added."""
        model = self.model
        if model is None or self.store is None:
            return 0
        added = catch_up(model, self.store)
        if added:
            log.info("applied %d songs from the song store (seq %d)", added,
                     model.applied_seq)
        return added

    async def follow(self) -> None:
        """Apply songs other servers add, until cancelled: wait for a NOTIFY (PostgreSQL)
        or the poll interval, then catch up if the store's last seq moved. An unreachable
        store is retried with exponential backoff; inference goes on meanwhile."""
        store = self.store
        assert store is not None
        backoff = FOLLOW_BACKOFF_S[0]
        down = False
        while True:
            try:
                await asyncio.to_thread(store.wait, store.poll_s)
                model = self.model
                if model is not None:
                    last = await asyncio.to_thread(store.last_seq)
                    if last > model.applied_seq:
                        await self.exclusive(self.apply_store, None, self._published)
                if down:
                    log.info("song store %s answers again; caught up to seq %d", store.url,
                             model.applied_seq if model is not None else 0)
                    self.metrics.store_up.set(1)
                    down = False
                backoff = FOLLOW_BACKOFF_S[0]
            except StoreError as exc:
                self.metrics.store_errors.labels("follow", exc.code.name).inc()
                if not down:
                    log.warning("song store unreachable, retrying with backoff (inference "
                                "goes on): %s", exc)
                    self.metrics.store_up.set(0)
                    down = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, FOLLOW_BACKOFF_S[1])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not stop following
                log.exception("song store follower failed; retrying")
                await asyncio.sleep(FOLLOW_BACKOFF_S[1])

    async def _published(self, _: object) -> None:
        self.publish()

    async def install(self, built: tuple[LiveModel, int]) -> None:
        """Serve a freshly built model (runs on the loop, after :meth:`build`)."""
        model, _ = built
        self.model = model
        self.bundle = model.source
        self.publish()
        await self.health.set("", SERVING)
        await self.health.set(RECOMMENDER, SERVING)

    def publish(self) -> None:
        """Refresh the model and index gauges."""
        model = self.model
        if model is None:
            self.metrics.set_model(None, 0, 0)
        else:
            self.metrics.set_model(model.version, model.n_bundle + model.n_added,
                                   model.n_added)
            self.metrics.store_applied_seq.set(model.applied_seq)
            self.metrics.store_unplaceable.set(model.unplaceable)


def catch_up(model: LiveModel, store: SongStore) -> int:
    """Add to ``model`` every song stored after its ``applied_seq`` (blocking; the caller
    holds the write lock). Returns how many it added."""
    added = 0
    while True:
        batch = store.since(model.applied_seq)
        if not batch:
            return added
        added += model.replay([stored.song for stored in batch])[0]
        model.applied_seq = batch[-1].seq


# ---------------------------------------------------------------- servicers


class RecommenderServicer(pb2_grpc.RecommenderServicer):
    """Inference: every method validates, then runs the model work in the worker pool."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def ContinuePlaylist(self, request: pb2.ContinuePlaylistRequest,
                               context: grpc.aio.ServicerContext
                               ) -> pb2.ContinuePlaylistResponse:
        params = validation.continue_params(request)
        model = self.state.require_model()
        job = model.continuation(params)
        response: list[pb2.ContinuePlaylistResponse] = []

        def step(budget: Budget) -> bool:
            if not job.step(budget):
                return False
            assert job.result is not None
            response.append(continuation_pb(job.result, model.version))
            return True

        await self.state.in_pieces(step, validation.continue_cost(params), context)
        return response[0]

    async def SimilarSongs(self, request: pb2.SimilarSongsRequest,
                           context: grpc.aio.ServicerContext
                           ) -> pb2.SimilarSongsResponse | WireMessage:
        params = validation.similar_params(request)
        model = self.state.require_model()
        if self.state.batcher is not None:
            response: pb2.SimilarSongsResponse | WireMessage = await self.state.batcher.similar(
                model, params, deadline_of(context))
            return response
        return await self.state.workers.run(
            lambda: neighbours_pb(model.similar_one(params), model.version),
            deadline_of(context))

    async def SimilarSongsBatch(self, request: pb2.SimilarSongsBatchRequest,
                                context: grpc.aio.ServicerContext
                                ) -> pb2.SimilarSongsBatchResponse:
        params = validation.similar_batch_params(request)
        model = self.state.require_model()
        response = pb2.SimilarSongsBatchResponse(model_version=model.version)
        job = model.similar_batch(params, lambda found, unknown: add_batch_results(
            response, found, unknown))
        await self.state.in_pieces(job.step, validation.similar_cost(params), context)
        return response

    async def EncodeSong(self, request: pb2.EncodeSongRequest,
                         context: grpc.aio.ServicerContext) -> pb2.EncodeSongResponse:
        params = validation.encode_params(request)
        model = self.state.require_model()
        return await self.state.workers.run(
            lambda: encoded_pb(model.encode(params), model.version), deadline_of(context))

    async def GetModelInfo(self, request: pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb2.ModelInfo:
        return model_info_pb(self.state.model)


class AdminServicer(pb2_grpc.AdminServicer):
    """Index writes and model reloads, one at a time."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def AddSongs(self, request: pb2.AddSongsRequest,
                       context: grpc.aio.ServicerContext) -> pb2.AddSongsResponse:
        songs = validation.new_songs(request)
        state = self.state
        state.require_model()
        store = state.store
        if store is None:
            raise FailedPrecondition("AddSongs needs a song store: start the server with "
                                     "--data-dir (a SQLite file there) or --store URL")

        def add() -> pb2.AddSongsResponse:
            model = state.require_model()  # the one served now, after any reload
            fresh, _ = model.absent(songs)
            added: list[int] = []
            if fresh:
                codes = model.encode_new(fresh, metadata_fields(fresh, songs))
                try:
                    # Committed before it is visible or acknowledged; on failure nothing
                    # was written and nothing is served.
                    stored = {s.song.song_id for s in store.add(fresh)}
                except StoreError as exc:
                    state.metrics.store_errors.labels("add", exc.code.name).inc()
                    log.warning("AddSongs failed: %s", exc)
                    raise
                keep = [i for i, song in enumerate(fresh) if song.song_id in stored]
                model.insert([fresh[i] for i in keep], codes[keep])
                added = [fresh[i].song_id for i in keep]
                log.info("added %d songs to model %s (%d already served or stored)",
                         len(added), model.version, len(songs) - len(added))
            try:
                # Songs another replica stored first (and any others it added meanwhile):
                # served before this call answers, as ours are.
                catch_up(model, store)
            except StoreError as exc:  # ours are durable: the follower catches up later
                log.warning("AddSongs: catching up with the song store failed: %s", exc)
            new = set(added)
            return pb2.AddSongsResponse(
                added_song_ids=added,
                existing_song_ids=[s.song_id for s in songs if s.song_id not in new],
                indexed_songs=model.n_bundle + model.n_added, model_version=model.version)

        async def after(_: pb2.AddSongsResponse) -> None:
            state.publish()

        return await state.exclusive(add, deadline_of(context), after)

    async def ReloadModel(self, request: pb2.ReloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb2.ReloadModelResponse:
        params = validation.reload_params(request)
        state = self.state
        if state.config.processes > 1:
            raise FailedPrecondition(_ONE_PROCESS.format(rpc="ReloadModel",
                                                         n=state.config.processes))
        path = params.path or state.bundle
        if path is None:
            raise FailedPrecondition("bundle_path: empty and no bundle is loaded; name the "
                                     "bundle directory to load")
        previous = state.model
        start = time.perf_counter()
        try:
            model, replayed = await state.exclusive(lambda: state.build(path, params.verify),
                                                    deadline_of(context), state.install)
        except BundleError as exc:
            state.metrics.reloads.labels("failed").inc()
            serving = previous.version if previous is not None else "no model"
            log.error("reload of %s failed, still serving %s: %s", path, serving, exc)
            raise FailedPrecondition(f"reload failed, still serving {serving}: {exc}") \
                from None
        state.metrics.reloads.labels("ok").inc()
        seconds = time.perf_counter() - start
        log.info("reloaded: model %s from %s in %.1fs (was %s)", model.version, path, seconds,
                 previous.version if previous is not None else "none")
        response = pb2.ReloadModelResponse(previous=model_info_pb(previous),
                                           current=model_info_pb(model),
                                           replayed_songs=replayed, seconds=seconds)
        del previous  # the last reference to the old model, unless a call still uses it
        await state.workers.run(release_memory)
        return response


# ---------------------------------------------------------------- the server


class Server:
    """A configured grpc.aio server and its state; :meth:`start` begins serving and loads
    the configured bundle, :meth:`stop` drains."""

    def __init__(self, grpc_server: grpc.aio.Server, state: ServingState, port: int,
                 model: LiveModel | None = None) -> None:
        self.grpc = grpc_server
        self.state = state
        self.port = port
        self.metrics_port = 0
        self.preloaded = model  # loaded before this process was forked (--processes)
        self.follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Accept calls (health NOT_SERVING), then load ``--bundle`` if given; returns once
        SERVING. Raises :class:`~server.bundle.BundleError` when the bundle is refused."""
        state = self.state
        await state.health.set("", NOT_SERVING)
        await state.health.set(RECOMMENDER, NOT_SERVING)
        await state.health.set(ADMIN, SERVING)
        late = state.config.listen_after_load and (self.preloaded is not None
                                                   or state.config.bundle is not None)
        if not late:
            await self.grpc.start()
        if state.config.metrics_port:
            self.metrics_port = state.metrics.serve(state.config.host,
                                                    state.config.metrics_port)
        if self.preloaded is not None:
            await state.install((self.preloaded, 0))
            model = state.require_model()
            log.info("serving model %s (%d songs) on %s, one of %d processes (pid %d)",
                     model.version, model.n_bundle + model.n_added, state.config.target,
                     state.config.processes, os.getpid())
        elif state.config.bundle is not None:
            bundle, verify = state.config.bundle, state.config.verify
            await state.exclusive(lambda: state.build(bundle, verify), None, state.install)
            model = state.require_model()
            log.info("serving model %s (%d songs) on %s", model.version,
                     model.n_bundle + model.n_added, state.config.target)
        else:
            log.info("no --bundle: NOT_SERVING on %s until Admin.ReloadModel",
                     state.config.target)
        if late:
            await self.grpc.start()
        if state.store is not None:
            state.metrics.store_up.set(1)
            self.follower = asyncio.create_task(state.follow(), name="songrec-store-follower")

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let in-flight ones finish within
        ``grace`` seconds, finish index writes, release everything."""
        state = self.state
        grace = state.config.grace_s if grace is None else grace
        await state.health.enter_graceful_shutdown()
        if state.store is not None:
            state.store.interrupt()
        if self.follower is not None:
            self.follower.cancel()
            await asyncio.gather(self.follower, return_exceptions=True)
        await self.grpc.stop(grace)
        await state.settle(timeout=max(grace, 1.0))
        await asyncio.to_thread(state.workers.shutdown)
        if state.store is not None:
            state.store.close()
        state.metrics.close()


def _credentials(config: ServerConfig) -> Any:
    assert config.tls_cert is not None and config.tls_key is not None
    try:
        return grpc.ssl_server_credentials([(config.tls_key.read_bytes(),
                                             config.tls_cert.read_bytes())])
    except OSError as exc:
        raise ConfigError(f"TLS files unreadable ({exc})") from None


async def create_server(config: ServerConfig, model: LiveModel | None = None
                        ) -> tuple[Server, int]:
    """Build the server for ``config`` and bind its port (0 picks one); not started yet.
    ``model``: one already loaded (``--processes``), served instead of loading ``--bundle``.

    Opens the song store (importing a write-ahead log of ``--data-dir`` into it), so an
    unusable store or a corrupt log fails here.
    """
    store, torn = open_configured_store(config)
    wire.warm_up()
    metrics = Metrics()
    if torn:
        metrics.wal_torn.inc()
    health = Health()
    state = ServingState(config, Workers(config.workers, metrics), metrics, health, store)
    gate = Gate(metrics, config.max_concurrent_rpcs, Tokens(config.admin_token, config.token),
                max_response_bytes=config.max_message_bytes)
    server = grpc.aio.server(
        interceptors=[gate],
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", config.max_message_bytes),
                 # Refuse a port another server holds, unless this is one of the
                 # --processes that share it.
                 ("grpc.so_reuseport", 1 if config.processes > 1 else 0)])
    pb2_grpc.add_RecommenderServicer_to_server(  # type: ignore[no-untyped-call]
        RecommenderServicer(state), server)
    pb2_grpc.add_AdminServicer_to_server(AdminServicer(state), server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [RECOMMENDER, ADMIN, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    address = config.target
    try:
        if config.tls_cert is not None:
            port = server.add_secure_port(address, _credentials(config))
        else:
            port = server.add_insecure_port(address)
    except (RuntimeError, ConfigError) as exc:
        if store is not None:
            store.close()
        raise ConfigError(f"cannot bind {address} ({exc})") from None
    return Server(server, state, port, model), port


def open_configured_store(config: ServerConfig) -> tuple[SongStore | None, int]:
    """The song store of ``config`` (None: none configured), after importing a write-ahead
    log found in ``--data-dir``; and the torn bytes that import dropped. Raises
    :class:`ConfigError` when the store cannot be opened, :class:`WalError` for a corrupt
    log."""
    url = config.store_url
    if url is None:
        return None, 0
    try:
        store = open_store(url)
    except (StoreConfigError, StoreError) as exc:
        raise ConfigError(str(exc)) from None
    torn = 0
    try:
        if config.data_dir is not None:
            imported = import_log(store, config.data_dir)
            if imported is not None:
                torn = imported[2]
    except StoreError as exc:
        store.close()
        raise ConfigError(f"importing the write-ahead log: {exc}") from None
    except BaseException:
        store.close()
        raise
    log.info("song store %s: %d songs", store.url, store.count())
    return store, torn


async def serve(config: ServerConfig, ready: Callable[[Server], None] | None = None,
                model: LiveModel | None = None) -> int:
    """Run until SIGTERM, SIGINT or SIGHUP, then drain gracefully. Returns the exit status."""
    server, port = await create_server(config, model)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.start()
    except (BundleError, WalError) as exc:
        log.error("cannot serve: %s", exc)
        await server.stop(0)
        return 2
    log.info("listening on %s:%d (tls %s, admin %s, inference token %s)", config.host, port,
             "on" if config.tls_cert else "off",
             "enabled" if config.admin_token else "disabled",
             "required" if config.token else "not required")
    if ready is not None:
        ready(server)
    await stopping.wait()
    log.info("shutting down: draining in-flight calls (grace %.1fs)", config.grace_s)
    await server.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m server``: flags and environment -> config -> serve."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"python -m server: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    log.info("config: %s", config)
    pin_mmap_threshold()
    if config.processes > 1:
        from server.processes import serve_processes

        return serve_processes(config)
    try:
        return asyncio.run(serve(config))
    except (ConfigError, WalError, BundleError) as exc:
        log.error("cannot start: %s", exc)  # one line on stderr, in the chosen log format
        return 2
