"""New songs by artist: the served songs' artists, and each artist's songs in no training playlist.

The artist new-song source of the continuation strategies (``strategies._artist_songs``):
a question whose seeds' artists have new songs (added at run time, compacted into the
bundle, or in the bundle but in no training playlist) gets those songs as candidates. Bundle
songs' artists come from the ranker's data (``ranker.npz``: ``song_artists`` as artist
indices, ``artist_ids``); added songs' from their metadata (AddSongs, the song store's
replay). Numpy only; the :class:`~server.live.LiveModel` adds songs under its write lock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.catalog import RowLists, gather_rows

log = logging.getLogger(__name__)

# New songs kept per artist (the newest): a prolific artist must not flood a question.
ARTIST_DEPTH = 100
# Seeds whose artists are looked up (the first ones): enough for the shape of a question.
MAX_SEEDS = 100


@dataclass(frozen=True)
class ArtistSongs:
    """The seeds' artists' new songs, as (song, seed) pairs: each pair is a new song and a
    seed sharing one of its artists, with that artist's popularity."""

    rows: np.ndarray  # int64 new song rows
    seeds: np.ndarray  # int64 the seed row of each pair
    artist_popularity: np.ndarray  # float64 training-playlist entries of the shared artist

    @staticmethod
    def empty() -> ArtistSongs:
        return ArtistSongs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))


class ArtistIndex:
    """Artists of bundle songs (rows ``0..n_bundle-1``, when the bundle knows them) and of
    songs added at run time (rows from ``n_bundle``), and each artist's new songs."""

    def __init__(self, n_bundle: int, song_artists: RowLists | None,
                 artist_ids: np.ndarray | None, popularity: np.ndarray) -> None:
        self.n_bundle = n_bundle
        self._position: dict[int, int] = {}  # artist id -> its position
        # Training-playlist entries of the bundle's artists' songs, per position; artists
        # first named by added songs (positions past these) have none.
        self._popularity: np.ndarray = np.zeros(0)
        self._song_artists: RowLists | None = None  # bundle row -> artist positions
        self._new = RowLists(np.zeros(1, np.int64), np.zeros(0, np.int32),
                             np.zeros(0, np.float32))  # position -> bundle new songs
        if song_artists is not None and artist_ids is not None:
            if song_artists.n_rows != n_bundle:
                raise ValueError(f"song_artists has {song_artists.n_rows} rows for "
                                 f"{n_bundle} songs")
            self._position = {int(a): i for i, a in enumerate(artist_ids.tolist())}
            owner = np.repeat(np.arange(n_bundle), np.diff(song_artists.indptr))
            artists = song_artists.indices.astype(np.int64)
            pop = popularity[:n_bundle].astype(np.float64)
            self._popularity = np.bincount(artists, weights=pop[owner],
                                           minlength=len(artist_ids))
            self._song_artists = song_artists
            # Each artist's songs in no training playlist, newest (highest row) first.
            new = pop[owner] == 0
            order = np.lexsort((-owner[new], artists[new]))
            by_artist, rows = artists[new][order], owner[new][order]
            rank = np.arange(len(rows)) - np.searchsorted(by_artist, by_artist)
            keep = rank < ARTIST_DEPTH
            indptr = np.zeros(len(artist_ids) + 1, np.int64)
            np.cumsum(np.bincount(by_artist[keep], minlength=len(artist_ids)),
                      out=indptr[1:])
            self._new = RowLists(indptr, rows[keep].astype(np.int32),
                                 np.ones(int(keep.sum()), np.float32))
        self._added: list[tuple[int, ...]] = []  # per added row: artist positions
        # position -> its newest ARTIST_DEPTH added rows (oldest first), replaced per add()
        # for the artists it touched (queries read, never build them: they hold a read lock).
        self._added_recent: dict[int, np.ndarray] = {}

    @property
    def has_new(self) -> bool:
        """Whether any artist has a new song."""
        return bool(len(self._new.indices) or self._added_recent)

    @property
    def knows_bundle(self) -> bool:
        """Whether the bundle's songs' artists are known (ranker data with artist ids)."""
        return self._song_artists is not None

    def add(self, rows: Sequence[int], artists: Sequence[Sequence[int]]) -> None:
        """Songs added at run time, in row order (the next rows), with their artist ids."""
        taken: dict[int, list[int]] = {}  # position -> this call's rows
        try:
            for row, song in zip(rows, artists, strict=True):
                if row != self.n_bundle + len(self._added):
                    raise ValueError(f"added song row {row}, expected "
                                     f"{self.n_bundle + len(self._added)}")
                positions = []
                for a in dict.fromkeys(int(a) for a in song):
                    pos = self._position.setdefault(a, len(self._position))
                    positions.append(pos)
                    taken.setdefault(pos, []).append(row)
                self._added.append(tuple(positions))
        finally:  # the songs taken before a refused one stay consistent
            for pos, new in taken.items():
                old = self._added_recent.get(pos, np.zeros(0, np.int64))
                self._added_recent[pos] = np.concatenate(
                    [old, np.asarray(new, np.int64)])[-ARTIST_DEPTH:]

    def _artists(self, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(seed position, artist position) pairs of the seeds."""
        owners: list[np.ndarray] = []
        found: list[np.ndarray] = []
        inside = np.flatnonzero(seeds < self.n_bundle)
        if self._song_artists is not None and len(inside):
            owner, artists, _ = gather_rows(self._song_artists, seeds[inside])
            owners.append(inside[owner])
            found.append(artists.astype(np.int64))
        for i in np.flatnonzero(seeds >= self.n_bundle).tolist():
            offset = int(seeds[i]) - self.n_bundle
            if offset < len(self._added):
                positions = self._added[offset]
                owners.append(np.full(len(positions), i, np.int64))
                found.append(np.asarray(positions, np.int64))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(owners).astype(np.int64), np.concatenate(found)

    def songs_of(self, seeds: np.ndarray) -> ArtistSongs:
        """The new songs of the seeds' artists, paired with each seed sharing the artist
        (the seeds themselves left out)."""
        seeds = np.asarray(seeds, np.int64)[:MAX_SEEDS]
        owner, artists = self._artists(seeds)
        if not len(artists):
            return ArtistSongs.empty()
        rows_parts: list[np.ndarray] = []
        seed_parts: list[np.ndarray] = []
        pop_parts: list[np.ndarray] = []
        known = len(self._popularity)
        popularity = np.where(artists < known, self._popularity[np.minimum(
            artists, max(known - 1, 0))] if known else 0.0, 0.0)
        inside = artists < self._new.n_rows
        if inside.any():
            a_owner, rows, _ = gather_rows(self._new, artists[inside])
            rows_parts.append(rows.astype(np.int64))
            seed_parts.append(seeds[owner[inside][a_owner]])
            pop_parts.append(popularity[inside][a_owner])
        if self._added_recent:
            recent = [self._added_recent.get(a) for a in artists.tolist()]
            lengths = np.asarray([0 if r is None else len(r) for r in recent], np.int64)
            if lengths.any():
                rows_parts.append(np.concatenate([r for r in recent if r is not None]))
                seed_parts.append(np.repeat(seeds[owner], lengths))
                pop_parts.append(np.repeat(popularity, lengths))
        if not rows_parts:
            return ArtistSongs.empty()
        rows = np.concatenate(rows_parts)
        keep = ~np.isin(rows, seeds)
        return ArtistSongs(rows[keep], np.concatenate(seed_parts)[keep],
                           np.concatenate(pop_parts)[keep])
