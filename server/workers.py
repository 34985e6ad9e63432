"""The worker pool that keeps model work (ONNX Runtime, hnswlib, strategy numpy) off the event
loop: two lanes, work cut into pieces of about :data:`PIECE_SECONDS`, each caller's deadline
and cancellation honoured between pieces.

A call whose cost (``server.validation``'s cost model) is small runs as one job in the
*light* lane. A call that is heavy by that model, and any call still unfinished after its
first piece, runs piece by piece in the *heavy* lane: a free worker takes light work first
(unless the oldest heavy piece has waited :data:`HEAVY_AGE_S`, so heavy calls always
progress), and a call never has more than one piece queued or running. So one call holds
at most one worker for about one piece, a light call waits for at most the pieces already
running, and a caller that gives up stops its call at the next piece boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from server.errors import DeadlineExceeded, ResourceExhausted
from server.interceptors import DEADLINE_SLACK_S
from server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

LIGHT, HEAVY = "light", "heavy"
# A piece's time budget. A piece ends before a slice that would overrun it (slices follow
# the measured time per item), so a caller that gives up stops its call within about this.
PIECE_SECONDS = 0.02
# A heavy piece that has waited this long goes before light work: heavy calls progress
# (at worst one piece per worker per this interval) even when light work never stops.
HEAVY_AGE_S = 0.2
# Heavy calls in progress per worker; past it, new heavy calls get RESOURCE_EXHAUSTED at
# once rather than each progressing ever more slowly toward their deadlines.
HEAVY_CALLS_PER_WORKER = 32


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the ``time.monotonic`` clock (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Budget:
    """The time allowance of one piece of work (``seconds`` None: unlimited)."""

    def __init__(self, seconds: float | None = PIECE_SECONDS) -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float:
        """Seconds left (infinite without a limit; negative once overspent)."""
        return float("inf") if self._end is None else self._end - time.perf_counter()


class Progress:
    """Items ``0..total-1`` worked through in slices. Each slice is as large as the time
    per unit of cost measured so far lets fit in what is left of the budget, and at most
    4 times the last one, so that a change in cost per item overshoots by little.

    ``costs``: each item's cost (from the cost model; None: 1 each); ``first``: the first
    slice's size in those units (at least one item)."""

    def __init__(self, total: int, first: int = 1, costs: np.ndarray | None = None) -> None:
        self.total = total
        self.done = 0
        self.size = max(1, first)
        self._cum = None if costs is None else np.cumsum(costs, dtype=np.int64)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def _cost(self, start: int, end: int) -> int:
        if self._cum is None:
            return end - start
        return int(self._cum[end - 1]) - (int(self._cum[start - 1]) if start else 0)

    def _end(self) -> int:
        if self._cum is None:
            return min(self.total, self.done + self.size)
        before = int(self._cum[self.done - 1]) if self.done else 0
        end = int(np.searchsorted(self._cum, before + self.size, side="right"))
        return min(self.total, max(end, self.done + 1))

    def step(self, budget: Budget, work: Callable[[int, int], None]) -> bool:
        """Call ``work(start, end)`` on slices until the items are done or the next one
        would overrun the budget; True when done. Without a time limit: the rest at once."""
        if budget.seconds is None and not self.finished:
            work(self.done, self.total)
            self.done = self.total
        while not self.finished:
            end = self._end()
            start = time.perf_counter()
            work(self.done, end)
            per_unit = (time.perf_counter() - start) / max(self._cost(self.done, end), 1)
            self.done = end
            last, left = self.size, budget.left()
            if per_unit <= 0:  # too quick to time
                self.size = 4 * last
                if left > 0:
                    continue
                break
            if not self.finished and per_unit * self._cost(self.done, self.done + 1) <= left:
                self.size = max(1, min(4 * last, int(left / per_unit)))
                continue
            # The next item would not fit: end this piece; the next is a whole budget.
            self.size = max(1, min(4 * last, int((budget.seconds or 0.0) / per_unit)))
            break
        return self.finished


@dataclass
class _Job(Generic[T]):
    fn: Callable[[], T]
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    lane: str
    queued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the caller's coroutine when it gives up


