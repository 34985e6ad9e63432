"""What the servicers share: the served model (swapped whole on reload), the song store and
its follower, the worker pool, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from server import validation
from server.batching import SimilarBatcher
from server.bundle import BundleError
from server.config import ServerConfig
from server.errors import FailedPrecondition
from server.following import catch_up
from server.health import RECOMMENDER, SERVING, Health
from server.live import LiveModel
from server.metrics import Metrics
from server.responses import similar_responses_of
from server.store import SongStore, StoreError
from server.workers import Budget, Workers, deadline_of

log = logging.getLogger(__name__)

T = TypeVar("T")

FOLLOW_BACKOFF_S = (0.1, 5.0)  # first and longest wait before retrying an unreachable store


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
