"""Playlist-continuation strategies on the song embeddings (numpy + a vector index, no torch).

Shared by the offline evaluation (``trainer.recommend --model ae-...``) and the gRPC server.

* ``ae-quota`` (the write-up): the requested song count is split as evenly as possible over
  the seed songs ([34, 33, 33] for three seeds); each seed's share is filled from its
  nearest songs by cosine similarity, skipping seeds and songs already taken; whatever is
  still missing comes from popularity. Tags are voted: every recommended song votes once
  for every tag ever attached to a training playlist containing it; the top tags win.
* ``ae-neighbours`` (the write-up's later improvement): the seeds' codes are summed, the
  nearest training playlists to that sum are found (a playlist's code is the mean of its
  songs' codes), and their songs and tags are scored by similarity.
* ``ae-hybrid``: the votes of ``ae-neighbours`` blended with those of neighbour CF (the
  ``playlist-knn`` baseline's IDF-weighted cosine over songs, tags, title words and
  artists, fitted by the trainer and stored in the bundle). With weight 0 on the
  autoencoder it is exactly neighbour CF, which is how the ablation isolates what the
  autoencoder adds.

Cold starts, for both: tags only -> each tag's most frequent songs (``ae-quota`` fills from
them, ``ae-neighbours`` uses them as pseudo-seeds); title only -> the title's words mapped to
the songs and tags of training playlists whose titles used them; nothing -> most popular.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from server import voting

if TYPE_CHECKING:
    from server.ranking import Ranker

STRATEGIES = ("ae-quota", "ae-neighbours", "ae-hybrid", "ranked")
# The default of a bundle without a ranker: the best hand-set strategy in docs/BENCHMARKS.md
# (bench-quality). A bundle with one answers ``ranked`` by default (server.ranking).
DEFAULT_STRATEGY = "ae-hybrid"
RANKED = "ranked"
_WORD = re.compile(r"\w+", re.UNICODE)

# Reason codes attached to each recommended song.
REASON_SEED = "seed"  # the nearest song of seed `source`
REASON_PLAYLIST = "playlist"  # a song of neighbour playlist `source`
REASON_TAG = "tag"  # a frequent song of question tag `source` (tag index)
REASON_TITLE = "title"  # a song learned from title words
REASON_POPULAR = "popular"  # top-up from popularity


def tokenize(title: str) -> list[str]:
    """Lower-cased word tokens of a playlist title (unicode-aware, deduplicated, in order)."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(title.lower()):
        seen.setdefault(word, None)
    return list(seen)


def pack_strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (utf-8 blob as uint8, int64 offsets): a pickle-free, compact npz layout."""
    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    bounds = offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class RowLists:
    """CSR rows of int32 indices with float32 weights (song->tags, tag->songs, ...)."""

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    def row(self, i: int) -> np.ndarray:
        if i < 0 or i + 1 >= len(self.indptr):
            return self.indices[:0]
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def row_weights(self, i: int) -> np.ndarray:
        if i < 0 or i + 1 >= len(self.indptr):
            return self.weights[:0]
        return self.weights[self.indptr[i] : self.indptr[i + 1]]

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @functools.cached_property
    def item_bound(self) -> int:
        """One more than the largest index (0 when empty)."""
        return int(self.indices.max()) + 1 if len(self.indices) else 0

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_indptr": self.indptr, f"{prefix}_indices": self.indices,
                f"{prefix}_weights": self.weights}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> RowLists:
        return RowLists(arrays[f"{prefix}_indptr"].astype(np.int64),
                        arrays[f"{prefix}_indices"].astype(np.int32),
                        arrays[f"{prefix}_weights"].astype(np.float32))


def best_first(scores: np.ndarray, n: int | None = None) -> np.ndarray:
    """Positions of the ``n`` best scores (all when None), by score then position.

    Sorts only the chosen, in one compiled pass (``server.voting.best_positions``): a
    numpy partition degrades ~15x on masses of equal values (2 ms on 30k tag scores mostly
    at 0 votes), and the numpy way around that took a dozen calls holding the GIL."""
    if n is None or n >= len(scores):
        return np.argsort(-scores, kind="stable")
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    positions: np.ndarray = voting.best_positions(scores, n)
    return positions


def row_positions(indptr: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where rows ``items`` of a CSR layout lie: (owner position in items, value index)."""
    items = np.asarray(items, dtype=np.int64)
    starts = indptr[items]
    lengths = indptr[items + 1] - starts
    owner = np.repeat(np.arange(len(items), dtype=np.int64), lengths)
    # Position of each value inside its own row, added to that row's start.
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(lengths) - lengths, lengths)
    return owner, np.repeat(starts, lengths) + within


