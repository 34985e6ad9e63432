"""Typed songrec clients over the generated gRPC stubs, synchronous and asyncio, returning
plain dataclasses and raising one :class:`ClientError` that keeps the status code.

    with SongRecClient("localhost:50051") as client:
        for n in client.similar(123, k=20, include_names=True).neighbours:
            print(n.song_id, n.similarity, n.name)

Both clients take the same arguments: ``target`` (``SONGREC_TARGET``, else
``localhost:50051``; several replicas as ``dns:///host:port``, a name with one address per
replica, or as comma-separated addresses ``host1:port,host2:port``: both spread calls with
gRPC's ``round_robin`` policy, see :func:`balanced`), ``token`` (``SONGREC_TOKEN``; sent
as ``authorization: Bearer``), TLS, a default deadline in seconds (across retries) and a
:class:`RetryPolicy`. Only ``UNAVAILABLE`` is retried, with exponential backoff and jitter:
every other status is an answer (a bad request stays bad), and ``DEADLINE_EXCEEDED`` means
the time is spent. One exception, in the channel itself (:data:`DRAIN_RETRY`): a
``CANCELLED`` that a draining replica answers to a call it never started is tried again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "SONGREC_TARGET"
TOKEN_ENV = "SONGREC_TOKEN"
DEFAULT_DEADLINE = 10.0
RECOMMENDER_SERVICE = "songrec.v1.Recommender"
ADMIN_SERVICE = "songrec.v1.Admin"
# Batch answers with names can pass gRPC's 4 MiB default; the server has its own limit.
MAX_RECEIVE_BYTES = 64 << 20

# A server whose drain (grpc.aio stop()) begins kills the calls it had accepted on an open
# connection but not yet started, answering them CANCELLED as a normal gRPC status; a
# balancer in front (nginx) passes that on instead of retrying (docs/OPERATIONS.md,
# Replicas). Every songrec RPC is idempotent (AddSongs keys songs by id), so the channel
# tries such a call again, on the next replica; gRPC's retries only ever resend a call
# whose answer carried nothing but the status, and a cancel by this client is final.
DRAIN_RETRY: tuple[str, str] = ("grpc.service_config", json.dumps({"methodConfig": [{
    "name": [{"service": "songrec.v1.Recommender"}, {"service": "songrec.v1.Admin"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["CANCELLED"]}}]}))

_REASON_NAMES = {pb2.Reason.SEED_NEIGHBOUR: "seed_neighbour",
                 pb2.Reason.PLAYLIST_NEIGHBOUR: "playlist_neighbour",
                 pb2.Reason.TAG: "tag", pb2.Reason.TITLE: "title",
                 pb2.Reason.POPULAR: "popular", pb2.Reason.ALS: "als",
                 pb2.Reason.ARTIST: "artist"}


class ClientError(Exception):
    """A call that failed: the gRPC status ``code``, the server's ``message`` (status
    details), the RPC ``method`` and how many ``attempts`` were made."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str,
                 attempts: int = 1) -> None:
        super().__init__(f"{method}: {code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method
        self.attempts = attempts

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError, method: str, attempts: int) -> ClientError:
        """Wrap a ``grpc.RpcError`` (sync or aio) raised by ``method``."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", method, attempts)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Neighbour:
    """A nearby song; ``name`` and ``artists`` are filled only with ``include_names``."""

    song_id: int
    similarity: float
    name: str = ""
    artists: str = ""


@dataclass(frozen=True)
class Similar:
    """The nearest songs of ``song_id``, best first."""

    song_id: int
    neighbours: tuple[Neighbour, ...]
    model_version: str


@dataclass(frozen=True)
class SimilarBatch:
    """One :class:`Similar` per known id in request order, and the unknown ids."""

    results: tuple[Similar, ...]
    unknown_song_ids: tuple[int, ...]
    model_version: str


@dataclass(frozen=True)
class Reason:
    """Why a song was recommended: ``kind`` is one of seed_neighbour, playlist_neighbour,
    tag, title, popular, als, artist (or unspecified); ``source`` the seed song id (also of
    an artist reason), playlist id or tag."""

    kind: str
    source: int | str | None = None


@dataclass(frozen=True)
class RecommendedSong:
    """A song of a continuation, its strategy-specific score and why it was chosen."""

    song_id: int
    score: float
    reason: Reason
    name: str = ""
    artists: str = ""


@dataclass(frozen=True)
class RecommendedTag:
    """A tag of a continuation and its score (higher is better)."""

    tag: str
    score: float


@dataclass(frozen=True)
class Continuation:
    """A playlist continuation: ranked songs and tags, the seeds and tags the model did not
    know, and the strategy that answered."""

    songs: tuple[RecommendedSong, ...]
    tags: tuple[RecommendedTag, ...]
    unknown_seed_ids: tuple[int, ...]
    unknown_tags: tuple[str, ...]
    strategy: str
    model_version: str


@dataclass(frozen=True)
class SongMetadata:
    """A song as in Melon's ``song_meta.json`` (plus the playlists and tags it is known to
    be in). ``issue_date`` is "YYYYMMDD"; "" when unknown."""

    genres: tuple[str, ...] = ()
    detail_genres: tuple[str, ...] = ()
    artist_ids: tuple[int, ...] = ()
    issue_date: str = ""
    playlist_ids: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def from_song_meta(cls, record: Mapping[str, Any]) -> SongMetadata:
        """From one ``song_meta.json`` record; the optional keys ``playlist_ids`` and
        ``tags`` are read too. Raises ``ValueError`` naming the field that is malformed."""
        return cls(genres=_strings(record, "song_gn_gnr_basket"),
                   detail_genres=_strings(record, "song_gn_dtl_gnr_basket"),
                   artist_ids=_ints(record, "artist_id_basket"),
                   issue_date=_issue_date(record.get("issue_date")),
                   playlist_ids=_ints(record, "playlist_ids"),
                   tags=_strings(record, "tags"))


@dataclass(frozen=True)
class NewSong:
    """A song to add to the served index (``Admin.AddSongs``)."""

    song_id: int
    metadata: SongMetadata
    name: str = ""
    artists: str = ""

    @classmethod
    def from_song_meta(cls, record: Mapping[str, Any]) -> NewSong:
        """From one ``song_meta.json`` record (``id``, ``song_name``,
        ``artist_name_basket`` and the metadata of :meth:`SongMetadata.from_song_meta`)."""
        song_id = record.get("id")
        if isinstance(song_id, bool) or not isinstance(song_id, int) or song_id < 0:
            raise ValueError(f"id: {song_id!r} is not a non-negative integer")
        name = record.get("song_name") or ""
        if not isinstance(name, str):
            raise ValueError(f"song_name: {name!r} is not a string")
        return cls(song_id, SongMetadata.from_song_meta(record), name,
                   ", ".join(_strings(record, "artist_name_basket")))


@dataclass(frozen=True)
class Encoded:
    """An unseen song's code, its nearest songs, and how many of its metadata values the
    model knows (0 would have been refused)."""

    code: tuple[float, ...]
    neighbours: tuple[Neighbour, ...]
    known_columns: int
    model_version: str


@dataclass(frozen=True)
class AddedSongs:
    """Ids inserted by an ``AddSongs`` call, ids already served (unchanged), and the
    index size after it."""

    added_song_ids: tuple[int, ...]
    existing_song_ids: tuple[int, ...]
    indexed_songs: int
    model_version: str


@dataclass(frozen=True)
class IndexInfo:
    """hnswlib parameters of one of the served indexes."""

    space: str
    dim: int
    m: int
    ef_construction: int
    ef: int
    count: int


@dataclass(frozen=True)
class ModelInfo:
    """What the server has loaded (``loaded`` False: nothing yet)."""

    loaded: bool
    model_version: str
    created: str
    data_fingerprint: str
    code_dim: int
    input_dim: int
    column_groups: dict[str, int]
    bundle_songs: int
    added_songs: int
    indexed_songs: int
    playlists: int
    tags: int
    strategies: tuple[str, ...]
    default_strategy: str
    song_index: IndexInfo
    playlist_index: IndexInfo


@dataclass(frozen=True)
class Reloaded:
    """The models before and after a reload, songs re-added from the log, seconds taken."""

    previous: ModelInfo
    current: ModelInfo
    replayed_songs: int
    seconds: float


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of ``UNAVAILABLE`` calls: at most ``attempts`` tries in all; the n-th pause
    is uniform in [b/2, b] for b = min(initial * multiplier**(n-1), maximum) seconds (the
    jitter keeps many clients from retrying in step). Pauses never outlast the deadline."""

    attempts: int = 4
    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts: {self.attempts}; at least 1 (no retry)")
        if self.initial < 0 or self.maximum < 0 or self.multiplier < 1:
            raise ValueError("initial and maximum must be >= 0 and multiplier >= 1")

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        base = min(self.initial * self.multiplier ** (attempt - 1), self.maximum)
        return random.uniform(base / 2, base)


