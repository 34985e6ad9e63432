"""Neighbour lists computed beforehand (by the server, in pieces of bounded time) and
served to a strategy as if looked up in one go."""

from __future__ import annotations

import numpy as np

from server.search import HnswSearch


class PrefetchedLists:
    """A :class:`VectorSearch` that answers some rows' neighbour lists (asked ``k`` deep
    with ``allow_short``) from lists computed beforehand, e.g. by the server in pieces of
    bounded time, and passes everything else to ``songs``. A row's list depends on that
    row alone (:meth:`HnswSearch.neighbour_lists`; hnswlib answers each query of a batch
    on its own), so the answers are those of one lookup for all."""

    def __init__(self, songs: HnswSearch, k: int) -> None:
        self.songs = songs
        self.k = k
        self._lists: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def fetch(self, rows: np.ndarray) -> None:
        """Compute and keep the lists of ``rows``."""
        labels, sims, offsets = self.songs.neighbour_lists(rows, self.k, allow_short=True)
        bounds = offsets.tolist()
        for row, a, b in zip(rows.tolist(), bounds, bounds[1:], strict=False):
            self._lists[row] = (labels[a:b], sims[a:b])

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.songs.search(vectors, k)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self.songs.vectors(labels)

    def count(self) -> int:
        return self.songs.count()

    def neighbours(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = np.asarray(rows, dtype=np.int64)
        if k != self.k or not allow_short or not self._lists:
            return self.songs.neighbours(rows, k, allow_short=allow_short)
        wanted = rows.tolist()
        rest = np.asarray([r for r in wanted if r not in self._lists], dtype=np.int64)
        found = dict(zip(rest.tolist(), self.songs.neighbours(rest, k, allow_short=True),
                         strict=True)) if len(rest) else {}
        return [self._lists[r] if r in self._lists else found[r] for r in wanted]
