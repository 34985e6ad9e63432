"""Compiled kernels (numba, GIL released) of the second stage: sources, union, features.

Why: strategy ``ranked`` spent most of its CPU outside the ranker in some sixty small numpy
calls per question (``np.unique``, ``np.isin``, ``np.maximum.at``, CSR gathers, one merge
per source), each cheap but each holding the GIL. Here each step is one loop. The results
are those of the numpy definitions they replaced, down to the order of every sum and the
choice of every tie (``tests/test_rank_kernels.py`` holds them to those definitions).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from server.voting import best_positions, csr_items

# Columns the feature kernel writes: positions in its ``columns`` argument.
LOG_POPULARITY = 0
YEARS_FROM_PLAYLISTS = 1
YEARS_SINCE_ISSUE = 2
ARTIST_OVERLAP = 3
GENRE_OVERLAP = 4
TAG_COOCCURRENCE = 5
TITLE_MATCH = 6
N_SOURCES = 7
KERNEL_FEATURES = ("log_popularity", "years_from_playlists", "years_since_issue",
                   "artist_overlap", "genre_overlap", "tag_cooccurrence", "title_match",
                   "n_sources")


@njit(nogil=True, cache=True)
def _inside(sorted_values: np.ndarray, value: int) -> bool:  # pragma: no cover (compiled)
    i = np.searchsorted(sorted_values, value)
    return bool(i < sorted_values.shape[0] and sorted_values[i] == value)


@njit(nogil=True, cache=True)
def top_unseen(items: np.ndarray, scores: np.ndarray, source: np.ndarray,
               seeds_sorted: np.ndarray, n: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """The ``n`` best of ``items`` that are not seeds, by score then position: their rows,
    scores (float64) and sources."""
    keep = np.empty(items.shape[0], dtype=np.int64)
    m = 0
    for i in range(items.shape[0]):
        if not _inside(seeds_sorted, items[i]):
            keep[m] = i
            m += 1
    kept = np.empty(m, dtype=np.float64)
    for j in range(m):
        kept[j] = scores[keep[j]]
    order = best_positions(kept, n)
    rows = np.empty(order.shape[0], dtype=np.int64)
    out = np.empty(order.shape[0], dtype=np.float64)
    src = np.empty(order.shape[0], dtype=np.int64)
    for j in range(order.shape[0]):
        i = keep[order[j]]
        rows[j] = items[i]
        out[j] = scores[i]
        src[j] = source[i]
    return rows, out, src


@njit(nogil=True, cache=True)
def first_unseen(rows: np.ndarray, seeds_sorted: np.ndarray, n: int
                 ) -> np.ndarray:  # pragma: no cover (compiled)
    """The first ``n`` of ``rows`` that are not seeds, in order."""
    out = np.empty(min(n, rows.shape[0]), dtype=np.int64)
    m = 0
    for i in range(rows.shape[0]):
        if m == out.shape[0]:
            break
        if not _inside(seeds_sorted, rows[i]):
            out[m] = rows[i]
            m += 1
    return out[:m]


@njit(nogil=True, cache=True)
def seed_votes(rows: np.ndarray, sims: np.ndarray, offsets: np.ndarray, seeds: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """The seeds' neighbour lists (``rows[offsets[i]:offsets[i + 1]]`` for seed i) as
    candidates (ascending), their summed positive similarities, and the seed of each one's
    largest similarity (the first such list on a tie)."""
    cand = np.unique(rows)
    total = np.zeros(cand.shape[0], dtype=np.float64)
    best = np.full(cand.shape[0], -np.inf)
    src = np.full(cand.shape[0], -1, dtype=np.int64)
    at = np.searchsorted(cand, rows)
    for i in range(rows.shape[0]):
        c = at[i]
        total[c] += np.float64(max(sims[i], np.float32(0.0)))
        if sims[i] > best[c]:
            best[c] = sims[i]
    for s in range(offsets.shape[0] - 1):
        for i in range(offsets[s], offsets[s + 1]):
            c = at[i]
            if src[c] < 0 and sims[i] >= best[c]:
                src[c] = seeds[s]
    return cand, total, src


@njit(nogil=True, cache=True)
def tag_votes(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray,
              tags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """The question tags' songs (ascending), each tag's counts over its best (so every tag
    weighs the same) summed, and the first tag that named each song."""
    rows = csr_items(indptr, indices, tags)
    cand = np.unique(rows)
    total = np.zeros(cand.shape[0], dtype=np.float64)
    src = np.full(cand.shape[0], -1, dtype=np.int64)
    k = 0
    for t in range(tags.shape[0]):
        start, end = indptr[tags[t]], indptr[tags[t] + 1]
        top = np.float32(1.0)
        if end > start:
            top = max(weights[start], np.float32(1e-9))
        for j in range(start, end):
            c = np.searchsorted(cand, rows[k])
            total[c] += np.float64(weights[j] / top)
            if src[c] < 0:
                src[c] = tags[t]
            k += 1
    return cand, total, src


@njit(nogil=True, cache=True)
def artist_votes(song_indptr: np.ndarray, song_artists: np.ndarray, artist_indptr: np.ndarray,
                 artist_songs: np.ndarray, popularity: np.ndarray, seeds: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """The songs of the seeds' artists (ascending): the number of seeds sharing the artist
    plus the song's popularity over one more than the largest (the best artist's score when
    several), and a seed of that artist."""
    n = 0
    for s in range(seeds.shape[0]):
        n += song_indptr[seeds[s] + 1] - song_indptr[seeds[s]]
    artists = np.empty(n, dtype=np.int64)
    owner = np.empty(n, dtype=np.int64)
    k = 0
    for s in range(seeds.shape[0]):
        for j in range(song_indptr[seeds[s]], song_indptr[seeds[s] + 1]):
            artists[k] = song_artists[j]
            owner[k] = s
            k += 1
    uniq = np.unique(artists)
    counts = np.zeros(uniq.shape[0], dtype=np.int64)
    first_seed = np.full(uniq.shape[0], -1, dtype=np.int64)
    for k in range(n):
        a = np.searchsorted(uniq, artists[k])
        counts[a] += 1
        if first_seed[a] < 0:
            first_seed[a] = seeds[owner[k]]
    m = 0
    for a in range(uniq.shape[0]):
        m += artist_indptr[uniq[a] + 1] - artist_indptr[uniq[a]]
    rows = np.empty(m, dtype=np.int64)
    top = 0.0
    k = 0
    for a in range(uniq.shape[0]):
        for j in range(artist_indptr[uniq[a]], artist_indptr[uniq[a] + 1]):
            rows[k] = artist_songs[j]
            top = max(top, np.float64(popularity[rows[k]]))
            k += 1
    cand = np.unique(rows)
    total = np.zeros(cand.shape[0], dtype=np.float64)
    src = np.full(cand.shape[0], -1, dtype=np.int64)
    k = 0
    for a in range(uniq.shape[0]):
        for _ in range(artist_indptr[uniq[a]], artist_indptr[uniq[a] + 1]):
            c = np.searchsorted(cand, rows[k])
            score = np.float64(counts[a]) + np.float64(popularity[rows[k]]) / (1.0 + top)
            total[c] = max(total[c], score)
            src[c] = first_seed[a]  # the last artist listing the song names the seed
            k += 1
    return cand, total, src


@njit(nogil=True, cache=True)
def best_trained(scores: np.ndarray, popularity: np.ndarray, n: int
                 ) -> np.ndarray:  # pragma: no cover (compiled)
    """Positions of the ``n`` best finite ``scores`` of songs some training playlist holds
    (popularity > 0), by score then position; ``scores`` is overwritten."""
    for i in range(scores.shape[0]):
        if popularity[i] == 0:
            scores[i] = -np.inf
    order = best_positions(scores, n)
    m = 0
    for j in range(order.shape[0]):
        if np.isfinite(scores[order[j]]):
            order[m] = order[j]
            m += 1
    return order[:m]


@njit(nogil=True, cache=True)
def merge(rows: np.ndarray, scores: np.ndarray, sources: np.ndarray, offsets: np.ndarray,
          columns: np.ndarray, n_columns: int, missing_rank: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """The union (ascending) of the sources' lists (list i is ``offsets[i]:offsets[i + 1]``,
    for column ``columns[i]``): per column, each candidate's score over the list's best
    (as is when the best is not positive), its 0-based rank (``missing_rank`` when absent)
    and the list's source for it (-1 when absent)."""
    cand = np.unique(rows)
    out_scores = np.zeros((cand.shape[0], n_columns), dtype=np.float32)
    out_ranks = np.full((cand.shape[0], n_columns), np.float32(missing_rank))
    out_sources = np.full((cand.shape[0], n_columns), -1, dtype=np.int64)
    for s in range(offsets.shape[0] - 1):
        j = columns[s]
        start, end = offsets[s], offsets[s + 1]
        top = 0.0
        if end > start:
            top = scores[start]
            for i in range(start, end):
                top = max(top, scores[i])
        for i in range(start, end):
            c = np.searchsorted(cand, rows[i])
            out_scores[c, j] = np.float32(scores[i] / top) if top > 0 else np.float32(scores[i])
            out_ranks[c, j] = np.float32(i - start)
            out_sources[c, j] = sources[i]
    return cand, out_scores, out_ranks, out_sources


