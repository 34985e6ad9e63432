"""Reads the Melon Playlist Dataset (and anything in its format) into compact numpy arrays.

A dataset directory holds ``song_meta.json``, ``genre_gn_all.json`` and any of the playlist
files ``train.json``, ``val.json``, ``test.json`` (a split made by ``trainer.split`` holds
``train.json``, ``val_questions.json`` and ``val_answers.json`` instead). Playlists become
CSR arrays over *song rows* (positions in ``song_meta.json``) and *tag indices* (into one
vocabulary shared by every playlist file of the dataset), never lists of dicts: at Melon
size (707,989 songs, 148,826 playlists) that is the difference between seconds and minutes.

Soft fields follow one policy, shared with the server (:mod:`server.melon`). A structural
fault (a missing or mistyped id, a list that is not a list, a duplicate song id) raises
:class:`DataError`, whose message names the file, the record index, the field and the
offending value. A dirty value is read leniently and counted: an impossible issue date
becomes a partial date, null albums and empty dates are unknown, artist name baskets may
differ in length from their id baskets, genre codes missing from ``genre_gn_all.json`` are
kept as codes, a song repeated in a playlist is kept once, and songs that
``song_meta.json`` lacks are dropped (refused above a small share). Each file then logs one
warning line per kind of lenient read; ``strict=True`` refuses each of them instead.

``python -m trainer.dataset --check DIR`` loads a directory and reports what it holds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server import melon
from server.melon import Kind, LenientReads

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

# The kinds of lenient read (each reported once per file with its count and first ids).
ISSUE_DATE_PARTIAL = melon.ISSUE_DATE_PARTIAL
ISSUE_DATE_EMPTY = Kind("null or empty issue dates read as unknown")
ALBUM_ID_NULL = Kind("null or missing album ids read as unknown")
ALBUM_NAME_NULL = Kind("null or missing album names read as empty")
ARTIST_NAMES_LENGTH = Kind("artist name baskets of another length than their id baskets, "
                           "paired in order")
GENRE_UNKNOWN = Kind("songs with genre codes missing from genre_gn_all.json, kept as codes")
SONG_REPEATED = Kind("repeated songs in a playlist dropped after the first", "playlists")
SONG_MISSING = Kind("songs not in song_meta.json dropped", "playlists")
MAX_MISSING_SONGS = melon.MAX_MISSING_SONG_SHARE


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
    n_table: int = 0  # codes[:n_table] are the file's; later ones came from songs only

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
    strict: bool = False
    # What each file (by name) read leniently; files read cleanly are absent.
    lenient: dict[str, LenientReads] = field(default_factory=dict)

    @property
    def train(self) -> Playlists:
        try:
            return self.playlists["train"]
        except KeyError:
            raise DataError(self.root / "train.json", "file not found") from None

    def load_playlists(self, path: Path, *, extend_tags: bool = True) -> Playlists:
        """Read another playlist file (questions, answers) against this dataset's songs,
        under the dataset's policy (lenient, or strict); lenient reads are logged."""
        reads = LenientReads(path.name)
        playlists = parse_playlists(read_json(path), path, self.songs, self.tags,
                                    extend_tags=extend_tags, strict=self.strict, reads=reads)
        _report(reads)
        if reads:
            self.lenient[path.name] = reads
        return playlists


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


class _Policy:
    """One file's reading policy: a lenient read is counted, or refused when strict."""

    def __init__(self, path: Path, strict: bool, reads: LenientReads | None) -> None:
        self.path = path
        self.strict = strict
        self.reads = reads if reads is not None else LenientReads(path.name)

    def lenient(self, kind: Kind, ident: object, index: int, name: str, message: str,
                count: int = 1) -> None:
        """Count a lenient read of record ``index`` (id ``ident``), or refuse it."""
        if self.strict:
            raise _fail(self.path, index, name, f"{message} (--strict)")
        self.reads.note(kind, ident, count)


def _report(reads: LenientReads) -> None:
    for line in reads.lines():
        log.warning("%s", line)


