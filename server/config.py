"""Server configuration: command-line flags over ``SONGREC_*`` environment variables over
defaults, turned into one frozen :class:`ServerConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server.bundle import MAX_EF

T = TypeVar("T")

ENV_PREFIX = "SONGREC_"


class ConfigError(ValueError):
    """A flag, environment variable or file named by one is unusable."""


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; containers often narrow it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start. Tokens are kept out of ``repr`` (and so out of
    every log line that prints the config)."""

    bundle: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path | None = None
    # The song store's URL (repr: it may hold a password). None: a SQLite file in
    # --data-dir when one is given, else no store (AddSongs refused).
    store: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    metrics_port: int = 0  # 0: no metrics endpoint
    max_concurrent_rpcs: int = 128
    max_message_bytes: int = 4 << 20
    # Threads running model work (ONNX, hnswlib, strategies): one per usable core, at most
    # 8. More only contend for the GIL: on 2 cores, 2 workers answered ContinuePlaylist
    # 429 and 399 calls/s against 398 and 338 with 4, in alternating runs.
    workers: int = field(default_factory=lambda: max(1, min(8, usable_cores())))
    threads: int = 1  # threads per ONNX Runtime / hnswlib call inside one worker
    # Server processes sharing the port (SO_REUSEPORT), forked once the model is loaded so
    # they share its memory: the way past one process's GIL. Each follows the song store;
    # a reload would reach one process of them, so ReloadModel needs --processes 1.
    processes: int = 1
    capacity: int = 100_000  # index room for added songs before it must grow
    song_ef: int = 0  # HNSW ef for song searches; 0: the bundle's (manifest) value
    playlist_ef: int = 0  # HNSW ef for playlist searches (ae-neighbours, ae-hybrid); 0: bundle's
    similar_batch: int = 256  # most SimilarSongs lookups per index query; 0: no batching
    verify: bool = True  # sha256 of every bundle file at load
    # Bind the port only once --bundle is loaded: behind a balancer without active health
    # checks (nginx), no call then reaches a replica that cannot answer yet.
    listen_after_load: bool = False
    grace_s: float = 10.0  # SIGTERM: how long in-flight calls may take to finish
    # SIGTERM: how long to go on answering with health NOT_SERVING before refusing calls,
    # so health-checking balancers (Kubernetes readiness) send new calls elsewhere first.
    drain_delay_s: float = 0.0
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def store_url(self) -> str | None:
        """The song store to open: ``--store``, else a SQLite file in ``--data-dir``."""
        if self.store:
            return self.store
        if self.data_dir is not None:
            from server.store import default_url

            return default_url(self.data_dir)
        return None

    @property
    def target(self) -> str:
        """host:port as a client would write it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _env(environ: Mapping[str, str], name: str, convert: Callable[[str], T],
         default: T) -> T:
    raw = environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r}: not a valid value") from None


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def read_token(path: Path, what: str) -> str:
    """A token from a file (see :func:`clean_token`); never echoes the content."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {path}: unreadable ({exc.__class__.__name__})") from None
    return clean_token(raw, f"{what} file {path}")


