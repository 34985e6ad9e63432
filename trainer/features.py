"""Builds the song x column matrix the autoencoder learns from (songs as "users").

Rows are songs; columns are the groups of :mod:`server.columns`: the training playlists a
song is in, the tags of those playlists, its major and detailed genres and, as options to
measure, its artists and issue-year bucket. Each group has a minimum count (how many songs
must carry a column for it to exist) and can be switched off.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from server.columns import ColumnSpace, year_bucket
from trainer.dataset import CSR, Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConfig:
    """Which column groups to build, and the minimum number of songs per column."""

    groups: tuple[str, ...] = ("playlists", "tags", "genres", "detail_genres")
    min_count: dict[str, int] = field(default_factory=lambda: {
        "playlists": 2, "tags": 2, "genres": 1, "detail_genres": 1, "artists": 2, "years": 1})
    year_width: int = 5

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["groups"] = list(self.groups)
        return out


@dataclass(frozen=True)
class SongMatrix:
    """Binary song x column matrix (CSR, float32) over every song row of the dataset."""

    matrix: sp.csr_matrix
    space: ColumnSpace

    @property
    def trainable_rows(self) -> np.ndarray:
        """Songs that are in at least one training playlist column (the training rows)."""
        if not self.space.has("playlists"):
            return np.nonzero(np.diff(self.matrix.indptr) > 0)[0]
        lo = self.space.offset("playlists")
        hi = lo + self.space.sizes()["playlists"]
        sub = self.matrix[:, lo:hi]
        return np.nonzero(np.diff(sub.indptr) > 0)[0]


def _csr_matrix(csr: CSR, n_cols: int) -> sp.csr_matrix:
    data = np.ones(len(csr.values), dtype=np.float32)
    return sp.csr_matrix((data, csr.values.astype(np.int64), csr.indptr),
                         shape=(csr.n_rows, n_cols))


def _keep_frequent(block: sp.csr_matrix, keys: list[str], min_count: int
                   ) -> tuple[sp.csr_matrix, list[str]]:
    counts = np.asarray((block > 0).sum(axis=0)).ravel()
    keep = np.nonzero(counts >= min_count)[0]
    return block[:, keep].tocsr(), [keys[i] for i in keep]


def song_playlist_matrix(data: Dataset) -> sp.csr_matrix:
    """songs x training playlists, 1 where the song is in the playlist."""
    train = data.train
    pl_by_song = _csr_matrix(train.songs, len(data.songs)).T.tocsr()
    pl_by_song.data[:] = 1.0  # a song listed twice in a playlist is still one membership
    return pl_by_song


def build_song_matrix(data: Dataset, config: FeatureConfig | None = None) -> SongMatrix:
    """The song x column matrix and its vocabulary for ``data.train``."""
    config = config or FeatureConfig()
    songs = data.songs
    n = len(songs)
    blocks: list[sp.csr_matrix] = []
    groups: list[tuple[str, list[str]]] = []
    song_pl = song_playlist_matrix(data)
    for group in config.groups:
        min_count = config.min_count.get(group, 1)
        if group == "playlists":
            block, keys = song_pl, [str(i) for i in data.train.ids.tolist()]
        elif group == "tags":
            pl_tags = _csr_matrix(data.train.tags, len(data.tags))
            block = (song_pl @ pl_tags).tocsr()
            block.data[:] = 1.0
            keys = list(data.tags.items)
        elif group in ("genres", "detail_genres"):
            csr = songs.genres if group == "genres" else songs.detail_genres
            block = _csr_matrix(csr, len(data.genres.codes))
            block.sum_duplicates()
            block.data[:] = 1.0
            keys = list(data.genres.codes.items)
        elif group == "artists":
            artist_ids, inverse = np.unique(songs.artists.values, return_inverse=True)
            block = _csr_matrix(CSR(songs.artists.indptr, inverse.astype(np.int32)),
                                len(artist_ids))
            block.sum_duplicates()
            block.data[:] = 1.0
            keys = [str(a) for a in artist_ids.tolist()]
        elif group == "years":
            labels = [year_bucket(int(d), config.year_width) for d in songs.issue_dates]
            keys = sorted({lab for lab in labels if lab is not None})
            where = {k: i for i, k in enumerate(keys)}
            rows = [i for i, lab in enumerate(labels) if lab is not None]
            cols = [where[labels[i]] for i in rows]  # type: ignore[index]
            block = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                  shape=(n, len(keys)))
        else:
            raise ValueError(f"unknown column group {group!r}")
        block, keys = _keep_frequent(block, keys, min_count)
        blocks.append(block)
        groups.append((group, keys))
        log.info("column group %s: %d columns (min count %d)", group, len(keys), min_count)
    matrix = sp.hstack(blocks, format="csr", dtype=np.float32)
    matrix.sort_indices()
    return SongMatrix(matrix, ColumnSpace(groups, config.year_width))
