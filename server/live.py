"""One served model: a loaded bundle plus the songs added at run time, behind a readers-writer
lock, answering in external ids. The one place where rows, tag indices and playlist
positions become song ids, tags, playlist ids and names. Every method blocks: call them
from worker threads."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.added import NEAR_CANDIDATES
from server.config import ServerConfig
from server.engine import Engine
from server.errors import InvalidArgument, NotFound
from server.locks import RWLock
from server.prefetch import PrefetchedLists
from server.strategies import (
    REASON_ARTIST,
    REASON_PLAYLIST,
    REASON_SEED,
    REASON_TAG,
    Answer,
    Query,
    quota_lists,
)
from server.validation import (
    ContinueParams,
    EncodeParams,
    NewSong,
    SimilarParams,
    first_slice,
    lookup_cost,
)
from server.workers import Budget, Progress

log = logging.getLogger(__name__)

ENCODE_CHUNK = 1000  # songs per encoder call when replaying the log
INSERT_FIRST = 16  # songs in the first slice of an insert; later slices are timed
READERS_TURN_S = 0.001  # the pause between pieces of an insert, for waiting queries


@dataclass(frozen=True)
class Continuation:
    """A ``ContinuePlaylist`` answer in external ids. ``reasons`` hold (kind, source): the
    seed song id, neighbour playlist id or question tag it came from, or None."""

    song_ids: list[int]
    song_scores: list[float]
    reasons: list[tuple[str, int | str | None]]
    names: list[tuple[str, str]] | None
    tags: list[str]
    tag_scores: list[float]
    unknown_seed_ids: list[int]
    unknown_tags: list[str]
    strategy: str


@dataclass(frozen=True)
class Neighbours:
    """Nearest songs of one song (or code), best first."""

    song_id: int
    ids: list[int]
    similarities: list[float]
    names: list[tuple[str, str]] | None


@dataclass(frozen=True)
class Encoded:
    """An unseen song's code and its nearest songs."""

    code: list[float]
    known_columns: int
    neighbours: Neighbours


