"""The songrec gRPC server (grpc.aio): the ``Recommender`` and ``Admin`` servicers over the
serving state (:mod:`server.state`; requests checked by :mod:`server.validation`, answers
built by :mod:`server.responses`), then ``create_server`` and ``serve``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server import validation, wire
from server.bundle import BundleError
from server.config import ConfigError, ServerConfig
from server.errors import FailedPrecondition
from server.following import catch_up, open_configured_store
from server.health import ADMIN, NOT_SERVING, RECOMMENDER, SERVING, Health
from server.interceptors import Gate, Tokens
from server.live import LiveModel
from server.memory import release_memory
from server.metrics import Metrics
from server.responses import (
    add_batch_results,
    added_pb,
    batch_pb,
    continuation_pb,
    encoded_pb,
    model_info_pb,
    neighbours_pb,
    reloaded_pb,
)
from server.state import ServingState
from server.store import (
    StoreError,
)
from server.validation import NewSong
from server.wal import WalError
from server.wire import WireMessage
from server.workers import Budget, Workers, deadline_of

log = logging.getLogger(__name__)

# Each drains: SIGHUP too, which a closed terminal or a process manager may send, and
# which by default would end the process without draining.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# With --processes N, each process holds its own model: a reload taken by one would not
# reach the others. (Added songs do: every process follows the song store.)
_ONE_PROCESS = ("{rpc}: this server runs {n} processes (--processes {n}), and a change "
                "made in one would be missing from the others; restart it with the new "
                "bundle, or run one process to change the model in place")


def metadata_fields(songs: Sequence[NewSong], request_order: Sequence[NewSong]) -> list[str]:
    """Request field names (``songs[i].metadata``) of a subset of a request's songs."""
    position = {song.song_id: pos for pos, song in enumerate(request_order)}
    return [f"songs[{position[song.song_id]}].metadata" for song in songs]


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
        response = batch_pb([], [], model.version)  # filled a piece at a time
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
            return added_pb(added, [s.song_id for s in songs if s.song_id not in new], model)

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
        response = reloaded_pb(previous, model, replayed, seconds)
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
    if config.drain_delay_s > 0:
        # Health turns NOT_SERVING (Watch streams end) while calls are still answered:
        # grpc.aio's stop() answers the calls it accepted but has not started CANCELLED,
        # so first let balancers that probe health stop sending any.
        await server.state.health.enter_graceful_shutdown()
        log.info("shutting down: health NOT_SERVING, still answering for %.1fs "
                 "(--drain-delay)", config.drain_delay_s)
        await asyncio.sleep(config.drain_delay_s)
    log.info("shutting down: draining in-flight calls (grace %.1fs)", config.grace_s)
    await server.stop()
    log.info("stopped")
    return 0
