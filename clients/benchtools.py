"""What every benchmark shares: the machine's description, marked sections of
docs/BENCHMARKS.md, repository-relative paths, free ports, a server in a child process and
the latency histogram plot. Used by the serving benchmarks here and by the trainer's.

Imports only the standard library and numpy (matplotlib when plotting), so that the load
test may use it and stay free of the server's code.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- reports


def machine() -> str:
    """A one-line description of this machine: core count, CPU model, OS, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()}, "
            f"Python {platform.python_version()}")


def replace_marked(path: Path, body: str, start_marker: str, end_marker: str) -> None:
    """Put ``body`` between two marker lines of ``path``; appends the marked section when
    the file has none, creates the file when missing. Every benchmark owns one section."""
    section = f"{start_marker}\n{body.rstrip()}\n{end_marker}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start, end = text.find(start_marker), text.find(end_marker)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(end_marker):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def shown_path(path: str | Path) -> str:
    """``path`` as a committed report may show it: relative to the repository when inside
    it (a report must not carry the paths of the machine that ran it), else its name."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPO).as_posix()
    except ValueError:
        return resolved.name if resolved.is_absolute() else str(path)


def shown_command(prog: str, argv: Sequence[str]) -> str:
    """A command line for a report, every argument that names a path made repository-
    relative (``--bundle /home/x/songrec/bundles/demo`` -> ``--bundle bundles/demo``)."""
    shown = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and value.startswith("/"):
            shown.append(f"{flag}={shown_path(value)}")
        elif arg.startswith("/"):
            shown.append(shown_path(arg))
        else:
            shown.append(arg)
    return " ".join([prog, *shown])


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` from ``/proc/<pid>/status`` (None: unknown)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------- a server in a child


class ServerError(RuntimeError):
    """The server in the child process did not start, or would not stop."""


class ServerProcess:
    """``python -m server`` in a child process with JSON logs on stderr; waits until it
    listens (it says so once health is SERVING) and reads the port it picked.

    Parameters
    ----------
    args : sequence of str
        More server flags (``--bundle``, ``--data-dir``, ``--port N`` instead of 0, ...).
    env : mapping, optional
        Extra environment variables (tokens belong here, not in ``args``: a command line
        is visible to every user of the machine).
    host : str or None
        ``--host`` to pass; None passes none (the server's default).
    ready_timeout : float
        Seconds to wait for "listening on".
    """

    def __init__(self, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                 host: str | None = "127.0.0.1", ready_timeout: float = 120.0) -> None:
        command = [sys.executable, "-m", "server", "--port", "0", "--log-format", "json"]
        if host is not None:
            command += ["--host", host]
        command += list(args)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._news: queue.Queue[str] = queue.Queue()
        self.port = 0
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"server-{self.process.pid}-log")
        self._reader.start()
        try:
            self._wait_listening(ready_timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_s = time.perf_counter() - started  # spawn to listening (SERVING)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self._lines.append(line)
            self._news.put(line)

    def _wait_listening(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._news.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    self._reader.join(timeout=5)
                    raise ServerError(f"the server exited with status "
                                      f"{self.process.returncode} before listening: "
                                      f"{self.tail()}") from None
                continue
            message = log_message(line)
            if message.startswith("listening on "):
                self.port = int(message.split()[2].rsplit(":", 1)[1])
                return
        raise ServerError(f"the server did not listen within {timeout:.0f} s: {self.tail()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        """Every stderr line so far."""
        with self._lock:
            return list(self._lines)

    def messages(self) -> list[str]:
        """The ``msg`` of every JSON log line so far."""
        return [log_message(line) for line in self.log_lines()]

    def tail(self, lines: int = 5) -> str:
        return " | ".join(line.strip() for line in self.log_lines()[-lines:])

    def rss_bytes(self) -> int | None:
        """The child's resident set size (Linux ``/proc``); None when unavailable."""
        return rss_bytes(self.pid)

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status (raises ``subprocess.TimeoutExpired``)."""
        status = self.process.wait(timeout)
        self._reader.join(timeout=5)
        return status

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful drain), then SIGKILL if it outlasts ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerError(f"the server ignored SIGTERM for {timeout:.0f} s") from None

    def kill(self) -> None:
        """SIGKILL, no drain (what a crash or the OOM killer does)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def log_message(line: str) -> str:
    """The ``msg`` of a JSON log line (the line itself when it is not JSON)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()
    return str(record.get("msg", "")) if isinstance(record, dict) else line.strip()


# ---------------------------------------------------------------- plots


def latency_histogram(ax: Any, series: Mapping[str, np.ndarray], *, digits: int = 2,
                      counts: bool = False) -> None:
    """Latency histograms (milliseconds) on one matplotlib axis: shared log-spaced bins,
    so that the shapes compare, one step line per series, p50 and p99 in the legend."""
    # matplotlib comes with the 'train' extra; only plotting needs it.
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    low = max(min(float(ms.min()) for ms in series.values()), 1e-3)
    high = max(max(float(ms.max()) for ms in series.values()), low * 2)
    edges = np.geomspace(low, high, 60)
    for label, ms in series.items():
        p50, p99 = np.percentile(ms, [50, 99])
        text = f"{label}: p50 {p50:.{digits}f}{' ms' if counts else ''}, p99 {p99:.{digits}f} ms"
        ax.hist(ms, bins=edges.tolist(), histtype="step", linewidth=1.5,
                label=text + (f", n={len(ms)}" if counts else ""))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("calls")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
