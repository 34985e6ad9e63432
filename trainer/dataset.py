"""Reads the Melon Playlist Dataset (and anything in its format) into compact numpy arrays.

A dataset directory holds ``song_meta.json``, ``genre_gn_all.json`` and any of the playlist
files ``train.json``, ``val.json``, ``test.json`` (a split made by ``trainer.split`` holds
``train.json``, ``val_questions.json`` and ``val_answers.json`` instead). Playlists become
CSR arrays over *song rows* (positions in ``song_meta.json``) and *tag indices* (into one
vocabulary shared by every playlist file of the dataset), never lists of dicts: at Melon
size (707,989 songs, 148,826 playlists) that is the difference between seconds and minutes.

Every malformed record raises :class:`DataError`, whose message names the file, the record
index, the field and the offending value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # orjson parses the 700k-record song_meta.json several times faster than json.
    import orjson

    def _parse_json(raw: bytes) -> Any:
        return orjson.loads(raw)

    _JSONDecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is a declared dependency
    import json

    def _parse_json(raw: bytes) -> Any:
        return json.loads(raw)

    _JSONDecodeError = json.JSONDecodeError

log = logging.getLogger(__name__)

PLAYLIST_FILES = ("train.json", "val.json", "test.json", "val_questions.json", "val_answers.json")
_UPDT_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) \d{2}:\d{2}:\d{2}(\.\d+)?$")


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names file, record and field."""

    def __init__(self, file: str | Path, message: str, index: int | None = None,
                 field_name: str | None = None) -> None:
        where = str(file)
        if index is not None:
            where += f": record {index}"
        if field_name is not None:
            where += f": field '{field_name}'"
        super().__init__(f"{where}: {message}")
        self.file = str(file)
        self.index = index
        self.field = field_name


def read_json(path: Path) -> Any:
    """Parse one JSON file, turning I/O and syntax errors into :class:`DataError`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from None
    try:
        return _parse_json(raw)
    except _JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None


# ---------------------------------------------------------------------------------------
# Compact containers


@dataclass(frozen=True)
class CSR:
    """Rows of variable-length integer lists: row ``i`` is ``values[indptr[i]:indptr[i+1]]``."""

    indptr: np.ndarray  # int64, len n_rows + 1
    values: np.ndarray  # int32

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.indptr[i] : self.indptr[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row_ids(self) -> np.ndarray:
        """The row index of every value (the COO row array)."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.lengths())

    @staticmethod
    def from_lists(lists: Iterable[Sequence[int]]) -> CSR:
        lengths: list[int] = []
        flat: list[int] = []
        for row in lists:
            lengths.append(len(row))
            flat.extend(row)
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return CSR(indptr, np.asarray(flat, dtype=np.int32))


@dataclass
class Vocabulary:
    """A growing string <-> index map (tags, title words, genre codes)."""

    items: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def add(self, item: str) -> int:
        idx = self.index.get(item)
        if idx is None:
            idx = len(self.items)
            self.index[item] = idx
            self.items.append(item)
        return idx

    def get(self, item: str, default: int = -1) -> int:
        return self.index.get(item, default)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Genres:
    """``genre_gn_all.json``: codes, names and, for each code, whether it is a major genre."""

    codes: Vocabulary
    names: list[str]

    def is_major(self, code: str) -> bool:
        return code.endswith("00")


@dataclass(frozen=True)
class Songs:
    """``song_meta.json`` as arrays; row ``r`` is the r-th record of the file."""

    ids: np.ndarray  # int64 song id of each row
    names: list[str]
    album_ids: np.ndarray  # int64, -1 when missing
    album_names: list[str]
    artists: CSR  # artist ids (int32) per song
    artist_names: dict[int, str]
    genres: CSR  # indices into Dataset.genres.codes (major genres)
    detail_genres: CSR  # indices into Dataset.genres.codes (detailed genres)
    issue_dates: np.ndarray  # int32 YYYYMMDD, 0 when unknown
    row_of_id: np.ndarray  # int64, song id -> row, -1 for ids not in song_meta

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the given song ids; -1 where an id is unknown."""
        arr = np.asarray(ids, dtype=np.int64)
        out = np.full(arr.shape, -1, dtype=np.int64)
        ok = (arr >= 0) & (arr < len(self.row_of_id))
        out[ok] = self.row_of_id[arr[ok]]
        return out


@dataclass(frozen=True)
class Playlists:
    """One playlist file as arrays. Song values are song rows, tag values tag indices."""

    source: str
    ids: np.ndarray  # int64 playlist ids
    titles: list[str]
    songs: CSR
    tags: CSR
    like_cnt: np.ndarray  # int64
    updt_dates: np.ndarray  # int32 YYYYMMDD of updt_date, 0 when absent

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Dataset:
    """A dataset directory: songs, genres, one tag vocabulary, and its playlist files."""

    root: Path
    songs: Songs
    genres: Genres
    tags: Vocabulary
    playlists: dict[str, Playlists]  # keyed by file stem: "train", "val_questions", ...

    @property
    def train(self) -> Playlists:
        try:
            return self.playlists["train"]
        except KeyError:
            raise DataError(self.root / "train.json", "file not found") from None

    def load_playlists(self, path: Path, *, extend_tags: bool = True) -> Playlists:
        """Read another playlist file (questions, answers) against this dataset's songs."""
        return parse_playlists(read_json(path), path, self.songs, self.tags,
                               extend_tags=extend_tags)


