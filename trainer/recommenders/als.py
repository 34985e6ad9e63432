"""Matrix-factorisation baseline: implicit's ALS over playlists x (songs | tags | title words).

Title words are items too, so a title-only question folds in like any other: its factor is
solved from the words it has (``recalculate_user``) and scored against song and tag factors.
``implicit`` lives in the optional ``als`` extra and is imported only when a model is built.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import scipy.sparse as sp

from server.catalog import tokenize
from trainer.dataset import Dataset, Songs
from trainer.recommenders.base import Question, Recommendation, Recommender
from trainer.recommenders.knn import binary_csr
from trainer.recommenders.popular import future_mask, top_k

log = logging.getLogger(__name__)


def _import_implicit() -> Any:
    """implicit is optional (the 'als' extra): imported when an ALS model is built."""
    try:
        import implicit.cpu.als
        import threadpoolctl
    except ImportError:
        raise ValueError("model 'als' needs the 'implicit' package: "
                         "pip install -e '.[als]'") from None
    return implicit.cpu.als, threadpoolctl


def default_threads() -> int:
    """Threads for implicit's own OpenMP loops: ``OMP_NUM_THREADS`` when set, else at most 2
    (the project's reference machine has two cores, shared with the rest of the pipeline)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return min(2, os.cpu_count() or 1)


class ALSRecommender(Recommender):
    """Weighted-ALS factors; questions are folded in and scored by dot product.

    Parameters
    ----------
    factors, iterations, regularization
        As in ``implicit.als.AlternatingLeastSquares``.
    confidence
        implicit's ``alpha``: weight of observed entries over unobserved ones.
    tag_weight, title_weight
        Value of tag and title-word entries relative to songs (1.0); 0 leaves a block out.
    num_threads
        implicit's threads; default :func:`default_threads`.
    seed
        Random state of the factor initialisation.
    drop_future
        Skip songs issued after the question's ``updt_date`` (unknown dates keep the song).
    """

    name = "als"

    def __init__(self, factors: int = 64, iterations: int = 15, regularization: float = 0.05,
                 confidence: float = 20.0, tag_weight: float = 1.0, title_weight: float = 1.0,
                 num_threads: int | None = None, seed: int = 0,
                 drop_future: bool = False) -> None:
        self._als_module, self._threadpoolctl = _import_implicit()
        self.factors = factors
        self.iterations = iterations
        self.regularization = regularization
        self.confidence = confidence
        self.tag_weight = tag_weight
        self.title_weight = title_weight
        self.num_threads = num_threads or default_threads()
        self.seed = seed
        self.drop_future = drop_future

    def fit(self, data: Dataset) -> ALSRecommender:
        """Factorise the playlist x item matrix of ``data.train``."""
        train = data.train
        n = len(train)
        self._songs: Songs = data.songs
        self._tag_items = list(data.tags.items)
        self._tag_index = {t: i for i, t in enumerate(self._tag_items)}
        n_songs, n_tags = len(data.songs), len(self._tag_items)
        self._word_index: dict[str, int] = {}
        word_rows: list[int] = []
        word_cols: list[int] = []
        for i, title in enumerate(train.titles):
            for w in tokenize(title):
                word_rows.append(i)
                word_cols.append(self._word_index.setdefault(w, len(self._word_index)))
        songs = binary_csr(train.songs.row_ids(), train.songs.values, (n, n_songs))
        tags = binary_csr(train.tags.row_ids(), train.tags.values, (n, n_tags))
        words = binary_csr(np.asarray(word_rows, np.int64), np.asarray(word_cols, np.int64),
                           (n, len(self._word_index)))
        self._tag_offset = n_songs
        self._word_offset = n_songs + n_tags
        user_items = sp.hstack([songs, tags * self.tag_weight, words * self.title_weight],
                               format="csr", dtype=np.float32)
        user_items.eliminate_zeros()
        # implicit parallelises itself; a threaded BLAS underneath it only fights for the
        # same cores (implicit's constructor warns about it), so BLAS stays single-threaded
        # around everything implicit does, and around the per-question products below.
        self._blas = self._threadpoolctl.ThreadpoolController()
        with self._blas.limit(limits=1, user_api="blas"):
            self._model = self._als_module.AlternatingLeastSquares(
                factors=self.factors, iterations=self.iterations,
                regularization=self.regularization, alpha=self.confidence,
                num_threads=self.num_threads, random_state=self.seed)
            self._model.fit(user_items, show_progress=False)
        # Folding in one question is a single small solve: OpenMP threads only add start-up
        # cost there (measured ~3x slower with 2 threads on the 2-core reference machine).
        self._model.num_threads = 1
        factors = np.asarray(self._model.item_factors)
        self._song_factors = factors[:n_songs]
        self._tag_factors = factors[n_songs:n_songs + n_tags]

        song_counts = np.asarray(songs.sum(axis=0)).ravel()
        tag_counts = np.asarray(tags.sum(axis=0)).ravel()
        self._pop_songs = top_k(song_counts, int((song_counts > 0).sum()))
        self._pop_tags = top_k(tag_counts, int((tag_counts > 0).sum()))
        # Songs never seen in training have untrained (near-random) factors: never rank them.
        self._unseen = song_counts == 0
        self._unseen_tags = tag_counts == 0
        return self

    def user_row(self, question: Question) -> sp.csr_matrix:
        """The question as a 1 x items row of the training matrix's layout."""
        rows = self._songs.rows(question.songs)
        cols = [np.unique(rows[rows >= 0])]
        vals = [np.ones(len(cols[0]), dtype=np.float32)]
        tags = sorted({self._tag_index[t] for t in question.tags if t in self._tag_index})
        cols.append(np.asarray(tags, dtype=np.int64) + self._tag_offset)
        vals.append(np.full(len(tags), self.tag_weight, dtype=np.float32))
        words = sorted({self._word_index[w] for w in tokenize(question.title)
                        if w in self._word_index})
        cols.append(np.asarray(words, dtype=np.int64) + self._word_offset)
        vals.append(np.full(len(words), self.title_weight, dtype=np.float32))
        col = np.concatenate(cols).astype(np.int64)
        val = np.concatenate(vals)
        keep = val > 0
        n_items = self._model.item_factors.shape[0]
        return sp.csr_matrix((val[keep], (np.zeros(keep.sum(), np.int64), col[keep])),
                             shape=(1, n_items))

    def recommend(self, question: Question, n_songs: int = 100,
                  n_tags: int = 10) -> Recommendation:
        """Fold the question in, then rank songs and tags by their factor dot products."""
        row = self.user_row(question)
        if row.nnz == 0:
            return self._popular(question, n_songs, n_tags)
        with self._blas.limit(limits=1, user_api="blas"):
            user = np.asarray(self._model.recalculate_user(0, row))
            song_scores = self._song_factors @ user
            tag_scores = self._tag_factors @ user
        drop = self._unseen.copy()
        seeds = row.indices[row.indices < self._tag_offset]
        drop[seeds] = True
        if self.drop_future:
            drop |= future_mask(self._songs.issue_dates, question.updt_date)
        song_scores[drop] = -np.inf
        best = top_k(song_scores, n_songs)
        best = best[np.isfinite(song_scores[best])]
        seed_tags = [self._tag_index[t] for t in question.tags if t in self._tag_index]
        tag_scores[self._unseen_tags] = -np.inf
        tag_scores[seed_tags] = -np.inf
        best_tags = top_k(tag_scores, n_tags)
        best_tags = best_tags[np.isfinite(tag_scores[best_tags])]
        return Recommendation(self._songs.ids[best], song_scores[best].astype(np.float32),
                              [self._tag_items[t] for t in best_tags],
                              tag_scores[best_tags].astype(np.float32))

    def _popular(self, question: Question, n_songs: int, n_tags: int) -> Recommendation:
        """Nothing usable in the question: the most popular songs and tags."""
        pool = self._pop_songs
        if self.drop_future:
            pool = pool[~future_mask(self._songs.issue_dates[pool], question.updt_date)]
        seeds = self._songs.rows(question.songs)
        pool = pool[: n_songs + len(seeds)]
        pool = pool[~np.isin(pool, seeds)][:n_songs]
        seed_tags = set(question.tags)
        tags = [self._tag_items[t] for t in self._pop_tags[: n_tags + len(seed_tags)]
                if self._tag_items[t] not in seed_tags][:n_tags]
        return Recommendation(self._songs.ids[pool], np.zeros(len(pool), np.float32), tags,
                              np.zeros(len(tags), np.float32))
