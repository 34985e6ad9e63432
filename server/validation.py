"""Pure request checks: each turns one protobuf request into a validated domain object or
raises :class:`~server.errors.InvalidArgument` naming the field, the value and the range."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from protos.songrec.v1 import songrec_pb2 as pb2
from server import melon
from server.columns import SongMeta
from server.errors import InvalidArgument
from server.strategies import DEFAULT_STRATEGY, STRATEGIES

# Limits. They bound the work and the answer size of one call; the message-size limit of
# the transport bounds the rest.
MAX_SEEDS = 1000
MAX_TAGS = 256
MAX_TAG_CHARS = 256
MAX_TITLE_CHARS = 1000
MAX_SONGS = 1000
DEFAULT_SONGS = 100
MAX_TAGS_OUT = 100
DEFAULT_TAGS = 10
MAX_K = 1000
DEFAULT_K = 10
MAX_EXCLUDE = 1000
MAX_BATCH = 1000
MAX_BATCH_RESULTS = 100_000  # len(song_ids) * k
MAX_NEW_SONGS = 1000
# Per metadata list. A popular song is in thousands of playlists, and carries their tags.
MAX_META_VALUES = {"genres": 64, "detail_genres": 64, "artist_ids": 64, "playlist_ids": 20_000,
                   "tags": 5_000}
MAX_NAME_CHARS = 1000
MAX_PATH_CHARS = 4096

# Cost model: the work of one call in candidate neighbours looked at, an upper bound that
# the limits above keep finite. One song's list costs k + 1 candidates; with exclusions it
# is deepened by doubling, never past k + 1 + exclusions, so at most twice that. The work
# is done in pieces of server.workers.PIECE_SECONDS each, whatever the cost.
HEAVY_COST = 20_000  # calls costing more run in the heavy lane from their first piece
SLICE_COST = 2_000  # a piece's first slice holds about this much work; later ones are timed

V = TypeVar("V")

log = logging.getLogger(__name__)

# re.ASCII: \d would otherwise accept any Unicode digit ("٢٠١٩").
_GENRE = re.compile(r"GN\d{4}", re.ASCII)


@dataclass(frozen=True)
class ContinueParams:
    """A playlist question in external ids; ``updt_date`` is YYYYMMDD (0 unknown)."""

    seed_ids: tuple[int, ...]
    tags: tuple[str, ...]
    title: str
    updt_date: int
    n_songs: int
    n_tags: int
    strategy: str
    drop_future: bool
    include_names: bool


@dataclass(frozen=True)
class SimilarParams:
    """One or many songs to find neighbours of."""

    song_ids: tuple[int, ...]
    k: int
    exclude: frozenset[int]
    include_names: bool


@dataclass(frozen=True)
class EncodeParams:
    """An unseen song's metadata and how many of its nearest songs to return."""

    song: SongMeta
    k: int
    include_names: bool


@dataclass(frozen=True)
class NewSong:
    """A song to add to the live index (also the write-ahead log's record of it)."""

    song_id: int
    meta: SongMeta
    name: str = ""
    artists: str = ""


@dataclass(frozen=True)
class ReloadParams:
    """Which bundle to load (``None``: the one served now) and whether to checksum it."""

    path: Path | None
    verify: bool


# ---------------------------------------------------------------- field checks


def check_range(field: str, value: int, low: int, high: int) -> int:
    """``value`` if ``low <= value <= high``, else :class:`InvalidArgument` naming ``field``."""
    if not low <= value <= high:
        raise InvalidArgument(f"{field}: {value} is out of range {low}..{high}")
    return value


