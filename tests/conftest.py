"""Shared fixtures: a tiny synthetic dataset, its official split, and a tiny trained bundle.

The dataset carries the real files' dirt (``quirks``), so every test that trains, splits or
serves goes through the lenient reads.

Built once per test session (a few seconds to ~20 s on 2 cores) and shared read-only;
tests that change a bundle copy it first (``copy_bundle``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clients.benchtools import free_port

os.environ.setdefault("OMP_NUM_THREADS", "2")

__all__ = ["free_port", "wait_until"]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0,
               what: str = "condition") -> float:
    """Poll ``condition`` until it holds and return the seconds that took; AssertionError
    naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.synth import generate, write_dataset

    out = tmp_path_factory.mktemp("tiny") / "data"
    write_dataset(generate("tiny", seed=7, quirks=True), out)
    return out


@pytest.fixture(scope="session")
def tiny_split(tiny_data: Path) -> Path:
    from trainer.split import write_split

    out = tiny_data.parent / "split"
    write_split(tiny_data, out, seed=777)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_split: Path) -> Path:
    """A bundle trained with the ``tiny`` preset on the tiny split."""
    from trainer.train import main

    out = tiny_split.parent / "bundle"
    assert main(["--data", str(tiny_split), "--out", str(out), "--preset", "tiny",
                 "--epochs", "3", "--val-every", "3", "--ranker-questions", "150"]) == 0
    return out


@pytest.fixture
def copy_bundle(tiny_bundle: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private, writable copy of the tiny bundle."""

    def make(name: str = "bundle") -> Path:
        dest = tmp_path / name
        shutil.copytree(tiny_bundle, dest)
        return dest

    return make


# ---------------------------------------------------------------- PostgreSQL and nginx

# CI sets this: there the helper servers are installed by the project's own files
# (`make sidecars`), so a missing one is a failure, never a skip.
REQUIRE_SIDECARS = os.environ.get("SONGREC_REQUIRE_SIDECARS", "") not in ("", "0")


def _sidecar_missing(reason: str) -> None:
    if REQUIRE_SIDECARS:
        pytest.fail(f"{reason} (SONGREC_REQUIRE_SIDECARS is set)")
    pytest.skip(f"{reason}; `make sidecars` installs it")


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """A PostgreSQL server (the Debian package's) for the whole session, on loopback."""
    from clients.sidecars import LocalPostgres, SidecarError, postgres_bin

    if postgres_bin() is None:
        _sidecar_missing("PostgreSQL is not installed")
    try:
        server = LocalPostgres()
    except SidecarError as exc:
        _sidecar_missing(f"PostgreSQL would not start: {exc}")
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres, request: pytest.FixtureRequest) -> str:  # type: ignore[no-untyped-def]
    """The URL of a fresh, empty database on the session's PostgreSQL server (restarted
    first if a test stopped it)."""
    import re

    if postgres.proc is None:
        postgres.start()
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return str(postgres.create_database(f"t_{name}_{os.getpid()}_{id(request)}"[:63]))


@pytest.fixture(scope="session")
def nginx_available() -> None:
    from clients.sidecars import nginx_bin

    if nginx_bin() is None:
        _sidecar_missing("nginx is not installed")
