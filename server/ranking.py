"""The learned second stage: candidates from every source, features, and the ONNX ranker.

Torch- and lightgbm-free (numpy + ONNX Runtime): the server runs strategy ``ranked`` with it,
and ``trainer.rank`` builds its training rows with the very same functions, so the features
a model was trained on are the features it is served.

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

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.bundle import RANKER_ARRAYS, RANKER_ONNX, load_ranker_arrays
from server.catalog import Catalog, RowLists, gather_rows, tokenize
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
    _title_scores,
    new_song_reason,
    with_new_songs,
)
from server.voting import best_first

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
    title_songs: np.ndarray | None  # title-word score of every song (None: no title)
    known_words: int  # title words known to the catalog


_REASON_KIND = {"ae": REASON_PLAYLIST, "cf": REASON_PLAYLIST, "seed": REASON_SEED,
                "als": REASON_ALS, "tag": REASON_TAG, "title": REASON_TITLE,
                "popular": REASON_POPULAR, "artist": REASON_ARTIST}


def _top(rows: np.ndarray, scores: np.ndarray, sources: np.ndarray | None, n: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = best_first(scores, n)
    src = np.full(len(order), -1, np.int64) if sources is None else sources[order]
    return rows[order].astype(np.int64), scores[order].astype(np.float64), src


def _drop_seeds(rows: np.ndarray, scores: np.ndarray, sources: np.ndarray | None,
                seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    keep = ~np.isin(rows, seeds)
    return rows[keep], scores[keep], None if sources is None else sources[keep]


def generate(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch, data: RankData,
             query: Query, sizes: dict[str, int] | None = None) -> Candidates:
    """Every source's candidates for ``query`` merged into one :class:`Candidates`."""
    sizes = data.sizes if sizes is None else sizes
    seeds = query.seeds
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    tag_votes = Votes.empty()
    title_tags: np.ndarray | None = None
    if sizes.get("cf", 0) and catalog.cf is not None:
        cf = catalog.cf
        pls, sims = cf.neighbours(seeds, query.tags, query.title)
        weights = sims.astype(np.float64) ** cf.alpha
        votes = Votes.of(catalog.playlist_songs, pls, weights)
        tag_votes = Votes.of(catalog.playlist_tags, pls, weights)
        found["cf"] = _top(*_drop_seeds(votes.items, votes.scores, votes.source, seeds),
                           sizes["cf"])
    if sizes.get("ae", 0):
        pls, weights, title_tags = _ae_playlists(catalog, songs, playlists, query, 50, 2.0)
        votes = Votes.of(catalog.playlist_songs, pls, weights)
        ae_tags = Votes.of(catalog.playlist_tags, pls, weights)
        tag_votes = ae_tags if "cf" not in found else tag_votes.blend(ae_tags, 0.25)
        found["ae"] = _top(*_drop_seeds(votes.items, votes.scores, votes.source, seeds),
                           sizes["ae"])
    if sizes.get("seed", 0) and len(seeds):
        depth = max(5, math.ceil(2 * sizes["seed"] / len(seeds)))
        rows, sims, offsets = _neighbour_lists(songs, seeds, depth)
        owner = np.repeat(np.arange(len(seeds)), np.diff(offsets))
        cand, inverse = np.unique(rows, return_inverse=True)
        total = np.bincount(inverse, weights=np.maximum(sims, 0.0), minlength=len(cand))
        best = np.full(len(cand), -np.inf)
        np.maximum.at(best, inverse, sims)
        # The seed of each candidate's largest similarity (its reason).
        is_best = sims >= best[inverse]
        src = np.full(len(cand), -1, np.int64)
        src[inverse[is_best][::-1]] = seeds[owner[is_best][::-1]]
        found["seed"] = _top(*_drop_seeds(cand, total, src, seeds), sizes["seed"])
    user = None
    if data.als is not None and (sizes.get("als", 0) or "als_dot" in data.features):
        user = data.als.fold_in(seeds, query.tags, query.title)
    if sizes.get("als", 0) and user is not None and data.als is not None:
        scores = data.als.songs @ user
        scores[catalog.popularity[: len(scores)] == 0] = -np.inf  # untrained factors
        scores[seeds[seeds < len(scores)]] = -np.inf
        top = best_first(scores, sizes["als"])
        top = top[np.isfinite(scores[top])]
        found["als"] = (top.astype(np.int64), scores[top].astype(np.float64),
                        np.full(len(top), -1, np.int64))
    if sizes.get("tag", 0) and len(query.tags):
        owner, rows, weights = gather_rows(catalog.tag_songs, query.tags.astype(np.int64))
        # Each tag's counts over its best, so every tag weighs the same.
        firsts = catalog.tag_songs.indptr[query.tags.astype(np.int64)]
        tops = catalog.tag_songs.weights[np.minimum(firsts, len(catalog.tag_songs.weights)
                                                    - 1)] if len(weights) else weights
        norm = weights / np.maximum(tops[owner], 1e-9)
        cand, inverse = np.unique(rows, return_inverse=True)
        total = np.bincount(inverse, weights=norm, minlength=len(cand))
        src = np.zeros(len(cand), np.int64)
        src[inverse[::-1]] = query.tags[owner[::-1]]
        found["tag"] = _top(*_drop_seeds(cand.astype(np.int64), total, src, seeds),
                            sizes["tag"])
    title_songs = None
    known_words = 0
    if query.title:
        title_songs, t_tags, known = _title_scores(catalog, query.title)
        known_words = len(known)
        title_tags = t_tags if title_tags is None else title_tags
        if sizes.get("title", 0) and known:
            positive = np.flatnonzero(title_songs > 0)
            found["title"] = _top(*_drop_seeds(positive, title_songs[positive], None, seeds),
                                  sizes["title"])
    if sizes.get("popular", 0):
        pool = catalog.popular_songs[: sizes["popular"] + len(seeds)]
        pool = pool[~np.isin(pool, seeds)][: sizes["popular"]]
        found["popular"] = (pool.astype(np.int64),
                            catalog.popularity[pool].astype(np.float64),
                            np.full(len(pool), -1, np.int64))
    if sizes.get("artist", 0) and len(seeds):
        inside = seeds[seeds < data.n_songs]
        owner, artists, _ = gather_rows(data.song_artists, inside)
        if len(artists):
            uniq, first, counts = np.unique(artists, return_index=True, return_counts=True)
            a_owner, rows, _ = gather_rows(data.artist_songs, uniq.astype(np.int64))
            pop = catalog.popularity[rows].astype(np.float64)
            # Seeds sharing the artist first, then the song's popularity.
            a_score = counts[a_owner].astype(np.float64) + pop / (1.0 + pop.max(initial=0.0))
            cand, inverse = np.unique(rows, return_inverse=True)
            a_total = np.zeros(len(cand))
            np.maximum.at(a_total, inverse, a_score)
            src = np.full(len(cand), -1, np.int64)
            src[inverse] = inside[owner[first[a_owner]]]
            found["artist"] = _top(*_drop_seeds(cand.astype(np.int64), a_total, src, seeds),
                                   sizes["artist"])
    out = _merge(found)
    out_tags = _tag_scores(catalog, tag_votes, title_tags)
    return Candidates(out[0], out[1], out[2], out[3], out_tags, user, title_songs, known_words)


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