NO_RETRY = RetryPolicy(attempts=1)


# ---------------------------------------------------------------- parsing helpers


def _strings(record: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = record.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: {value!r} is not a list of strings")
    return tuple(value)


def _ints(record: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = record.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{key}: {value!r} is not a list of integers")
    return tuple(value)


def _issue_date(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:08d}"
    if not isinstance(value, str):
        raise ValueError(f"issue_date: {value!r} is not a string like '20190301'")
    return value


# ---------------------------------------------------------------- requests (pure)


def similar_request(song_id: int, k: int | None = None, exclude: Iterable[int] = (),
                    include_names: bool = False) -> pb2.SimilarSongsRequest:
    """A ``SimilarSongsRequest``; ``k=None`` leaves the server default (10)."""
    request = pb2.SimilarSongsRequest(song_id=song_id, exclude_song_ids=list(exclude),
                                      include_names=include_names)
    if k is not None:
        request.k = k
    return request


def similar_batch_request(song_ids: Iterable[int], k: int | None = None,
                          exclude: Iterable[int] = (),
                          include_names: bool = False) -> pb2.SimilarSongsBatchRequest:
    """A ``SimilarSongsBatchRequest``; ``k=None`` leaves the server default (10)."""
    request = pb2.SimilarSongsBatchRequest(song_ids=list(song_ids),
                                           exclude_song_ids=list(exclude),
                                           include_names=include_names)
    if k is not None:
        request.k = k
    return request


def continue_request(seed_song_ids: Iterable[int] = (), tags: Iterable[str] = (),
                     title: str = "", updt_date: str = "", n_songs: int | None = None,
                     n_tags: int | None = None, strategy: str = "",
                     drop_future: bool = False,
                     include_names: bool = False) -> pb2.ContinuePlaylistRequest:
    """A ``ContinuePlaylistRequest``; ``None`` counts leave the server defaults (100, 10)."""
    request = pb2.ContinuePlaylistRequest(seed_song_ids=list(seed_song_ids), tags=list(tags),
                                          title=title, updt_date=updt_date,
                                          strategy=strategy, drop_future=drop_future,
                                          include_names=include_names)
    if n_songs is not None:
        request.n_songs = n_songs
    if n_tags is not None:
        request.n_tags = n_tags
    return request


def metadata_pb(meta: SongMetadata) -> pb2.SongMetadata:
    """:class:`SongMetadata` as its protobuf message."""
    return pb2.SongMetadata(genres=list(meta.genres), detail_genres=list(meta.detail_genres),
                            artist_ids=list(meta.artist_ids), issue_date=meta.issue_date,
                            playlist_ids=list(meta.playlist_ids), tags=list(meta.tags))


def encode_request(song: SongMetadata, k: int | None = None,
                   include_names: bool = False) -> pb2.EncodeSongRequest:
    """An ``EncodeSongRequest``; ``k=None`` leaves the server default (10)."""
    request = pb2.EncodeSongRequest(song=metadata_pb(song), include_names=include_names)
    if k is not None:
        request.k = k
    return request


def add_songs_request(songs: Iterable[NewSong]) -> pb2.AddSongsRequest:
    """An ``AddSongsRequest`` (the server takes 1..1000 songs per call)."""
    return pb2.AddSongsRequest(songs=[
        pb2.NewSong(song_id=s.song_id, metadata=metadata_pb(s.metadata), name=s.name,
                    artists=s.artists) for s in songs])


# ---------------------------------------------------------------- responses (pure)


def _neighbours(items: Iterable[Any]) -> tuple[Neighbour, ...]:
    return tuple(Neighbour(int(n.song_id), float(n.similarity), n.name, n.artists)
                 for n in items)


def similar_result(response: pb2.SimilarSongsResponse) -> Similar:
    """A ``SimilarSongsResponse`` as :class:`Similar`."""
    return Similar(int(response.song_id), _neighbours(response.neighbours),
                   response.model_version)


def similar_batch_result(response: pb2.SimilarSongsBatchResponse) -> SimilarBatch:
    """A ``SimilarSongsBatchResponse`` as :class:`SimilarBatch`."""
    return SimilarBatch(tuple(similar_result(r) for r in response.results),
                        tuple(int(i) for i in response.unknown_song_ids),
                        response.model_version)


def reason_of(reason: pb2.Reason) -> Reason:
    """A ``Reason`` message as :class:`Reason` (kind in lower case, source or None)."""
    kind = _REASON_NAMES.get(reason.kind, "unspecified")
    which = reason.WhichOneof("source")
    source: int | str | None = None if which is None else getattr(reason, which)
    return Reason(kind, source)


def continuation_result(response: pb2.ContinuePlaylistResponse) -> Continuation:
    """A ``ContinuePlaylistResponse`` as :class:`Continuation`."""
    return Continuation(
        songs=tuple(RecommendedSong(int(s.song_id), float(s.score), reason_of(s.reason),
                                    s.name, s.artists) for s in response.songs),
        tags=tuple(RecommendedTag(t.tag, float(t.score)) for t in response.tags),
        unknown_seed_ids=tuple(int(i) for i in response.unknown_seed_ids),
        unknown_tags=tuple(response.unknown_tags), strategy=response.strategy,
        model_version=response.model_version)


def encoded_result(response: pb2.EncodeSongResponse) -> Encoded:
    """An ``EncodeSongResponse`` as :class:`Encoded`."""
    return Encoded(tuple(float(x) for x in response.code), _neighbours(response.neighbours),
                   int(response.known_columns), response.model_version)


def added_result(response: pb2.AddSongsResponse) -> AddedSongs:
    """An ``AddSongsResponse`` as :class:`AddedSongs`."""
    return AddedSongs(tuple(int(i) for i in response.added_song_ids),
                      tuple(int(i) for i in response.existing_song_ids),
                      int(response.indexed_songs), response.model_version)


def _index_info(params: pb2.IndexParams) -> IndexInfo:
    return IndexInfo(params.space, int(params.dim), int(params.m),
                     int(params.ef_construction), int(params.ef), int(params.count))


def model_info_result(info: pb2.ModelInfo) -> ModelInfo:
    """A ``ModelInfo`` message as :class:`ModelInfo`."""
    return ModelInfo(
        loaded=info.loaded, model_version=info.model_version, created=info.created,
        data_fingerprint=info.data_fingerprint, code_dim=int(info.code_dim),
        input_dim=int(info.input_dim),
        column_groups={str(k): int(v) for k, v in info.column_groups.items()},
        bundle_songs=int(info.bundle_songs), added_songs=int(info.added_songs),
        indexed_songs=int(info.indexed_songs), playlists=int(info.playlists),
        tags=int(info.tags), strategies=tuple(info.strategies),
        default_strategy=info.default_strategy, song_index=_index_info(info.song_index),
        playlist_index=_index_info(info.playlist_index))


def reloaded_result(response: pb2.ReloadModelResponse) -> Reloaded:
    """A ``ReloadModelResponse`` as :class:`Reloaded`."""
    return Reloaded(model_info_result(response.previous), model_info_result(response.current),
                    int(response.replayed_songs), float(response.seconds))


def health_name(response: health_pb2.HealthCheckResponse) -> str:
    """The serving status's name: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


# ---------------------------------------------------------------- shared settings


def balanced(target: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and channel options for ``target``.

    - ``host1:port1,host2:port2,...``: one channel over all of them, each call to the next
      ready one (``round_robin``). Names are resolved here, once; gRPC takes several
      addresses only as ``ipv4:`` or ``ipv6:`` lists, so all must be of one family.
    - ``dns:///host:port``: gRPC resolves the name (again when connections fail) and
      balances over every address it returns (``round_robin``), e.g. a Kubernetes
      headless Service.
    - anything else: as given, one connection (gRPC's default ``pick_first``).

    Raises ValueError for an address list it cannot use.
    """
    round_robin: list[tuple[str, Any]] = [("grpc.lb_policy_name", "round_robin")]
    text = target.strip()
    if text.startswith("dns:"):
        return text, round_robin
    if "," not in text:
        return text, []
    v4: list[str] = []
    v6: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"target {target!r}: {part!r} is not host:port")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"target {target!r}: cannot resolve {host!r} ({exc})") from None
        for family, _, _, _, address in infos:
            if family == socket.AF_INET and f"{address[0]}:{port}" not in v4:
                v4.append(f"{address[0]}:{port}")
            elif family == socket.AF_INET6 and f"[{address[0]}]:{port}" not in v6:
                v6.append(f"[{address[0]}]:{port}")
            if family in (socket.AF_INET, socket.AF_INET6):
                break  # one address per entry: an entry is one replica
    if v4 and v6:
        raise ValueError(f"target {target!r}: mixes IPv4 and IPv6 addresses; gRPC balances "
                         f"over one family per channel")
    return ("ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)), round_robin


@dataclass(frozen=True)
class _Settings:
    target: str
    channel_target: str  # what gRPC connects to (an address list rewritten, see balanced)
    metadata: tuple[tuple[str, str], ...] = field(repr=False)
    credentials: Any
    options: tuple[tuple[str, Any], ...]
    deadline: float | None
    retry: RetryPolicy


def _settings(target: str | None, token: str | None, tls: bool,
              root_certificates: bytes | None, deadline: float | None, retry: RetryPolicy,
              options: Sequence[tuple[str, Any]]) -> _Settings:
    target = target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if token and any(c.isspace() for c in token):
        raise ValueError("token: contains whitespace (is it the whole header?)")
    if deadline is not None and deadline <= 0:
        raise ValueError(f"deadline: {deadline} seconds; give a positive number or None")
    credentials = None
    if tls or root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel_target, balancing = balanced(target)
    merged = {"grpc.max_receive_message_length": MAX_RECEIVE_BYTES, **dict(balancing),
              **dict([DRAIN_RETRY]), **dict(options)}
    return _Settings(target, channel_target, metadata, credentials, tuple(merged.items()),
                     deadline, retry)


def _end_of(deadline: float | None) -> float | None:
    return None if deadline is None else time.monotonic() + deadline


def _remaining(end: float | None) -> float | None:
    return None if end is None else max(end - time.monotonic(), 0.0)


def _retry_pause(exc: grpc.RpcError, attempt: int, retry: RetryPolicy,
                 end: float | None) -> float | None:
    """Seconds to wait before the next try, or None when the error is final."""
    code = exc.code() if hasattr(exc, "code") else None
    if code is not grpc.StatusCode.UNAVAILABLE or attempt >= retry.attempts:
        return None
    pause = retry.pause(attempt)
    if end is not None and time.monotonic() + pause >= end:
        return None
    return pause


# ---------------------------------------------------------------- synchronous client


class SongRecClient:
    """A blocking client of the ``Recommender``, ``Admin`` and health services.

    Parameters
    ----------
    target : str, optional
        ``host:port``; default ``SONGREC_TARGET`` or ``localhost:50051``.
    token : str, optional
        Bearer token for every call; default ``SONGREC_TOKEN``. Admin calls need the
        server's admin token.
    tls : bool
        Use TLS with the system's roots (implied by ``root_certificates``).
    root_certificates : bytes, optional
        PEM roots to trust, e.g. a self-signed server certificate.
    deadline : float or None
        Default seconds per call, retries included; None waits forever.
    retry : RetryPolicy
        Retries of ``UNAVAILABLE``; :data:`NO_RETRY` turns them off.
    options : sequence of (str, value)
        Extra gRPC channel options.
    """

    def __init__(self, target: str | None = None, *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None,
                 deadline: float | None = DEFAULT_DEADLINE,
                 retry: RetryPolicy = RetryPolicy(),
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._s = _settings(target, token, tls, root_certificates, deadline, retry, options)
        self.target = self._s.target
        if self._s.credentials is None:
            self._channel = grpc.insecure_channel(self._s.channel_target,
                                                  options=self._s.options)
        else:
            self._channel = grpc.secure_channel(self._s.channel_target, self._s.credentials,
                                                options=self._s.options)
        self._rec = pb2_grpc.RecommenderStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: Callable[..., Any], name: str, request: Any,
              deadline: float | None) -> Any:
        end = _end_of(self._s.deadline if deadline is None else deadline)
        attempt = 1
        while True:
            try:
                return method(request, timeout=_remaining(end), metadata=self._s.metadata)
            except grpc.RpcError as exc:
                pause = _retry_pause(exc, attempt, self._s.retry, end)
                if pause is None:
                    raise ClientError.from_rpc_error(exc, name, attempt) from None
            time.sleep(pause)
            attempt += 1

    def similar(self, song_id: int, k: int | None = None, *, exclude: Iterable[int] = (),
                include_names: bool = False, deadline: float | None = None) -> Similar:
        """Nearest songs of a known song (``SimilarSongs``); ``deadline`` None means the
        client's default. Unknown song: :class:`ClientError` NOT_FOUND."""
        return similar_result(self._call(
            self._rec.SimilarSongs, "SimilarSongs",
            similar_request(song_id, k, exclude, include_names), deadline))

    def similar_batch(self, song_ids: Iterable[int], k: int | None = None, *,
                      exclude: Iterable[int] = (), include_names: bool = False,
                      deadline: float | None = None) -> SimilarBatch:
        """Nearest songs of many songs in one call; unknown ids are listed, not fatal."""
        return similar_batch_result(self._call(
            self._rec.SimilarSongsBatch, "SimilarSongsBatch",
            similar_batch_request(song_ids, k, exclude, include_names), deadline))

    def continue_playlist(self, seed_song_ids: Iterable[int] = (), tags: Iterable[str] = (),
                          title: str = "", updt_date: str = "", *,
                          n_songs: int | None = None, n_tags: int | None = None,
                          strategy: str = "", drop_future: bool = False,
                          include_names: bool = False,
                          deadline: float | None = None) -> Continuation:
        """Songs and tags continuing a playlist (``ContinuePlaylist``)."""
        return continuation_result(self._call(
            self._rec.ContinuePlaylist, "ContinuePlaylist",
            continue_request(seed_song_ids, tags, title, updt_date, n_songs, n_tags,
                             strategy, drop_future, include_names), deadline))

    def encode(self, song: SongMetadata, k: int | None = None, *,
               include_names: bool = False, deadline: float | None = None) -> Encoded:
        """Code and nearest songs of an unseen song (``EncodeSong``)."""
        return encoded_result(self._call(self._rec.EncodeSong, "EncodeSong",
                                         encode_request(song, k, include_names), deadline))

    def model_info(self, *, deadline: float | None = None) -> ModelInfo:
        """What is loaded (``GetModelInfo``)."""
        return model_info_result(self._call(self._rec.GetModelInfo, "GetModelInfo",
                                            pb2.GetModelInfoRequest(), deadline))

    def add_songs(self, songs: Iterable[NewSong], *,
                  deadline: float | None = None) -> AddedSongs:
        """Insert unseen songs into the live index (admin token; idempotent by id, so the
        retries of ``UNAVAILABLE`` are safe)."""
        return added_result(self._call(self._admin.AddSongs, "AddSongs",
                                       add_songs_request(songs), deadline))

    def reload_model(self, bundle_path: str = "", *, skip_verify: bool = False,
                     deadline: float | None = None) -> Reloaded:
        """Load and swap in a bundle on the server (admin token); "" reloads the current."""
        return reloaded_result(self._call(
            self._admin.ReloadModel, "ReloadModel",
            pb2.ReloadModelRequest(bundle_path=bundle_path, skip_verify=skip_verify),
            deadline))

    def health(self, service: str = "", *, deadline: float | None = None) -> str:
        """The grpc.health.v1 status of ``service`` ("" = the server as a whole):
        SERVING, NOT_SERVING, ... An unknown service is :class:`ClientError` NOT_FOUND."""
        return health_name(self._call(self._health.Check, "Health.Check",
                                      health_pb2.HealthCheckRequest(service=service),
                                      deadline))

    def wait_serving(self, timeout: float, service: str = RECOMMENDER_SERVICE,
                     poll: float = 0.05) -> float:
        """Poll health until ``service`` is SERVING; returns the seconds waited. Raises
        ``TimeoutError`` after ``timeout`` seconds."""
        start = time.monotonic()
        while True:
            try:
                if self.health(service, deadline=max(poll * 10, 1.0)) == "SERVING":
                    return time.monotonic() - start
            except ClientError as exc:
                if exc.code not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{self.target}: {service or 'server'} not SERVING "
                                   f"after {timeout:.0f} s")
            time.sleep(poll)

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self._channel.close()

    def __enter__(self) -> SongRecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- asyncio client


