"""What the strategies know about songs, tags, playlists and title words, as plain arrays:
the rows of CSR lists, the id index, neighbour CF and the catalog itself (numpy only)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server.bundle import pack_strings, unpack_strings
from server.voting import best_first

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(title: str) -> list[str]:
    """Lower-cased word tokens of a playlist title (unicode-aware, deduplicated, in order)."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(title.lower()):
        seen.setdefault(word, None)
    return list(seen)

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


def playlist_codes(codes: np.ndarray, catalog: Catalog) -> np.ndarray:
    """A training playlist's code: the mean of its songs' unit-normalised codes."""
    unit = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
    ps = catalog.playlist_songs
    out = np.zeros((ps.n_rows, codes.shape[1]), dtype=np.float32)
    lengths = np.diff(ps.indptr)
    rows = np.repeat(np.arange(ps.n_rows), lengths)
    np.add.at(out, rows, unit[ps.indices]) if len(rows) < 1_000_000 else _chunked_add(
        out, rows, unit, ps.indices)
    out /= np.maximum(lengths, 1)[:, None]
    return out


def _chunked_add(out: np.ndarray, rows: np.ndarray, unit: np.ndarray, idx: np.ndarray) -> None:
    # np.add.at is slow on millions of rows; rows are sorted, so reduce by segments.
    for start in range(0, len(rows), 500_000):
        r, i = rows[start : start + 500_000], idx[start : start + 500_000]
        bounds = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        out[r[bounds]] += np.add.reduceat(unit[i], bounds, axis=0)