@njit(nogil=True, cache=True)
def _seed_items(indptr: np.ndarray, indices: np.ndarray, seeds: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int]:  # pragma: no cover (compiled)
    """The items of the seeds that have a row (ascending), how many of those seeds hold
    each, and how many seeds have a row."""
    n_rows = indptr.shape[0] - 1
    valid = 0
    n = 0
    for s in range(seeds.shape[0]):
        if seeds[s] < n_rows:
            valid += 1
            n += indptr[seeds[s] + 1] - indptr[seeds[s]]
    keys = np.empty(n, dtype=np.int64)
    k = 0
    v = 0
    for s in range(seeds.shape[0]):
        if seeds[s] < n_rows:
            for j in range(indptr[seeds[s]], indptr[seeds[s] + 1]):
                keys[k] = np.int64(indices[j]) * (valid + 1) + v
                k += 1
            v += 1
    keys = np.unique(keys)  # distinct (item, seed) pairs
    items = np.empty(keys.shape[0], dtype=np.int64)
    counts = np.zeros(keys.shape[0], dtype=np.int64)
    m = 0
    for i in range(keys.shape[0]):
        item = keys[i] // (valid + 1)
        if m == 0 or items[m - 1] != item:
            items[m] = item
            m += 1
        counts[m - 1] += 1
    return items[:m], counts[:m], valid


