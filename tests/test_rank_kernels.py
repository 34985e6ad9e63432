"""The ranker's compiled candidates and features (server/rankkernels.py) against the plain
numpy definitions they replaced, kept here as the reference: same candidates, same
per-source columns, same feature rows, on many questions of the tiny bundle."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from server import rankkernels
from server.catalog import Catalog, RowLists, gather_rows, tokenize
from server.engine import Engine
from server.rankdata import MISSING, MISSING_RANK, SOURCES, RankData, year_of
from server.ranking import _neighbour_lists, _tag_scores, candidate_features
from server.search import VectorSearch
from server.strategies import RANKED, Query, Votes, _ae_playlists, run_strategy
from server.voting import best_first

# ------------------------------------------------------------------ the numpy reference


def _ref_title_scores(catalog: Catalog, title: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    song_scores = np.zeros(catalog.n_songs, dtype=np.float32)
    tag_scores = np.zeros(len(catalog.tags), dtype=np.float32)
    known = [catalog.word_index[w] for w in tokenize(title) if w in catalog.word_index]
    for w in known:
        song_scores[catalog.word_songs.row(w)] += catalog.word_songs.row_weights(w)
        tag_scores[catalog.word_tags.row(w)] += catalog.word_tags.row_weights(w)
    return song_scores, tag_scores, known


def _top(rows: np.ndarray, scores: np.ndarray, sources: np.ndarray | None, n: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = best_first(scores, n)
    src = np.full(len(order), -1, np.int64) if sources is None else sources[order]
    return rows[order].astype(np.int64), scores[order].astype(np.float64), src


def _drop_seeds(rows: np.ndarray, scores: np.ndarray, sources: np.ndarray | None,
                seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    keep = ~np.isin(rows, seeds)
    return rows[keep], scores[keep], None if sources is None else sources[keep]


def _ref_generate(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                  data: RankData, query: Query) -> dict:
    sizes = data.sizes
    seeds = query.seeds
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    tag_votes = Votes.empty()
    title_tags = None
    if sizes.get("cf", 0) and catalog.cf is not None:
        pls, sims = catalog.cf.neighbours(seeds, query.tags, query.title)
        weights = sims.astype(np.float64) ** catalog.cf.alpha
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
        is_best = sims >= best[inverse]
        src = np.full(len(cand), -1, np.int64)
        src[inverse[is_best][::-1]] = seeds[owner[is_best][::-1]]
        found["seed"] = _top(*_drop_seeds(cand, total, src, seeds), sizes["seed"])
    user = None
    if data.als is not None:
        user = data.als.fold_in(seeds, query.tags, query.title)
    if sizes.get("als", 0) and user is not None and data.als is not None:
        scores = data.als.songs @ user
        scores[catalog.popularity[: len(scores)] == 0] = -np.inf
        scores[seeds[seeds < len(scores)]] = -np.inf
        top = best_first(scores, sizes["als"])
        top = top[np.isfinite(scores[top])]
        found["als"] = (top.astype(np.int64), scores[top].astype(np.float64),
                        np.full(len(top), -1, np.int64))
    if sizes.get("tag", 0) and len(query.tags):
        owner, rows, weights = gather_rows(catalog.tag_songs, query.tags.astype(np.int64))
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
        title_songs, t_tags, known = _ref_title_scores(catalog, query.title)
        known_words = len(known)
        title_tags = t_tags if title_tags is None else title_tags
        if sizes.get("title", 0) and known:
            positive = np.flatnonzero(title_songs > 0)
            found["title"] = _top(*_drop_seeds(positive, title_songs[positive], None, seeds),
                                  sizes["title"])
    if sizes.get("popular", 0):
        pool = catalog.popular_songs[: sizes["popular"] + len(seeds)]
        pool = pool[~np.isin(pool, seeds)][: sizes["popular"]]
        found["popular"] = (pool.astype(np.int64), catalog.popularity[pool].astype(np.float64),
                            np.full(len(pool), -1, np.int64))
    if sizes.get("artist", 0) and len(seeds):
        inside = seeds[seeds < data.n_songs]
        owner, artists, _ = gather_rows(data.song_artists, inside)
        if len(artists):
            uniq, first, counts = np.unique(artists, return_index=True, return_counts=True)
            a_owner, rows, _ = gather_rows(data.artist_songs, uniq.astype(np.int64))
            pop = catalog.popularity[rows].astype(np.float64)
            a_score = counts[a_owner].astype(np.float64) + pop / (1.0 + pop.max(initial=0.0))
            cand, inverse = np.unique(rows, return_inverse=True)
            a_total = np.zeros(len(cand))
            np.maximum.at(a_total, inverse, a_score)
            src = np.full(len(cand), -1, np.int64)
            src[inverse] = inside[owner[first[a_owner]]]
            found["artist"] = _top(*_drop_seeds(cand.astype(np.int64), a_total, src, seeds),
                                   sizes["artist"])
    n_src = len(SOURCES)
    rows = (np.unique(np.concatenate([r for r, _, _ in found.values()])) if found
            else np.zeros(0, np.int64))
    scores = np.zeros((len(rows), n_src), np.float32)
    ranks = np.full((len(rows), n_src), MISSING_RANK, np.float32)
    reasons = np.full((len(rows), n_src), -1, np.int64)
    for name, (r, s, src) in found.items():
        j = SOURCES.index(name)
        pos = np.searchsorted(rows, r)
        top_score = float(np.max(s)) if len(s) else 0.0
        scores[pos, j] = s / top_score if top_score > 0 else s
        ranks[pos, j] = np.arange(len(r), dtype=np.float32)
        reasons[pos, j] = src
    return {"rows": rows.astype(np.int64), "scores": scores, "ranks": ranks,
            "reasons": reasons, "tag_scores": _tag_scores(catalog, tag_votes, title_tags),
            "user": user, "title_songs": title_songs, "known_words": known_words}


def _ref_overlap(lists: RowLists, seeds: np.ndarray, cand: np.ndarray) -> np.ndarray:
    seeds = seeds[seeds < lists.n_rows]
    out = np.zeros(len(cand))
    if len(seeds) == 0:
        return np.full(len(cand), MISSING)
    s_owner, s_items, _ = gather_rows(lists, seeds)
    if len(s_items) == 0:
        return out
    pairs = np.unique(s_items.astype(np.int64) * (len(seeds) + 1) + s_owner)
    items, counts = np.unique(pairs // (len(seeds) + 1), return_counts=True)
    inside = np.flatnonzero(cand < lists.n_rows)
    c_owner, c_items, _ = gather_rows(lists, cand[inside])
    pos = np.minimum(np.searchsorted(items, c_items), len(items) - 1)
    hit = items[pos] == c_items
    best = np.zeros(len(inside))
    if hit.any():
        np.maximum.at(best, c_owner[hit], counts[pos[hit]].astype(np.float64))
    out[inside] = best / len(seeds)
    return out


def _ref_features(catalog: Catalog, songs: VectorSearch, data: RankData, query: Query,
                  cand: dict) -> np.ndarray:
    rows, user = cand["rows"], cand["user"]
    title_songs, known_words = cand["title_songs"], cand["known_words"]
    n = len(rows)
    cols: dict[str, np.ndarray] = {}
    for j, s in enumerate(SOURCES):
        cols[f"{s}_score"] = cand["scores"][:, j]
        cols[f"{s}_rank"] = cand["ranks"][:, j]
    cols["n_sources"] = (cand["ranks"] < MISSING_RANK).sum(axis=1).astype(np.float32)
    seeds = query.seeds
    if len(seeds) and n:
        seed_vecs = songs.vectors(seeds[:50])
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
    if user is not None and data.als is not None:
        als_rows = np.where(rows < len(data.als.songs), rows, 0)
        cols["als_dot"] = np.where(rows < len(data.als.songs), data.als.songs[als_rows] @ user,
                                   MISSING)
    else:
        cols["als_dot"] = np.full(n, MISSING)
    cols["log_popularity"] = np.log1p(np.where(inside, catalog.popularity[safe], 0))
    q_year = float(year_of(query.updt_date)) if query.updt_date else 0.0
    pl_years = np.where(inside, data.playlist_years[np.minimum(safe, data.n_songs - 1)], 0.0)
    cols["years_from_playlists"] = np.where((pl_years > 0) & (q_year > 0), q_year - pl_years,
                                            MISSING)
    issued = year_of(np.where(inside, catalog.issue_dates[safe], 0))
    cols["years_since_issue"] = np.where((issued > 0) & (q_year > 0), q_year - issued, MISSING)
    cols["artist_overlap"] = _ref_overlap(data.song_artists, seeds, rows)
    cols["genre_overlap"] = _ref_overlap(data.song_genres, seeds, rows)
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


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:
    return Engine.load(tiny_bundle)


def _questions(engine: Engine, n: int) -> list[Query]:
    """Demo-like questions: a few to many seeds (popular and rare), tags, titles (known
    and unknown words), release dates; and the cold starts (tags only, title only)."""
    rng = np.random.default_rng(13)
    catalog = engine.catalog
    n_songs, n_tags = catalog.n_songs, len(catalog.tags)
    words = list(catalog.word_index)
    out = []
    for i in range(n):
        kind = i % 6
        n_seeds = 0 if kind in (4, 5) else int(rng.choice([1, 2, 3, 5, 10, 25, 60]))
        seeds = np.unique(rng.choice(n_songs, n_seeds, replace=False)).astype(np.int64)
        tags = (rng.choice(n_tags, int(rng.integers(1, 4)), replace=False).astype(np.int32)
                if kind in (1, 3, 4) else np.zeros(0, np.int32))
        title = (" ".join(rng.choice(words, int(rng.integers(1, 3))).tolist() + ["zzunknown"])
                 if kind in (2, 3, 5) and words else "")
        updt = int(rng.choice([0, 20120315, 20200101, 20231231]))
        out.append(Query(seeds, tags, title, updt))
    return out


def test_candidates_and_features_match_the_numpy_definitions(engine: Engine) -> None:
    ranker = engine.ranker
    assert ranker is not None
    catalog, songs, playlists = engine.catalog, engine.songs, engine.playlists
    # The reference scans every song's ALS factors; the index's answers are checked
    # against that scan in tests/test_als_index.py.
    data = replace(ranker.data, als_index=None)
    compared = 0
    for query in _questions(engine, 240):
        cand, x = candidate_features(catalog, songs, playlists, data, query)
        want = _ref_generate(catalog, songs, playlists, data, query)
        np.testing.assert_array_equal(cand.rows, want["rows"])
        np.testing.assert_array_equal(cand.scores, want["scores"])
        np.testing.assert_array_equal(cand.ranks, want["ranks"])
        np.testing.assert_array_equal(cand.reason_sources, want["reasons"])
        assert cand.known_words == want["known_words"]
        for got, ref in ((cand.tag_scores, want["tag_scores"]), (cand.user, want["user"])):
            assert (got is None) == (ref is None)
            if ref is not None:
                np.testing.assert_array_equal(got, ref)
        ref_x = _ref_features(catalog, songs, data, query, want)
        assert x.shape == ref_x.shape and x.dtype == np.float32
        np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-6)
        compared += len(x)
    assert compared > 10_000


def test_features_keep_only_the_ranker_columns(engine: Engine) -> None:
    """A ranker trained on a subset of the features (an ablation) gets those columns, in
    its order, with the values of the full set."""
    ranker = engine.ranker
    assert ranker is not None
    full = ranker.data
    subset = tuple(reversed([f for f in full.features if not f.startswith(("als", "code"))]))
    data = replace(full, features=subset)
    for query in _questions(engine, 24):
        _, x_full = candidate_features(engine.catalog, engine.songs, engine.playlists, full,
                                       query)
        _, x = candidate_features(engine.catalog, engine.songs, engine.playlists, data, query)
        cols = [full.features.index(f) for f in subset]
        np.testing.assert_array_equal(x, x_full[:, cols])


def test_ranked_answers_keep_seeds_and_future_songs_out(engine: Engine) -> None:
    catalog = engine.catalog
    for query in _questions(engine, 36):
        query = replace(query, n_songs=300, updt_date=20150101, drop_future=True)
        answer = run_strategy(RANKED, catalog, engine.songs, engine.playlists, query,
                              engine.ranker)
        rows = answer.songs.tolist()
        assert len(rows) == len(set(rows)) == 300
        assert not set(rows) & set(query.seeds.tolist())
        inside = answer.songs[answer.songs < catalog.n_songs]
        assert (catalog.issue_dates[inside] <= 20150101).all()
        assert answer.song_scores.tolist() == sorted(answer.song_scores.tolist(), reverse=True)


def test_kernels_break_ties_by_position_and_first_source() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        items = np.unique(rng.integers(0, 60, n)).astype(np.int64)
        scores = rng.integers(0, 4, len(items)).astype(np.float64)  # many ties
        source = rng.integers(0, 9, len(items)).astype(np.int64)
        seeds = np.unique(rng.integers(0, 60, 5)).astype(np.int64)
        k = int(rng.integers(1, 30))
        got = rankkernels.top_unseen(items, scores, source, seeds, k)
        want = _top(*_drop_seeds(items, scores, source, seeds), k)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        # Neighbour lists with repeated songs and equal similarities across seeds.
        lengths = rng.integers(0, 6, 4)
        rows = rng.integers(0, 12, int(lengths.sum())).astype(np.int64)
        sims = rng.choice(np.asarray([-0.5, 0.25, 0.5, 1.0], np.float32), len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        seeds4 = np.asarray([100, 101, 102, 103], np.int64)
        cand, total, src = rankkernels.seed_votes(rows, sims, offsets, seeds4)
        owner = np.repeat(np.arange(4), lengths)
        want_cand, inverse = np.unique(rows, return_inverse=True)
        best = np.full(len(want_cand), -np.inf)
        np.maximum.at(best, inverse, sims)
        first = [seeds4[owner[np.flatnonzero((inverse == c) & (sims >= best[c]))[0]]]
                 for c in range(len(want_cand))]
        np.testing.assert_array_equal(cand, want_cand)
        np.testing.assert_array_equal(total, np.bincount(inverse, np.maximum(sims, 0.0),
                                                         len(want_cand)))
        np.testing.assert_array_equal(src, np.asarray(first, np.int64))


def test_float16_codes_widen_to_the_float32_numpy_casts() -> None:
    """Every float16 bit pattern (subnormals, infinities, NaNs included), read-only as the
    bundle's memory-mapped codes are, in any row order."""
    from server.voting import rows_float32

    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    codes = codes.reshape(256, 256)
    codes.flags.writeable = False
    slots = np.random.default_rng(3).permutation(256)[:200]
    got = rows_float32(codes, slots)
    assert got.dtype == np.float32 and got.shape == (200, 256)
    np.testing.assert_array_equal(got.view(np.uint32),
                                  codes[slots].astype(np.float32).view(np.uint32))