def _merge(found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Union of the sources' lists: rows, normalised scores, ranks, reason sources."""
    n_src = len(SOURCES)
    if not found:
        return (np.zeros(0, np.int64), np.zeros((0, n_src), np.float32),
                np.zeros((0, n_src), np.float32), np.zeros((0, n_src), np.int64))
    rows = np.unique(np.concatenate([r for r, _, _ in found.values()]))
    scores = np.zeros((len(rows), n_src), np.float32)
    ranks = np.full((len(rows), n_src), MISSING_RANK, np.float32)
    reasons = np.full((len(rows), n_src), -1, np.int64)
    for name, (r, s, src) in found.items():
        j = SOURCES.index(name)
        pos = np.searchsorted(rows, r)
        top = float(np.max(s)) if len(s) else 0.0
        scores[pos, j] = s / top if top > 0 else s
        ranks[pos, j] = np.arange(len(r), dtype=np.float32)
        reasons[pos, j] = src
    return rows.astype(np.int64), scores, ranks, reasons


def _tag_scores(catalog: Catalog, tag_votes: Votes, title_tags: np.ndarray | None
                ) -> np.ndarray | None:
    """Tag scores as ae-hybrid votes them (None: let the chosen songs vote)."""
    score: np.ndarray = np.zeros(len(catalog.tags), dtype=np.float32)
    if len(tag_votes.items):
        score[tag_votes.items] = tag_votes.normalised().scores
    if title_tags is not None and title_tags.any():
        score = score + title_tags / max(float(title_tags.max()), 1e-9)
    return score if score.any() else None


def _per_candidate_max(owner: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    if len(owner):
        np.maximum.at(out, owner, values)
    return out


def _overlap(lists: RowLists, seeds: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per candidate: the share of seeds that share an item (artist, genre) with it."""
    seeds = seeds[seeds < lists.n_rows]
    out = np.zeros(len(cand))
    if len(seeds) == 0:
        return np.full(len(cand), MISSING)
    s_owner, s_items, _ = gather_rows(lists, seeds)
    if len(s_items) == 0:
        return out
    # How many distinct seeds hold each item.
    pairs = np.unique(s_items.astype(np.int64) * (len(seeds) + 1) + s_owner)
    items, counts = np.unique(pairs // (len(seeds) + 1), return_counts=True)
    inside = np.flatnonzero(cand < lists.n_rows)
    c_owner, c_items, _ = gather_rows(lists, cand[inside])
    pos = np.minimum(np.searchsorted(items, c_items), len(items) - 1)
    hit = items[pos] == c_items
    out[inside] = _per_candidate_max(c_owner[hit], counts[pos[hit]].astype(np.float64),
                                     len(inside)) / len(seeds)
    return out


def features(catalog: Catalog, songs: VectorSearch, data: RankData, query: Query,
             cand: Candidates) -> np.ndarray:
    """float32 (n candidates, len(data.features)): one row of features per candidate."""
    rows, user = cand.rows, cand.user
    title_songs, known_words = cand.title_songs, cand.known_words
    n = len(rows)
    cols: dict[str, np.ndarray] = {}
    for j, s in enumerate(SOURCES):
        cols[f"{s}_score"] = cand.scores[:, j]
        cols[f"{s}_rank"] = cand.ranks[:, j]
    cols["n_sources"] = (cand.ranks < MISSING_RANK).sum(axis=1).astype(np.float32)
    wanted = set(data.features)
    seeds = query.seeds
    if wanted & {"code_sim_mean", "code_sim_max", "code_sim_avg"}:
        if len(seeds) and n:
            seed_vecs = songs.vectors(seeds[:50])  # enough for the shape of the seeds
            vecs = songs.vectors(rows)
            sims = vecs @ seed_vecs.T
            centre = seed_vecs.mean(axis=0)
            centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
            cols["code_sim_mean"] = vecs @ centre
            cols["code_sim_max"] = sims.max(axis=1)
            cols["code_sim_avg"] = sims.mean(axis=1)
        else:
            for name in ("code_sim_mean", "code_sim_max", "code_sim_avg"):
                cols[name] = np.full(n, MISSING)
    inside = rows < catalog.n_songs
    safe = np.where(inside, rows, 0)
    if "als_dot" in wanted:
        if user is not None and data.als is not None:
            als_rows = np.where(rows < len(data.als.songs), rows, 0)
            score = data.als.songs[als_rows] @ user
            cols["als_dot"] = np.where(rows < len(data.als.songs), score, MISSING)
        else:
            cols["als_dot"] = np.full(n, MISSING)
    cols["log_popularity"] = np.log1p(np.where(inside, catalog.popularity[safe], 0))
    q_year = float(year_of(query.updt_date)) if query.updt_date else 0.0
    pl_years = np.where(inside, data.playlist_years[np.minimum(safe, data.n_songs - 1)], 0.0)
    cols["years_from_playlists"] = np.where((pl_years > 0) & (q_year > 0), q_year - pl_years,
                                            MISSING)
    issued = year_of(np.where(inside, catalog.issue_dates[safe], 0))
    cols["years_since_issue"] = np.where((issued > 0) & (q_year > 0), q_year - issued, MISSING)
    cols["artist_overlap"] = _overlap(data.song_artists, seeds, rows)
    cols["genre_overlap"] = _overlap(data.song_genres, seeds, rows)
    if len(query.tags):
        ok = np.flatnonzero(rows < catalog.song_tags.n_rows)
        owner, tags, _ = gather_rows(catalog.song_tags, rows[ok])
        hits = np.bincount(owner[np.isin(tags, query.tags)], minlength=len(ok))
        share = np.zeros(n)
        share[ok] = hits / len(query.tags)
        cols["tag_cooccurrence"] = share
    else:
        cols["tag_cooccurrence"] = np.full(n, MISSING)
    if title_songs is not None and known_words:
        cols["title_match"] = np.where(inside, title_songs[safe], 0.0)
    else:
        cols["title_match"] = np.full(n, MISSING)
    cols["q_seeds"] = np.full(n, float(len(seeds)))
    cols["q_tags"] = np.full(n, float(len(query.tags)))
    cols["q_title_words"] = np.full(n, float(known_words))
    out = np.empty((n, len(data.features)), dtype=np.float32)
    for i, name in enumerate(data.features):
        out[:, i] = cols[name]
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
               artist_share: float = ARTIST_SHARE, artist_power: float = ARTIST_POWER
               ) -> Answer:
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
        # ``cand``; a new song's is negative.
        bundle = np.flatnonzero(cand.rows < catalog.n_songs)
        votes = with_new_songs(catalog, songs, query,
                               Votes(cand.rows[bundle], scores[bundle], bundle),
                               new_share, new_power, artist_share, artist_power)
        order = np.lexsort((votes.items, -votes.scores))
        # The reason: the source that ranked the song highest (first in SOURCES on a tie).
        best_src = np.argmin(cand.ranks, axis=1)
        for row, score, i in zip(votes.items[order].tolist(), votes.scores[order].tolist(),
                                 votes.source[order].tolist(), strict=True):
            if picker.full:
                break
            if i < 0:
                picker.take(row, score, new_song_reason(i))
                continue
            j = int(best_src[i])
            # Playlist reasons stay catalog positions: LiveModel turns them into ids.
            picker.take(row, score, (_REASON_KIND[SOURCES[j]], int(cand.reason_sources[i, j])))
        return _finish(catalog, picker, query, cand.tag_scores)


def load_ranker(root: Path, catalog: Catalog, threads: int = 1) -> Ranker:
    """The bundle's ranker; ValueError/OSError when its files do not fit the bundle."""
    data = RankData.from_arrays(load_ranker_arrays(root))
    data.check(catalog)
    return Ranker(root / RANKER_ONNX, data, threads)