def gather_rows(lists: RowLists, items: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
    """Concatenated rows ``items`` of ``lists``: (owner position in items, indices, weights)."""
    owner, idx = row_positions(lists.indptr, items)
    return owner, lists.indices[idx], lists.weights[idx]


@dataclass
class NeighbourCF:
    """Playlist-neighbour CF (the ``playlist-knn`` baseline) as plain arrays.

    Features are laid out songs | tags | title words | artists; ``features`` maps each
    feature to the training playlists holding it, with the playlist vector's IDF-weighted,
    L2-normalised value. A question's similarity to every playlist is one scatter-add.
    """

    features: RowLists
    feature_weights: np.ndarray  # float32, the question-side weight of each feature
    offsets: np.ndarray  # int64 [songs, tags, words, artists] block starts
    words: list[str]
    song_artists: RowLists  # song row -> artist feature positions (within the block)
    n_playlists: int
    k: int = 150
    alpha: float = 1.5
    word_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.word_index = {w: i for i, w in enumerate(self.words)}

    def question_columns(self, seeds: np.ndarray, tags: np.ndarray, title: str) -> np.ndarray:
        seeds = seeds[seeds < self.song_artists.n_rows]  # run-time songs have no CF features
        cols = [seeds + self.offsets[0], tags.astype(np.int64) + self.offsets[1]]
        words = [self.word_index[w] for w in tokenize(title) if w in self.word_index]
        cols.append(np.asarray(words, dtype=np.int64) + self.offsets[2])
        if len(seeds):
            _, artists, _ = gather_rows(self.song_artists, seeds)
            cols.append(artists.astype(np.int64) + self.offsets[3])
        merged: np.ndarray = np.unique(np.concatenate(cols))
        keep: np.ndarray = merged[self.feature_weights[merged] > 0]
        return keep

    def neighbours(self, seeds: np.ndarray, tags: np.ndarray, title: str
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar training playlists and their cosine similarities."""
        cols = self.question_columns(seeds, tags, title)
        if len(cols) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        q = self.feature_weights[cols].astype(np.float64)
        owner, playlists, values = gather_rows(self.features, cols)
        sims = np.bincount(playlists, weights=values * q[owner],
                           minlength=self.n_playlists).astype(np.float64)
        sims = sims / float(np.linalg.norm(q))
        # Most playlists share nothing with the question (similarity 0): choose among the
        # others only, ties by position.
        shared = np.flatnonzero(sims > 0)
        top = shared[best_first(sims[shared], self.k)]
        return top.astype(np.int64), sims[top].astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        blob, offsets = pack_strings(self.words)
        out = {"cf_feature_weights": self.feature_weights, "cf_offsets": self.offsets,
               "cf_word_blob": blob, "cf_word_offsets": offsets,
               "cf_params": np.asarray([self.n_playlists, self.k, self.alpha],
                                       dtype=np.float64)}
        out.update(self.features.to_arrays("cf_features"))
        out.update(self.song_artists.to_arrays("cf_song_artists"))
        return out

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> NeighbourCF:
        n_playlists, k, alpha = arrays["cf_params"].tolist()
        return NeighbourCF(RowLists.from_arrays(arrays, "cf_features"),
                           arrays["cf_feature_weights"].astype(np.float32),
                           arrays["cf_offsets"].astype(np.int64),
                           unpack_strings(arrays["cf_word_blob"], arrays["cf_word_offsets"]),
                           RowLists.from_arrays(arrays, "cf_song_artists"),
                           int(n_playlists), int(k), float(alpha))


class RowIndex:
    """Song id -> bundle row, as two sorted arrays. A dict of 700k ids costs ~80 MB of
    Python objects, spread through the allocator's arenas, where a reload under load left
    them unreturnable (the soak's RSS step); this costs 11 MB in two blocks."""

    def __init__(self, ids: np.ndarray) -> None:
        self._order = np.argsort(ids, kind="stable").astype(np.int64)
        self._sorted = np.asarray(ids, dtype=np.int64)[self._order]

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (int64), -1 where unknown."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self._sorted, wanted), max(len(self._sorted) - 1, 0))
        found = (self._sorted[pos] == wanted) if len(self._sorted) else np.zeros(
            len(wanted), dtype=bool)
        return np.where(found, self._order[pos] if len(self._order) else -1, -1)

    def get(self, song_id: int, default: int | None = None) -> int | None:
        row = int(self.rows([song_id])[0])
        return row if row >= 0 else default

    def __getitem__(self, song_id: int) -> int:
        row = self.get(song_id)
        if row is None:
            raise KeyError(song_id)
        return row

    def __contains__(self, song_id: object) -> bool:
        return isinstance(song_id, (int, np.integer)) and self.get(int(song_id)) is not None

    def __len__(self) -> int:
        return len(self._sorted)


@dataclass
class Catalog:
    """Everything the strategies know about songs, tags, playlists and title words.

    Song *rows* are the index labels: rows ``0..n_songs-1`` come from the bundle; the
    server may add rows past them (unseen songs), which have codes but no playlist data.
    """

    song_ids: np.ndarray  # int64, row -> external song id
    popularity: np.ndarray  # int32 training-playlist count per song row
    issue_dates: np.ndarray  # int32 YYYYMMDD per song row, 0 unknown
    tags: list[str]
    tag_popularity: np.ndarray  # int32
    song_tags: RowLists  # song row -> tags ever attached to a playlist holding it
    tag_songs: RowLists  # tag -> its most frequent songs, best first
    playlist_ids: np.ndarray  # int64 training playlist ids (playlist index labels)
    playlist_songs: RowLists  # playlist -> song rows
    playlist_tags: RowLists  # playlist -> tags
    words: list[str]
    word_songs: RowLists  # title word -> songs of playlists titled with it, best first
    word_tags: RowLists  # title word -> tags of playlists titled with it, best first
    cf: NeighbourCF | None = None  # neighbour CF over playlists (for ae-hybrid)
    tag_index: dict[str, int] = field(init=False)
    word_index: dict[str, int] = field(init=False)
    popular_songs: np.ndarray = field(init=False)
    popular_tags: np.ndarray = field(init=False)
    tag_order: np.ndarray = field(init=False)  # every tag, most popular first
    row_of_id: RowIndex = field(init=False)

    def __post_init__(self) -> None:
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.popular_songs = np.argsort(-self.popularity, kind="stable")[:5000]
        self.tag_order = np.argsort(-self.tag_popularity, kind="stable")
        self.popular_tags = self.tag_order[:1000]
        self.row_of_id = RowIndex(self.song_ids)

    @property
    def n_songs(self) -> int:
        return len(self.song_ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        tag_blob, tag_off = pack_strings(self.tags)
        word_blob, word_off = pack_strings(self.words)
        out = {"song_ids": self.song_ids, "popularity": self.popularity,
               "issue_dates": self.issue_dates, "tag_blob": tag_blob, "tag_offsets": tag_off,
               "tag_popularity": self.tag_popularity, "playlist_ids": self.playlist_ids,
               "word_blob": word_blob, "word_offsets": word_off}
        for name in ("song_tags", "tag_songs", "playlist_songs", "playlist_tags",
                     "word_songs", "word_tags"):
            out.update(getattr(self, name).to_arrays(name))
        if self.cf is not None:
            out.update(self.cf.to_arrays())
        return out

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> Catalog:
        return Catalog(
            song_ids=arrays["song_ids"].astype(np.int64),
            popularity=arrays["popularity"].astype(np.int32),
            issue_dates=arrays["issue_dates"].astype(np.int32),
            tags=unpack_strings(arrays["tag_blob"], arrays["tag_offsets"]),
            tag_popularity=arrays["tag_popularity"].astype(np.int32),
            song_tags=RowLists.from_arrays(arrays, "song_tags"),
            tag_songs=RowLists.from_arrays(arrays, "tag_songs"),
            playlist_ids=arrays["playlist_ids"].astype(np.int64),
            playlist_songs=RowLists.from_arrays(arrays, "playlist_songs"),
            playlist_tags=RowLists.from_arrays(arrays, "playlist_tags"),
            words=unpack_strings(arrays["word_blob"], arrays["word_offsets"]),
            word_songs=RowLists.from_arrays(arrays, "word_songs"),
            word_tags=RowLists.from_arrays(arrays, "word_tags"),
            cf=NeighbourCF.from_arrays(arrays) if "cf_features_indptr" in arrays else None,
        )


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
        list is shorter (callers that top up from elsewhere)."""
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
    :meth:`neighbours` of bundle songs is a lookup, merged with an exact scan of the songs
    added since loading (kept here as unit vectors: they are few, and the table knows
    nothing of them). Unseen songs and deeper questions go to the graph.
    """

    def __init__(self, index: object, rep_of: np.ndarray | None = None,
                 table: dict[str, np.ndarray] | None = None,
                 codes: np.ndarray | None = None, refine_seeds: int = 10) -> None:
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
        self._added_labels = np.empty(0, dtype=np.int64)
        self._added_unit = np.empty((0, int(index.dim)), dtype=np.float32)  # type: ignore[attr-defined]
        self._n_added = 0

    @property
    def table_depth(self) -> int:
        """Neighbours per song in the precomputed table (0 without one)."""
        return 0 if self._table_rows is None else int(self._table_rows.shape[1])

    def count(self) -> int:
        """Song rows searchable (duplicates included)."""
        return int(self.index.get_current_count()) + self._hidden  # type: ignore[attr-defined]

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        """Insert songs (call with writers excluded): into the graph, growing it
        geometrically when full (a resize copies the graph), and into the exact scan
        that complements the table."""
        index: Any = self.index
        needed = index.get_current_count() + len(labels)
        if needed > index.get_max_elements():
            index.resize_index(max(needed, 2 * index.get_max_elements()))
        index.add_items(codes, labels)
        if self._table_rows is None:
            return
        unit = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
        end = self._n_added + len(labels)
        if end > len(self._added_unit):
            grown = np.empty((max(end, 2 * len(self._added_unit), 64), unit.shape[1]),
                             dtype=np.float32)
            grown[: self._n_added] = self._added_unit[: self._n_added]
            self._added_unit = grown
            self._added_labels = np.resize(self._added_labels, len(grown))
        self._added_unit[self._n_added : end] = unit
        self._added_labels[self._n_added : end] = labels
        self._n_added = end

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
        if self._codes is not None and len(reps) and bool((reps < self._n_fixed).all()):
            stored: np.ndarray = self._codes[self._slot_of[reps]].astype(np.float32)
            return stored
        got = self.index.get_items(reps)  # type: ignore[attr-defined]
        return np.asarray(got, dtype=np.float32).reshape(len(labels), -1)

    def search(self, vectors: np.ndarray, k: int, skip: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest (expanded to duplicate groups); ``skip[i]``: one label query ``i`` must
        not return (its own song, for leave-one-out measurements), -1 for none."""
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
            scores = self._codes[self._slot_of[cand]].astype(np.float32) @ unit[i].astype(
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
            return self._table_lists(rows, k)
        inside = np.flatnonzero(~graph)
        outside = np.flatnonzero(graph)
        return merge_lists(len(rows), [(inside, *self._table_lists(rows[inside], k)),
                                       (outside, *self._graph_lists(rows[outside], k))])

    def _graph_lists(self, rows: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(rows) == 0:
            return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32),
                    np.zeros(1, dtype=np.int64))
        labels, sims = self.search(self.vectors(rows), k)
        return (labels.ravel(), sims.ravel(),
                np.arange(len(labels) + 1, dtype=np.int64) * labels.shape[1])

    def _table_lists(self, rows: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = self._table_rows
        assert table is not None
        reps = self._labels(rows)
        slots = self._slot_of[reps]
        # The song itself (its group) first, as a graph search for its own vector has it.
        cand = np.concatenate([reps[:, None], table[slots].astype(np.int64)], axis=1)
        cand_sims = np.concatenate([np.ones((len(rows), 1), dtype=np.float32),
                                    self._table_sims[slots].astype(np.float32)], axis=1)
        if self._n_added:
            added = self._added_unit[: self._n_added]
            scores = self.vectors(rows) @ added.T
            depth = min(k, self._n_added)
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            cand = np.concatenate([cand, self._added_labels[top]], axis=1)
            cand_sims = np.concatenate([cand_sims, np.take_along_axis(scores, top, axis=1)],
                                       axis=1)
            order = np.argsort(-cand_sims, axis=1, kind="stable")
            cand = np.take_along_axis(cand, order, axis=1)
            cand_sims = np.take_along_axis(cand_sims, order, axis=1)
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


def merge_lists(n: int, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat lists of ``n`` rows from parts ``(positions, labels, sims, offsets)``, each
    holding the lists of rows ``positions`` (in the layout of :meth:`neighbour_lists`)."""
    lengths = np.zeros(n, dtype=np.int64)
    for positions, _, _, offsets in parts:
        lengths[positions] = np.diff(offsets)
    out_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out_labels = np.empty(int(out_offsets[-1]), dtype=np.int64)
    out_sims = np.empty(int(out_offsets[-1]), dtype=np.float32)
    for positions, labels, sims, offsets in parts:
        sizes = np.diff(offsets)
        owner = np.repeat(np.arange(len(positions)), sizes)
        within = np.arange(len(labels)) - offsets[:-1][owner]
        target = out_offsets[positions][owner] + within
        out_labels[target] = labels
        out_sims[target] = sims
    return out_labels, out_sims, out_offsets


def first_per_list(keep: np.ndarray, owner: np.ndarray, offsets: np.ndarray,
                   k: int | np.ndarray) -> np.ndarray:
    """``keep`` narrowed to the first ``k`` kept entries of each list (``k``: one number,
    or one per entry)."""
    kept_so_far = np.cumsum(keep)
    before = np.concatenate([[0], kept_so_far])[offsets[:-1]]
    rank: np.ndarray = kept_so_far - before[owner]
    return keep & (rank <= k)


_FLAGS = threading.local()  # one scratch array per worker thread


def drop_marked(keep: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                marked: Sequence[np.ndarray]) -> None:
    """Clear ``keep`` where list ``i``'s label is in ``marked[i]``: one flag lookup per
    label. Flags live in a per-thread array that is set and cleared around each use, so a
    call costs O(labels + marked), never O(songs) (zeroing 700k flags per call would cost
    more than the lookups). Consecutive lists sharing one array object are done at once."""
    i, n = 0, len(marked)
    while i < n:
        rows = marked[i]
        j = i + 1
        while j < n and marked[j] is rows:
            j += 1
        start, end = int(offsets[i]), int(offsets[j])
        if len(rows) and end > start:
            part = labels[start:end]
            flags = _flags(max(int(part.max()), int(rows.max())) + 1)
            flags[rows] = True
            keep[start:end] &= ~flags[part]
            flags[rows] = False
        i = j


def _flags(size: int) -> np.ndarray:
    flags: np.ndarray | None = getattr(_FLAGS, "array", None)
    if flags is None or len(flags) < size:
        flags = np.zeros(max(size, 2 * len(flags) if flags is not None else 0), dtype=bool)
        _FLAGS.array = flags
    return flags


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


@dataclass(frozen=True)
class Query:
    """A validated question in row/index space."""

    seeds: np.ndarray  # int64 song rows known to the index
    tags: np.ndarray  # int32 tag indices known to the catalog
    title: str = ""
    updt_date: int = 0
    n_songs: int = 100
    n_tags: int = 10
    drop_future: bool = False


@dataclass(frozen=True)
class Answer:
    """Ranked song rows and tag indices, with scores and, per song, why it was chosen."""

    songs: np.ndarray  # int64 song rows
    song_scores: np.ndarray  # float32
    reasons: list[tuple[str, int]]  # (REASON_*, source) per song
    tags: np.ndarray  # int32 tag indices
    tag_scores: np.ndarray  # float32


def quotas(total: int, parts: int) -> list[int]:
    """Split ``total`` as evenly as possible over ``parts``, larger shares first."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Picker:
    """Collects unique songs in order, refusing excluded ones (seeds, future releases)."""

    def __init__(self, catalog: Catalog, query: Query, n_total_rows: int) -> None:
        self.catalog = catalog
        self.query = query
        self.n_total_rows = n_total_rows
        # A set, not a bool array over every song: an answer touches a few hundred rows,
        # and zeroing 700k flags per call cost more than all the lookups.
        self.excluded: set[int] = set(query.seeds.tolist())
        self.rows: list[int] = []
        self.scores: list[float] = []
        self.reasons: list[tuple[str, int]] = []

    def allowed(self, row: int) -> bool:
        if row < 0 or row >= self.n_total_rows or row in self.excluded:
            return False
        if self.query.drop_future and self.query.updt_date and row < self.catalog.n_songs:
            issued = int(self.catalog.issue_dates[row])
            if issued > self.query.updt_date:
                return False
        return True

    def take(self, row: int, score: float, reason: tuple[str, int]) -> bool:
        if not self.allowed(row):
            return False
        self.excluded.add(row)
        self.rows.append(row)
        self.scores.append(score)
        self.reasons.append(reason)
        return True

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.query.n_songs

    def fill_popular(self) -> None:
        for row in self.catalog.popular_songs.tolist():
            if self.full:
                return
            self.take(row, 0.0, (REASON_POPULAR, -1))


def vote_tags(catalog: Catalog, song_rows: Sequence[int], exclude: np.ndarray,
              n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Each song votes once for every tag ever attached to a playlist containing it."""
    rows = np.asarray(song_rows, dtype=np.int64)
    rows = rows[(rows >= 0) & (rows < catalog.song_tags.n_rows)]  # added songs have no tags
    _, tags, _ = gather_rows(catalog.song_tags, rows)
    votes = np.bincount(tags, minlength=len(catalog.tags)).astype(np.float32)
    return _top_tags(catalog, votes, exclude, n_tags)


def _top_tags(catalog: Catalog, scores: np.ndarray, exclude: np.ndarray,
              n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_tags`` best finite scores; ties (and tags nobody voted for) break by overall
    popularity, then by tag index: the tags are ranked in ``tag_order`` (popularity, then
    index), so a tie on score keeps that order."""
    scores = scores.copy()
    scores[exclude] = -np.inf
    n = min(n_tags, int(np.isfinite(scores).sum()))
    picked = catalog.tag_order[best_first(scores[catalog.tag_order], n)].astype(np.int32)
    return picked, np.maximum(scores[picked], 0.0).astype(np.float32)


def _title_scores(catalog: Catalog, title: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Song and tag scores from the title's known words (weights learned from titles)."""
    song_scores = np.zeros(catalog.n_songs, dtype=np.float32)
    tag_scores = np.zeros(len(catalog.tags), dtype=np.float32)
    known = [catalog.word_index[w] for w in tokenize(title) if w in catalog.word_index]
    for w in known:
        songs, weights = catalog.word_songs.row(w), catalog.word_songs.row_weights(w)
        song_scores[songs] += weights
        tags, tweights = catalog.word_tags.row(w), catalog.word_tags.row_weights(w)
        tag_scores[tags] += tweights
    return song_scores, tag_scores, known


def _best_scored(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` best positive scores, by score then row. Only the few thousand
    songs a title's words reach are ranked: sorting all 700k took 3.5 ms, a tenth of
    the questions (the title-only ones) paying for it."""
    positive = np.flatnonzero(scores > 0)
    chosen: np.ndarray = positive[best_first(scores[positive], n)]
    return chosen


def _tag_seed_songs(catalog: Catalog, tags: np.ndarray, per_tag: int) -> np.ndarray:
    rows = [catalog.tag_songs.row(int(t))[:per_tag] for t in tags]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def _finish(catalog: Catalog, picker: _Picker, query: Query,
            tag_scores: np.ndarray | None = None) -> Answer:
    picker.fill_popular()
    if tag_scores is None:
        tags, tscores = vote_tags(catalog, picker.rows, query.tags, query.n_tags)
    else:
        tags, tscores = _top_tags(catalog, tag_scores, query.tags, query.n_tags)
    return Answer(np.asarray(picker.rows, dtype=np.int64),
                  np.asarray(picker.scores, dtype=np.float32), picker.reasons, tags, tscores)


def _cold_start(catalog: Catalog, picker: _Picker, query: Query) -> np.ndarray | None:
    """Questions without seed songs: tags -> tag songs; title -> word songs/tags; nothing ->
    popularity. Returns the tag scores to rank by (title words, or popularity when nothing
    is known), or None when tags are to be voted by the songs."""
    if len(query.tags):
        for tag, share in zip(query.tags.tolist(), quotas(query.n_songs, len(query.tags)),
                              strict=True):
            taken = 0
            for rank, row in enumerate(catalog.tag_songs.row(tag).tolist()):
                if taken >= share:
                    break
                if picker.take(row, 1.0 / (rank + 1), (REASON_TAG, tag)):
                    taken += 1
        return None
    if query.title:
        song_scores, tag_scores, known = _title_scores(catalog, query.title)
        if known:
            for row in _best_scored(song_scores, query.n_songs * 2).tolist():
                if picker.full:
                    break
                picker.take(row, float(song_scores[row]), (REASON_TITLE, -1))
            return tag_scores
    # Nothing known at all: the most popular songs (filled by _finish) and tags.
    return catalog.tag_popularity.astype(np.float32)


def quota_lists(query: Query) -> tuple[np.ndarray, int]:
    """The neighbour lists ``ae-quota`` reads: the seeds with a share (``quotas``), each
    list as deep as the whole answer plus the seeds (the write-up kept 100 similar songs
    per song), so that earlier seeds' picks rarely exhaust a later seed's list. Asked
    with ``allow_short``."""
    seeds = query.seeds
    active = seeds[: min(query.n_songs, len(seeds))]  # quotas: shares > 0 come first
    return active, query.n_songs + len(seeds)


class PrefetchedLists:
    """A :class:`VectorSearch` that answers some rows' neighbour lists (asked ``k`` deep
    with ``allow_short``) from lists computed beforehand, e.g. by the server in pieces of
    bounded time, and passes everything else to ``songs``. A row's list depends on that
    row alone (:meth:`HnswSearch.neighbour_lists`; hnswlib answers each query of a batch
    on its own), so the answers are those of one lookup for all."""

    def __init__(self, songs: HnswSearch, k: int) -> None:
        self.songs = songs
        self.k = k
        self._lists: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def fetch(self, rows: np.ndarray) -> None:
        """Compute and keep the lists of ``rows``."""
        labels, sims, offsets = self.songs.neighbour_lists(rows, self.k, allow_short=True)
        bounds = offsets.tolist()
        for row, a, b in zip(rows.tolist(), bounds, bounds[1:], strict=False):
            self._lists[row] = (labels[a:b], sims[a:b])

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.songs.search(vectors, k)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self.songs.vectors(labels)

    def count(self) -> int:
        return self.songs.count()

    def neighbours(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = np.asarray(rows, dtype=np.int64)
        if k != self.k or not allow_short or not self._lists:
            return self.songs.neighbours(rows, k, allow_short=allow_short)
        wanted = rows.tolist()
        rest = np.asarray([r for r in wanted if r not in self._lists], dtype=np.int64)
        found = dict(zip(rest.tolist(), self.songs.neighbours(rest, k, allow_short=True),
                         strict=True)) if len(rest) else {}
        return [self._lists[r] if r in self._lists else found[r] for r in wanted]


def ae_quota(catalog: Catalog, songs: VectorSearch, query: Query) -> Answer:
    """The write-up's per-seed quota filling with tag voting."""
    picker = _Picker(catalog, query, songs.count())
    seeds = query.seeds
    if len(seeds) == 0:
        return _finish(catalog, picker, query, _cold_start(catalog, picker, query))
    shares = quotas(query.n_songs, len(seeds))
    active = [i for i, s in enumerate(shares) if s > 0]
    # Filtering happens here, in numpy order, not in an index callback.
    rows, k = quota_lists(query)
    lists = songs.neighbours(rows, k, allow_short=True)
    for pos, i in enumerate(active):
        taken = 0
        labels, sims = lists[pos]
        for row, sim in zip(labels.tolist(), sims.tolist(), strict=True):
            if taken >= shares[i]:
                break
            if picker.take(row, sim, (REASON_SEED, int(seeds[i]))):
                taken += 1
    return _finish(catalog, picker, query)


@dataclass
class Votes:
    """Candidates (song rows or tags) with summed neighbour weights and their best source."""

    items: np.ndarray
    scores: np.ndarray
    source: np.ndarray  # the playlist (position) that gave each candidate its largest vote

    @staticmethod
    def empty() -> Votes:
        return Votes(np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))

    @staticmethod
    def of(lists: RowLists, playlists: np.ndarray, weights: np.ndarray) -> Votes:
        """Each playlist votes ``weight`` for each of its items."""
        if len(playlists) == 0:
            return Votes.empty()
        # One compiled pass (the numpy version sorted for np.unique and gathered the CSR
        # rows in a dozen calls, all holding the GIL).
        cand, scores, source = voting.tally(lists.indptr, lists.indices, lists.item_bound,
                                            playlists, weights)
        return Votes(cand, scores, source)

    def normalised(self) -> Votes:
        top = float(self.scores.max()) if len(self.scores) else 0.0
        return Votes(self.items, self.scores / top if top > 0 else self.scores, self.source)

    def blend(self, other: Votes, weight: float) -> Votes:
        """self + weight x other, both normalised to a maximum of 1 first; each item keeps
        the source of its larger part (self's on a tie)."""
        a, b = self.normalised(), other.normalised()
        cand, inverse = np.unique(np.concatenate([a.items, b.items]), return_inverse=True)
        part_a = np.full(len(cand), -np.inf)
        part_b = np.full(len(cand), -np.inf)
        part_a[inverse[: len(a.items)]] = a.scores
        part_b[inverse[len(a.items) :]] = weight * b.scores
        source = np.zeros(len(cand), dtype=np.int64)
        source[inverse[: len(a.items)]] = a.source
        from_b = part_b > part_a
        source[from_b] = b.source[np.searchsorted(b.items, cand[from_b])]
        total = np.where(np.isfinite(part_a), part_a, 0.0) + np.where(np.isfinite(part_b),
                                                                      part_b, 0.0)
        return Votes(cand, total, source)

    def ranked(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items by score (ties: smaller item first); with ``limit``, only the first
        ``limit`` of that order, found without sorting the rest."""
        order = best_first(self.scores, limit)
        return self.items[order], self.scores[order], self.source[order]


def _ae_playlists(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                  query: Query, n_playlists: int, alpha: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Nearest training playlists to the summed codes of the seeds (or, for cold starts,
    of the question's tag songs or title songs), weighted by similarity ** alpha; also the
    title's tag scores for title-only questions."""
    seeds = query.seeds
    title_tags: np.ndarray | None = None
    if len(seeds) == 0 and len(query.tags):
        seeds = _tag_seed_songs(catalog, query.tags, per_tag=10)
    elif len(seeds) == 0 and query.title:
        song_scores, title_tags, known = _title_scores(catalog, query.title)
        if known:
            seeds = _best_scored(song_scores, 20)
    if len(seeds) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), title_tags
    labels, sims = playlists.search(songs.vectors(seeds).sum(axis=0, keepdims=True),
                                    n_playlists)
    return labels[0], np.maximum(sims[0].astype(np.float64), 0.0) ** alpha, title_tags


def _answer_from_votes(catalog: Catalog, songs: VectorSearch, query: Query, song_votes: Votes,
                       tag_votes: Votes, title_tags: np.ndarray | None) -> Answer:
    picker = _Picker(catalog, query, songs.count())
    # Most answers fill from the best few hundred candidates: rank only those first.
    limit = 2 * query.n_songs + len(query.seeds)
    rows, scores, sources = song_votes.ranked(limit)
    done = 0
    while True:
        for row, score, source in zip(rows[done:].tolist(), scores[done:].tolist(),
                                      sources[done:].tolist(), strict=True):
            if picker.full:
                break
            picker.take(row, score, (REASON_PLAYLIST, int(catalog.playlist_ids[source])))
        if picker.full or len(rows) == len(song_votes.items):
            break
        done = len(rows)
        rows, scores, sources = song_votes.ranked()
    if len(query.seeds) and not picker.full:
        # Neighbour playlists seldom hold every song a big seed list needs: fill the rest
        # per seed, as ae-quota does, before falling back to popularity.
        rest = ae_quota(catalog, songs, query)
        for row, score, reason in zip(rest.songs.tolist(), rest.song_scores.tolist(),
                                      rest.reasons, strict=True):
            if picker.full:
                break
            picker.take(row, score * 1e-3, reason)
    if len(rows) == 0 and len(query.seeds) == 0 and not len(tag_votes.items):
        return _finish(catalog, picker, query, _cold_start(catalog, picker, query))
    tag_score: np.ndarray = np.zeros(len(catalog.tags), dtype=np.float32)
    tag_score[tag_votes.items] = tag_votes.normalised().scores
    if title_tags is not None and title_tags.any():
        tag_score = tag_score + title_tags / max(float(title_tags.max()), 1e-9)
    return _finish(catalog, picker, query, tag_score if tag_score.any() else None)


def ae_neighbours(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                  query: Query, n_playlists: int = 50, alpha: float = 2.0) -> Answer:
    """Sum of seed codes -> nearest training playlists -> their songs and tags."""
    pls, weights, title_tags = _ae_playlists(catalog, songs, playlists, query, n_playlists,
                                             alpha)
    return _answer_from_votes(catalog, songs, query,
                              Votes.of(catalog.playlist_songs, pls, weights),
                              Votes.of(catalog.playlist_tags, pls, weights), title_tags)


def ae_hybrid(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch, query: Query,
              ae_weight: float = 0.25, n_playlists: int = 50, alpha: float = 2.0) -> Answer:
    """Neighbour-CF votes + ``ae_weight`` x ``ae-neighbours`` votes (each normalised)."""
    if catalog.cf is None:
        raise ValueError("this bundle has no neighbour-CF arrays: ae-hybrid needs a bundle "
                         "exported by a trainer with it (retrain)")
    cf = catalog.cf
    cf_pls, cf_sims = cf.neighbours(query.seeds, query.tags, query.title)
    cf_weights = cf_sims.astype(np.float64) ** cf.alpha
    song_votes = Votes.of(catalog.playlist_songs, cf_pls, cf_weights)
    tag_votes = Votes.of(catalog.playlist_tags, cf_pls, cf_weights)
    title_tags = None
    if ae_weight > 0:
        pls, weights, title_tags = _ae_playlists(catalog, songs, playlists, query,
                                                 n_playlists, alpha)
        song_votes = song_votes.blend(Votes.of(catalog.playlist_songs, pls, weights),
                                      ae_weight)
        tag_votes = tag_votes.blend(Votes.of(catalog.playlist_tags, pls, weights), ae_weight)
    return _answer_from_votes(catalog, songs, query, song_votes, tag_votes, title_tags)


def run_strategy(name: str, catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                 query: Query, ranker: Ranker | None = None, **options: float) -> Answer:
    """Dispatch by strategy name (one of :data:`STRATEGIES`); ``options`` are the
    strategy's keyword parameters (e.g. ``ae_weight`` for ae-hybrid); ``ranked`` needs the
    bundle's ``ranker``."""
    if name == RANKED:
        if ranker is None:
            raise ValueError("strategy 'ranked' needs a bundle with a ranker (trainer.rank)")
        return ranker.answer(catalog, songs, playlists, query)
    if name == "ae-quota":
        return ae_quota(catalog, songs, query)
    if name == "ae-neighbours":
        return ae_neighbours(catalog, songs, playlists, query, **options)  # type: ignore[arg-type]
    if name == "ae-hybrid":
        return ae_hybrid(catalog, songs, playlists, query, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