class Workers:
    """A fixed-size thread pool with a light and a heavy lane (see the module docstring).
    Work queued for a caller whose deadline has passed, or who went away, by the time a
    thread picks it up is skipped rather than done for nobody."""

    def __init__(self, threads: int, metrics: Metrics | None = None,
                 heavy_age: float = HEAVY_AGE_S,
                 heavy_calls: int | None = None) -> None:
        self.threads = threads
        self.metrics = metrics
        self.heavy_age = heavy_age
        self.heavy_limit = heavy_calls or HEAVY_CALLS_PER_WORKER * threads
        self.heavy_calls = 0  # touched on the event loop only
        self._queues: dict[str, deque[_Job[Any]]] = {LIGHT: deque(), HEAVY: deque()}
        self._cond = threading.Condition(threading.Lock())
        self._pool: list[threading.Thread] = []
        self._closed = False
        # Metric children per lane, looked up once (labels() locks on every call).
        self._gauges = ({lane: (metrics.work_queued.labels(lane), metrics.work_wait.labels(lane),
                                metrics.piece_seconds.labels(lane)) for lane in (LIGHT, HEAVY)}
                        if metrics is not None else {})

    # ------------------------------------------------------------ the event loop's side

    async def run(self, fn: Callable[[], T], deadline: float | None = None, *,
                  heavy: bool = False) -> T:
        """Run ``fn()`` in the pool (its ``heavy`` lane or the light one) and await it."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the work started")
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, deadline, loop, loop.create_future(),
                            HEAVY if heavy else LIGHT)
        self._submit(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # still queued: skipped; running: its result is dropped
            raise

    async def run_pieces(self, step: Callable[[Budget], bool], deadline: float | None,
                         *, heavy: bool = False) -> int:
        """Call ``step(budget)`` in the pool, one piece (one job with a budget of
        :data:`PIECE_SECONDS`) at a time, until it returns True; returns the pieces run.

        ``heavy`` (by the cost model): the call is counted against the heavy-call limit
        (:class:`ResourceExhausted` past it) and all its pieces run in the heavy lane;
        otherwise its first piece runs in the light lane and any later ones in the heavy.
        Between pieces the deadline is checked, and a cancelled caller stops at once.
        """
        if heavy:
            if self.heavy_calls >= self.heavy_limit:
                raise ResourceExhausted(
                    f"server busy: {self.heavy_calls} heavy calls in progress (limit "
                    f"{self.heavy_limit}); retry with backoff, or ask for fewer songs, "
                    f"neighbours or exclusions per call (docs/OPERATIONS.md, Limits)")
            self._heavy_calls(+1)
        pieces = 0
        try:
            while True:
                done = await self.run(lambda: step(Budget()), deadline,
                                      heavy=heavy or pieces > 0)
                pieces += 1
                if done:
                    return pieces
        except (asyncio.CancelledError, DeadlineExceeded) as exc:
            if pieces and self.metrics is not None:
                # gRPC cancels the call when its deadline passes, a moment after the
                # client's own timer fired: a cancellation that close is the deadline.
                expired = isinstance(exc, DeadlineExceeded) or (
                    deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S)
                self.metrics.stopped_calls.labels("deadline" if expired else "cancelled").inc()
            raise
        finally:
            if heavy:
                self._heavy_calls(-1)

    def _heavy_calls(self, change: int) -> None:
        self.heavy_calls += change
        if self.metrics is not None:
            self.metrics.heavy_calls.set(self.heavy_calls)

    def _submit(self, job: _Job[Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            self._queues[job.lane].append(job)
            if len(self._pool) < self.threads:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"songrec-work_{len(self._pool)}")
                self._pool.append(thread)
                thread.start()
            self._cond.notify()
        if self._gauges:
            self._gauges[job.lane][0].inc()

    # ------------------------------------------------------------ the threads' side

    def _next(self) -> _Job[Any] | None:
        """The next job (light first, unless the oldest heavy one has waited too long);
        None once shut down with nothing left. Call with the condition held."""
        light, heavy = self._queues[LIGHT], self._queues[HEAVY]
        while not light and not heavy:
            if self._closed:
                return None
            self._cond.wait()
        if heavy and (not light or time.monotonic() - heavy[0].queued >= self.heavy_age):
            return heavy.popleft()
        return light.popleft()

    def _serve(self) -> None:
        while True:
            with self._cond:
                job = self._next()
            if job is None:
                return
            self._execute(job)

    def _execute(self, job: _Job[Any]) -> None:
        now = time.monotonic()
        gauges = self._gauges.get(job.lane)
        if gauges is not None:
            gauges[0].dec()
            gauges[1].observe(now - job.queued)
        if job.cancelled:
            return
        outcome: tuple[bool, Any]
        if job.deadline is not None and now >= job.deadline:
            outcome = (False, DeadlineExceeded("deadline passed while the call waited "
                                               "for a worker"))
        else:
            start = time.perf_counter()
            try:
                outcome = (True, job.fn())
            except BaseException as exc:  # handed to the caller, who decides
                outcome = (False, exc)
            if gauges is not None:
                gauges[2].observe(time.perf_counter() - start)
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting
            log.debug("a worker finished after its event loop closed")

    def shutdown(self) -> None:
        """Finish queued work and stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            pool = list(self._pool)
        for thread in pool:
            thread.join()


def _resolve(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():  # the caller was cancelled
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
