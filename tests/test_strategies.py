"""Playlist-continuation strategies on a real tiny bundle: the write-up's rules, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.engine import Engine
from server.strategies import (
    REASON_PLAYLIST,
    REASON_POPULAR,
    REASON_SEED,
    REASON_TAG,
    STRATEGIES,
    Query,
    quotas,
    run_strategy,
    vote_tags,
)


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:
    return Engine.load(tiny_bundle)


def _ask(engine: Engine, strategy: str, seeds=(), tags=(), title="", **kw) -> object:  # type: ignore[no-untyped-def]
    query = Query(np.asarray(seeds, dtype=np.int64), np.asarray(tags, dtype=np.int32), title,
                  **kw)
    return run_strategy(strategy, engine.catalog, engine.songs, engine.playlists, query,
                        engine.ranker)


def test_quotas_split_evenly_larger_first() -> None:
    assert quotas(100, 3) == [34, 33, 33]
    assert quotas(100, 1) == [100]
    assert quotas(10, 4) == [3, 3, 2, 2]
    assert sum(quotas(100, 7)) == 100
    assert quotas(2, 5) == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_answers_are_unique_and_exclude_seeds(engine: Engine, strategy: str) -> None:
    seeds = np.argsort(-engine.catalog.popularity)[[3, 10, 40]]
    answer = _ask(engine, strategy, seeds)
    songs = answer.songs.tolist()
    assert len(songs) == 100 and len(set(songs)) == 100
    assert not set(songs) & set(seeds.tolist())
    assert len(answer.tags) == 10 and len(set(answer.tags.tolist())) == 10
    assert len(answer.reasons) == 100


def test_ae_quota_fills_each_seed_share_from_its_own_neighbours(engine: Engine) -> None:
    seeds = np.argsort(-engine.catalog.popularity)[[0, 5, 9]]
    answer = _ask(engine, "ae-quota", seeds)
    by_seed: dict[int, list[int]] = {}
    for row, (kind, source) in zip(answer.songs.tolist(), answer.reasons, strict=True):
        assert kind == REASON_SEED
        by_seed.setdefault(source, []).append(row)
    assert [len(by_seed[int(s)]) for s in seeds] == [34, 33, 33]
    # Each seed's share is that seed's nearest songs (in order), minus seeds and repeats.
    for seed in seeds.tolist():
        labels, _ = engine.songs.search(engine.songs.vectors(np.asarray([seed])), 200)
        nearest = [r for r in labels[0].tolist() if r not in set(seeds.tolist())]
        picked = by_seed[seed]
        assert all(r in nearest for r in picked)


def test_tags_are_voted_by_recommended_songs(engine: Engine) -> None:
    seeds = np.argsort(-engine.catalog.popularity)[[1, 2]]
    answer = _ask(engine, "ae-quota", seeds, tags=[0])
    expected, _ = vote_tags(engine.catalog, answer.songs.tolist(), np.asarray([0]), 10)
    assert answer.tags.tolist() == expected.tolist()
    assert 0 not in answer.tags.tolist()  # question tags never come back
    votes = np.zeros(len(engine.catalog.tags))
    for row in answer.songs.tolist():
        votes[engine.catalog.song_tags.row(row)] += 1
    assert answer.tag_scores.tolist() == [votes[t] for t in answer.tags.tolist()]


def test_tags_only_question_takes_each_tags_frequent_songs(engine: Engine) -> None:
    tag = int(np.argmax(engine.catalog.tag_popularity))
    answer = _ask(engine, "ae-quota", tags=[tag])
    assert all(kind == REASON_TAG for kind, _ in answer.reasons[:10])
    top = engine.catalog.tag_songs.row(tag)[:10].tolist()
    assert answer.songs[:10].tolist() == top


def test_title_only_question_uses_learned_title_words(engine: Engine) -> None:
    word = engine.catalog.words[0]
    for strategy in STRATEGIES:
        answer = _ask(engine, strategy, title=f"{word.upper()} !!")
        assert not all(kind == REASON_POPULAR for kind, _ in answer.reasons)
        assert len(set(answer.songs.tolist())) == 100


def test_empty_question_gets_most_popular(engine: Engine) -> None:
    for strategy in STRATEGIES:
        answer = _ask(engine, strategy)
        assert answer.songs.tolist() == engine.catalog.popular_songs[:100].tolist()
        assert answer.tags.tolist() == engine.catalog.popular_tags[:10].tolist()


def test_drop_future_removes_songs_issued_after_update(engine: Engine) -> None:
    seeds = np.argsort(-engine.catalog.popularity)[[0, 1]]
    dates = engine.catalog.issue_dates
    cutoff = int(np.median(dates[dates > 0]))
    for strategy in STRATEGIES:
        answer = _ask(engine, strategy, seeds, updt_date=cutoff, drop_future=True)
        issued = dates[answer.songs]
        assert (issued <= cutoff).all()


def test_ae_neighbours_reasons_name_training_playlists(engine: Engine) -> None:
    seeds = np.argsort(-engine.catalog.popularity)[[2, 4, 6]]
    answer = _ask(engine, "ae-neighbours", seeds)
    assert answer.strategy == "ae-neighbours"
    kinds = [kind for kind, _ in answer.reasons]
    assert kinds[0] == REASON_PLAYLIST
    # Strategies speak in catalog positions (the served model turns them into ids).
    for (kind, source), row in zip(answer.reasons, answer.songs.tolist(), strict=True):
        if kind == REASON_PLAYLIST:
            assert 0 <= source < len(engine.catalog.playlist_ids)
            assert row in engine.catalog.playlist_songs.row(source).tolist()


def test_hybrid_without_autoencoder_is_playlist_knn(engine: Engine, tiny_split: Path) -> None:
    """ae-hybrid with ae_weight=0 must rank exactly as the playlist-knn baseline."""
    from trainer.dataset import load_dataset
    from trainer.recommenders.base import questions_from
    from trainer.recommenders.knn import PlaylistKNN

    data = load_dataset(tiny_split)
    knn = PlaylistKNN().fit(data)
    questions = questions_from(data.playlists["val_questions"], data)
    checked = 0
    for q in questions[:40]:
        if len(q.songs) == 0:
            continue
        rows = [engine.catalog.row_of_id[int(s)] for s in q.songs]
        tags = [engine.catalog.tag_index[t] for t in q.tags if t in engine.catalog.tag_index]
        query = Query(np.asarray(rows), np.asarray(tags, dtype=np.int32), q.title)
        answer = run_strategy("ae-hybrid", engine.catalog, engine.songs, engine.playlists,
                              query, ae_weight=0.0)
        expected = knn.recommend(q)
        n = int((answer.song_scores > 0.01).sum())  # the CF-voted part (not the fill-up)
        got = engine.catalog.song_ids[answer.songs[:n]].tolist()
        assert got[:20] == expected.songs[:20].tolist() or n < 20
        checked += 1
    assert checked >= 10


def _top_tags_by_full_sort(popularity: np.ndarray, scores: np.ndarray, exclude: np.ndarray,
                           n_tags: int) -> list[int]:
    """The definition: order every tag by (score desc, popularity desc, index)."""
    scores = scores.copy()
    scores[exclude] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -popularity, -scores))
    return [int(t) for t in order if np.isfinite(scores[t])][:n_tags]


def test_top_tags_match_a_full_sort_with_ties_and_exclusions(engine: Engine) -> None:
    from server.strategies import _top_tags

    catalog = engine.catalog
    rng = np.random.default_rng(3)
    n = len(catalog.tags)
    for trial in range(300):
        kind = trial % 3
        if kind == 0:  # few voted tags, the rest tied at zero
            scores = np.zeros(n)
            voted = rng.choice(n, int(rng.integers(0, 8)), replace=False)
            scores[voted] = rng.integers(1, 4, len(voted))
        elif kind == 1:  # many ties among small integers
            scores = rng.integers(0, 3, n).astype(np.float64)
        else:
            scores = rng.random(n)
        exclude = rng.choice(n, int(rng.integers(0, 4)), replace=False)
        n_tags = int(rng.integers(1, 15))
        got, _ = _top_tags(catalog, scores.astype(np.float32), exclude, n_tags)
        want = _top_tags_by_full_sort(catalog.tag_popularity, scores.astype(np.float32),
                                      exclude, n_tags)
        assert got.tolist() == want
        assert not set(got.tolist()) & set(exclude.tolist())


def _votes_reference(lists, playlists, weights):  # type: ignore[no-untyped-def]
    """The definitions, by full sorts: total weight per item; source = the playlist with
    the largest vote (the earlier one on a tie)."""
    from server.catalog import gather_rows

    owner, items, _ = gather_rows(lists, playlists)
    w = weights[owner]
    cand, inverse = np.unique(items, return_inverse=True)
    scores = np.bincount(inverse, weights=w, minlength=len(cand))
    order = np.argsort(-w, kind="stable")
    _, first = np.unique(inverse[order], return_index=True)
    return cand, scores, playlists[owner[order[first]]]


def test_votes_blends_and_rankings_match_full_sorts(engine: Engine) -> None:
    from server.strategies import Votes

    catalog = engine.catalog
    rng = np.random.default_rng(11)
    n_pl = catalog.playlist_songs.n_rows
    for trial in range(120):
        pls = rng.choice(n_pl, int(rng.integers(1, 40)), replace=False)
        weights = np.round(rng.random(len(pls)), 1)  # ties on purpose
        if trial % 2:
            weights = np.sort(weights)[::-1].copy()  # best first, as callers pass them
        votes = Votes.of(catalog.playlist_songs, pls, weights)
        items, scores, source = _votes_reference(catalog.playlist_songs, pls, weights)
        assert votes.items.tolist() == items.tolist()
        np.testing.assert_allclose(votes.scores, scores)
        assert votes.source.tolist() == source.tolist()
        other_pls = rng.choice(n_pl, int(rng.integers(1, 40)), replace=False)
        other = Votes.of(catalog.playlist_songs, other_pls,
                         np.sort(np.round(rng.random(len(other_pls)), 1))[::-1].copy())
        blended = votes.blend(other, 0.25)
        a, b = votes.normalised(), other.normalised()
        all_items = np.concatenate([a.items, b.items])
        all_scores = np.concatenate([a.scores, 0.25 * b.scores])
        all_sources = np.concatenate([a.source, b.source])
        cand, inverse = np.unique(all_items, return_inverse=True)
        order = np.argsort(-all_scores, kind="stable")
        _, first = np.unique(inverse[order], return_index=True)
        assert blended.items.tolist() == cand.tolist()
        np.testing.assert_allclose(blended.scores, np.bincount(inverse, weights=all_scores))
        assert blended.source.tolist() == all_sources[order[first]].tolist()
        full = blended.ranked()
        full_order = np.argsort(-blended.scores, kind="stable")
        assert full[0].tolist() == blended.items[full_order].tolist()
        limit = int(rng.integers(1, len(blended.items) + 2))
        part = blended.ranked(limit)
        assert part[0].tolist() == full[0][:limit].tolist()
        assert part[2].tolist() == full[2][:limit].tolist()


def test_row_index_maps_ids_to_rows_like_a_dict() -> None:
    from server.catalog import RowIndex

    ids = np.asarray([50, 7, 900, -3, 12])
    index = RowIndex(ids)
    as_dict = {int(s): r for r, s in enumerate(ids.tolist())}
    asked = [7, 8, 900, -3, 50, 2**62, -(2**62), 12, 7]
    assert index.rows(asked).tolist() == [as_dict.get(s, -1) for s in asked]
    assert index.get(900) == 2 and index.get(901) is None and index.get(901, -1) == -1
    assert index[12] == 4 and 12 in index and 13 not in index and len(index) == 5
    with pytest.raises(KeyError):
        index[13]
    empty = RowIndex(np.zeros(0, dtype=np.int64))
    assert empty.rows([1, 2]).tolist() == [-1, -1] and empty.get(1) is None


def test_best_first_is_the_head_of_a_full_sort() -> None:
    from server.voting import best_first

    rng = np.random.default_rng(4)
    for _ in range(2000):
        m = int(rng.integers(1, 40))
        scores = rng.integers(0, 4, m).astype(np.float64)  # ties on purpose
        scores[rng.random(m) < 0.3] = -np.inf  # excluded items
        n = int(rng.integers(0, m + 2))
        want = np.lexsort((np.arange(m), -scores))[:n]
        assert best_first(scores, n).tolist() == want.tolist()
    assert best_first(np.asarray([1.0, 3.0, 3.0]), None).tolist() == [1, 2, 0]


def test_bundle_recommenders_take_the_playlist_ef(tiny_bundle: Path, tiny_split: Path) -> None:
    """``--set playlist_ef=N`` reaches the playlist index (the server's --playlist-ef)."""
    from trainer.dataset import load_dataset
    from trainer.recommenders.registry import make_recommender

    data = load_dataset(tiny_split)
    for name in ("ae-neighbours", "ae-quota", "ae-hybrid"):
        model = make_recommender(name, bundle=str(tiny_bundle), playlist_ef=17).fit(data)
        assert model._impl is not None  # type: ignore[attr-defined]
        assert model._impl.playlists.index.ef == 17  # type: ignore[attr-defined]
    default = make_recommender("ae-neighbours", bundle=str(tiny_bundle)).fit(data)
    manifest_ef = Engine.load(tiny_bundle).manifest.playlist_index.ef
    assert default._impl.playlists.index.ef == manifest_ef  # type: ignore[attr-defined]


def test_tally_matches_the_numpy_definition() -> None:
    """The compiled vote tally: candidates ascending, votes summed in order (bit-equal to
    np.bincount), source = the playlist of the largest vote, the earliest on a tie."""
    from server.voting import tally

    rng = np.random.default_rng(11)
    for trial in range(200):
        n_rows, n_items = int(rng.integers(1, 30)), int(rng.integers(1, 60))
        lengths = rng.integers(0, 12, n_rows)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = rng.integers(0, n_items, int(indptr[-1])).astype(np.int32)  # repeats too
        playlists = rng.choice(n_rows, int(rng.integers(0, n_rows + 1)), replace=False)
        weights = rng.choice([0.25, 0.5, 1.0, 0.1 * trial], len(playlists))  # ties, any order
        items, scores, source = tally(indptr, indices, n_items, playlists, weights)
        owner = np.repeat(np.arange(len(playlists)), lengths[playlists])
        flat = np.concatenate([indices[indptr[p]:indptr[p + 1]] for p in playlists] + [
            np.zeros(0, np.int32)])
        want_items, inverse = np.unique(flat, return_inverse=True)
        assert items.tolist() == want_items.tolist()
        np.testing.assert_array_equal(scores, np.bincount(inverse, weights=weights[owner],
                                                          minlength=len(want_items)))
        for i, item in enumerate(want_items.tolist()):
            votes = [(weights[o], o) for o, x in zip(owner, flat, strict=True) if x == item]
            best = min(votes, key=lambda v: (-v[0], v[1]))
            assert source[i] == playlists[best[1]]
    # The per-thread scratch is left clean: a second, unrelated tally is unaffected.
    again = tally(np.asarray([0, 2]), np.asarray([3, 1]), 60, np.asarray([0]),
                  np.asarray([2.0]))
    assert again[0].tolist() == [1, 3] and again[1].tolist() == [2.0, 2.0]


def test_best_positions_is_the_head_of_a_stable_sort() -> None:
    from server.voting import best_positions

    rng = np.random.default_rng(12)
    for _ in range(300):
        size = int(rng.integers(0, 80))
        scores = rng.choice([-np.inf, 0.0, 0.5, 1.0, 2.0], size) if rng.random() < 0.5 \
            else rng.normal(size=size)
        n = int(rng.integers(0, size + 3))
        want = np.argsort(-scores, kind="stable")[:n]
        assert best_positions(scores, n).tolist() == want.tolist()
        assert best_positions(scores.astype(np.float32), n).tolist() == \
            np.argsort(-scores.astype(np.float32), kind="stable")[:n].tolist()


def test_tally_scratch_is_bounded_per_thread() -> None:
    """Scratch arrays of item counts no longer used (a model reloaded with another size) are
    dropped, the most recently used kept."""
    from server import voting

    indptr, indices = np.asarray([0, 1]), np.asarray([0])
    for n_items in range(1, 12):
        voting.tally(indptr, indices, n_items, np.asarray([0]), np.asarray([1.0]))
    assert list(voting._scratch.arrays) == [8, 9, 10, 11]
    voting.tally(indptr, indices, 9, np.asarray([0]), np.asarray([1.0]))
    assert list(voting._scratch.arrays) == [8, 10, 11, 9]


def test_best_of_groups_is_maximum_at_with_the_first_on_a_tie() -> None:
    from server.voting import best_of_groups

    rng = np.random.default_rng(5)
    group = rng.integers(0, 40, 600)
    values = np.round(rng.normal(0.5, 0.4, 600), 1)  # many ties, some negative
    also = rng.random(600)
    best, first, most = best_of_groups(group, 45, values, also)
    want = np.zeros(45)
    np.maximum.at(want, group, np.maximum(values, 0.0))
    want_most = np.zeros(45)
    np.maximum.at(want_most, group, also)
    assert np.array_equal(best, want) and np.array_equal(most, want_most)
    for g in range(45):
        members = np.flatnonzero(group == g)
        if len(members) == 0:
            assert first[g] == -1
        else:  # the first member that reaches the group's best (negatives count as 0)
            assert first[g] == members[np.maximum(values[members], 0.0) >= want[g]][0]