# ---------------------------------------------------------------------------------------
# Field checks: each returns the value or raises DataError naming file/record/field.


def _fail(path: Path, index: int, name: str, message: str) -> DataError:
    return DataError(path.name, message, index, name)


def _get(rec: Any, path: Path, index: int, name: str) -> Any:
    if not isinstance(rec, dict):
        raise DataError(path.name, f"expected an object, got {type(rec).__name__}", index)
    try:
        return rec[name]
    except KeyError:
        raise _fail(path, index, name, "missing field") from None


def _int(rec: Any, path: Path, index: int, name: str) -> int:
    value = _get(rec, path, index, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(path, index, name, f"expected an integer, got {value!r}")
    return value


def _str(rec: Any, path: Path, index: int, name: str) -> str:
    value = _get(rec, path, index, name)
    if not isinstance(value, str):
        raise _fail(path, index, name, f"expected a string, got {value!r}")
    return value


def _list(rec: Any, path: Path, index: int, name: str, kind: type) -> list[Any]:
    value = _get(rec, path, index, name)
    if not isinstance(value, list):
        raise _fail(path, index, name, f"expected a list, got {value!r}")
    for item in value:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise _fail(path, index, name,
                        f"expected a list of {kind.__name__}, found {item!r}")
    return value


def parse_issue_date(text: str) -> int:
    """``"YYYYMMDD"`` -> int; ``"00000000"`` (unknown) -> 0. Melon also has ``YYYYMM00``
    and ``YYYY0000`` for partly known dates, which are kept as they are."""
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"bad issue_date {text!r}: expected YYYYMMDD")
    value = int(text)
    month, day = value // 100 % 100, value % 100
    if value and (month > 12 or day > 31):
        raise ValueError(f"bad issue_date {text!r}: month or day out of range")
    return value


def parse_updt_date(text: str) -> int:
    """``"YYYY-MM-DD hh:mm:ss.000"`` -> YYYYMMDD as int."""
    m = _UPDT_DATE.match(text)
    if not m:
        raise ValueError(f"bad updt_date {text!r}: expected 'YYYY-MM-DD hh:mm:ss.000'")
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise ValueError(f"bad updt_date {text!r}: month or day out of range")
    return year * 10000 + month * 100 + day


# ---------------------------------------------------------------------------------------
# Parsers


def parse_genres(raw: Any, path: Path) -> Genres:
    if not isinstance(raw, dict):
        raise DataError(path.name, f"expected an object {{code: name}}, got {type(raw).__name__}")
    codes = Vocabulary()
    names: list[str] = []
    for code, name in raw.items():
        if not isinstance(name, str):
            raise DataError(path.name, f"genre {code!r}: expected a name string, got {name!r}")
        codes.add(code)
        names.append(name)
    return Genres(codes, names)


def parse_songs(raw: Any, path: Path, genres: Genres) -> Songs:
    if not isinstance(raw, list):
        raise DataError(path.name, f"expected a list of songs, got {type(raw).__name__}")
    n = len(raw)
    ids = np.empty(n, dtype=np.int64)
    album_ids = np.empty(n, dtype=np.int64)
    issue = np.empty(n, dtype=np.int32)
    names: list[str] = []
    album_names: list[str] = []
    artist_lists: list[list[int]] = []
    artist_names: dict[int, str] = {}
    gn_lists: list[list[int]] = []
    dtl_lists: list[list[int]] = []
    # Genre codes seen in songs but missing from genre_gn_all.json (the real data has
    # a few) join the vocabulary instead of failing the load.
    code_index = genres.codes
    for i, rec in enumerate(raw):
        ids[i] = _int(rec, path, i, "id")
        names.append(_str(rec, path, i, "song_name"))
        album = rec.get("album_id") if isinstance(rec, dict) else None
        album_ids[i] = album if isinstance(album, int) else -1
        album_name = rec.get("album_name") if isinstance(rec, dict) else None
        album_names.append(album_name if isinstance(album_name, str) else "")
        artists = _list(rec, path, i, "artist_id_basket", int)
        artist_lists.append(artists)
        anames = rec.get("artist_name_basket")
        if isinstance(anames, list):
            for aid, aname in zip(artists, anames, strict=False):
                if isinstance(aname, str):
                    artist_names.setdefault(aid, aname)
        gn_lists.append([code_index.add(c) for c in _list(rec, path, i, "song_gn_gnr_basket", str)])
        dtl_lists.append(
            [code_index.add(c) for c in _list(rec, path, i, "song_gn_dtl_gnr_basket", str)])
        try:
            issue[i] = parse_issue_date(_str(rec, path, i, "issue_date"))
        except ValueError as exc:
            raise _fail(path, i, "issue_date", str(exc)) from None
    if n and ids.min() < 0:
        bad = int(np.argmin(ids))
        raise _fail(path, bad, "id", f"negative song id {ids[bad]}")
    if n and ids.max() > 16 * n + 1_000_000:
        # Ids index a dense lookup array: refuse one absurd id instead of allocating TiBs.
        bad = int(np.argmax(ids))
        raise _fail(path, bad, "id", f"song id {ids[bad]} is far larger than the number of "
                    f"songs ({n}); ids are expected to be compact")
    row_of_id = np.full(int(ids.max()) + 1 if n else 0, -1, dtype=np.int64)
    row_of_id[ids] = np.arange(n)
    if n and (row_of_id >= 0).sum() != n:
        uniq, counts = np.unique(ids, return_counts=True)
        dup = int(uniq[counts > 1][0])
        raise _fail(path, int(np.nonzero(ids == dup)[0][1]), "id", f"duplicate song id {dup}")
    while len(genres.names) < len(code_index):  # codes added above have no name
        genres.names.append(code_index.items[len(genres.names)])
    return Songs(ids, names, album_ids, album_names, CSR.from_lists(artist_lists),
                 artist_names, CSR.from_lists(gn_lists), CSR.from_lists(dtl_lists), issue,
                 row_of_id)


