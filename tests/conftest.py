"""Shared fixtures: a tiny synthetic dataset, its official split, and a tiny trained bundle.

The dataset carries the real files' dirt (``quirks``), so every test that trains, splits or
serves goes through the lenient reads.

Built once per test session (a few seconds to ~20 s on 2 cores) and shared read-only;
tests that change a bundle copy it first (``copy_bundle``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


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
