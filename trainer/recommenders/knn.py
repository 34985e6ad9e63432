"""Playlist-neighbour collaborative filtering: score songs and tags by similar playlists.

Each training playlist is a sparse vector over its songs, tags, title words and (optionally)
the artists of its songs, every block weighted and IDF-scaled, rows L2-normalised. A question
becomes the same kind of vector; its ``k`` most similar training playlists vote for their
songs and tags with weight ``similarity ** alpha``. This is the classic strong approach of
the Melon challenge (most top entries were refinements of it).

Fitting builds the playlist vectors here (scipy); finding a question's neighbours is the
server's :class:`~server.catalog.NeighbourCF` over them, the very code ``ae-hybrid``
answers with, so the baseline and the served strategy cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from server.catalog import NeighbourCF, RowLists, row_positions, tokenize
from trainer.dataset import CSR, Dataset, Songs
from trainer.recommenders.base import Question, Recommendation, Recommender
from trainer.recommenders.popular import future_mask, top_k


def gather(csr: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of several CSR rows at once, with the position in ``rows`` of each.

    Parameters
    ----------
    csr
        Rows of integer lists (e.g. the artists of every song).
    rows
        Which rows to read, in order; repeats allowed.

    Returns
    -------
    owner, values
        ``values[j]`` belongs to ``csr.row(rows[owner[j]])``.
    """
    owner, idx = row_positions(csr.indptr, rows)
    return owner, csr.values[idx]


def binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A 0/1 float32 CSR matrix with ones at ``(rows, cols)``; repeated pairs count once."""
    mat = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


class PlaylistKNN(Recommender):
    """Nearest training playlists vote for songs and tags.

    Parameters
    ----------
    k
        Number of neighbour playlists per question.
    alpha
        Exponent on the cosine similarity of a neighbour: higher trusts the closest more.
    song_weight, tag_weight, title_weight, artist_weight
        Weights of the feature blocks in the similarity; 0 leaves a block out.
    idf
        Scale each feature by ``log(1 + n_playlists / df)`` so rare shared songs count more
        than shared hits.
    drop_future
        Skip songs issued after the question's ``updt_date`` (unknown dates keep the song).
    """

    name = "playlist-knn"

    def __init__(self, k: int = 150, alpha: float = 1.5, song_weight: float = 1.0,
                 tag_weight: float = 1.0, title_weight: float = 1.0, artist_weight: float = 0.5,
                 idf: bool = True, drop_future: bool = False) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if min(song_weight, tag_weight, title_weight, artist_weight) < 0:
            raise ValueError("feature block weights must be >= 0")
        self.k = k
        self.alpha = alpha
        self.song_weight = song_weight
        self.tag_weight = tag_weight
        self.title_weight = title_weight
        self.artist_weight = artist_weight
        self.idf = idf
        self.drop_future = drop_future

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, data: Dataset) -> PlaylistKNN:
        """Build the normalised playlist-feature matrix and the song/tag vote matrices."""
        train = data.train
        n = len(train)
        songs = data.songs
        self._songs: Songs = songs
        # Snapshots: the dataset's tag vocabulary keeps growing as question files are read.
        self._tag_items = list(data.tags.items)
        self._tag_index = {t: i for i, t in enumerate(self._tag_items)}
        n_songs, n_tags = len(songs), len(self._tag_items)

        song_rows = train.songs.row_ids()
        self._votes_songs = binary_csr(song_rows, train.songs.values, (n, n_songs))
        self._votes_tags = binary_csr(train.tags.row_ids(), train.tags.values, (n, n_tags))

        # Title words and artists get compact vocabularies of their own.
        self._word_index: dict[str, int] = {}
        word_rows: list[int] = []
        word_cols: list[int] = []
        for i, title in enumerate(train.titles):
            for w in tokenize(title):
                word_rows.append(i)
                word_cols.append(self._word_index.setdefault(w, len(self._word_index)))
        self._artist_ids = np.unique(songs.artists.values)
        owner, artists = gather(songs.artists, train.songs.values)
        artist_rows = song_rows[owner]
        artist_cols = np.searchsorted(self._artist_ids, artists)

        n_words, n_artists = len(self._word_index), len(self._artist_ids)
        self._offsets = np.cumsum([0, n_songs, n_tags, n_words])  # song, tag, word, artist
        blocks = [
            (self._votes_songs, self.song_weight),
            (self._votes_tags, self.tag_weight),
            (binary_csr(np.asarray(word_rows, np.int64), np.asarray(word_cols, np.int64),
                        (n, n_words)), self.title_weight),
            (binary_csr(artist_rows, artist_cols, (n, n_artists)), self.artist_weight),
        ]
        weights = []
        for mat, w in blocks:
            df = np.asarray((mat > 0).sum(axis=0)).ravel().astype(np.float32)
            block = np.full(mat.shape[1], w, dtype=np.float32)
            if self.idf:
                block *= np.log1p(n / np.maximum(df, 1.0)).astype(np.float32)
            weights.append(block)
        self._feature_weights = np.concatenate(weights)
        features = sp.hstack([m for m, _ in blocks], format="csr", dtype=np.float32)
        features = features @ sp.diags(self._feature_weights)
        norms = np.sqrt(np.asarray(features.multiply(features).sum(axis=1)).ravel())
        features = sp.diags(1.0 / np.maximum(norms, 1e-12).astype(np.float32)) @ features
        # Feature-major so a question touches only the rows of its own few features.
        self._features_t = sp.csr_matrix(features.T)
        self._features_t.eliminate_zeros()

        song_counts = np.asarray(self._votes_songs.sum(axis=0)).ravel()
        tag_counts = np.asarray(self._votes_tags.sum(axis=0)).ravel()
        self._pop_songs = top_k(song_counts, int((song_counts > 0).sum()))
        self._pop_song_counts = song_counts[self._pop_songs].astype(np.float32)
        self._pop_tags = top_k(tag_counts, int((tag_counts > 0).sum()))
        self._pop_tag_counts = tag_counts[self._pop_tags].astype(np.float32)
        self._n_train = n
        self._cf = self.neighbour_cf()
        return self

    def neighbour_cf(self) -> NeighbourCF:
        """This fitted model as the torch- and scipy-free arrays the server's ``ae-hybrid``
        strategy answers with (same features, weights and neighbour count)."""
        ft = self._features_t.tocsr()
        ft.sort_indices()
        artists = self._songs.artists
        song_artists = RowLists(artists.indptr.astype(np.int64),
                                np.searchsorted(self._artist_ids, artists.values).astype(np.int32),
                                np.ones(len(artists.values), dtype=np.float32))
        words = sorted(self._word_index, key=self._word_index.__getitem__)
        return NeighbourCF(RowLists(ft.indptr.astype(np.int64), ft.indices.astype(np.int32),
                                    ft.data.astype(np.float32)),
                           self._feature_weights.astype(np.float32),
                           np.asarray(self._offsets, dtype=np.int64), words, song_artists,
                           self._n_train, self.k, self.alpha)

    # -- answering -------------------------------------------------------------------------

    def neighbours(self, question: Question) -> tuple[np.ndarray, np.ndarray]:
        """The question's nearest training playlists (indices into ``train``) and their
        cosine similarities, most similar first; empty when nothing overlaps."""
        tags = [self._tag_index[t] for t in question.tags if t in self._tag_index]
        return self._cf.neighbours(self._song_rows(question), np.asarray(tags, dtype=np.int32),
                                   question.title)

    def recommend(self, question: Question, n_songs: int = 100,
                  n_tags: int = 10) -> Recommendation:
        """Songs and tags of the nearest playlists, weighted by similarity ** alpha; popular
        songs and tags fill what the neighbours leave open."""
        seeds = self._song_rows(question)
        nbrs, sims = self.neighbours(question)
        weights = sims.astype(np.float64) ** self.alpha

        song_cand, song_scores = self._votes(self._votes_songs, nbrs, weights)
        drop = np.isin(song_cand, seeds)
        if self.drop_future:
            drop |= future_mask(self._songs.issue_dates[song_cand], question.updt_date)
        song_cand, song_scores = song_cand[~drop], song_scores[~drop]
        best = top_k(song_scores, n_songs)
        song_rows, song_sc = self._fill(song_cand[best], song_scores[best], n_songs,
                                        self._pop_songs, seeds, question.updt_date)

        seed_tags = np.asarray([self._tag_index[t] for t in question.tags
                                if t in self._tag_index], dtype=np.int64)
        tag_cand, tag_scores = self._votes(self._votes_tags, nbrs, weights)
        keep = ~np.isin(tag_cand, seed_tags)
        tag_cand, tag_scores = tag_cand[keep], tag_scores[keep]
        best = top_k(tag_scores, n_tags)
        tag_idx, tag_sc = self._fill(tag_cand[best], tag_scores[best], n_tags,
                                     self._pop_tags, seed_tags, 0)
        return Recommendation(self._songs.ids[song_rows], song_sc,
                              [self._tag_items[t] for t in tag_idx], tag_sc)

    # -- helpers ---------------------------------------------------------------------------

    def _song_rows(self, question: Question) -> np.ndarray:
        rows = self._songs.rows(question.songs)
        return np.unique(rows[rows >= 0])

    @staticmethod
    def _votes(votes: sp.csr_matrix, nbrs: np.ndarray,
               weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidates (column indices) and their similarity-weighted vote totals."""
        if len(nbrs) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        sub = votes[nbrs]
        cand, inverse = np.unique(sub.indices, return_inverse=True)
        per_entry = np.repeat(weights, np.diff(sub.indptr))
        return cand.astype(np.int64), np.bincount(inverse, weights=per_entry)

    def _fill(self, ranked: np.ndarray, scores: np.ndarray, n: int, popular: np.ndarray,
              exclude: np.ndarray, updt_date: int) -> tuple[np.ndarray, np.ndarray]:
        """Append popular items (score 0) not yet ranked nor excluded until ``n`` are held.

        ``updt_date`` > 0 with ``drop_future`` set also skips songs issued after it; pass 0
        for tags."""
        if len(ranked) >= n:
            return ranked[:n], scores[:n].astype(np.float32)
        taken = np.concatenate([ranked, exclude])
        pool = popular
        if self.drop_future and updt_date:
            pool = pool[~future_mask(self._songs.issue_dates[pool], updt_date)]
        # Only the first few popular items can be needed; skip scanning the whole catalogue.
        pool = pool[: n + len(taken)]
        extra = pool[~np.isin(pool, taken)][: n - len(ranked)]
        return (np.concatenate([ranked, extra]),
                np.concatenate([scores, np.zeros(len(extra))]).astype(np.float32))