def parse_playlists(raw: Any, path: Path, songs: Songs, tags: Vocabulary, *,
                    extend_tags: bool = True) -> Playlists:
    """Parse a playlist list. Song ids must exist in song_meta; ``tags`` grows with new tags
    unless ``extend_tags`` is False, in which case unknown tags are dropped."""
    if not isinstance(raw, list):
        raise DataError(path.name, f"expected a list of playlists, got {type(raw).__name__}")
    n = len(raw)
    ids = np.empty(n, dtype=np.int64)
    like = np.zeros(n, dtype=np.int64)
    updt = np.zeros(n, dtype=np.int32)
    titles: list[str] = []
    song_lists: list[np.ndarray] = []
    tag_lists: list[list[int]] = []
    row_of_id = songs.row_of_id
    add_tag: Callable[[str], int] = tags.add if extend_tags else tags.get
    for i, rec in enumerate(raw):
        ids[i] = _int(rec, path, i, "id")
        titles.append(_str(rec, path, i, "plylst_title"))
        song_ids = _list(rec, path, i, "songs", int)
        arr = np.asarray(song_ids, dtype=np.int64)
        rows = np.full(len(arr), -1, dtype=np.int64)
        ok = (arr >= 0) & (arr < len(row_of_id))
        rows[ok] = row_of_id[arr[ok]]
        if (rows < 0).any():
            bad = int(arr[np.argmin(rows)])
            raise _fail(path, i, "songs", f"song id {bad} not in song_meta.json")
        song_lists.append(rows)
        tag_idx = [add_tag(t) for t in _list(rec, path, i, "tags", str)]
        tag_lists.append([t for t in tag_idx if t >= 0])
        if isinstance(rec, dict) and "like_cnt" in rec:
            like[i] = _int(rec, path, i, "like_cnt")
        if isinstance(rec, dict) and "updt_date" in rec:
            try:
                updt[i] = parse_updt_date(_str(rec, path, i, "updt_date"))
            except ValueError as exc:
                raise _fail(path, i, "updt_date", str(exc)) from None
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(s) for s in song_lists], out=indptr[1:])
    values = (np.concatenate(song_lists) if song_lists else np.zeros(0)).astype(np.int32)
    return Playlists(path.stem, ids, titles, CSR(indptr, values), CSR.from_lists(tag_lists),
                     like, updt)


def load_dataset(root: str | Path, files: Sequence[str] | None = None) -> Dataset:
    """Load a dataset directory.

    Parameters
    ----------
    root
        Directory with ``song_meta.json``, ``genre_gn_all.json`` and playlist files.
    files
        Playlist files to read; by default every one of :data:`PLAYLIST_FILES` present.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset directory not found")
    genres = parse_genres(read_json(root / "genre_gn_all.json"), root / "genre_gn_all.json")
    songs = parse_songs(read_json(root / "song_meta.json"), root / "song_meta.json", genres)
    tags = Vocabulary()
    playlists: dict[str, Playlists] = {}
    names = files if files is not None else [f for f in PLAYLIST_FILES if (root / f).exists()]
    for name in names:
        path = root / name
        playlists[path.stem] = parse_playlists(read_json(path), path, songs, tags)
    log.info("loaded %s: %d songs, %s", root, len(songs),
             ", ".join(f"{k}={len(v)}" for k, v in playlists.items()))
    return Dataset(root, songs, genres, tags, playlists)
