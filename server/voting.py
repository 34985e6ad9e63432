"""Compiled kernels (numba, GIL released) for the per-call work of the strategies:
tallying the votes of neighbour playlists, choosing the best n of a list of scores, and
expanding search hits to their groups of duplicate songs.

Why: profiled under load, ContinuePlaylist spent a third of the server's CPU in dozens of
small numpy calls per answer (sorting for ``np.unique``, CSR gathers, partitions), each
cheap but each holding the GIL, so one core ran all of it. Here each step is one loop that
releases the GIL. The results are exactly those of the numpy definitions they replace
(same sums in the same order, same tie-breaking), which ``tests/test_strategies.py``
(tallies, top n) and ``tests/test_neighbours.py`` (expansion) check.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _tally(indptr: np.ndarray, indices: np.ndarray, playlists: np.ndarray,
           weights: np.ndarray, scratch: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """Every item of rows ``playlists`` votes the row's weight. ``scratch[item]`` holds
    (position of the playlist of its largest vote, summed votes, largest vote), the first
    column all -1 on entry and restored so on return. One row per item keeps an item's
    three values on one cache line: as three arrays over 700k songs, the misses made this
    slower than the numpy version."""
    n_votes = 0
    for p in range(playlists.shape[0]):
        n_votes += indptr[playlists[p] + 1] - indptr[playlists[p]]
    touched = np.empty(n_votes, dtype=np.int64)
    n_items = 0
    for p in range(playlists.shape[0]):
        row = playlists[p]
        w = weights[p]
        for j in range(indptr[row], indptr[row + 1]):
            item = indices[j]
            if scratch[item, 0] < 0:
                scratch[item, 0] = p
                scratch[item, 1] = 0.0 + w  # as np.bincount: 0.0, then each vote in order
                scratch[item, 2] = w
                touched[n_items] = item
                n_items += 1
            else:
                scratch[item, 1] += w
                if w > scratch[item, 2]:  # the largest vote; the earliest playlist on a tie
                    scratch[item, 2] = w
                    scratch[item, 0] = p
    items = np.sort(touched[:n_items])
    scores = np.empty(n_items, dtype=np.float64)
    source = np.empty(n_items, dtype=np.int64)
    for i in range(n_items):
        item = items[i]
        scores[i] = scratch[item, 1]
        source[i] = playlists[int(scratch[item, 0])]
        scratch[item, 0] = -1.0
    return items, scores, source


@njit(nogil=True, cache=True)
def best_positions(scores: np.ndarray, n: int) -> np.ndarray:  # pragma: no cover (compiled)
    """Positions of the ``n`` best scores, by score (descending) then position: a heap of
    the n best so far whose root is the worst of them, one pass over the scores."""
    n = min(n, scores.shape[0])
    heap_scores = np.empty(n, dtype=np.float64)
    heap_pos = np.empty(n, dtype=np.int64)
    size = 0
    for i in range(scores.shape[0]):
        s = scores[i]
        if size == n:
            # A later position loses every tie: only a strictly larger score gets in.
            if n == 0 or not s > heap_scores[0]:
                continue
            at = 0  # replace the root, then sift it down
            while True:
                child = 2 * at + 1
                if child >= n:
                    break
                if child + 1 < n and _worse(heap_scores[child + 1], heap_pos[child + 1],
                                            heap_scores[child], heap_pos[child]):
                    child += 1
                if not _worse(heap_scores[child], heap_pos[child], s, i):
                    break
                heap_scores[at] = heap_scores[child]
                heap_pos[at] = heap_pos[child]
                at = child
            heap_scores[at] = s
            heap_pos[at] = i
        else:
            at = size  # append, then sift it up
            size += 1
            while at > 0:
                parent = (at - 1) // 2
                if not _worse(s, i, heap_scores[parent], heap_pos[parent]):
                    break
                heap_scores[at] = heap_scores[parent]
                heap_pos[at] = heap_pos[parent]
                at = parent
            heap_scores[at] = s
            heap_pos[at] = i
    # The kept positions, best first: by position, then stably by score.
    by_position = np.sort(heap_pos[:size])
    order = np.argsort(-scores[by_position], kind="mergesort")
    return by_position[order]


@njit(nogil=True, cache=True, inline="always")
def _worse(score_a: float, pos_a: int, score_b: float, pos_b: int) -> bool:  # pragma: no cover
    return score_a < score_b or (score_a == score_b and pos_a > pos_b)


@njit(nogil=True, cache=True)
def expand_groups(labels: np.ndarray, sims: np.ndarray, k: int, group_len: np.ndarray,
                  group_start: np.ndarray, group_rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """Each question's hits (a row of ``labels``, representatives of duplicate groups, or
    labels past ``len(group_len)`` that stand for themselves) expanded to their groups'
    rows, each with its hit's similarity, cut to the first ``k`` per question. Returns the
    flat rows, similarities and ``offsets`` (question i is ``offsets[i]:offsets[i + 1]``)."""
    n_questions, width = labels.shape
    rows = np.empty(n_questions * k, dtype=np.int64)
    out_sims = np.empty(n_questions * k, dtype=np.float32)
    offsets = np.zeros(n_questions + 1, dtype=np.int64)
    n = 0
    bound = group_len.shape[0]
    for q in range(n_questions):
        taken = 0
        for h in range(width):
            if taken >= k:
                break
            label = labels[q, h]
            if label < bound:
                start = group_start[label]
                for j in range(group_len[label]):
                    if taken >= k:
                        break
                    rows[n] = group_rows[start + j]
                    out_sims[n] = sims[q, h]
                    n += 1
                    taken += 1
            else:
                rows[n] = label
                out_sims[n] = sims[q, h]
                n += 1
                taken += 1
        offsets[q + 1] = n
    return rows[:n], out_sims[:n], offsets


@njit(nogil=True, cache=True)
def best_of_groups(group: np.ndarray, n_groups: int, values: np.ndarray, also: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """Per group (``group[i]`` in ``0..n_groups-1``): the largest of ``values`` (from 0:
    negatives count as 0), the position of the first item reaching it, and the largest of
    ``also``. What ``np.maximum.at`` twice and a first-on-tie pick computed."""
    best = np.zeros(n_groups)
    first = np.full(n_groups, -1, np.int64)
    most = np.zeros(n_groups)
    for i in range(group.shape[0]):
        g = group[i]
        v = max(values[i], 0.0)
        if first[g] < 0 or v > best[g]:
            best[g] = v
            first[g] = i
        if also[i] > most[g]:
            most[g] = also[i]
    return best, first, most


@njit(nogil=True, cache=True)
def csr_items(indptr: np.ndarray, indices: np.ndarray, keys: np.ndarray
              ) -> np.ndarray:  # pragma: no cover (compiled)
    """The items of CSR rows ``keys``, row after row (int64)."""
    n = 0
    for r in range(keys.shape[0]):
        n += indptr[keys[r] + 1] - indptr[keys[r]]
    items = np.empty(n, dtype=np.int64)
    k = 0
    for r in range(keys.shape[0]):
        for j in range(indptr[keys[r]], indptr[keys[r] + 1]):
            items[k] = indices[j]
            k += 1
    return items


@njit(nogil=True, cache=True)
def word_scores(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """The songs of title words ``words`` (ascending) and their summed float32 weights,
    added word by word as a dense score array would add them."""
    rows = csr_items(indptr, indices, words)
    cand = np.unique(rows)
    total = np.zeros(cand.shape[0], dtype=np.float32)
    k = 0
    for w in range(words.shape[0]):
        for j in range(indptr[words[w]], indptr[words[w] + 1]):
            c = np.searchsorted(cand, rows[k])
            total[c] += weights[j]
            k += 1
    return cand, total


# Every float16 bit pattern as float32 (256 KB, cache-resident): numpy's float16 ->
# float32 cast ran at ~1 ns a value, a third of ``ranked``'s feature time (330 candidates
# x 256 dims per question); a table lookup gives the same values (the cast is exact).
_HALF_AS_SINGLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(
    np.float16).astype(np.float32)


@njit(nogil=True, cache=True)
def _widen_rows(bits: np.ndarray, slots: np.ndarray, table: np.ndarray
                ) -> np.ndarray:  # pragma: no cover (compiled)
    out = np.empty((slots.shape[0], bits.shape[1]), dtype=np.float32)
    for i in range(slots.shape[0]):
        row = bits[slots[i]]
        for j in range(bits.shape[1]):
            out[i, j] = table[row[j]]
    return out


def rows_float32(codes: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """``codes[slots].astype(np.float32)`` (float16 codes widened by table lookup)."""
    if codes.dtype != np.float16 or codes.ndim != 2:
        widened: np.ndarray = codes[slots].astype(np.float32)
        return widened
    out: np.ndarray = _widen_rows(np.asarray(codes).view(np.uint16),
                                  np.asarray(slots, dtype=np.int64), _HALF_AS_SINGLE)
    return out


class _Scratch(threading.local):
    """Per-thread item arrays of :func:`tally`, kept between calls: allocating and zeroing
    them for every answer (700k songs) would cost more than the tally."""

    def __init__(self) -> None:
        self.arrays: dict[int, np.ndarray] = {}


_scratch = _Scratch()
# Item counts whose scratch a thread keeps: a model's songs and tags, twice over while a
# reload swaps models; older ones (17 MB each at Melon scale) are dropped.
_KEPT_SIZES = 4


def tally(indptr: np.ndarray, indices: np.ndarray, n_items: int, playlists: np.ndarray,
          weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Votes of rows ``playlists`` (weights ``weights``) of a CSR list of items below
    ``n_items``: the candidates (ascending), their summed votes, and for each the playlist
    that gave its largest vote (the earliest one on a tie)."""
    arrays = _scratch.arrays
    scratch = arrays.pop(n_items, None)
    if scratch is None:
        scratch = np.zeros((n_items, 3), dtype=np.float64)
        scratch[:, 0] = -1.0
        while len(arrays) >= _KEPT_SIZES:  # sizes of a model no longer served
            del arrays[next(iter(arrays))]
    arrays[n_items] = scratch  # the most recently used last
    items, scores, source = _tally(indptr, indices,
                                   np.ascontiguousarray(playlists, dtype=np.int64),
                                   np.ascontiguousarray(weights, dtype=np.float64), scratch)
    return items, scores, source


