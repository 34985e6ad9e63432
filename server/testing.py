"""A real server in a background thread, for tests of the server and of its clients.

``ServerThread(ServerConfig(bundle=..., port=0))`` runs :func:`server.app.create_server` on
its own event loop, starts it (loading ``config.bundle`` if set) and exposes the bound port;
tests talk to it through real channels. No part of gRPC is mocked.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from server.app import Server, create_server
from server.config import ServerConfig

T = TypeVar("T")


class ServerThread:
    """Start a server for ``config`` (port 0 by default: a free one) and keep it running
    until :meth:`stop`. Use as a context manager or call :meth:`stop` yourself."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="songrec-test-server")
        self._thread.start()
        try:
            self.server, self.port = self.call(create_server(config))
            self.call(self.server.start())
        except BaseException:
            self._close_loop()
            raise
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Run a coroutine on the server's loop without waiting (a concurrent Future)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def channel(self, **options: Any) -> grpc.Channel:
        """A plain (insecure) synchronous channel to the server."""
        return grpc.insecure_channel(self.target, **options)

    def stop(self, grace: float = 0.0) -> None:
        """Drain and stop the server, then its loop."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Server", "ServerThread"]
