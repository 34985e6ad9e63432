"""The most-popular baseline: the songs and tags found in the most training playlists."""

from __future__ import annotations

import numpy as np

from trainer.dataset import Dataset
from trainer.recommenders.base import Question, Recommendation, Recommender


def future_mask(issue_dates: np.ndarray, updt_date: int) -> np.ndarray:
    """Which songs were issued after a playlist's last update.

    Parameters
    ----------
    issue_dates
        ``YYYYMMDD`` ints of the candidate songs, 0 when unknown.
    updt_date
        The question's ``YYYYMMDD`` update date, 0 when unknown.

    Returns
    -------
    numpy.ndarray
        Boolean mask, True for songs that cannot be in the playlist yet. Unknown dates on
        either side never drop a song: the filter is only worth having when it is safe.
    """
    if updt_date <= 0:
        return np.zeros(issue_dates.shape, dtype=bool)
    return (issue_dates > updt_date) & (issue_dates > 0)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first (ties keep index order).

    Parameters
    ----------
    scores
        1-D scores.
    k
        How many to keep; more than ``len(scores)`` keeps them all.
    """
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(len(scores))
    # Stable sort on the partitioned block so equal scores rank by index, deterministically.
    order = np.lexsort((part, -scores[part]))
    return part[order]


class MostPopular(Recommender):
    """Ranks every song and tag by how many training playlists contain it.

    Parameters
    ----------
    drop_future
        Skip songs issued after the question's ``updt_date`` (unknown dates keep the song).
    """

    name = "most-popular"

    def __init__(self, drop_future: bool = False) -> None:
        self.drop_future = drop_future

    def fit(self, data: Dataset) -> MostPopular:
        """Count songs and tags over ``data.train``."""
        train = data.train
        song_counts = np.bincount(train.songs.values, minlength=len(data.songs))
        tag_counts = np.bincount(train.tags.values, minlength=len(data.tags))
        # Only songs/tags that occur at all: the rest carry no evidence of popularity.
        song_rows = top_k(song_counts.astype(np.float64), int((song_counts > 0).sum()))
        tag_idx = top_k(tag_counts.astype(np.float64), int((tag_counts > 0).sum()))
        self._song_ids = data.songs.ids[song_rows]
        self._song_scores = song_counts[song_rows].astype(np.float32)
        self._song_dates = data.songs.issue_dates[song_rows]
        self._tags = [data.tags.items[t] for t in tag_idx]
        self._tag_scores = tag_counts[tag_idx].astype(np.float32)
        return self

    def recommend(self, question: Question, n_songs: int = 100,
                  n_tags: int = 10) -> Recommendation:
        """The same popular songs and tags for every question, seeds left out."""
        seeds = question.songs
        # Without the date filter at most len(seeds) of the first candidates can drop out.
        limit = None if self.drop_future else n_songs + len(seeds)
        ids = self._song_ids[:limit]
        keep = ~np.isin(ids, seeds)
        if self.drop_future:
            keep &= ~future_mask(self._song_dates, question.updt_date)
        idx = np.flatnonzero(keep)[:n_songs]
        seed_tags = set(question.tags)
        tags: list[str] = []
        tag_scores: list[float] = []
        for tag, score in zip(self._tags, self._tag_scores.tolist(), strict=True):
            if len(tags) == n_tags:
                break
            if tag not in seed_tags:
                tags.append(tag)
                tag_scores.append(score)
        return Recommendation(self._song_ids[idx], self._song_scores[idx], tags,
                              np.asarray(tag_scores, dtype=np.float32))
