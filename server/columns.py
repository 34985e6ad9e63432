"""The autoencoder's input columns: which playlist, tag, genre, artist or year each is.

A song's input row is multi-hot over column groups laid end to end (playlists it is in,
tags of those playlists, major genres, detailed genres, optionally artists and issue-year
buckets). The trainer builds the vocabulary; the bundle stores it (``columns.json``) so the
server can build the row of a song it has never seen from its metadata. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GROUP_ORDER = ("playlists", "tags", "genres", "detail_genres", "artists", "years")


def year_bucket(issue_date: int, width: int) -> str | None:
    """The bucket label of a YYYYMMDD date (``None`` when the date is unknown)."""
    year = issue_date // 10000
    if year <= 0:
        return None
    return str(year - year % width)


@dataclass
class ColumnSpace:
    """Column groups in input order; keys are strings (ids are written as decimal)."""

    groups: list[tuple[str, list[str]]]
    year_width: int = 5
    _offsets: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        offset = 0
        for name, keys in self.groups:
            if name not in GROUP_ORDER:
                raise ValueError(f"unknown column group {name!r}; known: {GROUP_ORDER}")
            self._offsets[name] = offset
            self._lookup[name] = {k: offset + i for i, k in enumerate(keys)}
            offset += len(keys)
        self.dim = offset

    def sizes(self) -> dict[str, int]:
        return {name: len(keys) for name, keys in self.groups}

    def has(self, group: str) -> bool:
        return group in self._offsets

    def offset(self, group: str) -> int:
        return self._offsets[group]

    def column(self, group: str, key: object) -> int:
        """Column of ``key`` in ``group``; -1 when the group is off or the key unknown."""
        table = self._lookup.get(group)
        if table is None:
            return -1
        return table.get(str(key), -1)

    def columns(self, group: str, keys: Iterable[object]) -> list[int]:
        return [c for c in (self.column(group, k) for k in keys) if c >= 0]

    def song_columns(self, *, genres: Sequence[str] = (), detail_genres: Sequence[str] = (),
                     artists: Sequence[int] = (), issue_date: int = 0,
                     playlists: Sequence[int] = (), tags: Sequence[str] = ()) -> np.ndarray:
        """The sorted unique input columns of one song described by its metadata."""
        cols = self.columns("playlists", playlists)
        cols += self.columns("tags", tags)
        cols += self.columns("genres", genres)
        cols += self.columns("detail_genres", detail_genres)
        cols += self.columns("artists", artists)
        bucket = year_bucket(issue_date, self.year_width)
        if bucket is not None:
            cols += self.columns("years", [bucket])
        return np.unique(np.asarray(cols, dtype=np.int64))

    def to_json(self) -> dict[str, Any]:
        return {"year_width": self.year_width,
                "groups": [{"name": name, "keys": keys} for name, keys in self.groups]}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ColumnSpace:
        try:
            groups = [(str(g["name"]), [str(k) for k in g["keys"]]) for g in raw["groups"]]
            return ColumnSpace(groups, int(raw.get("year_width", 5)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed column vocabulary ({exc!r})") from None


def pad_batch(rows: Sequence[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack variable-length column lists into the encoder's padded inputs.

    Returns ``columns`` (int64, batch x width, padded with ``pad``, the input dim, whose
    embedding row is zero) and ``weights`` (float32, 1 for a real column, 0 for padding).
    """
    width = max(1, max((len(r) for r in rows), default=1))
    columns = np.full((len(rows), width), pad, dtype=np.int64)
    weights = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        columns[i, : len(row)] = row
        weights[i, : len(row)] = 1.0
    return columns, weights


@dataclass(frozen=True)
class SongMeta:
    """A song not in the bundle, described by its metadata (``song_meta.json`` fields)."""

    genres: tuple[str, ...] = ()
    detail_genres: tuple[str, ...] = ()
    artists: tuple[int, ...] = ()
    issue_date: int = 0
    playlists: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