def clean_token(raw: str, where: str) -> str:
    """A token with surrounding whitespace (a trailing newline from a file or an
    environment variable) stripped: a client's bearer token is stripped too, so a stored
    one with whitespace could never match. Empty, or whitespace inside: refused."""
    token = raw.strip()
    if not token:
        raise ConfigError(f"{where}: empty")
    if any(c.isspace() for c in token):
        raise ConfigError(f"{where}: the token contains whitespace")
    return token


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Flags whose defaults come from the environment, so a flag beats its variable."""
    d = ServerConfig()
    path = Path
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve a songrec bundle over gRPC (similar songs, playlist continuation, "
                    "unseen songs). Every flag also reads SONGREC_<FLAG> from the "
                    "environment, e.g. SONGREC_PORT=50052.")
    p.add_argument("--bundle", type=path, default=_env(environ, "BUNDLE", path, None),
                   help="bundle directory; without it the server starts NOT_SERVING and "
                        "waits for ReloadModel")
    p.add_argument("--host", default=_env(environ, "HOST", str, d.host),
                   help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=_env(environ, "PORT", int, d.port),
                   help="0 picks a free port")
    p.add_argument("--data-dir", type=path, default=_env(environ, "DATA_DIR", path, None),
                   help="directory of the server's state: the default song store "
                        "(songs.db) and a write-ahead log of an older version to import")
    p.add_argument("--store", default=_env(environ, "STORE", str, None),
                   help="song store URL, shared by every replica: sqlite:///PATH (default: "
                        "sqlite:///<data-dir>/songs.db) or postgresql://USER@HOST:PORT/DB; "
                        "AddSongs needs a store")
    p.add_argument("--tls-cert", type=path, default=_env(environ, "TLS_CERT", path, None))
    p.add_argument("--tls-key", type=path, default=_env(environ, "TLS_KEY", path, None))
    p.add_argument("--admin-token-file", type=path,
                   default=_env(environ, "ADMIN_TOKEN_FILE", path, None),
                   help="file holding the admin bearer token (or set SONGREC_ADMIN_TOKEN); "
                        "without one, admin RPCs are refused")
    p.add_argument("--token-file", type=path, default=_env(environ, "TOKEN_FILE", path, None),
                   help="file holding a bearer token every inference call must carry (or set "
                        "SONGREC_TOKEN); default: inference is open")
    p.add_argument("--metrics-port", type=int,
                   default=_env(environ, "METRICS_PORT", int, d.metrics_port),
                   help="Prometheus endpoint port on --host (0: off)")
    p.add_argument("--max-concurrent-rpcs", type=int,
                   default=_env(environ, "MAX_CONCURRENT_RPCS", int, d.max_concurrent_rpcs),
                   help="calls past this many in flight get RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-bytes", type=int,
                   default=_env(environ, "MAX_MESSAGE_BYTES", int, d.max_message_bytes))
    p.add_argument("--workers", type=int, default=_env(environ, "WORKERS", int, d.workers),
                   help="worker threads for model work (default: usable cores, at most 8)")
    p.add_argument("--threads", type=int, default=_env(environ, "THREADS", int, d.threads),
                   help="threads per ONNX Runtime / hnswlib call")
    p.add_argument("--similar-batch", type=int,
                   default=_env(environ, "SIMILAR_BATCH", int, d.similar_batch),
                   help="most concurrent SimilarSongs lookups answered by one index query "
                        "(0: one worker call per lookup)")
    p.add_argument("--processes", type=int,
                   default=_env(environ, "PROCESSES", int, d.processes),
                   help="server processes sharing --port, forked after the bundle is "
                        "loaded (its memory is shared); more than 1 needs --bundle and a "
                        "fixed --port; each process follows the song store, and "
                        "ReloadModel is refused (restart to change the model)")
    p.add_argument("--capacity", type=int, default=_env(environ, "CAPACITY", int, d.capacity),
                   help="room in the index for added songs before it is grown")
    p.add_argument("--song-ef", type=int, default=_env(environ, "SONG_EF", int, d.song_ef),
                   help="HNSW ef for graph searches of the song index (unseen and added "
                        "songs); 0 keeps the bundle's, which is calibrated for recall@100 "
                        ">= 0.95; smaller is faster and less exact (docs/BENCHMARKS.md)")
    p.add_argument("--playlist-ef", type=int,
                   default=_env(environ, "PLAYLIST_EF", int, d.playlist_ef),
                   help="HNSW ef of the playlist index (the nearest playlists of "
                        "ae-neighbours and ae-hybrid); 0 keeps the bundle's; smaller is "
                        "faster, at a small cost in quality (docs/BENCHMARKS.md)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   default=_env(environ, "VERIFY", _bool, d.verify),
                   help="skip the sha256 check of the bundle's files at start-up")
    p.add_argument("--listen-after-load", action="store_true",
                   default=_env(environ, "LISTEN_AFTER_LOAD", _bool, d.listen_after_load),
                   help="open the port only once --bundle is loaded (default: at once, "
                        "with health NOT_SERVING until loaded); for balancers that do not "
                        "probe health, such as nginx")
    p.add_argument("--grace", dest="grace_s", type=float,
                   default=_env(environ, "GRACE", float, d.grace_s),
                   help="seconds in-flight calls get to finish after SIGTERM")
    p.add_argument("--drain-delay", dest="drain_delay_s", type=float,
                   default=_env(environ, "DRAIN_DELAY", float, d.drain_delay_s),
                   help="seconds to go on answering after SIGTERM with health NOT_SERVING, "
                        "before refusing new calls (for balancers that probe health, e.g. "
                        "a Kubernetes readiness probe; default 0)")
    p.add_argument("--log-format", choices=["text", "json"],
                   default=_env(environ, "LOG_FORMAT", str, d.log_format),
                   help="json: one JSON object per line")
    p.add_argument("--log-level", default=_env(environ, "LOG_LEVEL", str, d.log_level),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def load_config(argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags (and ``SONGREC_*`` variables) into a checked :class:`ServerConfig`.

    Raises :class:`ConfigError` with a one-line message; argparse exits on unknown flags.
    """
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    return check_config(vars(args), environ)


