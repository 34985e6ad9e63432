"""Cosine nearest neighbours over song and playlist codes: the exact numpy searches (the
reference, and training-time validation) and the hnswlib index the server answers with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from server import voting
from server.added import NEAR_CANDIDATES, NEAR_DEPTH, AddedSongs
from server.lists import drop_marked, first_per_list, merge_lists, padded_lists


class VectorSearch(Protocol):
    """Cosine nearest neighbours over labelled vectors (hnswlib or exact numpy)."""

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and cosine similarities (float32) of the k nearest, best first."""
        ...

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """The stored (unit-norm) vectors of ``labels``."""
        ...

    def count(self) -> int: ...

    def neighbours(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each song row, up to ``k`` nearest songs (the row itself and its duplicates
        first), best first. ``allow_short``: fewer than ``k`` are fine when a precomputed
        list is shorter (callers that top up from elsewhere), and songs added at run time
        come from the lookup only (those among the song's 20 nearest, see
        ``HnswSearch.add``)."""
        ...


class ExactSearch:
    """Brute-force cosine search: the reference for recall, and training-time validation."""

    def __init__(self, vectors: np.ndarray) -> None:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self._unit: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)

    def count(self) -> int:
        return len(self._unit)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self._unit[np.asarray(labels, dtype=np.int64)]

    def neighbours(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        labels, sims = self.search(self.vectors(rows), k)
        return list(zip(labels, sims, strict=True))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(vectors).astype(np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        k = min(k, len(self._unit))
        labels = np.empty((len(q), k), dtype=np.int64)
        sims = np.empty((len(q), k), dtype=np.float32)
        for start in range(0, len(q), 256):  # bounded memory: 256 x N similarities
            block = q[start : start + 256] @ self._unit.T
            top = np.argpartition(-block, k - 1, axis=1)[:, :k]
            top_sims = np.take_along_axis(block, top, axis=1)
            order = np.argsort(-top_sims, axis=1, kind="stable")
            labels[start : start + 256] = np.take_along_axis(top, order, axis=1)
            sims[start : start + 256] = np.take_along_axis(top_sims, order, axis=1)
        return labels, sims


class DotSearch(ExactSearch):
    """Exact search by raw dot product (vectors keep their norms): the write-up's
    alternative to cosine, for ablations."""

    def __init__(self, vectors: np.ndarray) -> None:
        self._raw = vectors.astype(np.float32)
        super().__init__(vectors)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self._raw[np.asarray(labels, dtype=np.int64)]

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(vectors).astype(np.float32)
        k = min(k, len(self._raw))
        scores = q @ self._raw.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return (np.take_along_axis(top, order, axis=1).astype(np.int64),
                np.take_along_axis(top_scores, order, axis=1))


class HnswSearch:
    """hnswlib cosine index (space 'cosine': similarity = 1 - distance) over song rows.

    Songs with identical input rows have identical codes, and exact duplicates break HNSW's
    graph (its neighbour heuristic prunes everything but the twin, leaving islands). The
    index therefore holds one representative per group of duplicates (``rep_of[row]`` is
    the representative of a bundle row) and searches expand each hit to its whole group.
    Rows at or past ``len(rep_of)`` (songs added at run time) are their own group.

    With a precomputed ``table`` (``neighbours.npz``, exact top-k per representative),
    :meth:`neighbours` of bundle songs is a lookup. Unseen songs and deeper questions go
    to the graph.

    Songs added at run time go into a graph of their own (:class:`AddedSongs`), never into
    the bundle's: every search merges the bundle's hits with that graph's, re-scored
    exactly against the added songs' stored unit vectors. A search therefore costs one
    small extra graph query however many songs were added (an exact scan of them grew
    linearly: issue 16), and the bundle's graph is never copied to grow.
    """

    def __init__(self, index: object, rep_of: np.ndarray | None = None,
                 table: dict[str, np.ndarray] | None = None,
                 codes: np.ndarray | None = None, refine_seeds: int = 10,
                 capacity: int = 0) -> None:
        self.index = index
        self.refine_seeds = refine_seeds
        self.rep_of = rep_of
        # Duplicate groups as CSR over representatives: group_rows[group_start[rep] :
        # group_start[rep] + group_len[rep]] is the group, the representative (its smallest
        # row) first; every other row has length 0.
        duplicate = (np.zeros(0, dtype=bool) if rep_of is None
                     else rep_of != np.arange(len(rep_of)))
        self._dups = bool(duplicate.any())
        self._group_rows = np.empty(0, dtype=np.int64)
        self._group_start = np.empty(0, dtype=np.int64)
        self._group_len = np.empty(0, dtype=np.int64)
        if rep_of is not None and self._dups:
            order = np.lexsort((np.arange(len(rep_of)), rep_of))
            reps, first, counts = np.unique(rep_of[order], return_index=True,
                                            return_counts=True)
            self._group_rows = order.astype(np.int64)
            self._group_start = np.zeros(len(rep_of), dtype=np.int64)
            self._group_len = np.zeros(len(rep_of), dtype=np.int64)
            self._group_start[reps] = first
            self._group_len[reps] = counts
        self._hidden = int(duplicate.sum())  # rows not in the graph themselves
        # The labels loaded from the bundle; larger ones are songs added at run time.
        if rep_of is not None:
            labels = np.flatnonzero(~duplicate)
            self._n_fixed = len(rep_of)
        else:
            labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))  # type: ignore[attr-defined]
            self._n_fixed = int(labels[-1]) + 1 if len(labels) else 0
        # Table rows and stored codes are both in ascending label order.
        self._slot_of = np.full(self._n_fixed, -1, dtype=np.int64)
        self._slot_of[labels] = np.arange(len(labels))
        self._table_rows: np.ndarray | None = None
        self._table_sims = np.empty((0, 0), dtype=np.float32)
        if table is not None:
            if not np.array_equal(table["labels"], labels):
                raise ValueError("the neighbour table's labels are not the index's songs")
            self._table_rows = table["rows"]
            self._table_sims = table["sims"]
        if codes is not None and codes.shape[0] != len(labels):
            raise ValueError(f"{codes.shape[0]} stored codes for {len(labels)} indexed songs")
        # hnswlib's get_items builds Python lists (~60 ns a float): the bundle's own copy of
        # the codes (float16, memory-mapped) reads a seed's code in microseconds instead.
        self._codes = codes
        self.added = AddedSongs(int(index.dim), self._n_fixed, capacity,  # type: ignore[attr-defined]
                                ef=int(getattr(index, "ef", 100)))

    @property
    def table_depth(self) -> int:
        """Neighbours per song in the precomputed table (0 without one)."""
        return 0 if self._table_rows is None else int(self._table_rows.shape[1])

    def count(self) -> int:
        """Song rows searchable (duplicates included)."""
        return (int(self.index.get_current_count()) + self._hidden  # type: ignore[attr-defined]
                + self.added.count)

    def add(self, codes: np.ndarray, labels: np.ndarray,
            bundle_hits: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Insert songs added at run time (call with writers excluded): rows
        ``n_fixed + added.count ...`` in order, into the added songs' own graph.

        ``bundle_hits``: each song's nearest bundle songs (:meth:`search_bundle`, a row per
        song). A song goes into the lists of those bundle songs it is one of the
        ``near_depth`` nearest of (its similarity reaches their table's ``near_depth``-th),
        so their SimilarSongs stays a lookup (table + these lists) up to that depth. A
        song whose bundle neighbours are not given is searched here."""
        self.added.add(codes, labels)
        if self._table_rows is None or not self.near_depth:
            return
        hits, sims = bundle_hits or self.search_bundle(codes, NEAR_CANDIDATES)
        reps = self._labels(hits.ravel()).reshape(hits.shape)
        inside = (reps >= 0) & (reps < self._n_fixed)
        slots = self._slot_of[np.where(inside, reps, 0)]
        inside &= slots >= 0
        bar = self._table_sims[np.where(inside, slots, 0), self.near_depth - 1]
        near = inside & (sims >= bar)
        owner = np.broadcast_to(np.asarray(labels, dtype=np.int64)[:, None], hits.shape)
        # A group of duplicates appears once per row: link its representative once.
        pairs, first = np.unique(np.stack([reps[near], owner[near]], axis=1), axis=0,
                                 return_index=True)
        if len(pairs):
            self.added.link(pairs[:, 0], pairs[:, 1], sims[near][first])

    @property
    def near_depth(self) -> int:
        """How deep a bundle song's SimilarSongs is a lookup with songs added (the table's
        depth, at most NEAR_DEPTH)."""
        return min(NEAR_DEPTH, self.table_depth)

    def _labels(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.rep_of is None:
            return rows
        out = rows.copy()
        inside = rows < len(self.rep_of)
        out[inside] = self.rep_of[rows[inside]]
        return out

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        reps = self._labels(labels)
        fixed = reps < self._n_fixed
        if not bool(fixed.all()):
            out = np.empty((len(reps), self.added.dim), dtype=np.float32)
            out[~fixed] = self.added.vectors(reps[~fixed])
            if bool(fixed.any()):
                out[fixed] = self.vectors(reps[fixed])
            return out
        if self._codes is not None and len(reps):
            return voting.rows_float32(self._codes, self._slot_of[reps])
        got = self.index.get_items(reps)  # type: ignore[attr-defined]
        return np.asarray(got, dtype=np.float32).reshape(len(labels), -1)

    def search(self, vectors: np.ndarray, k: int, skip: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest (expanded to duplicate groups), bundle and added songs together;
        ``skip[i]``: one label query ``i`` must not return (its own song, for leave-one-out
        measurements), -1 for none."""
        labels, sims = self.search_bundle(vectors, k, skip)
        if not self.added.count:
            return labels, sims
        return self.added.merge(np.atleast_2d(vectors), labels, sims, k,
                                self._linked_to(labels))

    def _linked_to(self, labels: np.ndarray) -> list[np.ndarray] | None:
        """Per row of bundle hits, the added songs linked to its best ``refine_seeds``:
        the hop that lifts the added songs' graph as the table lifts the bundle's. Songs
        added near a query crowd together (metadata-only codes), where the graph alone
        lost them: EncodeSong's recall@10 went from 0.983 to 0.991 with 45,000 songs added
        to the demo, from 0.917 to 0.931 with 100,000 at Melon scale (docs/BENCHMARKS.md,
        *Catalogue growth*)."""
        width = min(self.refine_seeds, labels.shape[1])
        if not width or not self.added.near:
            return None
        seeds = self._labels(labels[:, :width].ravel())
        linked, _, offsets = self.added.near_lists(seeds)
        bounds = offsets[::width]
        return [np.unique(linked[a:b]) for a, b in zip(bounds.tolist(), bounds[1:].tolist(),
                                                       strict=False)]

    def search_bundle(self, vectors: np.ndarray, k: int, skip: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` over the bundle's songs only."""
        queries = np.atleast_2d(vectors)
        k = min(k, int(self.index.get_current_count()))  # type: ignore[attr-defined]
        asked = k + (skip is not None)
        while True:
            try:
                labels, dist = self.index.knn_query(  # type: ignore[attr-defined]
                    queries, k=min(asked, int(self.index.get_current_count())))  # type: ignore[attr-defined]
                break
            except RuntimeError:
                # The graph could not reach k items from one of the queries: answer with
                # fewer rather than fail (callers already handle short lists).
                if asked <= 1:
                    raise
                asked //= 2
                k = min(k, asked)
        labels = labels.astype(np.int64)
        sims = (1.0 - dist).astype(np.float32)
        if skip is not None:
            labels, sims = _drop(labels, sims, np.asarray(skip, dtype=np.int64), k)
        if self._table_rows is not None and self._codes is not None and self.refine_seeds:
            labels, sims = self._refine(queries, labels, sims, k, skip)
        if not self._dups:
            return labels, sims
        flat_labels, flat_sims, _ = self._expand_rows(labels, sims, min(k, labels.shape[1]))
        # Each hit stands for at least one row, so every question fills all its places.
        return (flat_labels.reshape(len(labels), -1), flat_sims.reshape(len(labels), -1))

    def _refine(self, queries: np.ndarray, labels: np.ndarray, sims: np.ndarray, k: int,
                skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One hop over the exact neighbour table: the graph's hits plus the table lists of
        its best ``refine_seeds`` hits, re-scored against the stored codes. A true
        neighbour the graph missed is very likely a neighbour of a neighbour it found, so
        this lifts recall at a low ``ef`` (measured in docs/BENCHMARKS.md)."""
        assert self._table_rows is not None and self._codes is not None
        unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        rows_out, sims_out = [], []
        for i in range(len(labels)):
            hits = labels[i]
            inside = hits < self._n_fixed
            seeds = hits[inside][: self.refine_seeds]
            cand = np.unique(np.concatenate([hits[inside],
                                             self._table_rows[self._slot_of[seeds]].ravel()]))
            if skip is not None:
                cand = cand[cand != skip[i]]
            scores = voting.rows_float32(self._codes, self._slot_of[cand]) @ unit[i].astype(
                np.float32)
            # Songs added at run time are in no table: they keep the graph's similarity.
            cand = np.concatenate([cand, hits[~inside]])
            scores = np.concatenate([scores, sims[i][~inside]])
            depth = min(k, len(cand))
            top = np.argpartition(-scores, depth - 1)[:depth]
            top = top[np.lexsort((cand[top], -scores[top]))]
            rows_out.append(cand[top])
            sims_out.append(scores[top])
        width = min(len(r) for r in rows_out)
        return (np.stack([r[:width] for r in rows_out]),
                np.stack([s[:width] for s in sims_out]).astype(np.float32))

    def _expand_rows(self, labels: np.ndarray, sims: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hits (representatives; a row of ``labels`` per question) expanded to their
        groups of duplicates, each question's first ``k``: flat rows and similarities, and
        ``offsets`` (question ``i`` is ``offsets[i]:offsets[i + 1]``).

        One pass over the whole batch: done per question, numpy's fixed cost per call was
        a third of a SimilarSongs lookup's time."""
        n_rows, width = labels.shape
        if not self._dups or width == 0:
            depth = min(k, width)
            return (labels[:, :depth].ravel().astype(np.int64),
                    sims[:, :depth].ravel().astype(np.float32),
                    np.arange(n_rows + 1, dtype=np.int64) * depth)
        # One compiled pass (numpy took a dozen calls per batch, all holding the GIL).
        expanded: tuple[np.ndarray, np.ndarray, np.ndarray] = voting.expand_groups(
            np.ascontiguousarray(labels, dtype=np.int64),
            np.ascontiguousarray(sims, dtype=np.float32), k, self._group_len,
            self._group_start, self._group_rows)
        return expanded

    def neighbours(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        labels, sims, offsets = self.neighbour_lists(rows, k, allow_short=allow_short)
        bounds = offsets.tolist()
        return [(labels[a:b], sims[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]

    def needs_graph(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                    ) -> np.ndarray:
        """Which of ``rows`` :meth:`neighbour_lists` answers from the graph (the rest come
        from the table): songs added at run time, lists deeper than the table (unless
        ``allow_short``), every row without a table."""
        rows = np.asarray(rows, dtype=np.int64)
        table = self._table_rows
        if table is None or (not allow_short and k > table.shape[1] + 1):
            return np.ones(len(rows), dtype=bool)
        graph: np.ndarray = rows >= self._n_fixed
        return graph

    def neighbour_lists(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`neighbours` as flat arrays: rows, similarities and ``offsets`` (the list
        of ``rows[i]`` is ``offsets[i]:offsets[i + 1]``). Each row's list depends on that
        row alone: the table answers the rows it can even when others need the graph."""
        rows = np.asarray(rows, dtype=np.int64)
        graph = self.needs_graph(rows, k, allow_short=allow_short)
        if len(rows) == 0 or graph.all():
            return self._graph_lists(rows, k)
        if not graph.any():
            return self._table_lists(rows, k, allow_short)
        inside = np.flatnonzero(~graph)
        outside = np.flatnonzero(graph)
        return merge_lists(len(rows), [(inside, *self._table_lists(rows[inside], k,
                                                                   allow_short)),
                                       (outside, *self._graph_lists(rows[outside], k))])

    def _graph_lists(self, rows: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(rows) == 0:
            return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32),
                    np.zeros(1, dtype=np.int64))
        labels, sims = self.search(self.vectors(rows), k)
        return (labels.ravel(), sims.ravel(),
                np.arange(len(labels) + 1, dtype=np.int64) * labels.shape[1])

    def _table_lists(self, rows: np.ndarray, k: int, allow_short: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = self._table_rows
        assert table is not None
        reps = self._labels(rows)
        slots = self._slot_of[reps]
        # The song itself (its group) first, as a graph search for its own vector has it.
        cand = np.concatenate([reps[:, None], table[slots].astype(np.int64)], axis=1)
        cand_sims = np.concatenate([np.ones((len(rows), 1), dtype=np.float32),
                                    self._table_sims[slots].astype(np.float32)], axis=1)
        if self.added.count and (k <= self.near_depth + 1 or allow_short):
            # Lookup: the table's lists and each song's linked added songs, merged. Past
            # near_depth only callers that take short lists ask (the strategies' seed
            # lists): they get the added songs among a seed's near_depth nearest, not a
            # graph query per seed (which made a continuation 3-13x slower at 100k added
            # songs, docs/BENCHMARKS.md).
            width = cand.shape[1]
            more, more_sims = padded_lists(*self.added.near_lists(reps))
            if more.shape[1]:
                cand = np.concatenate([cand, more], axis=1)
                cand_sims = np.concatenate([cand_sims, more_sims], axis=1)
                order = np.argsort(-cand_sims, axis=1, kind="stable")[:, :width]
                cand = np.take_along_axis(cand, order, axis=1)
                cand_sims = np.take_along_axis(cand_sims, order, axis=1)
            return self._expand_rows(cand, cand_sims, k)
        if self.added.count:
            # Duplicates expand first (each hit stands for its whole group), then the
            # added songs' hits merge in by similarity.
            labels, sims, offsets = self._expand_rows(cand, cand_sims, k)
            # Lists of unequal length (short duplicate expansions) are padded so that one
            # query of the added songs' graph serves them all; the padding sorts last.
            padded, padded_sims = padded_lists(labels, sims, offsets)
            merged, merged_sims = self.added.merge(self.vectors(rows), padded, padded_sims, k)
            keep = merged >= 0
            return (merged[keep], merged_sims[keep],
                    np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64))
        return self._expand_rows(cand, cand_sims, k)

    def similar_lists(self, rows: np.ndarray, k: int | np.ndarray,
                      exclude: Sequence[np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each row, its first ``k`` (or ``k[i]``) neighbours other than itself and the
        rows of ``exclude[i]``, as flat arrays like :meth:`neighbour_lists`.

        Each list is looked up ``k + 1`` deep first (the table answers that for bundle
        songs); a row whose exclusions took places is looked up again, deeper (twice as
        deep, or past twice the exclusions it met), never past ``k + 1 + len(exclude[i])``,
        which always suffices. An exclusion costs one flag lookup per candidate, and deep
        searches only for the rows whose neighbours it really removes. Rows that share an
        exclusion list should share the array object: it is marked once for all of them.
        """
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        same_k = k if isinstance(k, int) else (
            int(k[0]) if n and bool((k == k[0]).all()) else None)
        if same_k is not None and not any(map(len, exclude)):  # the common case, quickly
            labels, sims, offsets = self.neighbour_lists(rows, same_k + 1)
            owner = np.repeat(np.arange(n), np.diff(offsets))
            keep = first_per_list(labels != rows[owner], owner, offsets, same_k)
            counts = np.bincount(owner[keep], minlength=n)
            return (labels[keep], sims[keep],
                    np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (n,))
        depth = ks + 1
        caps = depth + np.fromiter(map(len, exclude), dtype=np.int64, count=n)
        uniform = same_k is not None
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        pending = np.arange(n)
        while len(pending):
            deeper = []
            if uniform and len(parts) == 0 and len(pending) == n:
                groups = [(pending, int(depth[0]) if n else 1)]
            else:  # rows as deep are searched together
                groups = [(pending[depth[pending] == d], d)
                          for d in np.unique(depth[pending]).tolist()]
            for group, d in groups:
                part, again, more = self._similar_pass(rows[group], ks[group], d,
                                                       caps[group], exclude, group)
                if part is not None:
                    if len(part[0]) == n:  # every list done in one pass: the common case
                        return part[1], part[2], part[3]
                    parts.append(part)
                depth[group[again]] = more
                deeper.append(group[again])
            pending = np.concatenate(deeper)
        return merge_lists(n, parts)

    def _similar_pass(self, rows: np.ndarray, ks: np.ndarray, d: int, caps: np.ndarray,
                      exclude: Sequence[np.ndarray], positions: np.ndarray
                      ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                                 np.ndarray, np.ndarray]:
        """One lookup ``d`` deep for :meth:`similar_lists`: the finished lists (positions,
        labels, sims, offsets; None when none is), which rows must go deeper, and how deep."""
        labels, sims, offsets = self.neighbour_lists(rows, d)
        lengths = np.diff(offsets)
        owner = np.repeat(np.arange(len(rows)), lengths)
        keep = labels != rows[owner]
        if bool((caps > ks + 1).any()):  # some rows have exclusions
            drop_marked(keep, labels, offsets, [exclude[i] for i in positions.tolist()])
            kept = np.bincount(owner[keep], minlength=len(rows))
            final = (kept >= ks) | (lengths < d) | (d >= caps)
        else:
            kept = lengths - 1
            final = np.ones(len(rows), dtype=bool)
        again = np.flatnonzero(~final)
        more = np.minimum(caps[again], np.maximum(2 * d, ks[again] + 1 + 2 * (
            lengths[again] - kept[again])))
        if len(again) == len(rows):
            return None, again, more
        keep = first_per_list(keep, owner, offsets, ks[owner])
        if len(again):
            keep &= final[owner]
        counts = np.bincount(owner[keep], minlength=len(rows))
        if len(again):
            counts = counts[final]
        finished = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return (positions[final], labels[keep], sims[keep], finished), again, more


def _drop(labels: np.ndarray, sims: np.ndarray, skip: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Each row without its ``skip`` label, cut to ``k`` columns."""
    keep = labels != skip[:, None]
    width = min(k, int(keep.sum(axis=1).min()))
    out_labels = np.stack([row[m][:width] for row, m in zip(labels, keep, strict=True)])
    out_sims = np.stack([row[m][:width] for row, m in zip(sims, keep, strict=True)])
    return out_labels, out_sims


def representatives(rows_indptr: np.ndarray, rows_indices: np.ndarray) -> np.ndarray:
    """``rep_of``: for each row of a CSR matrix, the first row with the same columns."""
    first: dict[bytes, int] = {}
    rep_of = np.empty(len(rows_indptr) - 1, dtype=np.int64)
    bounds = rows_indptr.tolist()
    for i in range(len(rep_of)):
        key = rows_indices[bounds[i] : bounds[i + 1]].tobytes()
        rep_of[i] = first.setdefault(key, i)
    return rep_of
