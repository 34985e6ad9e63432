"""Neighbour lists of many songs as flat arrays (labels, similarities, offsets): merging the
parts of a batch, padding them into a matrix, keeping each list's first k, dropping
excluded songs by flag lookup."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np


def merge_lists(n: int, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat lists of ``n`` rows from parts ``(positions, labels, sims, offsets)``, each
    holding the lists of rows ``positions`` (in the layout of :meth:`neighbour_lists`)."""
    lengths = np.zeros(n, dtype=np.int64)
    for positions, _, _, offsets in parts:
        lengths[positions] = np.diff(offsets)
    out_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out_labels = np.empty(int(out_offsets[-1]), dtype=np.int64)
    out_sims = np.empty(int(out_offsets[-1]), dtype=np.float32)
    for positions, labels, sims, offsets in parts:
        sizes = np.diff(offsets)
        owner = np.repeat(np.arange(len(positions)), sizes)
        within = np.arange(len(labels)) - offsets[:-1][owner]
        target = out_offsets[positions][owner] + within
        out_labels[target] = labels
        out_sims[target] = sims
    return out_labels, out_sims, out_offsets


def padded_lists(labels: np.ndarray, sims: np.ndarray, offsets: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Flat lists as a matrix, a row per list, as wide as the longest: short rows padded
    with label -1 and similarity -inf (which sorts last)."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    padded = np.full((len(lengths), width), -1, dtype=np.int64)
    padded_sims = np.full((len(lengths), width), -np.inf, dtype=np.float32)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    column = np.arange(len(labels)) - offsets[:-1][owner]
    padded[owner, column] = labels
    padded_sims[owner, column] = sims
    return padded, padded_sims


def first_per_list(keep: np.ndarray, owner: np.ndarray, offsets: np.ndarray,
                   k: int | np.ndarray) -> np.ndarray:
    """``keep`` narrowed to the first ``k`` kept entries of each list (``k``: one number,
    or one per entry)."""
    kept_so_far = np.cumsum(keep)
    before = np.concatenate([[0], kept_so_far])[offsets[:-1]]
    rank: np.ndarray = kept_so_far - before[owner]
    return keep & (rank <= k)


_FLAGS = threading.local()  # one scratch array per worker thread


def drop_marked(keep: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                marked: Sequence[np.ndarray]) -> None:
    """Clear ``keep`` where list ``i``'s label is in ``marked[i]``: one flag lookup per
    label. Flags live in a per-thread array that is set and cleared around each use, so a
    call costs O(labels + marked), never O(songs) (zeroing 700k flags per call would cost
    more than the lookups). Consecutive lists sharing one array object are done at once."""
    i, n = 0, len(marked)
    while i < n:
        rows = marked[i]
        j = i + 1
        while j < n and marked[j] is rows:
            j += 1
        start, end = int(offsets[i]), int(offsets[j])
        if len(rows) and end > start:
            part = labels[start:end]
            flags = _flags(max(int(part.max()), int(rows.max())) + 1)
            flags[rows] = True
            keep[start:end] &= ~flags[part]
            flags[rows] = False
        i = j


def _flags(size: int) -> np.ndarray:
    flags: np.ndarray | None = getattr(_FLAGS, "array", None)
    if flags is None or len(flags) < size:
        flags = np.zeros(max(size, 2 * len(flags) if flags is not None else 0), dtype=bool)
        _FLAGS.array = flags
    return flags
