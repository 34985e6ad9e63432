"""Throwaway PostgreSQL and nginx servers on loopback, for the tests, benchmarks and demo.

Both come from the Debian packages (``postgresql``, ``nginx``; ``make sidecars`` installs
them). PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user
the package creates, from a data directory of its own under the system temp directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clients.benchtools import free_port

NGINX_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "songrec.conf"


class SidecarError(RuntimeError):
    """A helper server is not installed or would not start."""


def postgres_bin() -> Path | None:
    """The directory of the PostgreSQL server programs (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name)
                      if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def nginx_bin() -> Path | None:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None)
    return Path(found) if found else None


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[Any], what: str,
               log_file: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SidecarError(f"{what} exited with {proc.returncode}: "
                               f"{log_file.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SidecarError(f"{what} did not listen on port {port} within {timeout:.0f} s")


class LocalPostgres:
    """A PostgreSQL server in a fresh temp directory on 127.0.0.1 (trust authentication,
    user ``songrec``). :meth:`stop` and :meth:`start` again keep the data and the port."""

    def __init__(self, port: int = 0) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise SidecarError("PostgreSQL is not installed (Debian: apt-get install "
                               "postgresql, or `make sidecars`)")
        self.bindir = bindir
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="songrec-pg-"))
        self.data = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres will not run as root
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise SidecarError("running as root, and no `postgres` user to run "
                                   "PostgreSQL as") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid,
                          "extra_groups": []}
        self.proc: subprocess.Popen[bytes] | None = None
        self._run([str(bindir / "initdb"), "-D", str(self.data), "-U", "songrec",
                   "-A", "trust", "-E", "UTF8", "--no-sync"])
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://songrec@127.0.0.1:{self.port}/postgres"

    def url_of(self, database: str) -> str:
        return f"postgresql://songrec@127.0.0.1:{self.port}/{database}"

    def _run(self, argv: Sequence[str]) -> None:
        done = subprocess.run(argv, capture_output=True, cwd=self.root, check=False,
                              **self._user)
        if done.returncode:
            raise SidecarError(f"{' '.join(argv)} failed: "
                               f"{(done.stderr or done.stdout).decode(errors='replace')}")

    def start(self, timeout: float = 30.0) -> None:
        log_fh = open(self.log_file, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
             "-c", "max_connections=200"],
            stdout=log_fh, stderr=subprocess.STDOUT, cwd=self.root, **self._user)
        log_fh.close()
        _wait_port(self.port, timeout, self.proc, "postgres", self.log_file)
        # Listening is not yet accepting queries: wait for a real connection.
        import psycopg

        end = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open connections are cut."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalNginx:
    """nginx on 127.0.0.1:``port`` balancing gRPC over ``upstreams`` (host:port), with the
    configuration of ``deploy/nginx/songrec.conf``."""

    def __init__(self, upstreams: Sequence[str], port: int = 0) -> None:
        binary = nginx_bin()
        if binary is None:
            raise SidecarError("nginx is not installed (Debian: apt-get install nginx, or "
                               "`make sidecars`)")
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="songrec-nginx-"))
        self.log_file = self.root / "error.log"
        conf = self.root / "nginx.conf"
        conf.write_text(render_nginx_conf(upstreams, f"127.0.0.1:{self.port}", self.root))
        log_fh = open(self.log_file, "ab")  # noqa: SIM115 - owned by the process
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [str(binary), "-p", str(self.root), "-c", str(conf), "-e", str(self.log_file)],
            stdout=log_fh, stderr=subprocess.STDOUT, cwd=self.root)
        log_fh.close()
        _wait_port(self.port, 15, self.proc, "nginx", self.log_file)
        self.target = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish the calls in flight
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalNginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def render_nginx_conf(upstreams: Sequence[str], listen: str, prefix: Path) -> str:
    """``deploy/nginx/songrec.conf`` with its upstream servers, listen address and file
    locations filled in (a runnable configuration of its own, daemon off)."""
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=2s;" for u in upstreams)
    text = NGINX_TEMPLATE.read_text()
    return (text.replace("# @UPSTREAMS@", servers.strip())
                .replace("127.0.0.1:8080", listen)
                .replace("/run/songrec-nginx", str(prefix)))
