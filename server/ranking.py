"""The learned second stage: candidates from every source, features, and the ONNX ranker.

Torch- and lightgbm-free (numpy, the numba kernels of :mod:`server.rankkernels`, ONNX
Runtime): the server runs strategy ``ranked`` with it, and ``trainer.rank`` builds its
training rows with the very same functions, so the features a model was trained on are the
features it is served.

Per question, each *source* proposes its best songs with a score:

* ``ae``: votes of the training playlists nearest to the summed seed codes (ae-neighbours);
* ``cf``: votes of the neighbour-CF playlists (playlist-knn);
* ``seed``: each seed's nearest songs by code (the ae-quota source), similarities summed;
* ``als``: ALS with the question folded in from its seeds, tags and title words (a small
  least-squares solve on the item factors stored in the bundle; implicit is not needed);
* ``tag`` / ``title``: the question tags' frequent songs, the title words' songs;
* ``popular``: the most popular songs;
* ``artist``: the most popular songs of the seeds' artists.

The union is scored by a LightGBM lambdarank model exported to ONNX (``ranker.onnx``), fed
one row of :data:`FEATURES` per candidate; the best ``n_songs`` win. Each song keeps, as its
reason, the source that ranked it highest. Tags are voted as in ``ae-hybrid``. The ranker's
features cannot describe a song no training playlist holds (added at run time, compacted):
as in ``ae-hybrid``, such songs join the ranked candidates afterwards
(``strategies.with_new_songs``): the seeds' nearest ones by code (``new_share``,
``new_power``; reason: the seed) and their artists' ones (``artist_share``,
``artist_power``; reason: REASON_ARTIST with the seed).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server import alsindex
from server import rankkernels as kernels
from server.bundle import RANKER_ARRAYS, RANKER_ONNX, Manifest, load_ranker_arrays
from server.catalog import Catalog, tokenize
from server.rankdata import (
    MISSING,
    MISSING_RANK,
    SOURCES,
    RankData,
    year_of,
)
from server.runtime import cpu_session
from server.search import VectorSearch
from server.strategies import (
    ARTIST_POWER,
    ARTIST_SHARE,
    NEW_POWER,
    NEW_SHARE,
    NEW_TAIL,
    REASON_ALS,
    REASON_ARTIST,
    REASON_PLAYLIST,
    REASON_POPULAR,
    REASON_SEED,
    REASON_TAG,
    REASON_TITLE,
    Answer,
    Query,
    Votes,
    _ae_playlists,
    _finish,
    _Picker,
    _title_songs,
    _title_tag_scores,
    _title_words,
    new_song_reason,
    with_new_songs,
)

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """The union of the sources' candidates for one question, with per-source columns."""

    rows: np.ndarray  # int64 song rows
    scores: np.ndarray  # float32 (n, n_sources): score / the source's best, 0 when absent
    ranks: np.ndarray  # float32 (n, n_sources): 0-based rank, MISSING_RANK when absent
    reason_sources: np.ndarray  # int64 (n, n_sources): each source's reason id, -1 none
    tag_scores: np.ndarray | None  # voted tag scores (ae-hybrid's), None: vote by songs
    user: np.ndarray | None  # the question's ALS factor (None: nothing to fold in)
    title_rows: np.ndarray | None  # songs the title's words name (ascending; None: no title)
    title_scores: np.ndarray | None  # their title-word scores (float32)
    known_words: int  # title words known to the catalog


_REASON_KIND = {"ae": REASON_PLAYLIST, "cf": REASON_PLAYLIST, "seed": REASON_SEED,
                "als": REASON_ALS, "tag": REASON_TAG, "title": REASON_TITLE,
                "popular": REASON_POPULAR, "artist": REASON_ARTIST}
_SOURCE_KINDS = [_REASON_KIND[s] for s in SOURCES]
_NO_ROWS = np.zeros(0, np.int64)


def _found(found: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]], name: str,
           top: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    found.append((SOURCES.index(name), top))