def optional_count(field: str, message: object, default: int, low: int, high: int) -> int:
    """An ``optional uint32`` field: its default when unset, else range-checked."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return default
    return check_range(field, int(getattr(message, field)), low, high)


def check_length(field: str, values: Sequence[object], high: int, low: int = 0) -> None:
    """Refuse a repeated field with fewer than ``low`` or more than ``high`` entries."""
    if not low <= len(values) <= high:
        raise InvalidArgument(f"{field}: {len(values)} entries, allowed {low}..{high}")


def check_ids(field: str, ids: Iterable[int]) -> tuple[int, ...]:
    """Song/playlist/artist ids are non-negative (Melon's ids start at 0)."""
    out = tuple(int(i) for i in ids)
    for pos, value in enumerate(out):
        if value < 0:
            raise InvalidArgument(f"{field}[{pos}]: {value} is negative; ids are >= 0")
    return out


def unique(values: Iterable[V]) -> tuple[V, ...]:
    """Values without repeats, first occurrence kept, order kept."""
    return tuple(dict.fromkeys(values))


def parse_updt_date(value: str, field: str = "updt_date") -> int:
    """Melon's ``updt_date`` ("YYYY-MM-DD[ hh:mm:ss[.fff]]") as YYYYMMDD; "" -> 0 (unknown).
    The trainer reads playlist files with the same parser (:mod:`server.melon`)."""
    try:
        return melon.parse_updt_date(value)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def parse_issue_date(value: str, field: str, reads: melon.LenientReads | None = None,
                     ident: object = None) -> int:
    """Melon's ``issue_date`` "YYYYMMDD" as an int; month or day "00" mean unknown parts
    (as in song_meta.json); "" and "00000000" mean unknown (0). A date no calendar has is
    read as a partial date (:func:`server.melon.parse_issue_date`), as the trainer reads
    it, and counted in ``reads`` under ``ident``."""
    try:
        number, repaired = melon.parse_issue_date(value)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None
    if repaired is not None and reads is not None:
        reads.note(melon.ISSUE_DATE_PARTIAL, ident)
    return number


def check_text(field: str, value: str, high: int) -> str:
    """Refuse a string longer than ``high`` characters."""
    if len(value) > high:
        raise InvalidArgument(f"{field}: {len(value)} characters, at most {high} allowed")
    return value


def check_metadata(meta: pb2.SongMetadata, field: str, reads: melon.LenientReads | None = None,
                   ident: object = None) -> SongMeta:
    """A ``SongMetadata`` message as the encoder's :class:`SongMeta`, every code checked.
    Soft fields are read as the trainer reads ``song_meta.json``; lenient reads are counted
    in ``reads`` under ``ident``. Genre codes the model does not know are kept (they
    simply match no input column)."""
    for name, most in MAX_META_VALUES.items():
        check_length(f"{field}.{name}", getattr(meta, name), most)
    for pos, code in enumerate(meta.genres):
        if _GENRE.fullmatch(code) is None or not code.endswith("00"):
            raise InvalidArgument(f"{field}.genres[{pos}]: {code[:40]!r} is not a major "
                                  f"genre code (GN followed by 4 digits ending in 00, "
                                  f"e.g. GN0100)")
    for pos, code in enumerate(meta.detail_genres):
        if _GENRE.fullmatch(code) is None:
            raise InvalidArgument(f"{field}.detail_genres[{pos}]: {code[:40]!r} is not a "
                                  f"genre code (GN followed by 4 digits, e.g. GN0105)")
    for pos, tag in enumerate(meta.tags):
        check_text(f"{field}.tags[{pos}]", tag, MAX_TAG_CHARS)
    return SongMeta(genres=tuple(meta.genres), detail_genres=tuple(meta.detail_genres),
                    artists=check_ids(f"{field}.artist_ids", meta.artist_ids),
                    issue_date=parse_issue_date(meta.issue_date, f"{field}.issue_date", reads,
                                                ident),
                    playlists=check_ids(f"{field}.playlist_ids", meta.playlist_ids),
                    tags=tuple(meta.tags))


def report(reads: melon.LenientReads) -> None:
    """Log one line per kind of lenient read of a request (none when it was clean)."""
    for line in reads.lines():
        log.warning("%s", line)


# ---------------------------------------------------------------- requests


def continue_params(request: pb2.ContinuePlaylistRequest) -> ContinueParams:
    """Check a ``ContinuePlaylist`` request; repeated seeds and tags are folded."""
    check_length("seed_song_ids", request.seed_song_ids, MAX_SEEDS)
    check_length("tags", request.tags, MAX_TAGS)
    for pos, tag in enumerate(request.tags):
        check_text(f"tags[{pos}]", tag, MAX_TAG_CHARS)
    # Empty stays empty: the loaded bundle decides (ranked when it has a ranker).
    strategy = request.strategy
    if strategy and strategy not in STRATEGIES:
        raise InvalidArgument(f"strategy: {request.strategy[:40]!r} is unknown; known: "
                              f"{', '.join(STRATEGIES)} (empty = the bundle's default: "
                              f"ranked with a ranker, else {DEFAULT_STRATEGY})")
    return ContinueParams(
        seed_ids=unique(check_ids("seed_song_ids", request.seed_song_ids)),
        tags=unique(request.tags),
        title=check_text("title", request.title, MAX_TITLE_CHARS),
        updt_date=parse_updt_date(request.updt_date),
        n_songs=optional_count("n_songs", request, DEFAULT_SONGS, 1, MAX_SONGS),
        n_tags=optional_count("n_tags", request, DEFAULT_TAGS, 0, MAX_TAGS_OUT),
        strategy=strategy,
        drop_future=request.drop_future,
        include_names=request.include_names,
    )


def similar_params(request: pb2.SimilarSongsRequest) -> SimilarParams:
    """Check a ``SimilarSongs`` request."""
    check_length("exclude_song_ids", request.exclude_song_ids, MAX_EXCLUDE)
    (song_id,) = check_ids("song_id", [request.song_id])
    return SimilarParams((song_id,), optional_count("k", request, DEFAULT_K, 1, MAX_K),
                         frozenset(check_ids("exclude_song_ids", request.exclude_song_ids)),
                         request.include_names)


def similar_batch_params(request: pb2.SimilarSongsBatchRequest) -> SimilarParams:
    """Check a ``SimilarSongsBatch`` request; repeated ids are answered once."""
    check_length("song_ids", request.song_ids, MAX_BATCH, low=1)
    check_length("exclude_song_ids", request.exclude_song_ids, MAX_EXCLUDE)
    k = optional_count("k", request, DEFAULT_K, 1, MAX_K)
    ids = unique(check_ids("song_ids", request.song_ids))
    if len(ids) * k > MAX_BATCH_RESULTS:
        raise InvalidArgument(f"song_ids x k: {len(ids)} x {k} = {len(ids) * k} neighbours, "
                              f"at most {MAX_BATCH_RESULTS} per call; split the batch")
    return SimilarParams(ids, k, frozenset(check_ids("exclude_song_ids",
                                                     request.exclude_song_ids)),
                         request.include_names)


def encode_params(request: pb2.EncodeSongRequest) -> EncodeParams:
    """Check an ``EncodeSong`` request."""
    if not request.HasField("song"):
        raise InvalidArgument("song: missing; give at least one of genres, detail_genres, "
                              "artist_ids, issue_date, playlist_ids, tags")
    reads = melon.LenientReads("EncodeSong")
    params = EncodeParams(check_metadata(request.song, "song", reads),
                          optional_count("k", request, DEFAULT_K, 0, MAX_K),
                          request.include_names)
    report(reads)
    return params


def new_songs(request: pb2.AddSongsRequest) -> list[NewSong]:
    """Check an ``AddSongs`` request: 1..1000 songs, each id once, metadata well formed."""
    check_length("songs", request.songs, MAX_NEW_SONGS, low=1)
    out: list[NewSong] = []
    seen: dict[int, int] = {}
    reads = melon.LenientReads("AddSongs")
    for pos, song in enumerate(request.songs):
        (song_id,) = check_ids(f"songs[{pos}].song_id", [song.song_id])
        if song_id in seen:
            raise InvalidArgument(f"songs[{pos}].song_id: {song_id} repeats songs"
                                  f"[{seen[song_id]}]; each id may appear once per call")
        seen[song_id] = pos
        if not song.HasField("metadata"):
            raise InvalidArgument(f"songs[{pos}].metadata: missing")
        out.append(NewSong(song_id, check_metadata(song.metadata, f"songs[{pos}].metadata",
                                                   reads, song_id),
                           check_text(f"songs[{pos}].name", song.name, MAX_NAME_CHARS),
                           check_text(f"songs[{pos}].artists", song.artists,
                                      MAX_NAME_CHARS)))
    report(reads)
    return out


def reload_params(request: pb2.ReloadModelRequest) -> ReloadParams:
    """Check a ``ReloadModel`` request (the path itself is checked by loading it)."""
    path = check_text("bundle_path", request.bundle_path, MAX_PATH_CHARS).strip()
    if "\x00" in path:
        raise InvalidArgument("bundle_path: contains a NUL character")
    return ReloadParams(Path(path) if path else None, not request.skip_verify)


# ---------------------------------------------------------------- cost model


def lookup_cost(k: int, excluded: int) -> int:
    """Candidates one song's neighbour list looks at, at most (see the cost model)."""
    return k + 1 if excluded == 0 else 2 * (k + 1 + excluded)


def similar_cost(params: SimilarParams) -> int:
    """``SimilarSongs``/``SimilarSongsBatch``: ids x lookup cost (at most 1000 x 2 x 2001
    under the limits; ``song_ids x k`` alone is capped at ``MAX_BATCH_RESULTS``)."""
    return len(params.song_ids) * lookup_cost(params.k, len(params.exclude))


def continue_cost(params: ContinueParams) -> int:
    """``ContinuePlaylist``: the seeds with a share each read a list ``n_songs + seeds``
    deep (``ae-quota``, and the other strategies' top-up), then ``n_songs`` are picked."""
    seeds = len(params.seed_ids)
    return min(params.n_songs, seeds) * (params.n_songs + seeds) + params.n_songs


def first_slice(item_cost: int) -> int:
    """Items in a piece's first slice, when each costs ``item_cost``."""
    return max(1, SLICE_COST // max(item_cost, 1))
