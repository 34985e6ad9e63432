"""The ranker's bundle data (``ranker.npz``): sources, feature names, ALS factors, artists.

What :mod:`server.ranking` serves with and ``trainer.rank`` writes; numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from server.bundle import pack_strings, unpack_strings
from server.catalog import Catalog, RowLists, tokenize

SOURCES = ("ae", "cf", "seed", "als", "tag", "title", "popular", "artist")
# Candidates per source: a few hundred in all once overlaps are merged.
DEFAULT_SIZES: dict[str, int] = {"ae": 100, "cf": 100, "seed": 100, "als": 100, "tag": 50,
                                 "title": 50, "popular": 30, "artist": 50}
# Ablation groups: the sources and features each model family contributes.
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ae": (("ae", "seed"), ("code_sim_mean", "code_sim_max", "code_sim_avg")),
    "als": (("als",), ("als_dot",)),
    "cf": (("cf",), ()),
}
MISSING_RANK = 1000.0  # the rank of a candidate a source did not propose
MISSING = -99.0  # a feature that cannot be computed (no seeds, unknown date)
FEATURES: tuple[str, ...] = (
    *(f"{s}_score" for s in SOURCES), *(f"{s}_rank" for s in SOURCES),
    "n_sources", "code_sim_mean", "code_sim_max", "code_sim_avg", "als_dot",
    "log_popularity", "years_from_playlists", "years_since_issue", "artist_overlap",
    "genre_overlap", "tag_cooccurrence", "title_match", "q_seeds", "q_tags", "q_title_words",
)
ALS_TAG = 1  # the ALS item blocks: songs | tags | title words
ALS_WORD = 2


def year_of(yyyymmdd: np.ndarray | int) -> np.ndarray:
    """YYYYMMDD -> fractional years (0 stays 0: unknown)."""
    d = np.asarray(yyyymmdd, dtype=np.float64)
    years = np.floor(d / 10000) + (np.floor(d / 100) % 100 - 1) / 12 + (d % 100) / 365
    return np.where(d > 0, years, 0.0)


@dataclass
class AlsFactors:
    """ALS item factors (songs | tags | title words) and what a fold-in needs."""

    songs: np.ndarray  # float32 (n_songs, f); zero rows for songs in no training playlist
    tags: np.ndarray  # float32 (n_tags, f)
    words: np.ndarray  # float32 (n_words, f)
    word_list: list[str]
    yty: np.ndarray  # float64 (f, f): Y^T Y over every item
    regularization: float
    confidence: float  # implicit's alpha
    tag_weight: float
    title_weight: float
    word_index: dict[str, int] = field(init=False)
    base: np.ndarray = field(init=False)  # YtY + reg I: what every fold-in starts from

    def __post_init__(self) -> None:
        self.word_index = {w: i for i, w in enumerate(self.word_list)}
        self.base = self.yty + self.regularization * np.eye(len(self.yty))

    def fold_in(self, seeds: np.ndarray, tags: np.ndarray, title: str) -> np.ndarray | None:
        """The question's user factor, as implicit's ``recalculate_user`` solves it:
        (YtY + reg I + sum (c - 1) y y^T) x = sum c y with c = alpha x value."""
        seeds = seeds[seeds < len(self.songs)]
        tags = tags[tags < len(self.tags)]
        words = [self.word_index[w] for w in tokenize(title) if w in self.word_index]
        parts = [(self.songs[seeds], 1.0), (self.tags[tags], self.tag_weight),
                 (self.words[np.asarray(words, dtype=np.int64)], self.title_weight)]
        ys = [y for y, w in parts if w > 0 and len(y)]
        cs = [np.full(len(y), self.confidence * w) for y, w in parts if w > 0 and len(y)]
        if not ys:
            return None
        y = np.concatenate(ys).astype(np.float64)
        c = np.concatenate(cs)
        a = self.base + (y.T * (c - 1)) @ y
        user: np.ndarray = np.linalg.solve(a, (y.T * c).sum(axis=1))
        return user.astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        blob, offsets = pack_strings(self.word_list)
        return {"als_songs": self.songs, "als_tags": self.tags, "als_words": self.words,
                "als_word_blob": blob, "als_word_offsets": offsets, "als_yty": self.yty,
                "als_params": np.asarray([self.regularization, self.confidence,
                                          self.tag_weight, self.title_weight])}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> AlsFactors:
        reg, conf, tw, ww = arrays["als_params"].tolist()
        return AlsFactors(arrays["als_songs"].astype(np.float32),
                          arrays["als_tags"].astype(np.float32),
                          arrays["als_words"].astype(np.float32),
                          unpack_strings(arrays["als_word_blob"], arrays["als_word_offsets"]),
                          arrays["als_yty"].astype(np.float64), float(reg), float(conf),
                          float(tw), float(ww))


@dataclass
class RankData:
    """Per-song data the sources and features need beyond the catalog (``ranker.npz``)."""

    song_artists: RowLists  # song row -> artist index
    artist_songs: RowLists  # artist index -> its songs, most popular first
    song_genres: RowLists  # song row -> genre indices (major and detailed)
    playlist_years: np.ndarray  # float32 per song: mean updt year of its playlists, 0 none
    als: AlsFactors | None
    features: tuple[str, ...] = FEATURES  # the ranker's input columns, in order
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    # The artist id of each artist index (int64); None in bundles written before it was
    # stored: they know their songs' artists only as indices (no artist new-song source).
    artist_ids: np.ndarray | None = None
    # The ALS source's inner-product index (server.alsindex.AlsIndex, from als.hnsw; not
    # part of ranker.npz); None: the source scans every song's factors.
    als_index: Any | None = None

    @property
    def n_songs(self) -> int:
        return self.song_artists.n_rows

    def to_arrays(self) -> dict[str, np.ndarray]:
        blob, offsets = pack_strings(list(self.features))
        out = {"playlist_years": self.playlist_years, "feature_blob": blob,
               "feature_offsets": offsets,
               "source_sizes": np.asarray([self.sizes.get(s, 0) for s in SOURCES], np.int64)}
        out.update(self.song_artists.to_arrays("song_artists"))
        out.update(self.artist_songs.to_arrays("artist_songs"))
        out.update(self.song_genres.to_arrays("song_genres"))
        if self.als is not None:
            out.update(self.als.to_arrays())
        if self.artist_ids is not None:
            out["artist_ids"] = self.artist_ids
        return out

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> RankData:
        sizes = arrays["source_sizes"].tolist()
        if len(sizes) != len(SOURCES):
            raise ValueError(f"source_sizes has {len(sizes)} entries, expected "
                             f"{len(SOURCES)} ({', '.join(SOURCES)})")
        features = tuple(unpack_strings(arrays["feature_blob"], arrays["feature_offsets"]))
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown ranker features {unknown}; this build knows "
                             f"{', '.join(FEATURES)}")
        return RankData(RowLists.from_arrays(arrays, "song_artists"),
                        RowLists.from_arrays(arrays, "artist_songs"),
                        RowLists.from_arrays(arrays, "song_genres"),
                        arrays["playlist_years"].astype(np.float32),
                        AlsFactors.from_arrays(arrays) if "als_songs" in arrays else None,
                        features, dict(zip(SOURCES, (int(s) for s in sizes), strict=True)),
                        arrays["artist_ids"].astype(np.int64) if "artist_ids" in arrays
                        else None)

    def with_added_songs(self, n: int, artists: Sequence[Sequence[int]] | None = None
                         ) -> RankData:
        """The same data for a catalog with ``n`` songs appended (a compacted bundle): the
        new songs are in no training playlist, so they get what such songs get here, no
        genre rows known to the ranker, no playlist year, zero ALS factors, and in no
        artist's list of popular songs. Their artists (``artists``: ids per new song) are
        kept when this data knows artist ids: the new-song sources find a compacted song
        by its artists as they found it added (``server.artists``)."""
        def grown(lists: RowLists, rows: Sequence[np.ndarray] = ()) -> RowLists:
            lengths = np.asarray([len(r) for r in rows] if rows else np.zeros(n), np.int64)
            indptr = np.concatenate([lists.indptr, lists.indptr[-1] + np.cumsum(lengths)])
            values = np.concatenate([lists.indices, *rows]).astype(lists.indices.dtype)
            return RowLists(indptr.astype(lists.indptr.dtype), values,
                            np.ones(len(values), lists.weights.dtype) if rows
                            else lists.weights)

        als = self.als
        if als is not None:
            als = replace(als, songs=np.concatenate(
                [als.songs, np.zeros((n, als.songs.shape[1]), als.songs.dtype)]))
        artist_ids, artist_songs = self.artist_ids, self.artist_songs
        song_artists = grown(self.song_artists)
        if artists is not None and artist_ids is not None:
            if len(artists) != n:
                raise ValueError(f"artists of {len(artists)} songs for {n} added songs")
            index = {int(a): i for i, a in enumerate(artist_ids.tolist())}
            rows = []
            for song in artists:
                for a in song:
                    index.setdefault(int(a), len(index))
                rows.append(np.asarray([index[int(a)] for a in dict.fromkeys(song)],
                                       np.int64))
            extra = len(index) - len(artist_ids)
            artist_ids = np.concatenate([artist_ids, np.fromiter(
                list(index)[len(artist_ids):], np.int64, extra)])
            artist_songs = RowLists(np.concatenate([artist_songs.indptr, np.full(
                extra, artist_songs.indptr[-1], artist_songs.indptr.dtype)]),
                artist_songs.indices, artist_songs.weights)
            song_artists = grown(self.song_artists, rows)
        return replace(self, song_artists=song_artists, artist_songs=artist_songs,
                       song_genres=grown(self.song_genres),
                       playlist_years=np.concatenate(
                           [self.playlist_years, np.zeros(n, self.playlist_years.dtype)]),
                       als=als, artist_ids=artist_ids)

    def check(self, catalog: Catalog) -> None:
        """Dimensions against the catalog; raises ValueError naming the array."""
        n, n_tags = catalog.n_songs, len(catalog.tags)
        for name, rows in (("song_artists", self.song_artists.n_rows),
                           ("song_genres", self.song_genres.n_rows),
                           ("playlist_years", len(self.playlist_years))):
            if rows != n:
                raise ValueError(f"{name} has {rows} rows for {n} songs")
        if len(self.artist_songs.indices) and self.artist_songs.item_bound > n:
            raise ValueError(f"artist_songs names song row {self.artist_songs.item_bound - 1}"
                             f" of {n}")
        if len(self.song_artists.indices) and (self.song_artists.item_bound
                                               > self.artist_songs.n_rows):
            raise ValueError(f"song_artists names artist {self.song_artists.item_bound - 1} "
                             f"of {self.artist_songs.n_rows}")
        if self.artist_ids is not None and len(self.artist_ids) != self.artist_songs.n_rows:
            raise ValueError(f"artist_ids has {len(self.artist_ids)} entries for "
                             f"{self.artist_songs.n_rows} artists")
        if self.als is not None:
            f = self.als.yty.shape[0]
            shapes = {"als_songs": (self.als.songs.shape, (n, f)),
                      "als_tags": (self.als.tags.shape, (n_tags, f)),
                      "als_words": (self.als.words.shape, (len(self.als.word_list), f)),
                      "als_yty": (self.als.yty.shape, (f, f))}
            for name, (got, want) in shapes.items():
                if got != want:
                    raise ValueError(f"{name} has shape {got}, expected {want}")
