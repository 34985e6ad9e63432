"""The autoencoder strategies behind the recommender interface (``ae-quota``,
``ae-neighbours``), over a bundle or, during training, over in-memory codes."""

from __future__ import annotations

import numpy as np

from server.artists import ArtistIndex
from server.bundle import load_arrays
from server.catalog import Catalog
from server.engine import Engine
from server.ranking import Ranker
from server.search import DotSearch, VectorSearch
from server.strategies import Query, run_strategy
from trainer.dataset import Dataset
from trainer.recommenders.base import Question, Recommendation, Recommender

__all__ = ["AEHybrid", "AENeighbours", "AEQuota", "EmbeddingStrategy", "Ranked"]


class EmbeddingStrategy:
    """Maps questions (external ids, tag strings) to a strategy's row/index space."""

    def __init__(self, name: str, catalog: Catalog, songs: VectorSearch,
                 playlists: VectorSearch, drop_future: bool = False,
                 ranker: Ranker | None = None, artists: ArtistIndex | None = None,
                 **options: float) -> None:
        self.name, self.catalog = name, catalog
        self.ranker = ranker
        self.artists = artists  # the new songs by artist (a bundle's, as the server's)
        self.songs, self.playlists = songs, playlists
        self.drop_future = drop_future
        self.options = options

    def query(self, q: Question, n_songs: int, n_tags: int) -> Query:
        rows = [self.catalog.row_of_id.get(int(s), -1) for s in q.songs.tolist()]
        tags = [self.catalog.tag_index.get(t, -1) for t in q.tags]
        return Query(np.asarray([r for r in rows if r >= 0], dtype=np.int64),
                     np.asarray([t for t in tags if t >= 0], dtype=np.int32),
                     q.title, q.updt_date, n_songs, n_tags, self.drop_future)

    def recommend(self, q: Question, n_songs: int = 100, n_tags: int = 10) -> Recommendation:
        answer = run_strategy(self.name, self.catalog, self.songs, self.playlists,
                              self.query(q, n_songs, n_tags), self.ranker, self.artists,
                              **self.options)
        return Recommendation(self.catalog.song_ids[answer.songs], answer.song_scores,
                              [self.catalog.tags[t] for t in answer.tags.tolist()],
                              answer.tag_scores)


class _BundleStrategy(Recommender):
    strategy = ""

    def __init__(self, bundle: str, drop_future: bool = False, verify: bool = True,
                 playlist_ef: int = 0) -> None:
        self.bundle, self.drop_future, self.verify = bundle, drop_future, verify
        self.playlist_ef = int(playlist_ef)  # 0: the bundle's (as the server's --playlist-ef)
        self.options: dict[str, float] = {}
        self._impl: EmbeddingStrategy | None = None

    def fit(self, data: Dataset) -> Recommender:
        """Loads the bundle; the model was trained by ``trainer.train`` on ``data``."""
        engine = Engine.load(self.bundle, verify=self.verify,
                             playlist_ef=self.playlist_ef or None)
        if self.strategy == "ranked" and engine.ranker is None:
            raise ValueError(f"{self.bundle} has no ranker: add one with python -m "
                             f"trainer.rank --data SPLIT --bundle {self.bundle}")
        self._impl = EmbeddingStrategy(self.strategy, engine.catalog, engine.songs,
                                       engine.playlists, self.drop_future, engine.ranker,
                                       engine.artists, **self.options)
        return self

    def recommend(self, question: Question, n_songs: int = 100,
                  n_tags: int = 10) -> Recommendation:
        if self._impl is None:
            raise RuntimeError(f"{self.name}: call fit() first")
        return self._impl.recommend(question, n_songs, n_tags)


class AEQuota(_BundleStrategy):
    """The write-up: per-seed quotas of nearest songs, tags by voting. ``metric="dot"``
    ranks neighbours by dot product of the raw codes instead of cosine (the write-up's
    comparison; exact search, so for evaluation-sized catalogues only)."""

    name = "ae-quota"
    strategy = "ae-quota"

    def __init__(self, bundle: str, metric: str = "cosine", drop_future: bool = False,
                 verify: bool = True, playlist_ef: int = 0) -> None:
        if metric not in ("cosine", "dot"):
            raise ValueError(f"metric {metric!r}: choose cosine or dot")
        super().__init__(bundle, drop_future, verify, playlist_ef)
        self.metric = metric

    def fit(self, data: Dataset) -> Recommender:
        super().fit(data)
        if self.metric == "dot" and self._impl is not None:
            norms = load_arrays(self.bundle)["code_norms"]
            unit = self._impl.songs.vectors(np.arange(len(norms)))
            self._impl.songs = DotSearch(unit * norms[:, None])
        return self


class _NewSongsBlend(_BundleStrategy):
    """A strategy that blends in songs no training playlist holds
    (``strategies.with_new_songs``); ``new_songs=False`` turns both of its sources off
    (``new_share`` and ``artist_share`` 0), to show what they add."""

    def __init__(self, bundle: str, drop_future: bool = False, verify: bool = True,
                 playlist_ef: int = 0, new_songs: bool = True) -> None:
        super().__init__(bundle, drop_future, verify, playlist_ef)
        if not new_songs:
            self.options.update(new_share=0.0, artist_share=0.0)


class AENeighbours(_NewSongsBlend):
    """Summed seed codes -> nearest training playlists -> their songs and tags."""

    name = "ae-neighbours"
    strategy = "ae-neighbours"


class AEHybrid(_NewSongsBlend):
    """Neighbour CF blended with ae-neighbours; ``ae_weight=0`` is neighbour CF alone."""

    name = "ae-hybrid"
    strategy = "ae-hybrid"

    def __init__(self, bundle: str, ae_weight: float = 0.25, drop_future: bool = False,
                 verify: bool = True, playlist_ef: int = 0, new_songs: bool = True) -> None:
        super().__init__(bundle, drop_future, verify, playlist_ef, new_songs)
        self.options["ae_weight"] = ae_weight


class Ranked(_NewSongsBlend):
    """The learned second stage: every source's candidates re-ranked by the bundle's
    LightGBM ranker in ONNX Runtime (server.ranking), exactly as the server runs it."""

    name = "ranked"
    strategy = "ranked"
