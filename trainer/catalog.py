"""Builds the strategies' :class:`server.catalog.Catalog` from a training dataset.

Popularity, song -> tags (for voting), tag -> most frequent songs (tags-only questions),
playlist -> songs/tags (``ae-neighbours``), and title word -> songs/tags (title-only
questions) all come from ``train.json``; nothing here depends on the model.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from server.catalog import Catalog, RowLists, tokenize
from trainer.dataset import CSR, Dataset, Vocabulary
from trainer.recommenders.knn import PlaylistKNN


def _binary(csr: CSR, n_cols: int) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(csr.values), np.float32), csr.values.astype(np.int64),
                       csr.indptr), shape=(csr.n_rows, n_cols))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _top_per_row(m: sp.csr_matrix, limit: int, weights: np.ndarray | None = None) -> RowLists:
    """Each row's ``limit`` largest entries, best first (ties: lower column first)."""
    m = m.tocsr()
    m.sum_duplicates()
    indptr = [0]
    indices: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for i in range(m.shape[0]):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        cols, vals = m.indices[lo:hi], m.data[lo:hi]
        if weights is not None:
            vals = vals * weights[i]
        if len(cols) > limit:
            keep = np.argpartition(-vals, limit - 1)[:limit]
            cols, vals = cols[keep], vals[keep]
        order = np.lexsort((cols, -vals))
        indices.append(cols[order].astype(np.int32))
        values.append(vals[order].astype(np.float32))
        indptr.append(indptr[-1] + len(order))
    return RowLists(np.asarray(indptr, dtype=np.int64),
                    np.concatenate(indices) if indices else np.zeros(0, np.int32),
                    np.concatenate(values) if values else np.zeros(0, np.float32))


def _all_rows(m: sp.csr_matrix) -> RowLists:
    m = m.tocsr()
    m.sum_duplicates()
    return RowLists(m.indptr.astype(np.int64), m.indices.astype(np.int32),
                    m.data.astype(np.float32))


def title_words(titles: list[str], min_playlists: int = 2) -> tuple[Vocabulary, sp.csr_matrix]:
    """Words used by at least ``min_playlists`` titles, and the word x playlist matrix."""
    vocab = Vocabulary()
    rows: list[int] = []
    cols: list[int] = []
    for p, title in enumerate(titles):
        for word in tokenize(title):
            rows.append(vocab.add(word))
            cols.append(p)
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                      shape=(len(vocab), len(titles)))
    counts = np.diff(m.indptr)
    keep = np.nonzero(counts >= min_playlists)[0]
    kept = Vocabulary()
    for i in keep:
        kept.add(vocab.items[i])
    return kept, m[keep]


def build_catalog(data: Dataset, *, tag_songs_limit: int = 200,
                  word_songs_limit: int = 200, word_tags_limit: int = 50) -> Catalog:
    train = data.train
    n_songs, n_tags = len(data.songs), len(data.tags)
    pl_songs = _binary(train.songs, n_songs)
    pl_tags = _binary(train.tags, n_tags)
    popularity = np.asarray(pl_songs.sum(axis=0)).ravel().astype(np.int32)
    tag_popularity = np.asarray(pl_tags.sum(axis=0)).ravel().astype(np.int32)
    song_tags = (pl_songs.T @ pl_tags).tocsr()  # counts of co-occurrence
    song_tags.data[:] = 1.0  # voting is "ever attached", one vote per tag
    tag_songs = (pl_tags.T @ pl_songs).tocsr()
    words, word_pl = title_words(train.titles)
    n_with_word = np.maximum(np.diff(word_pl.indptr), 1).astype(np.float32)
    # A word's weight for a song: the share of playlists titled with it that hold the song.
    word_songs = _top_per_row(word_pl @ pl_songs, word_songs_limit, 1.0 / n_with_word)
    word_tags = _top_per_row(word_pl @ pl_tags, word_tags_limit, 1.0 / n_with_word)
    return Catalog(
        song_ids=data.songs.ids.astype(np.int64),
        popularity=popularity,
        issue_dates=data.songs.issue_dates.astype(np.int32),
        tags=list(data.tags.items),
        tag_popularity=tag_popularity,
        song_tags=_all_rows(song_tags),
        tag_songs=_top_per_row(tag_songs, tag_songs_limit),
        playlist_ids=train.ids.astype(np.int64),
        playlist_songs=_all_rows(pl_songs),
        playlist_tags=_all_rows(pl_tags),
        words=list(words.items),
        word_songs=word_songs,
        word_tags=word_tags,
        cf=PlaylistKNN().fit(data).neighbour_cf(),
    )
