"""Songs added at run time: their unit vectors and an hnswlib graph of their own, beside
the bundle's (which :class:`server.search.HnswSearch` merges into every search)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# A bundle song's SimilarSongs up to this depth stays a table lookup as songs are added.
NEAR_DEPTH = 20
# Bundle songs searched per added song to find those it is among the nearest of. Being
# among a bundle song's nearest is not symmetric: a bundle song whose own neighbours are
# far (an outlier) can have an added song in its top 10 while being past that song's
# 200th nearest. With 200, SimilarSongs of bundle songs kept a recall@10 of 0.935 against
# exact search (5th percentile 0.5) with 20,000 songs added to the cold-start demo bundle;
# with 1,000, 0.985 (0.9), adding songs 4x slower (docs/BENCHMARKS.md, *Catalogue growth*).
NEAR_CANDIDATES = 1000
# The added songs' graph. Metadata-only codes crowd together (songs of one genre and year
# differ only by artist), and a sparse graph loses them: with 45,000 songs added to the
# cold-start demo bundle, EncodeSong's recall@10 against exact search was 0.963 at M 16 /
# ef_construction 100 (a deeper search, ef 600, gave 0.964), 0.975 at 32 / 200 and 0.983
# at 48 / 400 (docs/BENCHMARKS.md, *Catalogue growth*).
GRAPH_M = 48
GRAPH_EF_CONSTRUCTION = 400


class AddedSongs:
    """Songs added at run time: their unit vectors (rows ``first``, ``first + 1``, ... in
    the order they came) and an hnswlib graph over them, separate from the bundle's.

    Searches ask the graph for ``k`` candidates (searching ``max(k, ef)`` deep) and
    re-score them exactly against the stored vectors. The graph starts with room for
    ``capacity`` songs and doubles when full (a resize copies only this graph, never the
    bundle's)."""

    def __init__(self, dim: int, first: int, capacity: int, *, m: int = GRAPH_M,
                 ef_construction: int = GRAPH_EF_CONSTRUCTION, ef: int = 100,
                 threads: int = 1) -> None:
        self.dim, self.first, self.threads = dim, first, threads
        self.capacity = max(int(capacity), 1)
        self.m, self.ef_construction, self.ef = m, ef_construction, max(ef, 50)
        self.count = 0
        self._unit = np.empty((0, dim), dtype=np.float32)
        self._index: Any = None
        self.resizes = 0  # how often the graph grew past its capacity
        # Songs with identical metadata have identical codes, and exact duplicates break
        # HNSW's graph (as in the bundle's): the graph holds the first of each, and hits
        # expand to the others.
        self._first_of: dict[bytes, int] = {}
        self._twins: dict[int, list[int]] = {}
        self.in_graph = 0
        # Bundle song (representative) -> positions in the arrays below of the added songs
        # among its nearest (see HnswSearch.link): its SimilarSongs stays a lookup.
        self.near: dict[int, list[int]] = {}
        self._near_song = np.empty(0, dtype=np.int64)
        self._near_sim = np.empty(0, dtype=np.float32)
        self._n_near = 0
        # near as sorted arrays (keys, indptr, songs, sims): see near_lists.
        self._snapshot: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def link(self, bundle_reps: np.ndarray, songs: np.ndarray, sims: np.ndarray) -> None:
        """Record added ``songs[i]`` among the nearest of bundle song ``bundle_reps[i]``."""
        end = self._n_near + len(songs)
        if end > len(self._near_song):
            size = max(end, 2 * len(self._near_song), 1024)
            self._near_song = np.resize(self._near_song, size)
            self._near_sim = np.resize(self._near_sim, size)
        self._near_song[self._n_near : end] = songs
        self._near_sim[self._n_near : end] = sims
        crowded = []
        for offset, rep in enumerate(bundle_reps.tolist()):
            positions = self.near.setdefault(rep, [])
            positions.append(self._n_near + offset)
            if len(positions) == 2 * NEAR_DEPTH:
                crowded.append(rep)
        self._n_near = end
        self._snapshot = None
        # A hub (a bundle song near very many added ones) keeps only its NEAR_DEPTH
        # nearest: no lookup reads deeper, and a list of thousands made its lookups slow.
        for rep in crowded:
            positions = self.near[rep]
            order = np.argsort(-self._near_sim[positions], kind="stable")[:NEAR_DEPTH]
            self.near[rep] = [positions[i] for i in sorted(order.tolist())]

    def near_of(self, rep: int) -> tuple[np.ndarray, np.ndarray]:
        """The added songs linked to bundle song ``rep`` and their similarities."""
        songs, sims, _ = self.near_lists(np.asarray([rep], dtype=np.int64))
        return songs, sims

    def near_lists(self, reps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`near_of` of every bundle song of ``reps`` as flat arrays: songs,
        similarities and ``offsets`` (``reps[i]``'s are ``offsets[i]:offsets[i + 1]``).

        Read from a sorted snapshot of the links, rebuilt on the first read after
        :meth:`link`: a seed list looked them up one dict entry at a time, which at Melon
        scale (58k linked bundle songs) was most of what 100k added songs cost ae-quota."""
        if self._snapshot is None:
            keys = np.fromiter(self.near, dtype=np.int64, count=len(self.near))
            keys.sort()
            lists = [self.near[int(k)] for k in keys.tolist()]
            indptr = np.zeros(len(keys) + 1, dtype=np.int64)
            np.cumsum([len(x) for x in lists], out=indptr[1:])
            flat = (np.fromiter((p for x in lists for p in x), dtype=np.int64,
                                count=int(indptr[-1])))
            self._snapshot = (keys, indptr, self._near_song[flat], self._near_sim[flat])
        keys, indptr, songs, sims = self._snapshot
        reps = np.asarray(reps, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, reps), max(len(keys) - 1, 0))
        found = (keys[at] == reps) if len(keys) else np.zeros(len(reps), dtype=bool)
        starts = np.where(found, indptr[at], 0) if len(keys) else np.zeros(len(reps), np.int64)
        lengths = np.where(found, indptr[np.minimum(at + 1, len(keys))] - starts, 0)
        offsets = np.zeros(len(reps) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        picks = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
        return songs[picks], sims[picks], offsets

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        expected = np.arange(self.first + self.count, self.first + self.count + len(labels))
        if not np.array_equal(labels, expected):
            raise ValueError(f"added songs must take rows {expected[:1].tolist()}.. in order")
        if not len(labels):
            return
        unit = np.asarray(codes, dtype=np.float32)
        unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
        end = self.count + len(labels)
        if end > len(self._unit):
            grown = np.empty((max(end, 2 * len(self._unit), 64), self.dim), dtype=np.float32)
            grown[: self.count] = self._unit[: self.count]
            self._unit = grown
        self._unit[self.count : end] = unit
        fresh = []
        for i, label in enumerate(labels.tolist()):
            # A 16-byte digest, not the code itself: 100k codes of 1024 floats as keys
            # would hold 400 MB.
            key = hashlib.blake2b(unit[i].tobytes(), digest_size=16).digest()
            first = self._first_of.setdefault(key, label)
            if first == label:
                fresh.append(i)
            else:
                self._twins.setdefault(first, []).append(label)
        self.count = end
        if not fresh:
            return
        if self._index is None:
            # hnswlib only here: the load test reads bundles through this package.
            import hnswlib

            self._index = hnswlib.Index(space="cosine", dim=self.dim)
            self._index.init_index(max_elements=max(self.capacity, len(fresh)),
                                   ef_construction=self.ef_construction, M=self.m)
            self._index.set_ef(self.ef)
            self._index.set_num_threads(self.threads)
        needed = self.in_graph + len(fresh)
        if needed > self._index.get_max_elements():
            self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
            self.resizes += 1
        self._index.add_items(unit[fresh], labels[fresh])
        self.in_graph = needed

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self._unit[np.asarray(labels, dtype=np.int64) - self.first]

    def search(self, queries: np.ndarray, k: int, linked: Sequence[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest added songs of each query, exactly re-scored, best first;
        ``linked[i]``: added songs re-scored for query ``i`` besides the graph's hits."""
        queries = np.atleast_2d(queries).astype(np.float32)
        depth = min(self.in_graph, k)  # the graph searches max(ef, k) deep anyway
        while True:
            try:
                cand, _ = self._index.knn_query(queries, k=depth)
                break
            except RuntimeError:
                # The graph could not reach ``depth`` songs from a query: fewer, not none.
                if depth <= 1:
                    raise
                depth //= 2
        cand = cand.astype(np.int64)
        if self._twins:
            cand = self._with_twins(cand, k)
            depth = cand.shape[1]
        unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        if linked is not None:
            return self._best_of_rows([np.union1d(hits, more) for hits, more in
                                       zip(cand, linked, strict=True)], unit, k)
        scores = np.einsum("qkd,qd->qk", self._unit[cand - self.first], unit)
        take = min(k, depth)
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return (np.take_along_axis(np.take_along_axis(cand, top, axis=1), order, axis=1),
                np.take_along_axis(top_scores, order, axis=1).astype(np.float32))

    def _best_of_rows(self, rows: Sequence[np.ndarray], unit: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per query, its ``k`` best of ``rows[i]`` (distinct added songs) by exact
        similarity, best first; cut to the shortest row so that the rows stay a matrix."""
        labels, sims = [], []
        for row, query in zip(rows, unit, strict=True):
            scores = self._unit[row - self.first] @ query
            take = min(k, len(row))
            top = np.argpartition(-scores, take - 1)[:take]
            top = top[np.argsort(-scores[top], kind="stable")]
            labels.append(row[top])
            sims.append(scores[top])
        width = min(len(r) for r in labels)
        return (np.stack([r[:width] for r in labels]).astype(np.int64),
                np.stack([r[:width] for r in sims]).astype(np.float32))

    def _with_twins(self, cand: np.ndarray, k: int) -> np.ndarray:
        """Each row of graph hits followed by their twins, cut to ``k`` (or the shortest
        row's length, so the rows stay a matrix)."""
        rows = []
        for hits in cand.tolist():
            row: list[int] = []
            for label in hits:
                row.append(label)
                row.extend(self._twins.get(label, ()))
                if len(row) >= k:
                    break
            rows.append(row[:k])
        width = min(len(r) for r in rows)
        return np.asarray([r[:width] for r in rows], dtype=np.int64)

    def merge(self, queries: np.ndarray, labels: np.ndarray, sims: np.ndarray, k: int,
              linked: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The bundle's hits (``labels``, ``sims``: a row per query, best first) merged
        with the added songs' ``k`` nearest (``linked[i]``: more candidates of query
        ``i``): the first ``max(k, bundle width)`` by similarity (ties: bundle songs
        first)."""
        add_labels, add_sims = self.search(queries, k, linked)
        cand = np.concatenate([labels.astype(np.int64), add_labels], axis=1)
        cand_sims = np.concatenate([sims.astype(np.float32), add_sims], axis=1)
        order = np.argsort(-cand_sims, axis=1, kind="stable")[:, : max(k, labels.shape[1])]
        return (np.take_along_axis(cand, order, axis=1),
                np.take_along_axis(cand_sims, order, axis=1))