def _issue_date(rec: Any, path: Path, index: int, song_id: int, policy: _Policy) -> int:
    value = _get(rec, path, index, "issue_date")
    if value is None or value == "":
        policy.lenient(ISSUE_DATE_EMPTY, song_id, index, "issue_date",
                       f"expected YYYYMMDD, got {value!r}")
        return 0
    if not isinstance(value, str):
        raise _fail(path, index, "issue_date", f"expected a string, got {value!r}")
    try:
        number, repaired = melon.parse_issue_date(value)
    except ValueError as exc:
        raise _fail(path, index, "issue_date", str(exc)) from None
    if repaired is not None:
        policy.lenient(ISSUE_DATE_PARTIAL, song_id, index, "issue_date",
                       f"{value!r}: {repaired}")
    return number


def _updt_date(rec: Any, path: Path, index: int) -> int:
    try:
        return melon.parse_updt_date(_str(rec, path, index, "updt_date"))
    except ValueError as exc:
        raise _fail(path, index, "updt_date", str(exc)) from None


def _nullable(rec: dict[str, Any], path: Path, index: int, name: str, kind: type,
              null: Kind, song_id: int, policy: _Policy) -> Any:
    """A soft field that may be null or missing (counted): its value, or None."""
    value = rec.get(name)
    if value is None:
        policy.lenient(null, song_id, index, name, "null or missing")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _fail(path, index, name, f"expected {kind.__name__} or null, got {value!r}")
    return value


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
    return Genres(codes, names, len(codes))


def parse_songs(raw: Any, path: Path, genres: Genres, *, strict: bool = False,
                reads: LenientReads | None = None) -> Songs:
    """Parse ``song_meta.json``; lenient reads are counted in ``reads`` (or refused when
    ``strict``)."""
    if not isinstance(raw, list):
        raise DataError(path.name, f"expected a list of songs, got {type(raw).__name__}")
    policy = _Policy(path, strict, reads)
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
    # a few) join the vocabulary, named after themselves.
    code_index = genres.codes
    n_known = genres.n_table
    for i, rec in enumerate(raw):
        song_id = ids[i] = _int(rec, path, i, "id")
        names.append(_str(rec, path, i, "song_name"))
        album = _nullable(rec, path, i, "album_id", int, ALBUM_ID_NULL, song_id, policy)
        album_ids[i] = -1 if album is None else album
        album_name = _nullable(rec, path, i, "album_name", str, ALBUM_NAME_NULL, song_id,
                               policy)
        album_names.append("" if album_name is None else album_name)
        artists = _list(rec, path, i, "artist_id_basket", int)
        artist_lists.append(artists)
        anames = ([] if rec.get("artist_name_basket") is None
                  else _list(rec, path, i, "artist_name_basket", str))
        if len(anames) != len(artists):
            policy.lenient(ARTIST_NAMES_LENGTH, song_id, i, "artist_name_basket",
                           f"{len(anames)} names for {len(artists)} artist ids")
        for aid, aname in zip(artists, anames, strict=False):
            artist_names.setdefault(aid, aname)
        baskets = []
        for basket in ("song_gn_gnr_basket", "song_gn_dtl_gnr_basket"):
            codes = [code_index.add(c) for c in _list(rec, path, i, basket, str)]
            unknown = [code_index.items[c] for c in codes if c >= n_known]
            if unknown:
                policy.lenient(GENRE_UNKNOWN, song_id, i, basket,
                               f"genre code {unknown[0]!r} not in genre_gn_all.json")
            baskets.append(codes)
        gn_lists.append(baskets[0])
        dtl_lists.append(baskets[1])
        issue[i] = _issue_date(rec, path, i, song_id, policy)
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
                    extend_tags: bool = True, strict: bool = False,
                    reads: LenientReads | None = None) -> Playlists:
    """Parse a playlist list. ``tags`` grows with new tags unless ``extend_tags`` is False,
    in which case unknown tags are dropped.

    A song repeated in one playlist is kept once (its first place); songs missing from
    ``song_meta.json`` are dropped, unless they are more than
    :data:`server.melon.MAX_MISSING_SONG_SHARE` of the file's song entries. Both are
    counted in ``reads``, or refused when ``strict``.
    """
    if not isinstance(raw, list):
        raise DataError(path.name, f"expected a list of playlists, got {type(raw).__name__}")
    policy = _Policy(path, strict, reads)
    n = len(raw)
    ids = np.empty(n, dtype=np.int64)
    like = np.zeros(n, dtype=np.int64)
    updt = np.zeros(n, dtype=np.int32)
    titles: list[str] = []
    song_lists: list[np.ndarray] = []
    tag_lists: list[list[int]] = []
    row_of_id = songs.row_of_id
    add_tag: Callable[[str], int] = tags.add if extend_tags else tags.get
    n_entries = n_missing = 0
    first_missing: tuple[int, int] | None = None  # (record, song id)
    for i, rec in enumerate(raw):
        playlist_id = ids[i] = _int(rec, path, i, "id")
        titles.append(_str(rec, path, i, "plylst_title"))
        song_ids = _list(rec, path, i, "songs", int)
        n_entries += len(song_ids)
        if len(set(song_ids)) != len(song_ids):
            kept = list(dict.fromkeys(song_ids))
            repeated = next(s for s in kept if song_ids.count(s) > 1)
            policy.lenient(SONG_REPEATED, playlist_id, i, "songs",
                           f"song id {repeated} repeats in the playlist",
                           len(song_ids) - len(kept))
            song_ids = kept
        arr = np.asarray(song_ids, dtype=np.int64)
        rows = np.full(len(arr), -1, dtype=np.int64)
        ok = (arr >= 0) & (arr < len(row_of_id))
        rows[ok] = row_of_id[arr[ok]]
        missing = rows < 0
        if missing.any():
            bad = int(arr[np.argmax(missing)])
            if first_missing is None:
                first_missing = (i, bad)
            count = int(missing.sum())
            n_missing += count
            policy.lenient(SONG_MISSING, playlist_id, i, "songs",
                           f"song id {bad} not in song_meta.json", count)
            rows = rows[~missing]
        song_lists.append(rows)
        tag_idx = [add_tag(t) for t in _list(rec, path, i, "tags", str)]
        tag_lists.append([t for t in tag_idx if t >= 0])
        if isinstance(rec, dict) and "like_cnt" in rec:
            like[i] = _int(rec, path, i, "like_cnt")
        if isinstance(rec, dict) and "updt_date" in rec:
            updt[i] = _updt_date(rec, path, i)
    if first_missing is not None and n_missing > MAX_MISSING_SONGS * n_entries:
        index, bad = first_missing
        raise _fail(path, index, "songs",
                    f"song id {bad} not in song_meta.json ({n_missing} of {n_entries} song "
                    f"entries are not, more than the {MAX_MISSING_SONGS:.0%} dropped "
                    f"leniently: is this song_meta.json the playlists' own?)")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(s) for s in song_lists], out=indptr[1:])
    values = (np.concatenate(song_lists) if song_lists else np.zeros(0)).astype(np.int32)
    return Playlists(path.stem, ids, titles, CSR(indptr, values), CSR.from_lists(tag_lists),
                     like, updt)


