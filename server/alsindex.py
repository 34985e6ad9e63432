"""The ALS source's inner-product index (``als.hnsw``): its best songs without a scan."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from server import bundle as bundle_files
from server.bundle import ALS_INDEX, RANKER_ARRAYS, BundleError, IndexParams, Manifest

log = logging.getLogger(__name__)

# The exact ALS source reads every song's factors per question (a scan that grows with the
# catalogue: 707,989 x 64 float32 is 181 MB at Melon scale). hnswlib's inner-product space
# over the trained songs' factors instead; the ALS scores of what it finds stay exact.
# Recall of the exact top 100 on 400 demo validation questions (41,807 trained songs x 64
# factors), per (M, ef_construction) at ef 300: (16, 200) 0.895, (32, 400) 0.955,
# (48, 400) 0.966, (64, 500) 0.977. Inner product is no metric: a few long factor vectors
# are the best answer to many questions, and the graph needs more links than the cosine
# indexes' M 16 to reach the rest; M 48 keeps a margin over the 0.95 target for a larger
# catalogue, whose recall at the same ef is lower.
M = 48
EF_CONSTRUCTION = 400
# ef 300: recall 0.966 (M 48); ef 200: 0.956, 400: 0.972, 800: 0.980, at growing cost.
EF = 300
SPACE = "ip"


def trained_rows(popularity: np.ndarray, n: int) -> np.ndarray:
    """The songs (rows below ``n``) some training playlist holds: the only ones the ALS
    source may propose (the others have zero, untrained factors)."""
    return np.flatnonzero(np.asarray(popularity[:n]) > 0).astype(np.int64)


def build(factors: np.ndarray, popularity: np.ndarray, threads: int = 1
          ) -> tuple[Any, IndexParams] | None:
    """An hnswlib inner-product index over the trained songs' ``factors`` (label = song
    row) and its manifest entry; None when no song is trained."""
    import hnswlib

    rows = trained_rows(popularity, len(factors))
    if not len(rows):
        return None
    dim = int(factors.shape[1])
    index = hnswlib.Index(space=SPACE, dim=dim)
    index.init_index(max_elements=len(rows), M=M, ef_construction=EF_CONSTRUCTION,
                     random_seed=0)
    index.set_num_threads(threads)
    index.add_items(np.ascontiguousarray(factors[rows], dtype=np.float32), rows)
    index.set_ef(EF)
    return index, IndexParams(SPACE, dim, M, EF_CONSTRUCTION, EF, len(rows))


class AlsIndex:
    """A loaded ``als.hnsw``: :meth:`top` answers the ALS source from it."""

    def __init__(self, index: Any, count: int) -> None:
        self.index = index
        self.count = count

    def top(self, factors: np.ndarray, user: np.ndarray, n: int, seeds: np.ndarray,
            popularity: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The ``n`` best trained songs for ``user`` that are not ``seeds`` (rows by exact
        score ``factors[row] @ user``, descending, then by row) and those scores; None
        when the graph cannot reach enough songs (the caller scans instead)."""
        k = min(n + len(seeds), self.count)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        try:
            labels, _ = self.index.knn_query(user.reshape(1, -1).astype(np.float32), k=k)
        except RuntimeError:
            return None
        rows = labels[0].astype(np.int64)
        rows = rows[(rows < len(factors)) & ~np.isin(rows, seeds)]
        rows = rows[popularity[rows] > 0]
        scores = factors[rows] @ user
        order = np.lexsort((rows, -scores))[:n]
        return rows[order], scores[order]


def load(root: Path, manifest: Manifest, factors: np.ndarray | None,
         popularity: np.ndarray) -> AlsIndex | None:
    """``als.hnsw`` when the manifest lists it, checked against the ranker's ALS
    ``factors`` and the catalog's trained songs; :class:`BundleError` naming the file
    when it does not fit them."""
    params = manifest.als_index
    if params is None:
        return None
    path = Path(root) / ALS_INDEX
    if factors is None:
        raise BundleError(f"{path}: the ranker has no ALS factors for it to index")
    if params.dim != factors.shape[1]:
        raise BundleError(f"{path}: manifest says als_index.dim {params.dim}, the ranker's "
                          f"ALS factors have {factors.shape[1]}")
    labels = trained_rows(popularity, len(factors))
    index = bundle_files.load_hnsw(root, params, ALS_INDEX, labels=labels)
    # The labels fit; the vectors must be this ranker's factors (an index of another
    # training run would propose another model's songs). A few of them, spread out.
    sample = labels[np.linspace(0, len(labels) - 1, min(len(labels), 16)).astype(np.int64)]
    held = np.asarray(index.get_items(sample), dtype=np.float32)
    if not np.allclose(held, factors[sample], rtol=1e-5, atol=1e-6):
        raise BundleError(f"{path}: its vectors are not the ALS factors of {RANKER_ARRAYS}")
    index.set_num_threads(1)  # one question per call: the server's threads run questions
    return AlsIndex(index, params.count)