def warm_up(indices_dtype: np.dtype | type = np.int32) -> None:
    """Compile (or load from numba's cache) every kernel for the types real calls pass
    (CSR indices of ``indices_dtype``; float64 votes and float32 tag scores), so that no
    call pays for it: numba compiles once per combination of argument types."""
    indptr = np.asarray([0, 2, 3], dtype=np.int64)
    indices = np.asarray([1, 0, 1], dtype=indices_dtype)
    tally(indptr, indices, 2, np.asarray([0, 1]), np.asarray([1.0, 0.5]))
    for scores in (np.asarray([0.5, 1.0, 0.5]), np.asarray([0.5, 1.0, 0.5], np.float32)):
        best_positions(scores, 2)
    codes = np.ones((2, 3), dtype=np.float16)
    codes.flags.writeable = False  # as the bundle's memory-mapped codes.npy
    rows_float32(codes, np.asarray([1, 0]))
    word_scores(indptr, indices, np.asarray([1.0, 0.5, 1.0], dtype=np.float32),
                np.asarray([1]))
    best_of_groups(np.asarray([0, 0]), 1, np.asarray([0.5, 1.0]), np.asarray([1.0, 2.0]))
    expand_groups(np.zeros((1, 1), dtype=np.int64), np.ones((1, 1), dtype=np.float32), 1,
                  np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64),
                  np.zeros(1, dtype=np.int64))


def best_first(scores: np.ndarray, n: int | None = None) -> np.ndarray:
    """Positions of the ``n`` best scores (all when None), by score then position.

    Sorts only the chosen, in one compiled pass (:func:`best_positions`): a
    numpy partition degrades ~15x on masses of equal values (2 ms on 30k tag scores mostly
    at 0 votes), and the numpy way around that took a dozen calls holding the GIL."""
    if n is None or n >= len(scores):
        return np.argsort(-scores, kind="stable")
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    positions: np.ndarray = best_positions(scores, n)
    return positions
