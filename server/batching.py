"""Dynamic batching of concurrent ``SimilarSongs`` lookups, as Triton's dynamic batcher does
with no queue delay: calls that arrive while a batch is in the index form the next batch.

Measured on the 2-core development machine, server and load generator sharing it, 32
concurrent clients calling SimilarSongs(k=100), alternating runs (calls/s): on the 3000 x 32
test index (~60 us per hnswlib query) 1565-1880 batched against 1054-1193 with one worker
hop per call; on a 20k x 256 index (~280 us per query) 1060-1364 against 815-1076. With one
client, p50 stays ~1 ms either way: a batch never waits to fill, so a lone call pays nothing.
Batching amortises the event-loop and thread hand-offs, not the index work (hnswlib costs
the same per query in a batch). ``--similar-batch 0`` turns it off.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.errors import DeadlineExceeded, ServingError
from server.live import LiveModel, Neighbours
from server.metrics import Metrics
from server.validation import SLICE_COST, SimilarParams, lookup_cost
from server.workers import Budget, Progress, Workers


@dataclass(order=True)
class _Pending:
    cost: int  # the cost model's bound: cheaper lookups go first
    seq: int  # then arrival order
    model: LiveModel = field(compare=False)
    params: SimilarParams = field(compare=False)
    deadline: float | None = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)  # the response: a message or bytes


Render = Callable[[Sequence[Neighbours], str], Sequence[Any]]


class SimilarBatcher:
    """Queues single-song lookups; one batch at a time runs in a worker as one index query
    per slice, and the responses are rendered there too, all at once (``render(answers,
    model_version)`` gives one response per answer, a message or its wire bytes).

    A batch is one piece of work (``server.workers``): the cheapest lookups by the cost
    model first, as many as fit in the piece's time budget; the rest wait for the next
    piece with the lookups that arrived meanwhile, so a cheap lookup never waits behind
    more than one piece of expensive ones. Lookups for different models (during a
    reload) are answered by their own model.
    """

    def __init__(self, workers: Workers, metrics: Metrics, render: Render,
                 max_batch: int = 256) -> None:
        self.workers = workers
        self.metrics = metrics
        self.render = render
        self.max_batch = max_batch
        self._queue: list[_Pending] = []  # a heap
        self._seq = itertools.count()
        self._running = False
        self._task: asyncio.Task[None] | None = None  # referenced, so it is not collected

    async def similar(self, model: LiveModel, params: SimilarParams,
                      deadline: float | None) -> Any:
        """The neighbours of one song; raises what the lookup raised (e.g. ``NotFound``)."""
        future: asyncio.Future[Any] = \
            asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, _Pending(lookup_cost(params.k, len(params.exclude)),
                                             next(self._seq), model, params, deadline,
                                             future))
        if not self._running:
            self._running = True
            self._task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch: list[_Pending] = []
                while self._queue and len(batch) < self.max_batch:
                    pending = heapq.heappop(self._queue)
                    if self._live(pending):
                        batch.append(pending)
                for pending in await self._run(batch):
                    heapq.heappush(self._queue, pending)
        finally:
            self._running = False

    @staticmethod
    def _live(pending: _Pending) -> bool:
        """False (and the caller told) when nobody waits for the answer any more."""
        if pending.future.done():  # cancelled: the client went away
            return False
        if pending.deadline is not None and time.monotonic() >= pending.deadline:
            pending.future.set_exception(DeadlineExceeded("deadline passed while the call "
                                                          "waited for the index"))
            return False
        return True

    async def _run(self, batch: list[_Pending]) -> list[_Pending]:
        """Answer what of ``batch`` fits in one piece; returns the lookups left over."""
        if not batch:
            return []
        progress = Progress(len(batch), SLICE_COST,
                            np.asarray([p.cost for p in batch], dtype=np.int64))

        def lookups(start: int, end: int, out: list[tuple[_Pending, Any]]) -> None:
            by_model: dict[int, list[_Pending]] = {}
            for pending in batch[start:end]:
                by_model.setdefault(id(pending.model), []).append(pending)
            for group in by_model.values():
                model = group[0].model
                answers = model.similar_each([p.params for p in group])
                failed = [(p, a) for p, a in zip(group, answers, strict=True)
                          if isinstance(a, ServingError)]
                found = [(p, a) for p, a in zip(group, answers, strict=True)
                         if not isinstance(a, ServingError)]
                out.extend(failed)
                if found:
                    rendered = self.render([a for _, a in found], model.version)
                    out.extend(zip([p for p, _ in found], rendered, strict=True))

        def work() -> list[tuple[_Pending, Any]]:
            out: list[tuple[_Pending, Any]] = []
            progress.step(Budget(), lambda start, end: lookups(start, end, out))
            return out

        try:
            results = await self.workers.run(work)
        except Exception as exc:  # a failed batch fails each of its calls, not the batcher
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return []
        self.metrics.similar_batch.observe(len(results))
        for pending, answer in results:
            if pending.future.done():
                continue
            if isinstance(answer, Exception):
                pending.future.set_exception(answer)
            else:
                pending.future.set_result(answer)
        return batch[progress.done:]
