"""Builds every protobuf response, the counterpart of :mod:`server.validation`: answers in
external ids (:mod:`server.live`) in, messages (or wire bytes, :mod:`server.wire`) out.
Pure functions; the only place that knows the ``Reason`` enum."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from protos.songrec.v1 import songrec_pb2 as pb2
from server.bundle import IndexParams
from server.live import Continuation, Encoded, LiveModel, Neighbours
from server.strategies import (
    DEFAULT_STRATEGY,
    REASON_ALS,
    REASON_ARTIST,
    REASON_PLAYLIST,
    REASON_POPULAR,
    REASON_SEED,
    REASON_TAG,
    REASON_TITLE,
    STRATEGIES,
)
from server.wire import WireMessage, similar_responses

# Why a song was recommended: the strategies' reason codes as the API's enum.
REASON_KINDS = {REASON_SEED: pb2.Reason.SEED_NEIGHBOUR,
                REASON_PLAYLIST: pb2.Reason.PLAYLIST_NEIGHBOUR,
                REASON_TAG: pb2.Reason.TAG, REASON_TITLE: pb2.Reason.TITLE,
                REASON_POPULAR: pb2.Reason.POPULAR, REASON_ALS: pb2.Reason.ALS,
                REASON_ARTIST: pb2.Reason.ARTIST}


def continuation_pb(answer: Continuation, version: str) -> pb2.ContinuePlaylistResponse:
    """A ``ContinuePlaylist`` answer as its response message."""
    response = pb2.ContinuePlaylistResponse(unknown_seed_ids=answer.unknown_seed_ids,
                                            unknown_tags=answer.unknown_tags,
                                            strategy=answer.strategy, model_version=version)
    songs = response.songs
    # Fields are set in place: building a Reason and passing it to add() copies it, and
    # empty name fields cost as much as the rest (upb), so both are skipped.
    for i, (song_id, score, (kind, source)) in enumerate(zip(
            answer.song_ids, answer.song_scores, answer.reasons, strict=True)):
        song = songs.add(song_id=song_id, score=score)
        reason = song.reason
        reason.kind = REASON_KINDS.get(kind, pb2.Reason.KIND_UNSPECIFIED)
        if kind in (REASON_SEED, REASON_ARTIST) and isinstance(source, int):
            reason.seed_song_id = source
        elif kind == REASON_PLAYLIST and isinstance(source, int):
            reason.playlist_id = source
        elif kind == REASON_TAG and isinstance(source, str):
            reason.tag = source
        if answer.names is not None:
            song.name, song.artists = answer.names[i]
    for tag, score in zip(answer.tags, answer.tag_scores, strict=True):
        response.tags.add(tag=tag, score=score)
    return response


def fill_neighbours(target: Any, found: Neighbours) -> None:
    """Append ``found`` to a repeated ``Neighbour`` field."""
    if found.names is None:
        # Without the empty name fields: a third of the cost per neighbour (upb).
        for song_id, similarity in zip(found.ids, found.similarities, strict=True):
            target.add(song_id=song_id, similarity=similarity)
        return
    for song_id, similarity, (name, artists) in zip(found.ids, found.similarities,
                                                    found.names, strict=True):
        target.add(song_id=song_id, similarity=similarity, name=name, artists=artists)


def neighbours_pb(found: Neighbours, version: str) -> pb2.SimilarSongsResponse:
    """One song's neighbours as a ``SimilarSongsResponse``."""
    response = pb2.SimilarSongsResponse(song_id=found.song_id, model_version=version)
    fill_neighbours(response.neighbours, found)
    return response


def similar_responses_of(answers: Sequence[Neighbours], version: str
                         ) -> list[pb2.SimilarSongsResponse | WireMessage]:
    """Responses of a batch of lookups: encoded together straight to wire bytes (names
    need the protobuf runtime: such answers are built as messages)."""
    if any(found.names is not None for found in answers):
        return [neighbours_pb(found, version) for found in answers]
    ids = np.fromiter(itertools.chain.from_iterable(found.ids for found in answers),
                      dtype=np.int64)
    sims = np.fromiter(itertools.chain.from_iterable(found.similarities for found in answers),
                       dtype=np.float32)
    bounds = [0, *itertools.accumulate(len(found.ids) for found in answers)]
    return list(similar_responses([found.song_id for found in answers], version, ids, sims,
                                  bounds))


def batch_pb(results: Sequence[Neighbours], unknown: Sequence[int],
             version: str) -> pb2.SimilarSongsBatchResponse:
    """Many songs' neighbours as a ``SimilarSongsBatchResponse``."""
    response = pb2.SimilarSongsBatchResponse(model_version=version)
    add_batch_results(response, results, unknown)
    return response


def add_batch_results(response: pb2.SimilarSongsBatchResponse, results: Sequence[Neighbours],
                      unknown: Sequence[int]) -> None:
    """Append some songs' neighbours (and unknown ids) to a ``SimilarSongsBatchResponse``."""
    response.unknown_song_ids.extend(unknown)
    for found in results:
        item = response.results.add(song_id=found.song_id, model_version=response.model_version)
        fill_neighbours(item.neighbours, found)


def encoded_pb(encoded: Encoded, version: str) -> pb2.EncodeSongResponse:
    """An unseen song's code and neighbours as an ``EncodeSongResponse``."""
    response = pb2.EncodeSongResponse(code=encoded.code, known_columns=encoded.known_columns,
                                      model_version=version)
    fill_neighbours(response.neighbours, encoded.neighbours)
    return response


def index_params_pb(params: IndexParams) -> pb2.IndexParams:
    return pb2.IndexParams(space=params.space, dim=params.dim, m=params.m,
                           ef_construction=params.ef_construction, ef=params.ef,
                           count=params.count)


def model_info_pb(model: LiveModel | None) -> pb2.ModelInfo:
    """What is served; ``loaded=False`` (with the strategies) when nothing is."""
    if model is None:
        return pb2.ModelInfo(loaded=False, strategies=STRATEGIES,
                             default_strategy=DEFAULT_STRATEGY)
    info = model.info()
    return pb2.ModelInfo(
        loaded=True, model_version=info["model_version"], created=info["created"],
        data_fingerprint=info["data_fingerprint"], code_dim=info["code_dim"],
        input_dim=info["input_dim"], column_groups=info["column_groups"],
        bundle_songs=info["bundle_songs"], added_songs=info["added_songs"],
        indexed_songs=info["indexed_songs"], playlists=info["playlists"], tags=info["tags"],
        strategies=info["strategies"], default_strategy=info["default_strategy"],
        song_index=index_params_pb(info["song_index"]),
        playlist_index=index_params_pb(info["playlist_index"]))


def added_pb(added: Sequence[int], existing: Sequence[int], model: LiveModel
             ) -> pb2.AddSongsResponse:
    """What ``AddSongs`` added, what was served or stored already, and the index size."""
    return pb2.AddSongsResponse(added_song_ids=added, existing_song_ids=existing,
                                indexed_songs=model.n_bundle + model.n_added,
                                model_version=model.version)


def reloaded_pb(previous: LiveModel | None, current: LiveModel, replayed: int,
                seconds: float) -> pb2.ReloadModelResponse:
    """The models before and after a reload."""
    return pb2.ReloadModelResponse(previous=model_info_pb(previous),
                                   current=model_info_pb(current), replayed_songs=replayed,
                                   seconds=seconds)
