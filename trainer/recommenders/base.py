"""The one interface every playlist-continuation model implements, and the arena contract.

A model is fitted on a :class:`~trainer.dataset.Dataset` and answers a :class:`Question`
(seed songs, tags, title, update date; any may be empty) with ranked songs and tags.
:func:`complete` turns any model's answer into a valid arena answer: exactly ``n_songs``
unique songs and ``n_tags`` unique tags, seeds excluded, topped up from popularity.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from trainer.dataset import Dataset, Playlists


@dataclass(frozen=True)
class Question:
    """A playlist to continue. Song ids are external ids as in ``song_meta.json``."""

    id: int
    songs: np.ndarray  # int64 song ids
    tags: list[str]
    title: str = ""
    updt_date: int = 0  # YYYYMMDD, 0 when unknown


@dataclass(frozen=True)
class Recommendation:
    """Ranked songs (ids) and tags, best first, with the model's scores."""

    songs: np.ndarray  # int64 song ids
    song_scores: np.ndarray  # float32, same length as songs
    tags: list[str]
    tag_scores: np.ndarray  # float32, same length as tags


class Recommender(abc.ABC):
    """Fit on a dataset directory, then answer questions."""

    name: ClassVar[str]

    @abc.abstractmethod
    def fit(self, data: Dataset) -> Recommender:
        """Learn from ``data.train``; returns self."""

    @abc.abstractmethod
    def recommend(self, question: Question, n_songs: int = 100,
                  n_tags: int = 10) -> Recommendation:
        """Rank songs and tags for one question. May return fewer than asked, or seeds;
        :func:`complete` fixes both."""


def questions_from(playlists: Playlists, data: Dataset) -> list[Question]:
    """Turn a parsed playlist file (e.g. ``val_questions.json``) into questions."""
    song_ids = data.songs.ids
    tag_items = data.tags.items
    return [
        Question(
            id=int(playlists.ids[i]),
            songs=song_ids[playlists.songs.row(i)],
            tags=[tag_items[t] for t in playlists.tags.row(i)],
            title=playlists.titles[i],
            updt_date=int(playlists.updt_dates[i]),
        )
        for i in range(len(playlists))
    ]


@dataclass(frozen=True)
class Popularity:
    """Fallback rankings: song ids and tags by how many training playlists hold them."""

    songs: np.ndarray  # int64 song ids, most popular first
    tags: list[str]

    @staticmethod
    def of(data: Dataset, limit: int = 2000) -> Popularity:
        train = data.train
        song_counts = np.bincount(train.songs.values, minlength=len(data.songs))
        tag_counts = np.bincount(train.tags.values, minlength=len(data.tags))
        top_songs = np.argsort(-song_counts, kind="stable")[:limit]
        top_tags = np.argsort(-tag_counts, kind="stable")[:limit]
        return Popularity(data.songs.ids[top_songs],
                          [data.tags.items[t] for t in top_tags if tag_counts[t] > 0])


def complete(rec: Recommendation, question: Question, popular: Popularity,
             n_songs: int = 100, n_tags: int = 10) -> Recommendation:
    """Exactly ``n_songs`` unique songs and ``n_tags`` unique tags, seeds excluded.

    Keeps the model's order, drops seeds and repeats, then appends popular songs/tags
    (score 0) until the counts are met.
    """
    seen = set(int(s) for s in question.songs)
    songs: list[int] = []
    scores: list[float] = []
    for sid, score in zip(rec.songs.tolist(), rec.song_scores.tolist(), strict=True):
        if sid not in seen:
            seen.add(sid)
            songs.append(sid)
            scores.append(score)
            if len(songs) == n_songs:
                break
    for sid in popular.songs.tolist():
        if len(songs) == n_songs:
            break
        if sid not in seen:
            seen.add(sid)
            songs.append(sid)
            scores.append(0.0)
    if len(songs) < n_songs:
        raise ValueError(f"cannot fill {n_songs} songs: the catalogue is too small")
    seen_tags = set(question.tags)
    tags: list[str] = []
    tag_scores: list[float] = []
    for tag, score in zip(rec.tags, rec.tag_scores.tolist(), strict=True):
        if tag not in seen_tags:
            seen_tags.add(tag)
            tags.append(tag)
            tag_scores.append(score)
            if len(tags) == n_tags:
                break
    for tag in popular.tags:
        if len(tags) == n_tags:
            break
        if tag not in seen_tags:
            seen_tags.add(tag)
            tags.append(tag)
            tag_scores.append(0.0)
    if len(tags) < n_tags:
        raise ValueError(f"cannot fill {n_tags} tags: the tag vocabulary is too small")
    return Recommendation(np.asarray(songs, dtype=np.int64), np.asarray(scores, np.float32),
                          tags, np.asarray(tag_scores, np.float32))
