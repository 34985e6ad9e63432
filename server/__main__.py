"""``python -m server``: run the songrec gRPC server (see ``python -m server --help``)."""

from __future__ import annotations

import asyncio
import logging
import sys

from server.app import serve
from server.bundle import BundleError
from server.config import ConfigError, load_config
from server.logs import setup_logging
from server.memory import pin_mmap_threshold
from server.processes import serve_processes
from server.wal import WalError

# Run as __main__ (python -m server): __name__ would name its log lines "__main__".
log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    """Flags and environment -> config -> serve (one process, or ``--processes N``)."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"python -m server: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    log.info("config: %s", config)
    pin_mmap_threshold()
    if config.processes > 1:
        return serve_processes(config)
    try:
        return asyncio.run(serve(config))
    except (ConfigError, WalError, BundleError) as exc:
        log.error("cannot start: %s", exc)  # one line on stderr, in the chosen log format
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
