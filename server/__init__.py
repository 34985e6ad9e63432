"""songrec's serving side (see docs/ARCHITECTURE.md).

numba keeps compiled kernels (``@njit(cache=True)``) on disk and notices a change to a
kernel's own file, but not to a kernel it calls from another file (a documented limitation
of numba's cache). After an in-place update, such a stale kernel made the server fail at
start ("'descr' is NULL"). So the cache lives in a directory named by a digest of every
file that holds kernels: a change to any of them starts a fresh cache. ``NUMBA_CACHE_DIR``
set by the user wins.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

KERNEL_FILES = ("voting.py", "rankkernels.py", "wire.py")


def kernel_cache_dir(package: Path = Path(__file__).parent) -> Path | None:
    """Where numba caches the kernels of ``package`` (None: its files cannot be read)."""
    digest = hashlib.sha256()
    try:
        for name in KERNEL_FILES:
            digest.update((package / name).read_bytes())
    except OSError:
        return None
    return package / "__pycache__" / f"numba-{digest.hexdigest()[:16]}"


if "NUMBA_CACHE_DIR" not in os.environ:
    _cache = kernel_cache_dir()
    if _cache is not None:
        os.environ["NUMBA_CACHE_DIR"] = str(_cache)
        if "numba" in sys.modules:  # imported first (the trainer does): set its config too
            sys.modules["numba"].config.CACHE_DIR = str(_cache)
