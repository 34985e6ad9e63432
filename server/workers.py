"""The worker pool that keeps model work (ONNX Runtime, hnswlib, strategy numpy) off the event
loop, honouring each caller's deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from server.errors import DeadlineExceeded

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the ``time.monotonic`` clock (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Workers:
    """A fixed-size thread pool. Work queued for a caller whose deadline has passed by the
    time a thread picks it up is skipped rather than done for nobody."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="songrec-work")

    async def run(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run ``fn()`` in the pool and await its result."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the work started")

        def job() -> T:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed while the call waited for a worker")
            return fn()

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def shutdown(self) -> None:
        """Finish queued work and stop the threads."""
        self._pool.shutdown(wait=True, cancel_futures=False)