@njit(nogil=True, cache=True)
def _overlap(out: np.ndarray, col: int, rows: np.ndarray, indptr: np.ndarray,
             indices: np.ndarray, seeds: np.ndarray, missing: float) -> None:  # pragma: no cover
    """Per candidate: the share of seeds that share an item (artist, genre) with it."""
    items, counts, valid = _seed_items(indptr, indices, seeds)
    n_rows = indptr.shape[0] - 1
    for r in range(rows.shape[0]):
        if valid == 0:
            out[r, col] = np.float32(missing)
            continue
        best = 0.0
        row = rows[r]
        if row < n_rows and items.shape[0]:
            for j in range(indptr[row], indptr[row + 1]):
                i = np.searchsorted(items, indices[j])
                if i < items.shape[0] and items[i] == indices[j]:
                    best = max(best, np.float64(counts[i]))
        out[r, col] = np.float32(best / valid)


@njit(nogil=True, cache=True, inline="always")
def _year(yyyymmdd: float) -> float:  # pragma: no cover (compiled)
    # As server.rankdata.year_of, for one date.
    if yyyymmdd <= 0:
        return 0.0
    return float(np.floor(yyyymmdd / 10000) + (np.floor(yyyymmdd / 100) % 100 - 1) / 12
                 + (yyyymmdd % 100) / 365)