def load_dataset(root: str | Path, files: Sequence[str] | None = None, *,
                 strict: bool = False) -> Dataset:
    """Load a dataset directory.

    Parameters
    ----------
    root
        Directory with ``song_meta.json``, ``genre_gn_all.json`` and playlist files.
    files
        Playlist files to read; by default every one of :data:`PLAYLIST_FILES` present.
    strict
        Refuse every dirty value instead of reading it leniently (see the module's
        docstring); the loaded dataset keeps this policy for :meth:`Dataset.load_playlists`.

    Each file's lenient reads are logged as one warning line per kind, and kept in
    :attr:`Dataset.lenient`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset directory not found")
    genres = parse_genres(read_json(root / "genre_gn_all.json"), root / "genre_gn_all.json")
    reads = {"song_meta.json": LenientReads("song_meta.json")}
    songs = parse_songs(read_json(root / "song_meta.json"), root / "song_meta.json", genres,
                        strict=strict, reads=reads["song_meta.json"])
    tags = Vocabulary()
    playlists: dict[str, Playlists] = {}
    names = files if files is not None else [f for f in PLAYLIST_FILES if (root / f).exists()]
    for name in names:
        path = root / name
        reads[path.name] = LenientReads(path.name)
        playlists[path.stem] = parse_playlists(read_json(path), path, songs, tags,
                                               strict=strict, reads=reads[path.name])
    _note_future(songs, playlists, reads["song_meta.json"])
    for file_reads in reads.values():
        _report(file_reads)
    log.info("loaded %s: %d songs, %s", root, len(songs),
             ", ".join(f"{k}={len(v)}" for k, v in playlists.items()))
    return Dataset(root, songs, genres, tags, playlists, strict,
                   {name: r for name, r in reads.items() if r})


def _note_future(songs: Songs, playlists: dict[str, Playlists], reads: LenientReads) -> None:
    """Count songs issued after the last playlist update: kept as they are (the real file
    has a date two years after its playlists), but worth a line."""
    last = max((int(p.updt_dates.max()) for p in playlists.values() if len(p)), default=0)
    if not last:
        return
    kind = Kind(f"issue dates after the last playlist update ({format_date(last)}), kept")
    for row in np.nonzero(songs.issue_dates > last)[0].tolist():
        reads.note(kind, int(songs.ids[row]))


def format_date(value: int) -> str:
    """YYYYMMDD (month or day 00 unknown, 0 unknown) as ``YYYY-MM-DD``, ``YYYY-MM``,
    ``YYYY`` or ``unknown``."""
    year, month, day = value // 10000, value // 100 % 100, value % 100
    if not year:
        return "unknown"
    if not month:
        return f"{year:04d}"
    return f"{year:04d}-{month:02d}" + (f"-{day:02d}" if day else "")


# ---------------------------------------------------------------------------------------
# The data report: python -m trainer.dataset --check DIR


def _date_range(dates: np.ndarray) -> str:
    known = dates[dates > 0]
    if not len(known):
        return "no dates"
    return f"{format_date(int(known.min()))} .. {format_date(int(known.max()))}"


def check_report(data: Dataset) -> list[str]:
    """What a loaded dataset holds (songs, genres, playlists, tags, date ranges) and every
    lenient read with its count, as lines for people."""
    songs = data.songs
    dates = songs.issue_dates
    year_only = int(((dates > 0) & (dates // 100 % 100 == 0)).sum())
    year_month = int(((dates // 100 % 100 > 0) & (dates % 100 == 0)).sum())
    lines = [
        f"dataset {data.root}",
        f"songs: {len(songs)}, {len(np.unique(songs.artists.values))} artists, "
        f"{len(np.unique(songs.album_ids[songs.album_ids >= 0]))} albums",
        f"issue dates: {_date_range(dates)}; {int((dates > 0).sum()) - year_only - year_month}"
        f" full, {year_month} year and month only, {year_only} year only, "
        f"{int((dates == 0).sum())} unknown",
    ]
    codes = data.genres.codes
    used = np.unique(np.concatenate([songs.genres.values, songs.detail_genres.values]))
    n_table = data.genres.n_table
    extra = codes.items[n_table:]
    majors = sum(1 for c in codes.items[:n_table] if data.genres.is_major(c))
    lines.append(f"genres: {n_table} codes in genre_gn_all.json ({majors} major), "
                 f"{len(used)} used by songs, {len(extra)} not in genre_gn_all.json"
                 + (f" ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})"
                    if extra else ""))
    for stem, pl in data.playlists.items():
        lines.append(f"{stem}.json: {len(pl)} playlists, {len(pl.songs.values)} song entries "
                     f"({len(np.unique(pl.songs.values))} distinct songs), "
                     f"{len(pl.tags.values)} tag entries "
                     f"({len(np.unique(pl.tags.values))} distinct tags), "
                     f"updt_date {_date_range(pl.updt_dates)}")
    lines.append(f"tags: {len(data.tags)} distinct over all playlist files")
    read_lines = [line for reads in data.lenient.values() for line in reads.lines()]
    lines.append(f"lenient reads: {len(read_lines) or 'none'}")
    lines += [f"  {line}" for line in read_lines]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m trainer.dataset --check DIR [--strict]``."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.dataset",
        description="Load a dataset directory and report what it holds and what was read "
                    "leniently. Exit status 0: usable; 2: not (one line says why).")
    parser.add_argument("--check", required=True, type=Path, metavar="DIR",
                        help="dataset directory (song_meta.json, genre_gn_all.json, "
                             "playlist files)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse every dirty value instead of reading it leniently")
    args = parser.parse_args(argv)
    # The report prints the lenient reads itself; the loader's warnings would repeat them.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        data = load_dataset(args.check, strict=args.strict)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in check_report(data):
        print(line)
    print("usable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