def generate(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch, data: RankData,
             query: Query, sizes: dict[str, int] | None = None) -> Candidates:
    """Every source's candidates for ``query`` merged into one :class:`Candidates`."""
    sizes = data.sizes if sizes is None else sizes
    seeds = query.seeds
    unseen = np.sort(seeds)  # what the sources must not propose
    found: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    tag_votes = Votes.empty()
    title_tags: np.ndarray | None = None
    if sizes.get("cf", 0) and catalog.cf is not None:
        cf = catalog.cf
        pls, sims = cf.neighbours(seeds, query.tags, query.title)
        weights = sims.astype(np.float64) ** cf.alpha
        votes = Votes.of(catalog.playlist_songs, pls, weights)
        tag_votes = Votes.of(catalog.playlist_tags, pls, weights)
        _found(found, "cf", kernels.top_unseen(votes.items, votes.scores, votes.source,
                                               unseen, sizes["cf"]))
    if sizes.get("ae", 0):
        pls, weights, title_tags = _ae_playlists(catalog, songs, playlists, query, 50, 2.0)
        votes = Votes.of(catalog.playlist_songs, pls, weights)
        ae_tags = Votes.of(catalog.playlist_tags, pls, weights)
        tag_votes = ae_tags if not found else tag_votes.blend(ae_tags, 0.25)
        _found(found, "ae", kernels.top_unseen(votes.items, votes.scores, votes.source,
                                               unseen, sizes["ae"]))
    if sizes.get("seed", 0) and len(seeds):
        depth = max(5, math.ceil(2 * sizes["seed"] / len(seeds)))
        rows, sims, offsets = _neighbour_lists(songs, seeds, depth)
        cand, total, src = kernels.seed_votes(rows, sims, offsets, seeds)
        _found(found, "seed", kernels.top_unseen(cand, total, src, unseen, sizes["seed"]))
    user = None
    if data.als is not None and (sizes.get("als", 0) or "als_dot" in data.features):
        user = data.als.fold_in(seeds, query.tags, query.title)
    if sizes.get("als", 0) and user is not None and data.als is not None:
        found.append((SOURCES.index("als"), _als_top(catalog, data, user, seeds,
                                                     sizes["als"])))
    if sizes.get("tag", 0) and len(query.tags):
        lists = catalog.tag_songs
        cand, total, src = kernels.tag_votes(lists.indptr, lists.indices, lists.weights,
                                             query.tags.astype(np.int64))
        _found(found, "tag", kernels.top_unseen(cand, total, src, unseen, sizes["tag"]))
    title_rows = title_scores = None
    known: list[int] = []
    if query.title:
        known = _title_words(catalog, query.title)
        title_rows, title_scores = _title_songs(catalog, known)
        if title_tags is None:
            title_tags = _title_tag_scores(catalog, known)
        if sizes.get("title", 0) and known:
            positive = title_scores > 0
            rows = title_rows[positive]
            _found(found, "title", kernels.top_unseen(
                rows, title_scores[positive].astype(np.float64),
                np.full(len(rows), -1, np.int64), unseen, sizes["title"]))
    if sizes.get("popular", 0):
        pool = kernels.first_unseen(catalog.popular_songs[: sizes["popular"] + len(seeds)],
                                    unseen, sizes["popular"])
        found.append((SOURCES.index("popular"),
                      (pool, catalog.popularity[pool].astype(np.float64),
                       np.full(len(pool), -1, np.int64))))
    if sizes.get("artist", 0) and len(seeds):
        lists = data.song_artists
        cand, total, src = kernels.artist_votes(
            lists.indptr, lists.indices, data.artist_songs.indptr, data.artist_songs.indices,
            catalog.popularity, seeds[seeds < data.n_songs])
        _found(found, "artist", kernels.top_unseen(cand, total, src, unseen,
                                                   sizes["artist"]))
    rows, scores, ranks, reasons = _merge(found)
    return Candidates(rows, scores, ranks, reasons, _tag_scores(catalog, tag_votes, title_tags),
                      user, title_rows, title_scores, len(known))


def _als_top(catalog: Catalog, data: RankData, user: np.ndarray, seeds: np.ndarray, n: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ALS source: the ``n`` trained songs (not seeds) of the best dot product with
    the folded-in ``user``, from the bundle's inner-product index when it has one, else by
    scanning every song's factors."""
    assert data.als is not None
    factors = data.als.songs
    got = None
    if data.als_index is not None:
        got = data.als_index.top(factors, user, n, seeds, catalog.popularity)
    if got is not None:
        top, best = got
    else:
        scores = factors @ user
        scores[seeds[seeds < len(scores)]] = -np.inf
        top = kernels.best_trained(scores, catalog.popularity[: len(scores)], n)
        best = scores[top]
    return top, best.astype(np.float64), np.full(len(top), -1, np.int64)


def _neighbour_lists(songs: VectorSearch, seeds: np.ndarray, depth: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lister = getattr(songs, "neighbour_lists", None)
    if lister is not None:
        got: tuple[np.ndarray, np.ndarray, np.ndarray] = lister(seeds, depth + 1,
                                                                allow_short=True)
        return got
    lists = songs.neighbours(seeds, depth + 1, allow_short=True)
    rows = np.concatenate([r for r, _ in lists]).astype(np.int64)
    sims = np.concatenate([s for _, s in lists]).astype(np.float64)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r, _ in lists])]).astype(np.int64)
    return rows, sims, offsets


