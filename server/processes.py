"""``--processes N``: several server processes answering on one port.

One Python process runs its strategies' Python code on one core at a time (the GIL). Here
the parent loads the bundle once, then forks N children. Each child starts its own event
loop and gRPC server on the same port (SO_REUSEPORT), and the kernel spreads incoming
connections over them. Forked after the load, the children share the model's memory
copy-on-write: the index, tables and codes are never written while serving.

gRPC must not be started before a fork: nothing here touches it until each child runs
:func:`server.app.serve`. The parent only waits: it passes SIGTERM, SIGINT and SIGHUP on,
and when a child dies on its own it stops the others and exits non-zero. A process manager
then restarts the whole server, rather than one half-configured child.

Songs: the parent adds the song store's songs before forking; then each child follows the
store on its own connection (as separate replicas do), so a song added through any one
process is served by all within a second. ReloadModel would reach one process only, and is
refused with FAILED_PRECONDITION: change the model by restarting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
from types import FrameType

from server import wire
from server.app import STOP_SIGNALS, serve
from server.bundle import BundleError
from server.config import ConfigError, ServerConfig
from server.following import catch_up, open_configured_store
from server.live import LiveModel
from server.memory import glibc
from server.store import StoreError
from server.wal import WalError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies


def serve_processes(config: ServerConfig) -> int:
    """Load the bundle, fork ``config.processes`` servers, wait for them; the exit status."""
    assert config.bundle is not None  # checked with the flags
    try:
        model = LiveModel.configured(config, config.bundle, config.verify)
        # Connections are not shared across a fork: this one is closed before it.
        store, _ = open_configured_store(config)
        if store is not None:
            try:
                added = catch_up(model, store)
                log.info("added %d songs from the song store %s before forking", added,
                         store.url)
            finally:
                store.close()
    except (BundleError, OSError, ConfigError, WalError, StoreError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    wire.warm_up()  # compiled once here, not in every child
    # Objects made so far go to a generation the collector never scans again: its passes
    # would otherwise write to every object's header and copy the shared pages.
    gc.collect()
    gc.freeze()
    children: dict[int, int] = {}  # pid -> process number
    for number in range(config.processes):
        pid = os.fork()
        if pid == 0:  # the child: serve, and never return into the parent's code
            status = 1
            try:
                status = _serve_child(config, model, number)
            except BaseException:  # noqa: BLE001 (a child must end here, whatever happened)
                log.exception("server process %d failed", number)
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = number
    log.info("%d server processes on %s: pids %s", len(children), config.target,
             " ".join(str(p) for p in children))
    return _supervise(children)


def _serve_child(config: ServerConfig, model: LiveModel, number: int) -> int:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)  # serve() installs the loop's own handlers
    _die_with_parent()
    # Each process needs a port of its own for its metrics.
    mine = dataclasses.replace(config, metrics_port=config.metrics_port + number
                               if config.metrics_port else 0)
    return asyncio.run(serve(mine, model=model))


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies, so no orphan keeps the port."""
    prctl = glibc("prctl")
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _supervise(children: dict[int, int]) -> int:
    """Wait for every child; pass SIGTERM, SIGINT and SIGHUP on; stop all when one dies
    unasked."""
    stopping = False
    status = 0

    def stop_all(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop_all)
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        number = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            log.error("server process %d (pid %d) ended with status %d: stopping the "
                      "others", number, pid, code)
            status = 1
            stop_all(signal.SIGTERM)
        elif code != 0:
            log.error("server process %d (pid %d) ended with status %d", number, pid, code)
            status = status or 1
    log.info("all server processes stopped")
    return status