class LiveModel:
    """An :class:`Engine` and the songs added to its index since it was loaded.

    Rows ``0..n-1`` are the bundle's songs; added songs get rows ``n, n+1, ...`` in the order
    they were added. Queries hold the lock shared; inserts hold it exclusively, because
    hnswlib must not be searched while ``add_items`` or ``resize_index`` runs.
    """

    def __init__(self, engine: Engine, source: Path) -> None:
        self.engine = engine
        self.source = source
        self.lock = RWLock()
        self._added_ids: list[int] = []
        self._row_of_added: dict[int, int] = {}
        self._added_names: list[tuple[str, str]] = []
        # The song store's rows up to this sequence number are applied (served, or
        # counted in ``unplaceable``); the follower reads on from here.
        self.applied_seq = 0
        self.unplaceable = 0  # stored songs whose metadata this model cannot encode

    @staticmethod
    def load(path: Path, *, verify: bool, capacity: int, threads: int,
             song_ef: int | None = None, playlist_ef: int | None = None) -> LiveModel:
        """Load and verify a bundle (raises :class:`~server.bundle.BundleError`)."""
        return LiveModel(Engine.load(path, verify=verify, capacity=capacity, threads=threads,
                                     song_ef=song_ef, playlist_ef=playlist_ef), path)

    @staticmethod
    def configured(config: ServerConfig, path: Path, verify: bool) -> LiveModel:
        """:meth:`load` with the server's flags (index room, threads, ef overrides)."""
        return LiveModel.load(path, verify=verify, capacity=config.capacity,
                              threads=config.threads, song_ef=config.song_ef or None,
                              playlist_ef=config.playlist_ef or None)

    # ------------------------------------------------------------ ids and rows

    @property
    def version(self) -> str:
        return self.engine.model_version

    @property
    def n_bundle(self) -> int:
        return self.engine.catalog.n_songs

    @property
    def n_added(self) -> int:
        return len(self._added_ids)

    def row_of(self, song_id: int) -> int:
        """The row of a served song id, -1 when unknown (call under the lock)."""
        row = self.engine.catalog.row_of_id.get(song_id)
        if row is not None:
            return row
        return self._row_of_added.get(song_id, -1)

    def rows_of(self, song_ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Rows of the known ids (in order) and the unknown ids (call under the lock)."""
        rows = self.rows_or_missing(song_ids)
        known = rows >= 0
        unknown = [song_ids[i] for i in np.flatnonzero(~known).tolist()]
        return rows[known], unknown

    def rows_or_missing(self, song_ids: Sequence[int]) -> np.ndarray:
        """The row of each id, -1 where it is not served (call under the lock)."""
        if not len(song_ids):
            return np.zeros(0, dtype=np.int64)
        rows = self.engine.catalog.row_of_id.rows(song_ids)
        for i in np.flatnonzero(rows < 0).tolist():  # not in the bundle: added at run time?
            rows[i] = self._row_of_added.get(song_ids[i], -1)
        return rows

    def ids_of(self, rows: Sequence[int] | np.ndarray) -> list[int]:
        """External ids of rows (call under the lock)."""
        song_ids = self.engine.catalog.song_ids
        n = len(song_ids)
        positions = np.asarray(rows, dtype=np.int64)
        if not len(positions) or int(positions.max()) < n:
            found: list[int] = song_ids[positions].tolist()
            return found
        return [int(song_ids[r]) if r < n else self._added_ids[r - n] for r in rows]

    def names_of(self, rows: Sequence[int]) -> list[tuple[str, str]]:
        """(name, artists) of rows; empty strings when unknown (call under the lock)."""
        n = self.n_bundle
        return [self.engine.song_name(r) if r < n else self._added_names[r - n] for r in rows]

    # ------------------------------------------------------------ queries

    def continue_playlist(self, params: ContinueParams) -> Continuation:
        """Run a strategy on a question given in external ids (in one go)."""
        job = self.continuation(params)
        job.step(Budget(None))
        assert job.result is not None
        return job.result

    def continuation(self, params: ContinueParams) -> ContinuationJob:
        """A question to answer in pieces of bounded time (:class:`ContinuationJob`)."""
        return ContinuationJob(self, params)

    def _question(self, params: ContinueParams) -> tuple[Query, list[int], list[str]]:
        """The question in rows, the unknown seed ids and tags (call under the lock)."""
        catalog = self.engine.catalog
        tag_rows, unknown_tags = [], []
        for tag in params.tags:
            index = catalog.tag_index.get(tag)
            if index is None:
                unknown_tags.append(tag)
            else:
                tag_rows.append(index)
        seeds, unknown = self.rows_of(params.seed_ids)
        return (Query(seeds, np.asarray(tag_rows, dtype=np.int32), params.title,
                      params.updt_date, params.n_songs, params.n_tags, params.drop_future),
                unknown, unknown_tags)

    def _continuation(self, params: ContinueParams, answer: Answer, unknown: list[int],
                      unknown_tags: list[str]) -> Continuation:
        """A strategy's answer in external ids (call under the lock)."""
        catalog = self.engine.catalog
        rows = answer.songs.tolist()
        song_ids = self.ids_of(rows)
        reasons: list[tuple[str, int | str | None]] = []
        for kind, source in answer.reasons:
            if kind in (REASON_SEED, REASON_ARTIST):
                reasons.append((kind, self.ids_of([source])[0]))
            elif kind == REASON_PLAYLIST:
                reasons.append((kind, int(catalog.playlist_ids[source])))
            elif kind == REASON_TAG:
                reasons.append((kind, catalog.tags[source]))
            else:
                reasons.append((kind, None))
        names = self.names_of(rows) if params.include_names else None
        return Continuation(song_ids, answer.song_scores.tolist(), reasons, names,
                            [catalog.tags[t] for t in answer.tags.tolist()],
                            answer.tag_scores.tolist(), unknown, unknown_tags,
                            answer.strategy)

    def similar(self, params: SimilarParams) -> tuple[list[Neighbours], list[int]]:
        """Nearest songs of each known id (in request order), and the unknown ids (in one
        go; :meth:`similar_batch` works in pieces)."""
        results: list[Neighbours] = []
        unknown: list[int] = []

        def emit(found: list[Neighbours], missing: list[int]) -> None:
            results.extend(found)
            unknown.extend(missing)

        self.similar_batch(params, emit).step(Budget(None))
        return results, unknown

    def similar_batch(self, params: SimilarParams,
                      emit: Callable[[list[Neighbours], list[int]], None]) -> SimilarJob:
        """Many songs' neighbours in pieces of bounded time (:class:`SimilarJob`)."""
        return SimilarJob(self, params, emit)

    def similar_one(self, params: SimilarParams) -> Neighbours:
        """``similar`` for a single id; :class:`NotFound` when the index lacks it."""
        (found,) = self.similar_each([params])
        if isinstance(found, NotFound):
            raise found
        return found

    def similar_each(self, requests: Sequence[SimilarParams]) -> list[Neighbours | NotFound]:
        """Many single-song requests (each with its own k and exclusions) answered by one
        index query; an unknown song gives a :class:`NotFound` in its place."""
        with self.lock.read():
            rows = self.rows_or_missing([p.song_ids[0] for p in requests])
            known = np.flatnonzero(rows >= 0)
            found: dict[int, Neighbours] = {}
            if len(known):
                chosen = [requests[i] for i in known.tolist()]
                nothing = np.zeros(0, dtype=np.int64)
                excluded = [self.rows_of(sorted(p.exclude))[0] if p.exclude else nothing
                            for p in chosen]
                found = dict(zip(known.tolist(), self._neighbour_lists(
                    [p.song_ids[0] for p in chosen], rows[known],
                    np.asarray([p.k for p in chosen]), excluded,
                    [p.include_names for p in chosen]), strict=True))
            return [found[i] if i in found else NotFound(
                f"song_id: {params.song_ids[0]} is not in the index of model "
                f"{self.version} ({self.n_bundle + self.n_added} songs)")
                for i, params in enumerate(requests)]

    def _neighbour_lists(self, song_ids: Sequence[int], rows: np.ndarray,
                         k: int | np.ndarray, excluded: Sequence[np.ndarray],
                         include_names: Sequence[bool]) -> list[Neighbours]:
        """The neighbours of known songs, one lookup for all (call under the lock):
        numpy's cost per call, not the work, dominated when each was answered alone."""
        labels, sims, offsets = self.engine.songs.similar_lists(rows, k, excluded)
        ids, similarities = self.ids_of(labels), sims.tolist()
        names = self.names_of(labels.tolist()) if any(include_names) else None
        bounds = offsets.tolist()
        return [Neighbours(song_id, ids[a:b], similarities[a:b],
                           names[a:b] if names is not None and with_names else None)
                for song_id, with_names, a, b in zip(song_ids, include_names, bounds,
                                                     bounds[1:], strict=False)]

    def encode(self, params: EncodeParams) -> Encoded:
        """Code of an unseen song and its nearest songs."""
        codes, known = self.engine.encoder.encode([params.song])
        self._check_known(known, ["song"])
        neighbours = Neighbours(-1, [], [], [] if params.include_names else None)
        if params.k:
            with self.lock.read():
                labels, sims = self.engine.nearest_to(codes, params.k)
                neighbours = self._neighbours(-1, labels[0].tolist(), sims[0].tolist(),
                                              params.include_names)
        return Encoded(codes[0].tolist(), known[0], neighbours)

    def _neighbours(self, song_id: int, rows: list[int], sims: list[float],
                    include_names: bool) -> Neighbours:
        return Neighbours(song_id, self.ids_of(rows), sims,
                          self.names_of(rows) if include_names else None)

    def _check_known(self, known: Sequence[int], fields: Sequence[str]) -> None:
        for count, field in zip(known, fields, strict=True):
            if count == 0:
                groups = ", ".join(self.engine.manifest.column_groups)
                raise InvalidArgument(f"{field}: none of its metadata is known to model "
                                      f"{self.version} (its input columns: {groups}); the "
                                      f"song cannot be placed")

    # ------------------------------------------------------------ inserts

    def absent(self, songs: Sequence[NewSong]) -> tuple[list[NewSong], list[int]]:
        """Split songs into those not yet served and the ids already served."""
        fresh, existing = [], []
        with self.lock.read():
            for song in songs:
                if self.row_of(song.song_id) >= 0:
                    existing.append(song.song_id)
                else:
                    fresh.append(song)
        return fresh, existing

    def encode_new(self, songs: Sequence[NewSong], fields: Sequence[str]) -> np.ndarray:
        """Codes of songs to add; :class:`InvalidArgument` naming the first unplaceable one."""
        codes, known = self.engine.encoder.encode([s.meta for s in songs])
        self._check_known(known, fields)
        return codes

    def insert(self, songs: Sequence[NewSong], codes: np.ndarray) -> None:
        """Add encoded songs to the index (grows it when full). Queries cannot run while
        the exclusive lock is held, so songs go in a piece (``server.workers``) at a time,
        with a pause between pieces for the queries that waited: a thousand songs at once
        held every query for their whole insert (~80 ms on the demo bundle, about ten times
        that with Melon's wider codes and denser graph). Their nearest bundle songs (for
        the links of ``HnswSearch.add``) are searched first, under the shared lock."""
        if not songs:
            return
        with self.lock.read():  # the bundle's graph only: no writer changes it
            hits, hit_sims = self.engine.songs.search_bundle(codes, NEAR_CANDIDATES)
        progress = Progress(len(songs), INSERT_FIRST)

        def add(first: int, end: int) -> None:
            with self.lock.write():
                start = self.n_bundle + len(self._added_ids)
                self.engine.songs.add(codes[first:end],
                                      np.arange(start, start + end - first, dtype=np.int64),
                                      (hits[first:end], hit_sims[first:end]))
                for offset, song in enumerate(songs[first:end]):
                    self._row_of_added[song.song_id] = start + offset
                    self._added_ids.append(song.song_id)
                    self._added_names.append((song.name, song.artists))
                self.engine.artists.add(range(start, start + end - first),
                                        [s.meta.artists for s in songs[first:end]])

        while not progress.step(Budget(), add):
            time.sleep(READERS_TURN_S)

    def replay(self, songs: Sequence[NewSong]) -> tuple[int, int]:
        """Add stored songs (skipping served ones and, with a warning naming them, ones
        this model cannot place). Returns (added, skipped as unplaceable)."""
        fresh, _ = self.absent(songs)
        added = 0
        skipped: list[int] = []
        for start in range(0, len(fresh), ENCODE_CHUNK):
            chunk = fresh[start : start + ENCODE_CHUNK]
            codes, known = self.engine.encoder.encode([s.meta for s in chunk])
            keep = [i for i, n in enumerate(known) if n > 0]
            skipped.extend(chunk[i].song_id for i, n in enumerate(known) if n == 0)
            self.insert([chunk[i] for i in keep], codes[keep])
            added += len(keep)
        if skipped:
            self.unplaceable += len(skipped)
            shown = ", ".join(str(i) for i in skipped[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            log.warning("model %s knows none of the metadata of %d stored songs (ids %s%s; "
                        "its input columns: %s); they stay in the song store but this model "
                        "does not serve them", self.version, len(skipped), shown, more,
                        ", ".join(self.engine.manifest.column_groups))
        return added, len(skipped)

    # ------------------------------------------------------------ metadata

    def info(self) -> dict[str, Any]:
        """Version, counts, dims, strategies and index parameters."""
        m = self.engine.manifest
        return {"model_version": m.model_version, "created": m.created,
                "data_fingerprint": m.data_fingerprint, "code_dim": m.code_dim,
                "input_dim": m.input_dim, "column_groups": dict(m.column_groups),
                "bundle_songs": self.n_bundle, "added_songs": self.n_added,
                "indexed_songs": self.n_bundle + self.n_added,
                "playlists": len(self.engine.catalog.playlist_ids),
                "tags": len(self.engine.catalog.tags), "strategies": list(self.engine.strategies),
                "default_strategy": self.engine.default_strategy,
                "song_index": dataclasses.replace(m.song_index, ef=self.engine.songs.index.ef),  # type: ignore[attr-defined]
                "playlist_index": dataclasses.replace(
                    m.playlist_index, ef=self.engine.playlists.index.ef)}  # type: ignore[attr-defined]


class SimilarJob:
    """``SimilarSongsBatch`` worked through in slices of its ids, a piece at a time
    (:meth:`step`, see ``server.workers``); ``emit(results, unknown)`` gets each slice's
    answers in request order. Exclusions are looked up again in each piece: songs may be
    added between pieces."""

    def __init__(self, model: LiveModel, params: SimilarParams,
                 emit: Callable[[list[Neighbours], list[int]], None]) -> None:
        self.model = model
        self.params = params
        self.emit = emit
        self.progress = Progress(len(params.song_ids), first_slice(
            lookup_cost(params.k, len(params.exclude))))
        self._excluded = np.zeros(0, dtype=np.int64)

    def step(self, budget: Budget) -> bool:
        """Work until ``budget`` is spent; True once every id is answered."""
        model = self.model
        with model.lock.read():
            self._excluded = model.rows_of(sorted(self.params.exclude))[0]
            return self.progress.step(budget, self._slice)

    def _slice(self, start: int, end: int) -> None:
        ids = self.params.song_ids[start:end]
        model = self.model
        rows, unknown = model.rows_of(ids)
        missing = set(unknown)
        known = [i for i in ids if i not in missing]
        found = model._neighbour_lists(known, rows, self.params.k,
                                       [self._excluded] * len(rows),
                                       [self.params.include_names] * len(rows))
        self.emit(found, unknown)


class ContinuationJob:
    """``ContinuePlaylist`` worked through a piece at a time (:meth:`step`, see
    ``server.workers``): the seed lists that need graph searches (songs added at run time,
    bundles without a neighbour table) are computed a slice of seeds at a time, then the
    strategy runs on them (:class:`~server.search.PrefetchedLists`). A question whose
    lists all come from the table is answered in its first piece. ``result`` holds the
    answer once :meth:`step` has returned True."""

    def __init__(self, model: LiveModel, params: ContinueParams) -> None:
        self.model = model
        self.params = params
        self.result: Continuation | None = None
        self._question: tuple[Query, list[int], list[str]] | None = None
        self._lists: PrefetchedLists | None = None
        self._graph_rows = np.zeros(0, dtype=np.int64)
        self.progress = Progress(0)

    def step(self, budget: Budget) -> bool:
        """Work until ``budget`` is spent; True once ``result`` is set."""
        model = self.model
        with model.lock.read():
            if self._question is None:
                self._start()
            if not self.progress.finished:
                if not self.progress.step(budget, self._fetch) or budget.left() <= 0:
                    return False
            assert self._question is not None
            query, unknown, unknown_tags = self._question
            answer = model.engine.continue_playlist(self.params.strategy, query, self._lists)
            self.result = model._continuation(self.params, answer, unknown, unknown_tags)
        return True

    def _start(self) -> None:
        model = self.model
        self._question = model._question(self.params)
        rows, k = quota_lists(self._question[0])
        songs = model.engine.songs
        self._graph_rows = rows[songs.needs_graph(rows, k, allow_short=True)]
        if len(self._graph_rows):
            self._lists = PrefetchedLists(songs, k)
            self.progress = Progress(len(self._graph_rows), first_slice(k))

    def _fetch(self, start: int, end: int) -> None:
        assert self._lists is not None
        self._lists.fetch(self._graph_rows[start:end])