@njit(nogil=True, cache=True)
def fill_features(out: np.ndarray, columns: np.ndarray, rows: np.ndarray,
                  ranks: np.ndarray, missing_rank: float, popularity: np.ndarray,
                  playlist_years: np.ndarray, issue_dates: np.ndarray, q_year: float,
                  artist_indptr: np.ndarray, artist_indices: np.ndarray,
                  genre_indptr: np.ndarray, genre_indices: np.ndarray, seeds: np.ndarray,
                  tag_indptr: np.ndarray, tag_indices: np.ndarray, q_tags: np.ndarray,
                  title_rows: np.ndarray, title_scores: np.ndarray,
                  has_title: bool, missing: float) -> None:  # pragma: no cover (compiled)
    """The candidate features of :data:`KERNEL_FEATURES` into ``out[:, columns[f]]``
    (-1: not wanted), one pass per feature family; ``rows`` below ``len(popularity)`` are
    catalog songs, the rest songs added at run time (popularity 0, no dates, no lists)."""
    n_songs = popularity.shape[0]
    f32_q_year = np.float32(q_year)
    # A flag per tag up to the largest asked: a song lists ~100 tags, too many to search.
    asked = np.zeros(q_tags.max() + 1 if q_tags.shape[0] else 0, dtype=np.bool_)
    for t in range(q_tags.shape[0]):
        asked[q_tags[t]] = True
    for r in range(rows.shape[0]):
        row = rows[r]
        inside = row < n_songs
        col = columns[LOG_POPULARITY]
        if col >= 0:
            out[r, col] = np.float32(math.log1p(np.float64(popularity[row]) if inside
                                                else 0.0))
        col = columns[YEARS_FROM_PLAYLISTS]
        if col >= 0:
            pl = playlist_years[min(row, playlist_years.shape[0] - 1)] if inside \
                else np.float32(0.0)
            out[r, col] = f32_q_year - pl if pl > 0 and q_year > 0 else np.float32(missing)
        col = columns[YEARS_SINCE_ISSUE]
        if col >= 0:
            issued = _year(np.float64(issue_dates[row])) if inside else 0.0
            out[r, col] = np.float32(q_year - issued if issued > 0 and q_year > 0
                                     else missing)
        col = columns[TITLE_MATCH]
        if col >= 0:
            value = np.float32(missing)
            if has_title:
                value = np.float32(0.0)
                i = np.searchsorted(title_rows, row)
                if inside and i < title_rows.shape[0] and title_rows[i] == row:
                    value = title_scores[i]
            out[r, col] = value
        col = columns[N_SOURCES]
        if col >= 0:
            count = 0
            for j in range(ranks.shape[1]):
                if ranks[r, j] < missing_rank:
                    count += 1
            out[r, col] = np.float32(count)
        col = columns[TAG_COOCCURRENCE]
        if col >= 0:
            if q_tags.shape[0] == 0:
                out[r, col] = np.float32(missing)
            else:
                hits = 0
                if row < tag_indptr.shape[0] - 1:
                    for j in range(tag_indptr[row], tag_indptr[row + 1]):
                        t = tag_indices[j]
                        if t < asked.shape[0] and asked[t]:
                            hits += 1
                out[r, col] = np.float32(hits / q_tags.shape[0])
    if columns[ARTIST_OVERLAP] >= 0:
        _overlap(out, columns[ARTIST_OVERLAP], rows, artist_indptr, artist_indices, seeds,
                 missing)
    if columns[GENRE_OVERLAP] >= 0:
        _overlap(out, columns[GENRE_OVERLAP], rows, genre_indptr, genre_indices, seeds,
                 missing)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the types a bundle's arrays
    have (CSR int64 pointers, int32 indices, float32 weights, int32 popularity and
    dates), so that no question pays for it."""
    indptr = np.asarray([0, 2, 3], dtype=np.int64)
    indices = np.asarray([1, 0, 1], dtype=np.int32)
    weights = np.asarray([1.0, 0.5, 1.0], dtype=np.float32)
    rows = np.asarray([0, 1], dtype=np.int64)
    seeds = np.asarray([0], dtype=np.int64)
    popularity = np.asarray([3, 0], dtype=np.int32)
    scores = np.asarray([1.0, 0.5])
    top_unseen(rows, scores, rows, seeds, 1)
    first_unseen(rows, seeds, 1)
    seed_votes(rows, np.asarray([1.0, 0.5], dtype=np.float32), indptr[:2], seeds)
    tag_votes(indptr, indices, weights, seeds)
    artist_votes(indptr, indices, indptr, indices, popularity, seeds)
    best_trained(scores.astype(np.float32), popularity, 1)
    merged = merge(rows, scores, rows, indptr[:2], seeds, 2, 1000.0)
    out = np.zeros((2, len(KERNEL_FEATURES)), dtype=np.float32)
    fill_features(out, np.arange(len(KERNEL_FEATURES), dtype=np.int64), rows, merged[2],
                  1000.0, popularity, weights[:2], np.asarray([20200101, 0], np.int32),
                  2020.5, indptr, indices, indptr, indices, seeds, indptr, indices, seeds,
                  rows, weights[:2], True, -99.0)