class AsyncSongRecClient:
    """The asyncio twin of :class:`SongRecClient` (same arguments, awaitable methods).
    Create it inside a running event loop; close it with ``await client.close()`` or
    ``async with``."""

    def __init__(self, target: str | None = None, *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None,
                 deadline: float | None = DEFAULT_DEADLINE,
                 retry: RetryPolicy = RetryPolicy(),
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._s = _settings(target, token, tls, root_certificates, deadline, retry, options)
        self.target = self._s.target
        if self._s.credentials is None:
            self._channel = grpc.aio.insecure_channel(self._s.channel_target,
                                                      options=self._s.options)
        else:
            self._channel = grpc.aio.secure_channel(self._s.channel_target, self._s.credentials,
                                                    options=self._s.options)
        self._rec = pb2_grpc.RecommenderStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method: Callable[..., Awaitable[Any]], name: str, request: Any,
                    deadline: float | None) -> Any:
        end = _end_of(self._s.deadline if deadline is None else deadline)
        attempt = 1
        while True:
            try:
                return await method(request, timeout=_remaining(end),
                                    metadata=self._s.metadata)
            except grpc.RpcError as exc:
                pause = _retry_pause(exc, attempt, self._s.retry, end)
                if pause is None:
                    raise ClientError.from_rpc_error(exc, name, attempt) from None
            await asyncio.sleep(pause)
            attempt += 1

    async def similar(self, song_id: int, k: int | None = None, *,
                      exclude: Iterable[int] = (), include_names: bool = False,
                      deadline: float | None = None) -> Similar:
        """See :meth:`SongRecClient.similar`."""
        return similar_result(await self._call(
            self._rec.SimilarSongs, "SimilarSongs",
            similar_request(song_id, k, exclude, include_names), deadline))

    async def similar_batch(self, song_ids: Iterable[int], k: int | None = None, *,
                            exclude: Iterable[int] = (), include_names: bool = False,
                            deadline: float | None = None) -> SimilarBatch:
        """See :meth:`SongRecClient.similar_batch`."""
        return similar_batch_result(await self._call(
            self._rec.SimilarSongsBatch, "SimilarSongsBatch",
            similar_batch_request(song_ids, k, exclude, include_names), deadline))

    async def continue_playlist(self, seed_song_ids: Iterable[int] = (),
                                tags: Iterable[str] = (), title: str = "",
                                updt_date: str = "", *, n_songs: int | None = None,
                                n_tags: int | None = None, strategy: str = "",
                                drop_future: bool = False, include_names: bool = False,
                                deadline: float | None = None) -> Continuation:
        """See :meth:`SongRecClient.continue_playlist`."""
        return continuation_result(await self._call(
            self._rec.ContinuePlaylist, "ContinuePlaylist",
            continue_request(seed_song_ids, tags, title, updt_date, n_songs, n_tags,
                             strategy, drop_future, include_names), deadline))

    async def encode(self, song: SongMetadata, k: int | None = None, *,
                     include_names: bool = False, deadline: float | None = None) -> Encoded:
        """See :meth:`SongRecClient.encode`."""
        return encoded_result(await self._call(
            self._rec.EncodeSong, "EncodeSong", encode_request(song, k, include_names),
            deadline))

    async def model_info(self, *, deadline: float | None = None) -> ModelInfo:
        """See :meth:`SongRecClient.model_info`."""
        return model_info_result(await self._call(
            self._rec.GetModelInfo, "GetModelInfo", pb2.GetModelInfoRequest(), deadline))

    async def add_songs(self, songs: Iterable[NewSong], *,
                        deadline: float | None = None) -> AddedSongs:
        """See :meth:`SongRecClient.add_songs`."""
        return added_result(await self._call(self._admin.AddSongs, "AddSongs",
                                             add_songs_request(songs), deadline))

    async def reload_model(self, bundle_path: str = "", *, skip_verify: bool = False,
                           deadline: float | None = None) -> Reloaded:
        """See :meth:`SongRecClient.reload_model`."""
        return reloaded_result(await self._call(
            self._admin.ReloadModel, "ReloadModel",
            pb2.ReloadModelRequest(bundle_path=bundle_path, skip_verify=skip_verify),
            deadline))

    async def health(self, service: str = "", *, deadline: float | None = None) -> str:
        """See :meth:`SongRecClient.health`."""
        return health_name(await self._call(self._health.Check, "Health.Check",
                                            health_pb2.HealthCheckRequest(service=service),
                                            deadline))

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncSongRecClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "ADMIN_SERVICE", "DEFAULT_TARGET", "NO_RETRY", "RECOMMENDER_SERVICE", "AddedSongs",
    "AsyncSongRecClient", "ClientError", "Continuation", "Encoded", "IndexInfo", "ModelInfo",
    "Neighbour", "NewSong", "Reason", "RecommendedSong", "RecommendedTag", "Reloaded",
    "RetryPolicy", "Similar", "SimilarBatch", "SongMetadata", "SongRecClient",
]