def _merge(found: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Union of the sources' lists: rows, normalised scores, ranks, reason sources."""
    lengths = [len(r) for _, (r, _, _) in found]
    return kernels.merge(
        np.concatenate([r for _, (r, _, _) in found]) if found else np.zeros(0, np.int64),
        np.concatenate([s for _, (_, s, _) in found]) if found else np.zeros(0),
        np.concatenate([s for _, (_, _, s) in found]) if found else np.zeros(0, np.int64),
        np.cumsum([0, *lengths], dtype=np.int64),
        np.asarray([j for j, _ in found], dtype=np.int64), len(SOURCES), MISSING_RANK)


def _tag_scores(catalog: Catalog, tag_votes: Votes, title_tags: np.ndarray | None
                ) -> np.ndarray | None:
    """Tag scores as ae-hybrid votes them (None: let the chosen songs vote)."""
    score: np.ndarray = np.zeros(len(catalog.tags), dtype=np.float32)
    if len(tag_votes.items):
        score[tag_votes.items] = tag_votes.normalised().scores
    if title_tags is not None and title_tags.any():
        score = score + title_tags / max(float(title_tags.max()), 1e-9)
    return score if score.any() else None


@functools.lru_cache(maxsize=16)
def _layout(features: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                np.ndarray, np.ndarray]:
    """Where each feature goes in a row of ``features``: the source score and rank columns
    (and their sources), and the kernel's columns (-1: not wanted)."""
    at = {name: i for i, name in enumerate(features)}
    score = [(at[f"{s}_score"], j) for j, s in enumerate(SOURCES) if f"{s}_score" in at]
    rank = [(at[f"{s}_rank"], j) for j, s in enumerate(SOURCES) if f"{s}_rank" in at]
    return (np.asarray([c for c, _ in score], np.int64), np.asarray([j for _, j in score],
                                                                    np.int64),
            np.asarray([c for c, _ in rank], np.int64), np.asarray([j for _, j in rank],
                                                                   np.int64),
            np.asarray([at.get(name, -1) for name in kernels.KERNEL_FEATURES], np.int64))


def features(catalog: Catalog, songs: VectorSearch, data: RankData, query: Query,
             cand: Candidates) -> np.ndarray:
    """float32 (n candidates, len(data.features)): one row of features per candidate."""
    rows, user = cand.rows, cand.user
    n = len(rows)
    at = {name: i for i, name in enumerate(data.features)}
    out = np.empty((n, len(data.features)), dtype=np.float32)
    score_cols, score_src, rank_cols, rank_src, kernel_cols = _layout(data.features)
    out[:, score_cols] = cand.scores[:, score_src]
    out[:, rank_cols] = cand.ranks[:, rank_src]
    seeds = query.seeds
    sim_cols = [at.get(name, -1) for name in ("code_sim_mean", "code_sim_max", "code_sim_avg")]
    if max(sim_cols) >= 0:
        if len(seeds) and n:
            seed_vecs = songs.vectors(seeds[:50])  # enough for the shape of the seeds
            vecs = songs.vectors(rows)
            sims = vecs @ seed_vecs.T
            centre = seed_vecs.mean(axis=0)
            centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
            if sim_cols[0] >= 0:
                out[:, sim_cols[0]] = vecs @ centre
            if sim_cols[1] >= 0:
                out[:, sim_cols[1]] = sims.max(axis=1)
            if sim_cols[2] >= 0:
                out[:, sim_cols[2]] = sims.mean(axis=1)
        else:
            out[:, [c for c in sim_cols if c >= 0]] = MISSING
    if "als_dot" in at:
        if user is not None and data.als is not None:
            known = rows < len(data.als.songs)
            score = data.als.songs[np.where(known, rows, 0)] @ user
            out[:, at["als_dot"]] = np.where(known, score, MISSING)
        else:
            out[:, at["als_dot"]] = MISSING
    q_year = float(year_of(query.updt_date)) if query.updt_date else 0.0
    has_title = cand.title_rows is not None and cand.known_words > 0
    title_rows = cand.title_rows if cand.title_rows is not None else _NO_ROWS
    title_scores = (cand.title_scores if cand.title_scores is not None
                    else np.zeros(0, np.float32))
    kernels.fill_features(
        out, kernel_cols, rows, cand.ranks, MISSING_RANK, catalog.popularity,
        data.playlist_years, catalog.issue_dates, q_year, data.song_artists.indptr,
        data.song_artists.indices, data.song_genres.indptr, data.song_genres.indices, seeds,
        catalog.song_tags.indptr, catalog.song_tags.indices,
        query.tags.astype(np.int64), title_rows, title_scores,
        has_title, MISSING)
    for name, count in (("q_seeds", len(seeds)), ("q_tags", len(query.tags)),
                        ("q_title_words", cand.known_words)):
        if name in at:
            out[:, at[name]] = float(count)
    return out


def candidate_features(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                       data: RankData, query: Query) -> tuple[Candidates, np.ndarray]:
    """Candidates of ``query`` and their feature rows: what the ranker scores, in training
    (``trainer.rank``) and in serving alike."""
    cand = generate(catalog, songs, playlists, data, query)
    return cand, features(catalog, songs, data, query, cand)


class Ranker:
    """``ranker.onnx`` in ONNX Runtime, opened as the encoder is
    (:func:`server.runtime.cpu_session`)."""

    def __init__(self, path: Path, data: RankData, threads: int = 1) -> None:
        self.session = cpu_session(path, threads)
        inputs = self.session.get_inputs()
        width = inputs[0].shape[1] if len(inputs) == 1 and len(inputs[0].shape) == 2 else None
        if width != len(data.features):
            raise ValueError(f"{path.name} takes {width} features, {RANKER_ARRAYS} lists "
                             f"{len(data.features)}")
        self.input = inputs[0].name
        self.data = data

    def score(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float32)
        (out,) = self.session.run(None, {self.input: x.astype(np.float32)})[:1]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def answer(self, catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
               query: Query, new_share: float = NEW_SHARE, new_power: float = NEW_POWER,
               artist_share: float = ARTIST_SHARE, artist_power: float = ARTIST_POWER,
               new_tail: float = NEW_TAIL) -> Answer:
        """Strategy ``ranked``: candidates by learned score, blended with the new songs no
        playlist holds (the seeds' nearest ones and their artists' ones, with the options
        of ae-hybrid's :func:`~server.strategies.with_new_songs`; share 0: none), then
        popularity for the rest."""
        picker = _Picker(catalog, query, songs.count())
        if not len(query.seeds) and not len(query.tags) and not any(
                w in catalog.word_index for w in tokenize(query.title)):
            # Nothing known: the most popular songs and tags, as every strategy answers.
            return _finish(catalog, picker, query, catalog.tag_popularity.astype(np.float32))
        cand, x = candidate_features(catalog, songs, playlists, self.data, query)
        # A logistic squash keeps the order and puts every ranked song above the
        # popularity top-up (score 0), so an answer's scores always descend.
        scores = 1.0 / (1.0 + np.exp(-self.score(x).astype(np.float64)))
        # The ranker's features cannot describe a song added at run time (it learned on
        # bundle songs only; the seed source proposes added ones), so such songs are left
        # to the new-song blend, the way ae-hybrid blends them into its votes: the ranker
        # scored them as it scores a bundle song in no playlist, which cost the cold-start
        # demo score (docs/BENCHMARKS.md). A ranked candidate's source is its index in
        # ``cand``; a new song's is negative (strategies.new_song_reason).
        bundle = np.flatnonzero(cand.rows < catalog.n_songs)
        votes = with_new_songs(catalog, songs, query,
                               Votes(cand.rows[bundle], scores[bundle], bundle),
                               new_share, new_power, artist_share, artist_power, new_tail)
        # Most answers fill from their best few hundred: rank those first, then the rest.
        limit = query.n_songs + len(query.seeds)
        rows, values, sources = votes.ranked(limit)
        while True:
            chosen = np.flatnonzero(picker.allowed_many(rows))[: picker.room]
            rows, values, sources = rows[chosen], values[chosen], sources[chosen]
            # The reason: the source that ranked the song highest (first in SOURCES on a
            # tie); a new song's is its seed (by code or by artist).
            reasons = [new_song_reason(i) if i < 0 else ("", 0) for i in sources.tolist()]
            ranked = np.flatnonzero(sources >= 0)
            best = np.argmin(cand.ranks[sources[ranked]], axis=1)
            ids = cand.reason_sources[sources[ranked], best]
            for at, j, r in zip(ranked.tolist(), best.tolist(), ids.tolist(), strict=True):
                # Playlist reasons stay catalog positions: LiveModel turns them into ids.
                reasons[at] = (_SOURCE_KINDS[j], int(r))
            picker.take_all(rows.tolist(), values.tolist(), reasons)
            if picker.full or limit >= len(votes.items):
                break
            # Exhausted the first ranks (dropped songs): the rest, past those seen.
            rows, values, sources = (a[limit:] for a in votes.ranked())
            limit = len(votes.items)
        return _finish(catalog, picker, query, cand.tag_scores)


def load_ranker(root: Path, manifest: Manifest, catalog: Catalog, threads: int = 1) -> Ranker:
    """The bundle's ranker (with its ALS index when the manifest lists one);
    ValueError/OSError when its files do not fit the bundle, BundleError when the ALS
    index does not."""
    data = RankData.from_arrays(load_ranker_arrays(root))
    data.check(catalog)
    data.als_index = alsindex.load(root, manifest, None if data.als is None
                                   else data.als.songs, catalog.popularity)
    kernels.warm_up()
    return Ranker(root / RANKER_ONNX, data, threads)
