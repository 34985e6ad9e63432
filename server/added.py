"""Songs added at run time: their unit vectors and hnswlib graphs of their own, beside
the bundle's (which :class:`server.search.HnswSearch` merges into every search)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
# hnswlib's graph loses songs where codes crowd: grown by 100,000 Melon-scale songs in file
# order (71,180 distinct codes), a search for a song's own code found only 72% of them, at ef
# 800 and 3,000 alike (a fresh graph of a random 20,000 found 99%; larger M, other
# ef_construction values and a scaffold inserted first gave 0.60-0.80). Every added song is
# therefore searched for by its own code, and one the graph loses goes into an orphan graph
# (and that graph's losses into the next, up to MAX_GRAPHS); every search asks all of them.
MAX_GRAPHS = 3
# A song found when added can be lost later, as later songs prune the links to it: each add
# re-checks this many times as many earlier songs of each graph, in rotation (on clustered
# toy codes, tests/test_neighbours.py, 2 left 8% of the songs lost, 4 left 6%, 8 left 3%).
SWEEP = 4
# The checks search this deep (or the graph's ef, if lower): a lost song is unreachable,
# not just far (72% were found at ef 800 and at 3,000 alike), and a check at the first
# graph's serving ef (800 at Melon scale) would cost several milliseconds a song.
CHECK_EF = 100
# The first graph is searched as deep as the bundle's (ef), at most this deep. Past it the
# songs a search misses are the lost ones, which the orphan graphs find: with 100,000
# Melon-scale songs added, recall@10 of metadata queries was 0.960 at ef 800 (first graph
# alone, 1.87 ms), and with the orphan graphs 0.991 at ef 800 (2.41 ms), 0.990 at 400
# (1.79 ms), 0.987 at 200 (1.39 ms) (one scan of the same grown graphs; docs/BENCHMARKS.md,
# *Catalogue growth*, orphan graphs).
MAX_EF = 400
# Orphan graphs are small (a fraction of the added songs): searched this deep, a sparse
# neighbourhood of them costs a fraction of the first graph's search.
ORPHAN_EF = 40
ORPHAN_M = 16


class AddedSongs:
    """Songs added at run time: their unit vectors (rows ``first``, ``first + 1``, ... in
    the order they came) and hnswlib graphs over them, separate from the bundle's.

    The first graph holds every distinct code; orphan graphs hold the songs the graph
    before loses (see MAX_GRAPHS). Searches ask each graph for ``k`` candidates (searching
    ``max(k, ef)`` deep) and re-score them exactly against the stored vectors. The first
    graph starts with room for ``capacity`` songs, an orphan graph for a quarter of that,
    and each doubles when full (a resize copies only that graph, never the bundle's)."""

    def __init__(self, dim: int, first: int, capacity: int, *, m: int = GRAPH_M,
                 ef_construction: int = GRAPH_EF_CONSTRUCTION, ef: int = 100,
                 threads: int = 1) -> None:
        self.dim, self.first, self.threads = dim, first, threads
        self.capacity = max(int(capacity), 1)
        self.m, self.ef_construction = m, ef_construction
        self.ef = min(max(ef, 50), MAX_EF)
        self.count = 0
        self._unit = np.empty((0, dim), dtype=np.float32)
        self._graphs: list[_Graph] = []
        self.resizes = 0  # how often a graph grew past its capacity
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
        """Store songs and insert their distinct codes into the graphs (call with searches
        excluded: hnswlib must not be searched while it inserts)."""
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
        self._place(0, labels[fresh], unit[fresh])
        self.in_graph += len(fresh)

    @property
    def graph_sizes(self) -> list[int]:
        """Songs in each graph, the first one first."""
        return [g.count for g in self._graphs]

    def distinct(self) -> np.ndarray:
        """The songs in the first graph: one of each distinct code."""
        if not self._graphs:
            return np.empty(0, dtype=np.int64)
        return self._graphs[0].labels[: self._graphs[0].count].copy()

    @contextmanager
    def first_graph_only(self) -> Iterator[None]:
        """Searches inside ask the first graph alone, as before orphan graphs (for
        measurements: trainer.bench_added)."""
        graphs = self._graphs
        self._graphs = graphs[:1]
        try:
            yield
        finally:
            self._graphs = graphs

    @property
    def orphans(self) -> int:
        """Songs held by the orphan graphs (lost by the graph before theirs)."""
        return sum(g.count for g in self._graphs[1:])

    def _graph(self, level: int) -> _Graph:
        if level == len(self._graphs):
            first = level == 0
            self._graphs.append(_Graph(
                self.dim, self.capacity if first else max(self.capacity // 4, 64),
                m=self.m if first else ORPHAN_M, ef_construction=self.ef_construction,
                ef=self.ef if first else ORPHAN_EF, threads=self.threads))
        return self._graphs[level]

    def _place(self, level: int, labels: np.ndarray, unit: np.ndarray) -> None:
        """Insert songs into graph ``level``, then send the songs it loses (these and
        SWEEP times as many of its earlier ones) to the next graph."""
        graph = self._graph(level)
        self.resizes += graph.insert(unit, labels)
        if level + 1 >= MAX_GRAPHS:
            return
        checked = np.concatenate([labels, graph.rotation(SWEEP * len(labels))])
        lost = graph.lost(self.vectors(checked), checked)
        if level + 1 < len(self._graphs):  # rescued before: the next graph holds them
            lost = lost[~self._graphs[level + 1].holds(lost)]
        if len(lost):
            self._place(level + 1, lost, self.vectors(lost))

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self._unit[np.asarray(labels, dtype=np.int64) - self.first]

    def search(self, queries: np.ndarray, k: int, linked: Sequence[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest added songs of each query, exactly re-scored, best first;
        ``linked[i]``: added songs re-scored for query ``i`` besides the graph's hits."""
        queries = np.atleast_2d(queries).astype(np.float32)
        unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        if len(self._graphs) > 1 or linked is not None:
            rows = self._graph_hits(queries, k)
            if linked is not None:
                rows = [np.union1d(hits, more) for hits, more in zip(rows, linked, strict=True)]
            return self._best_of_rows(rows, unit, k)
        cand = self._graphs[0].search(queries, k)
        if self._twins:
            cand = self._with_twins(cand, k)
        depth = cand.shape[1]
        scores = np.einsum("qkd,qd->qk", self._unit[cand - self.first], unit)
        take = min(k, depth)
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return (np.take_along_axis(np.take_along_axis(cand, top, axis=1), order, axis=1),
                np.take_along_axis(top_scores, order, axis=1).astype(np.float32))

    def _graph_hits(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """Per query, the distinct songs any graph returns for it, each with up to ``k``
        of its twins (one pass of sets rather than several numpy calls per row: each
        numpy call has a fixed cost of microseconds)."""
        parts = [graph.search(queries, k).tolist() for graph in self._graphs]
        rows = []
        for i in range(len(queries)):
            hits: set[int] = set()
            for part in parts:
                hits.update(part[i])
            if self._twins:
                for label in list(hits):
                    hits.update(self._twins.get(label, ())[:k])
            rows.append(np.fromiter(hits, dtype=np.int64, count=len(hits)))
        return rows

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


class _Graph:
    """One hnswlib graph of added songs, with the labels it holds in insertion order (for
    the rotation of re-checks)."""

    def __init__(self, dim: int, capacity: int, *, m: int, ef_construction: int, ef: int,
                 threads: int) -> None:
        # hnswlib only here: the load test reads bundles through this package.
        import hnswlib

        self.ef = ef
        self.index = hnswlib.Index(space="cosine", dim=dim)
        self.index.init_index(max_elements=capacity, ef_construction=ef_construction, M=m)
        self.index.set_ef(ef)
        self.index.set_num_threads(threads)
        self.labels = np.empty(0, dtype=np.int64)
        self.count = 0
        self._cursor = 0  # next label of the rotation

    def insert(self, unit: np.ndarray, labels: np.ndarray) -> int:
        """Add songs; the number of resizes it took (0 or 1)."""
        needed = self.count + len(labels)
        resized = 0
        if needed > self.index.get_max_elements():
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
            resized = 1
        self.index.add_items(unit, labels)
        if needed > len(self.labels):
            self.labels = np.resize(self.labels, max(needed, 2 * len(self.labels), 64))
        self.labels[self.count : needed] = labels
        self.count = needed
        return resized

    def holds(self, labels: np.ndarray) -> np.ndarray:
        """Whether each of ``labels`` is in this graph."""
        return np.isin(labels, self.labels[: self.count])

    def rotation(self, n: int) -> np.ndarray:
        """The next ``n`` songs of the re-check rotation over the songs inserted before."""
        n = min(n, self.count)
        picks = (self._cursor + np.arange(n)) % max(self.count, 1)
        self._cursor = int((self._cursor + n) % max(self.count, 1))
        return self.labels[picks]

    def lost(self, unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The songs of ``labels`` a search for their own code (``unit``) does not find
        first. Changes the graph's ef while it runs: call it with searches excluded (as
        :meth:`AddedSongs.add` is)."""
        if not len(labels):
            return labels
        self.index.set_ef(min(self.ef, CHECK_EF))
        try:
            found, dist = self.index.knn_query(unit, k=1)
        finally:
            self.index.set_ef(self.ef)
        # A song whose code another one matches to float precision is found through it.
        missed = (found[:, 0].astype(np.int64) != labels) & (dist[:, 0] > 1e-6)
        return np.unique(labels[missed])

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` labels per query (a matrix: fewer columns where the graph could not
        reach ``k`` songs from a query)."""
        depth = min(self.count, k)
        while True:
            try:
                cand, _ = self.index.knn_query(queries, k=depth)
                return np.asarray(cand, dtype=np.int64)
            except RuntimeError:
                # The graph could not reach ``depth`` songs from a query: fewer, not none.
                if depth <= 1:
                    raise
                depth //= 2