def check_config(values: dict[str, Any], environ: Mapping[str, str]) -> ServerConfig:
    """Resolve token sources and range-check numbers."""
    admin_file = values.pop("admin_token_file")
    token_file = values.pop("token_file")
    admin = read_token(admin_file, "admin token") if admin_file else None
    admin = admin or _env_token(environ, "ADMIN_TOKEN")
    token = read_token(token_file, "token") if token_file else None
    token = token or _env_token(environ, "TOKEN")
    config = ServerConfig(admin_token=admin, token=token, **values)
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + item.name.removesuffix("_s").replace("_", "-")
            raise ConfigError(f"{flag}: {value} is not a finite number")
    limits = {"port": (0, 65535), "metrics_port": (0, 65535),
              "max_concurrent_rpcs": (1, 100_000), "max_message_bytes": (1024, 1 << 30),
              "workers": (1, 256), "threads": (1, 256), "similar_batch": (0, 4096),
              "capacity": (0, 100_000_000), "song_ef": (0, MAX_EF),
              "playlist_ef": (0, MAX_EF), "processes": (1, 256)}
    for name, (low, high) in limits.items():
        value = getattr(config, name)
        if not low <= value <= high:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: {value} is out of range {low}..{high}")
    if config.grace_s < 0:
        raise ConfigError(f"--grace: {config.grace_s} is negative")
    if config.drain_delay_s < 0:
        raise ConfigError(f"--drain-delay: {config.drain_delay_s} is negative")
    if config.processes > 1:
        for problem, wrong in (("needs --bundle", config.bundle is None),
                               ("needs a fixed --port, not 0", config.port == 0)):
            if wrong:
                raise ConfigError(f"--processes {config.processes} {problem}")
    if config.store is not None and not config.store.startswith(
            ("sqlite:///", "postgresql://", "postgres://")):
        from server.store import redact

        raise ConfigError(f"--store {redact(config.store)}: not a store URL; use "
                          f"sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    for name in ("tls_cert", "tls_key"):
        file = getattr(config, name)
        if file is not None and not file.is_file():
            raise ConfigError(f"--{name.replace('_', '-')} {file}: no such file")
    if config.bundle is not None and not config.bundle.is_dir():
        raise ConfigError(f"--bundle {config.bundle}: no such directory")
    if config.data_dir is not None and config.data_dir.exists() and \
            not config.data_dir.is_dir():
        raise ConfigError(f"--data-dir {config.data_dir}: not a directory")
    return config


def _env_token(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(ENV_PREFIX + name)
    return clean_token(raw, ENV_PREFIX + name) if raw else None
