"""Property-based fuzzing of every RPC against a real server on port 0 (hypothesis).

Arbitrary requests for each RPC: empty, huge and repeated lists, negative and 64-bit ids,
odd unicode, dates in every wrong format, oversized messages, and raw bytes that are no
message at all (corrupt wire format, strings that are not UTF-8, NaN and infinite doubles
in fields the schema does not know: no request field is a float, so that is where such
numbers can reach the server). Every call must end with a deliberate status code (never
``UNKNOWN``, ``INTERNAL`` or a timeout), answers that succeed must keep the API's promises
(no seed recommended, nothing repeated, finite scores), and the server must be healthy
afterwards. The default run is small and derandomized; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clients.benchtools import ServerProcess
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server.bundle import DIGEST, seal
from server.config import ServerConfig
from server.hnswfile import HEADER
from server.strategies import RANKED, STRATEGIES
from server.testing import ServerThread

ADMIN = "fuzz-admin-token"
AUTH = [("authorization", f"Bearer {ADMIN}")]
MAX_MESSAGE = 64 << 10  # small, so that oversized requests are cheap to make
CALL_TIMEOUT = 60.0  # a call that needs this long is hung, not slow
FAST, LONG = 30, 300  # examples per RPC in the default and the slow run

Code = grpc.StatusCode
# Every code the server means to send. UNKNOWN, INTERNAL, DEADLINE_EXCEEDED (the calls have
# a generous deadline), UNAVAILABLE and CANCELLED mean a bug or a crash.
DELIBERATE = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION,
              Code.RESOURCE_EXHAUSTED}

REQUESTS: dict[str, tuple[str, Any, Any]] = {
    "ContinuePlaylist": ("Recommender", pb2.ContinuePlaylistRequest,
                         pb2.ContinuePlaylistResponse),
    "SimilarSongs": ("Recommender", pb2.SimilarSongsRequest, pb2.SimilarSongsResponse),
    "SimilarSongsBatch": ("Recommender", pb2.SimilarSongsBatchRequest,
                          pb2.SimilarSongsBatchResponse),
    "EncodeSong": ("Recommender", pb2.EncodeSongRequest, pb2.EncodeSongResponse),
    "GetModelInfo": ("Recommender", pb2.GetModelInfoRequest, pb2.ModelInfo),
    "AddSongs": ("Admin", pb2.AddSongsRequest, pb2.AddSongsResponse),
    "ReloadModel": ("Admin", pb2.ReloadModelRequest, pb2.ReloadModelResponse),
}

# ---------------------------------------------------------------- strategies

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
# Ids the tiny bundle holds (0..2999) most of the time, the edges of int64 the rest.
KNOWN = st.integers(0, 3100)
IDS = st.one_of(KNOWN, st.sampled_from([-1, 2**31, 2**53 + 1, 2**63 - 1]), INT64)


def id_lists(most: int = 1000) -> st.SearchStrategy[list[int]]:
    """Short lists, lists repeating one id, and lists just either side of ``most``."""
    short = st.one_of(st.lists(KNOWN, max_size=12), st.lists(IDS, max_size=12))
    return st.one_of(short, short.map(lambda ids: ids + ids),
                     st.tuples(st.integers(most - 2, most + 2), IDS).map(
                         lambda nx: [nx[1] + i % 7 for i in range(nx[0])]
                         if nx[1] < 2**62 else [nx[1]] * nx[0]))


ODD_TEXT = st.sampled_from([
    "", " ", "\x00", "\u202e\u0645\u0631\u062d\u0628\u0627", "\ufeffBOM", "봄 여름 가을",
    "🎵" * 300, "𝔲𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301" * 50, "\u200b\u200d", "NaN", "inf", "-1e309",
    "'; DROP TABLE songs; --", "%s%n%x", "../../etc/passwd", "a" * 257, "a" * 1001])
TEXT = st.one_of(ODD_TEXT, st.text(st.characters(blacklist_categories=("Cs",)),
                                   max_size=40))
DATES = st.one_of(st.sampled_from([
    "", "2020-01-01", "2020-01-01 12:00:00", "2020-01-01 12:00:00.000", "2020-02-30",
    "2019-02-29", "2020-13-01", "0000-00-00", "9999-12-31 23:59:59.999999999", "20200101",
    "2020/01/01", "2020-01-01T12:00:00", "2020-01-01 24:00:00", "٢٠٢٠-٠١-٠١", "NaN",
    " 2020-01-01 ", "2020-1-1"]), TEXT)
ISSUE_DATES = st.one_of(st.sampled_from([
    "", "00000000", "20200100", "20200000", "20201301", "20200132", "2020-01-01", "2020",
    "٢٠٢٠٠١٠١", "-2020101", "99999999"]), DATES)
GENRES = st.one_of(st.sampled_from(["GN0100", "GN0105", "GN2500", "GN9900", "GN0101", "gn0100",
                                    "GN01000", "GN", "", "GN٠١٠٠"]), TEXT)
TAGS = st.one_of(st.lists(TEXT, max_size=8), st.integers(255, 258).map(lambda n: ["t"] * n))
COUNT = st.one_of(st.none(), st.sampled_from([0, 1, 10, 100, 1000, 1001]), UINT32)
STRATEGY = st.one_of(st.sampled_from([*STRATEGIES, "", "AE-QUOTA", "best", "ae-quota "]),
                     TEXT)


def optional(message: Any, field: str, value: int | None) -> Any:
    """Set an ``optional`` field only when ``value`` is not None (unset differs from 0)."""
    if value is not None:
        setattr(message, field, value)
    return message


@st.composite
def wild_metadata(draw: Any) -> pb2.SongMetadata:
    return pb2.SongMetadata(genres=draw(st.lists(GENRES, max_size=4)),
                            detail_genres=draw(st.lists(GENRES, max_size=4)),
                            artist_ids=draw(st.lists(IDS, max_size=4)),
                            issue_date=draw(ISSUE_DATES),
                            playlist_ids=draw(st.one_of(st.lists(IDS, max_size=8),
                                                        id_lists(20_000))),
                            tags=draw(TAGS))


@st.composite
def plausible_metadata(draw: Any) -> pb2.SongMetadata:
    """Well-formed metadata (the model may still know none of it), so that songs do get
    added and encoded, not only refused."""
    return pb2.SongMetadata(
        genres=draw(st.lists(st.sampled_from(["GN0100", "GN0200", "GN2500", "GN9900"]),
                             max_size=3)),
        detail_genres=draw(st.lists(st.sampled_from(["GN0101", "GN0105", "GN0201"]),
                                    max_size=3)),
        artist_ids=draw(st.lists(KNOWN, max_size=3)),
        issue_date=draw(st.sampled_from(["", "00000000", "20200100", "19991231"])),
        playlist_ids=draw(st.lists(KNOWN, max_size=10)),
        tags=draw(st.lists(st.text(max_size=20), max_size=4)))


def metadata() -> st.SearchStrategy[pb2.SongMetadata]:
    return st.one_of(plausible_metadata(), plausible_metadata(), wild_metadata())


@st.composite
def continue_requests(draw: Any) -> pb2.ContinuePlaylistRequest:
    request = pb2.ContinuePlaylistRequest(
        seed_song_ids=draw(id_lists()), tags=draw(TAGS), title=draw(TEXT),
        updt_date=draw(DATES), strategy=draw(STRATEGY), drop_future=draw(st.booleans()),
        include_names=draw(st.booleans()))
    optional(request, "n_songs", draw(COUNT))
    return optional(request, "n_tags", draw(COUNT))


@st.composite
def similar_requests(draw: Any) -> pb2.SimilarSongsRequest:
    request = pb2.SimilarSongsRequest(song_id=draw(IDS), exclude_song_ids=draw(id_lists()),
                                      include_names=draw(st.booleans()))
    return optional(request, "k", draw(COUNT))


@st.composite
def batch_requests(draw: Any) -> pb2.SimilarSongsBatchRequest:
    request = pb2.SimilarSongsBatchRequest(song_ids=draw(id_lists()),
                                           exclude_song_ids=draw(id_lists()),
                                           include_names=draw(st.booleans()))
    return optional(request, "k", draw(COUNT))


@st.composite
def encode_requests(draw: Any) -> pb2.EncodeSongRequest:
    request = pb2.EncodeSongRequest(include_names=draw(st.booleans()))
    song = draw(st.one_of(st.none(), metadata()))
    if song is not None:
        request.song.CopyFrom(song)
    return optional(request, "k", draw(COUNT))


@st.composite
def add_requests(draw: Any) -> pb2.AddSongsRequest:
    # Fresh ids with well-formed metadata, so that songs are really added.
    plausible = st.builds(lambda song_id, meta, name: pb2.NewSong(
        song_id=song_id, metadata=meta, name=name, artists=name[::-1]),
        st.integers(1_000_000, 1_001_000), plausible_metadata(), st.text(max_size=30))
    wild = st.builds(lambda song_id, meta, name, artists, has_meta: pb2.NewSong(
        song_id=song_id, name=name, artists=artists,
        **({"metadata": meta} if has_meta else {})),
        IDS, metadata(), TEXT, TEXT, st.booleans())
    songs = draw(st.one_of(st.lists(plausible, min_size=1, max_size=4),
                           st.lists(st.one_of(plausible, wild), max_size=4)))
    if draw(st.booleans()) and songs:
        songs = songs + songs[:1]  # the same id twice in one call
    return pb2.AddSongsRequest(songs=songs)


WELL_FORMED = {"AddSongs": pb2.AddSongsRequest(songs=[pb2.NewSong(
    song_id=1_000_999, name="a new song",
    metadata=pb2.SongMetadata(genres=["GN0100"], detail_genres=["GN0101"]))])}

BUNDLE = "<the served bundle>"
PATHS = st.one_of(st.sampled_from([
    "", BUNDLE, " ", "/", "/dev/null", "/proc/self", "/nonexistent/bundle", "\x00",
    "bundle\x00/x", "../../..", "~", "x" * 300, "a/" * 2047, "a/" * 2049, "./" + "b" * 255]),
    TEXT)


@st.composite
def reload_requests(draw: Any) -> pb2.ReloadModelRequest:
    return pb2.ReloadModelRequest(bundle_path=draw(PATHS), skip_verify=draw(st.booleans()))


@st.composite
def oversized(draw: Any, name: str) -> Any:
    """A request just over the server's message limit."""
    _, request_type, _ = REQUESTS[name]
    blob = "x" * (MAX_MESSAGE + draw(st.integers(1, 1000)))
    if name == "ContinuePlaylist":
        return request_type(title=blob)
    if name in ("SimilarSongs", "SimilarSongsBatch"):
        return request_type(exclude_song_ids=[2**62] * (MAX_MESSAGE // 8 + 10))
    if name == "EncodeSong":
        return request_type(song=pb2.SongMetadata(tags=[blob]))
    if name == "AddSongs":
        return request_type(songs=[pb2.NewSong(song_id=1, name=blob)])
    if name == "ReloadModel":
        return request_type(bundle_path=blob)
    return request_type()


TYPED: dict[str, st.SearchStrategy[Any]] = {
    "ContinuePlaylist": continue_requests(), "SimilarSongs": similar_requests(),
    "SimilarSongsBatch": batch_requests(), "EncodeSong": encode_requests(),
    "GetModelInfo": st.just(pb2.GetModelInfoRequest()), "AddSongs": add_requests(),
    "ReloadModel": reload_requests()}


def field_key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


DOUBLES = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324])
FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 3.4e38, 1e-45])
# Raw additions to a valid message: doubles (NaN, infinities) in unknown and in known
# fields of the wrong wire type, truncated varints, lengths that run past the end,
# strings that are not UTF-8.
JUNK = st.one_of(
    st.tuples(st.integers(1, 99), DOUBLES).map(
        lambda nd: field_key(nd[0], 1) + struct.pack("<d", nd[1])),
    st.tuples(st.integers(1, 20), FLOATS).map(
        lambda nd: field_key(nd[0], 5) + struct.pack("<f", nd[1])),
    st.integers(1, 20).map(lambda n: field_key(n, 0) + b"\xff" * 10),
    st.integers(1, 20).map(lambda n: field_key(n, 2) + varint(1000) + b"abc"),
    st.integers(1, 20).map(lambda n: field_key(n, 2) + b"\x03\xff\xfe\xc0"),
    st.integers(1, 20).map(lambda n: field_key(n, 3)),  # a group start: deprecated
    st.binary(max_size=64))


@st.composite
def raw_payloads(draw: Any, name: str) -> bytes:
    base = draw(TYPED[name]).SerializeToString()
    if draw(st.booleans()):
        return bytes(draw(JUNK)) + base if draw(st.booleans()) else base + draw(JUNK)
    return draw(st.binary(max_size=256))


# ---------------------------------------------------------------- the server and calls


class Fuzzed:
    """A running server and raw-bytes callables for every RPC."""

    def __init__(self, live: ServerThread, bundle: Path) -> None:
        self.live = live
        self.bundle = bundle
        self.channel = live.channel(options=[("grpc.max_receive_message_length", 64 << 20)])
        self.calls: dict[str, Callable[..., bytes]] = {
            name: self.channel.unary_unary(f"/songrec.v1.{service}/{name}")
            for name, (service, _, _) in REQUESTS.items()}
        self.codes: dict[tuple[str, str], int] = {}

    def call(self, name: str, payload: bytes) -> tuple[grpc.StatusCode, Any, str]:
        """Send ``payload`` to RPC ``name``; the status code, the parsed answer (None when
        the call failed) and the status details."""
        try:
            raw = self.calls[name](payload, timeout=CALL_TIMEOUT, metadata=AUTH)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
            answer = None
        else:
            code, details = Code.OK, ""
            answer = REQUESTS[name][2].FromString(raw)
        key = (name, code.name)
        self.codes[key] = self.codes.get(key, 0) + 1
        assert code in DELIBERATE, f"{name}: {code.name}: {details}"
        if code is not Code.OK:
            assert details, f"{name}: {code.name} without a message"
        return code, answer, details


@pytest.fixture(scope="module")
def fuzzed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    state = tmp_path_factory.mktemp("fuzz-state")
    config = ServerConfig(bundle=tiny_bundle, port=0, data_dir=state, admin_token=ADMIN,
                          max_message_bytes=MAX_MESSAGE, workers=2)
    with ServerThread(config) as live:
        fuzzed = Fuzzed(live, tiny_bundle)
        yield fuzzed
        fuzzed.channel.close()


def assert_healthy(fuzzed: Fuzzed) -> None:
    """SERVING, a model loaded, ordinary calls answered, nothing left in flight."""
    health = health_pb2_grpc.HealthStub(fuzzed.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    code, info, _ = fuzzed.call("GetModelInfo", b"")
    assert code is Code.OK and info.loaded
    code, answer, _ = fuzzed.call("ContinuePlaylist", pb2.ContinuePlaylistRequest(
        seed_song_ids=[1, 2, 3]).SerializeToString())
    assert code is Code.OK and len(answer.songs) == 100
    registry = fuzzed.live.server.state.metrics.registry
    assert registry.get_sample_value("songrec_in_flight_requests") == 0


# ---------------------------------------------------------------- promises of answers


def finite(values: Any) -> bool:
    return all(math.isfinite(v) for v in values)


def check_neighbours(neighbours: Any, k: int, never: set[int]) -> None:
    ids = [n.song_id for n in neighbours]
    assert len(ids) <= k and len(set(ids)) == len(ids)
    assert not never & set(ids)
    assert all(-1.001 <= n.similarity <= 1.001 for n in neighbours)
    sims = [n.similarity for n in neighbours]
    assert sims == sorted(sims, reverse=True)


def check_answer(name: str, request: Any, answer: Any) -> None:
    """What the proto promises about a successful answer to ``request``."""
    if name == "ContinuePlaylist":
        songs = [s.song_id for s in answer.songs]
        n_songs = request.n_songs if request.HasField("n_songs") else 100
        assert len(songs) <= n_songs and len(set(songs)) == len(songs)
        assert not set(songs) & set(request.seed_song_ids)
        if not request.drop_future:
            assert len(songs) == n_songs  # 3000 songs: popularity always fills the list
        tags = [t.tag for t in answer.tags]
        assert len(tags) <= (request.n_tags if request.HasField("n_tags") else 10)
        assert len(set(tags)) == len(tags) and not set(tags) & set(request.tags)
        assert set(answer.unknown_seed_ids) <= set(request.seed_song_ids)
        assert set(answer.unknown_tags) <= set(request.tags)
        assert answer.strategy == (request.strategy or RANKED)  # the bundle has a ranker
        assert finite(s.score for s in answer.songs) and finite(t.score for t in answer.tags)
    elif name == "SimilarSongs":
        k = request.k if request.HasField("k") else 10
        assert answer.song_id == request.song_id
        check_neighbours(answer.neighbours, k, {request.song_id, *request.exclude_song_ids})
    elif name == "SimilarSongsBatch":
        k = request.k if request.HasField("k") else 10
        asked = list(dict.fromkeys(request.song_ids))
        unknown = set(answer.unknown_song_ids)
        assert [r.song_id for r in answer.results] == [i for i in asked if i not in unknown]
        assert unknown <= set(asked)
        for result in answer.results:
            check_neighbours(result.neighbours, k, {result.song_id,
                                                    *request.exclude_song_ids})
    elif name == "EncodeSong":
        k = request.k if request.HasField("k") else 10
        assert len(answer.code) > 0 and finite(answer.code)
        assert answer.known_columns > 0
        check_neighbours(answer.neighbours, k, set())
    elif name == "AddSongs":
        asked = {s.song_id for s in request.songs}
        added, existing = set(answer.added_song_ids), set(answer.existing_song_ids)
        assert added | existing == asked and not added & existing
    elif name == "ReloadModel":
        assert answer.current.loaded
    elif name == "GetModelInfo":
        assert answer.loaded and answer.indexed_songs == answer.bundle_songs + \
            answer.added_songs


def fuzz_typed(fuzzed: Fuzzed, name: str, examples: int, derandomize: bool) -> None:
    strategy = st.one_of(TYPED[name], oversized(name)) if name != "GetModelInfo" \
        else TYPED[name]

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(request=strategy)
    def run(request: Any) -> None:
        if name == "ReloadModel" and request.bundle_path == BUNDLE:
            request.bundle_path = str(fuzzed.bundle)
        code, answer, details = fuzzed.call(name, request.SerializeToString())
        if code is Code.OK:
            check_answer(name, request, answer)
        elif code is Code.RESOURCE_EXHAUSTED:
            # Only the size limits, here: gRPC's for requests ("larger than max"), the
            # server's own for answers.
            assert ("larger than max" in details
                    or "byte message limit (--max-message-bytes)" in details), details

    if name in WELL_FORMED:
        # Derandomised draws change whenever this function's code does; one request that
        # must succeed keeps "both outcomes reached" independent of that luck.
        run = example(request=WELL_FORMED[name])(run)
    run()
    assert_healthy(fuzzed)


def fuzz_raw(fuzzed: Fuzzed, name: str, examples: int, derandomize: bool) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(payload=raw_payloads(name))
    def run(payload: bytes) -> None:
        fuzzed.call(name, payload)

    run()
    assert_healthy(fuzzed)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(REQUESTS))
def test_fuzzed_requests_get_deliberate_codes(fuzzed: Fuzzed, name: str) -> None:
    fuzz_typed(fuzzed, name, FAST, derandomize=True)


@pytest.mark.parametrize("name", list(REQUESTS))
def test_fuzzed_bytes_get_deliberate_codes(fuzzed: Fuzzed, name: str) -> None:
    fuzz_raw(fuzzed, name, FAST // 2, derandomize=True)


def test_corrupt_messages_are_invalid_argument(fuzzed: Fuzzed) -> None:
    """Bytes that are no message get INVALID_ARGUMENT naming the request (gRPC's own
    deserializer would answer UNKNOWN); unknown fields, NaN doubles included, are ignored
    as protobuf prescribes."""
    for name in REQUESTS:
        code, _, details = fuzzed.call(name, b"\xff\xff\xff")
        assert code is Code.INVALID_ARGUMENT
        assert f"request: not a valid {name} request message" in details
    not_utf8 = field_key(3, 2) + b"\x02\xc3\x28"  # ContinuePlaylist.title
    code, _, details = fuzzed.call("ContinuePlaylist", not_utf8)
    assert code is Code.INVALID_ARGUMENT and "UTF-8" in details
    nan_field = field_key(77, 1) + struct.pack("<d", math.nan)
    request = pb2.SimilarSongsRequest(song_id=5, k=3).SerializeToString() + nan_field
    code, answer, _ = fuzzed.call("SimilarSongs", request)
    assert code is Code.OK and len(answer.neighbours) == 3


def test_every_rpc_was_exercised(fuzzed: Fuzzed) -> None:
    """The fuzzing reaches both outcomes of each RPC: a generator that only ever makes
    refused requests would test little. It fuzzes again (the same derandomized examples as
    the tests above) on a count of its own, so that it holds alone and in any order."""
    earlier, fuzzed.codes = fuzzed.codes, {}
    try:
        for name in REQUESTS:
            fuzz_typed(fuzzed, name, FAST, derandomize=True)
            fuzz_raw(fuzzed, name, FAST // 2, derandomize=True)
        seen = fuzzed.codes
    finally:
        fuzzed.codes = earlier
    for name in REQUESTS:
        outcomes = {code for (rpc, code), n in seen.items() if rpc == name}
        assert "OK" in outcomes, (name, outcomes)
        if name != "GetModelInfo":
            assert outcomes - {"OK"}, (name, outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REQUESTS))
def test_fuzzed_requests_long_run(fuzzed: Fuzzed, name: str) -> None:
    fuzz_typed(fuzzed, name, LONG, derandomize=False)
    fuzz_raw(fuzzed, name, LONG // 2, derandomize=False)


# ---------------------------------------------------------------- bundle mutations
#
# Every number of the manifest changed (sealed with a recomputed digest, so that the checks
# behind it are reached, and not), bytes of each index file's header flipped, with and
# without skip_verify, each reloaded into a server *process* (a crash shows as a dead
# server, not a dead test run): the reload is refused with FAILED_PRECONDITION naming a
# bundle file, or accepted, and either way the server answers as the API promises.

INDEX_FILES = ("songs.hnsw", "playlists.hnsw")
PROBES: list[tuple[str, Any]] = [
    ("SimilarSongs", pb2.SimilarSongsRequest(song_id=5, k=10, exclude_song_ids=[7])),
    ("SimilarSongsBatch", pb2.SimilarSongsBatchRequest(song_ids=[1, 2, 3000], k=20)),
    ("ContinuePlaylist", pb2.ContinuePlaylistRequest(seed_song_ids=[1, 2, 3])),
    ("ContinuePlaylist", pb2.ContinuePlaylistRequest(seed_song_ids=[4], strategy="ae-quota")),
    ("ContinuePlaylist", pb2.ContinuePlaylistRequest(tags=["x"], title="love songs")),
    ("EncodeSong", pb2.EncodeSongRequest(song=pb2.SongMetadata(
        genres=["GN0100"], detail_genres=["GN0105"]), k=50)),
]


def numbers(raw: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every number in a JSON value (booleans are not numbers here)."""
    if isinstance(raw, dict):
        return [n for key, value in raw.items() for n in numbers(value, (*path, key))]
    if isinstance(raw, list):
        return [n for i, value in enumerate(raw) for n in numbers(value, (*path, i))]
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [(path, raw)]
    return []


def replacements(value: Any) -> list[Any]:
    """Other values for a number: near, zero, negative, huge, another type."""
    if isinstance(value, float):
        return [value * 2, 0.0, -1.0, 1e308, math.nan, int(value), str(value)]
    return [value + 1, value - 1, 0, -1, 2 * value + 1, 10**9, 2**63, -(2**63), value + 0.5,
            str(value), None]


def put(raw: Any, path: tuple[Any, ...], value: Any) -> Any:
    copy = json.loads(json.dumps(raw))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


class Mutations:
    """A server process on the tiny bundle and a working copy of it to mutate."""

    def __init__(self, server: ServerProcess, original: Path, work: Path) -> None:
        self.server = server
        self.original = original
        self.work = work
        self.manifest = json.loads((original / "manifest.json").read_text())
        self.channel = grpc.insecure_channel(server.target)
        self.outcomes: Counter[str] = Counter()

    def restore(self) -> None:
        for name in ("manifest.json", *INDEX_FILES):
            shutil.copyfile(self.original / name, self.work / name)

    def try_reload(self, what: str, skip_verify: bool) -> None:
        """Reload the working copy; then the server must be alive and answer correctly."""
        try:
            self.channel.unary_unary("/songrec.v1.Admin/ReloadModel")(
                pb2.ReloadModelRequest(bundle_path=str(self.work),
                                       skip_verify=skip_verify).SerializeToString(),
                metadata=AUTH, timeout=CALL_TIMEOUT)
            outcome = "accepted"
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
            assert self.server.process.poll() is None, f"{what}: the server died"
            assert code is Code.FAILED_PRECONDITION, (what, code, details)
            # Naming the file: a path inside the bundle.
            assert "still serving" in details and f"{self.work}/" in details, (what, details)
            outcome = "refused"
        self.outcomes[outcome] += 1
        self.probe(what)

    def probe(self, what: str) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status == \
            health_pb2.HealthCheckResponse.SERVING, what
        for name, request in PROBES:
            raw = self.channel.unary_unary(f"/songrec.v1.Recommender/{name}")(
                request.SerializeToString(), timeout=CALL_TIMEOUT)
            check_answer(name, request, REQUESTS[name][2].FromString(raw))

    def manifest_numbers(self, sealed: bool, skip_verify: bool, every_value: bool) -> None:
        for path, value in numbers(self.manifest):
            if path[0] == DIGEST:
                continue
            values = replacements(value) if every_value else replacements(value)[:1]
            for new in values:
                raw = put(self.manifest, path, new)
                text = json.dumps(seal(raw) if sealed else raw)
                (self.work / "manifest.json").write_text(text)
                self.try_reload(f"manifest {'/'.join(map(str, path))} = {new!r} "
                                f"(sealed {sealed}, skip_verify {skip_verify})", skip_verify)
        self.restore()

    def header_flips(self, skip_verify: bool, masks: tuple[int, ...],
                     positions: range = range(HEADER.size)) -> None:
        for name in INDEX_FILES:
            original = (self.original / name).read_bytes()
            for position in positions:
                for mask in masks:
                    data = bytearray(original)
                    data[position] ^= mask
                    (self.work / name).write_bytes(bytes(data))
                    self.try_reload(f"{name} byte {position} ^ {mask:#x} (skip_verify "
                                    f"{skip_verify})", skip_verify)
            (self.work / name).write_bytes(original)

    def body_flips(self, skip_verify: bool, count: int, seed: int) -> None:
        rng = random.Random(seed)
        for name in INDEX_FILES:
            original = (self.original / name).read_bytes()
            for _ in range(count):
                position = rng.randrange(HEADER.size, len(original))
                mask = 1 << rng.randrange(8)
                data = bytearray(original)
                data[position] ^= mask
                (self.work / name).write_bytes(bytes(data))
                self.try_reload(f"{name} byte {position} ^ {mask:#x} (skip_verify "
                                f"{skip_verify})", skip_verify)
            (self.work / name).write_bytes(original)

    def close(self) -> None:
        self.channel.close()
        print(f"bundle mutations: {dict(self.outcomes)}")  # shown with pytest -s
        assert not [line for line in self.server.log_lines() if "Traceback" in line]


@pytest.fixture
def mutations(tiny_bundle: Path, tmp_path: Path) -> Iterator[Mutations]:
    work = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, work)
    with ServerProcess(["--bundle", str(tiny_bundle), "--workers", "2", "--no-verify"],
                       env={"SONGREC_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1"}) as server:
        found = Mutations(server, tiny_bundle, work)
        yield found
        found.close()


def test_bundle_mutations_are_refused_or_served(mutations: Mutations) -> None:
    """A short pass: each number of the manifest changed once (sealed), and a few header
    bytes of each index file flipped, with skip_verify."""
    mutations.manifest_numbers(sealed=True, skip_verify=True, every_value=False)
    mutations.header_flips(skip_verify=True, masks=(0x01,), positions=range(0, HEADER.size, 7))
    assert mutations.outcomes["refused"] and mutations.outcomes["accepted"]


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("skip_verify", [True, False])
def test_bundle_manifest_mutations_long_run(mutations: Mutations, skip_verify: bool) -> None:
    """Every number of the manifest, every replacement value, sealed; and unsealed (the
    digest refuses those)."""
    mutations.manifest_numbers(sealed=True, skip_verify=skip_verify, every_value=True)
    refused = mutations.outcomes["refused"]
    mutations.manifest_numbers(sealed=False, skip_verify=skip_verify, every_value=False)
    assert mutations.outcomes["refused"] - refused == len(numbers(mutations.manifest))


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("skip_verify", [True, False])
def test_index_header_flips_long_run(mutations: Mutations, skip_verify: bool) -> None:
    """Every header byte of each index file, three ways; with verification on, the sha256
    refuses every one."""
    mutations.header_flips(skip_verify=skip_verify, masks=(0x01, 0x80, 0xFF))
    if not skip_verify:
        assert not mutations.outcomes["accepted"]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_index_body_flips_long_run(mutations: Mutations) -> None:
    """Random single-bit flips past the headers, skip_verify: refused, or served within
    the API's promises (a flipped low bit of a vector is not detectable without sha256)."""
    mutations.body_flips(skip_verify=True, count=150, seed=11)


# ---------------------------------------------------------------- heavy shapes (issue 11)

HEAVY_ROUNDS = 25
ADDED = list(range(2_000_000, 2_000_050))  # songs added at run time: graph-served seeds


@pytest.fixture(scope="module")
def heavy(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A server with the default message limit, so that the heaviest answers are sent and
    checked, and with songs added at run time (their lists need graph searches)."""
    state = tmp_path_factory.mktemp("fuzz-heavy-state")
    config = ServerConfig(bundle=tiny_bundle, port=0, data_dir=state, admin_token=ADMIN,
                          workers=2)
    with ServerThread(config) as live:
        fuzzed = Fuzzed(live, tiny_bundle)
        code, _, details = fuzzed.call("AddSongs", pb2.AddSongsRequest(songs=[
            pb2.NewSong(song_id=song_id, metadata=pb2.SongMetadata(
                genres=["GN0100"], detail_genres=["GN0101"], artist_ids=[i % 7]))
            for i, song_id in enumerate(ADDED)]).SerializeToString())
        assert code is Code.OK, details
        yield fuzzed
        fuzzed.channel.close()


@st.composite
def heavy_id_lists(draw: Any, cluster: list[int]) -> list[int]:
    """Close to the limit of 1000 ids: one dense neighbourhood, random known songs, the
    added songs among them, or one id repeated."""
    kind = draw(st.sampled_from(["cluster", "random", "added", "repeated"]))
    size = draw(st.sampled_from([900, 999, 1000]))
    if kind == "cluster":
        return cluster[:size]
    if kind == "repeated":
        return [cluster[0]] * size
    ids = draw(st.lists(KNOWN, min_size=size, max_size=size))
    return ADDED + ids[len(ADDED):] if kind == "added" else ids


@st.composite
def heavy_requests(draw: Any, cluster: list[int]) -> tuple[str, Any]:
    """SimilarSongsBatch with up to 1000 ids, k up to 1000 and 1000 exclusions (of the
    same dense neighbourhood, at random, or none), or ContinuePlaylist with 1000 seeds
    (added songs among them) for 1000 songs."""
    if draw(st.booleans()):
        ids = draw(heavy_id_lists(cluster))
        exclude = draw(st.sampled_from(["same", "cluster", "random", "none"]))
        excluded = {"same": ids, "cluster": cluster, "none": []}.get(exclude) or draw(
            st.lists(KNOWN, min_size=1000, max_size=1000))
        k = draw(st.sampled_from([1, 10, 100, 1000]))
        if draw(st.booleans()):  # within song_ids x k <= 100000, or just past it
            ids = ids[: max(1, 100_000 // k + draw(st.sampled_from([0, 0, 1])))]
        return "SimilarSongsBatch", pb2.SimilarSongsBatchRequest(
            song_ids=ids, k=k, exclude_song_ids=excluded[:1000],
            include_names=draw(st.booleans()))
    seeds = draw(heavy_id_lists(cluster))
    return "ContinuePlaylist", pb2.ContinuePlaylistRequest(
        seed_song_ids=list(dict.fromkeys(ADDED + seeds))[:1000],
        n_songs=draw(st.sampled_from([100, 1000])), strategy=draw(st.sampled_from(STRATEGIES)),
        drop_future=draw(st.booleans()), updt_date="2015-06-01")


@pytest.mark.slow
def test_heavy_shapes_long_run(heavy: Fuzzed) -> None:
    """Rounds of 2-4 of the heaviest requests at once, some with deadlines that expire
    mid-way, while one-song probes go on: every call ends with a deliberate code (a
    deadline that passes may end one with DEADLINE_EXCEEDED), answers keep the API's
    promises, probes are answered throughout, and the server ends healthy and idle."""
    stub = pb2_grpc.RecommenderStub(heavy.channel)
    near = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=0, k=999), timeout=CALL_TIMEOUT)
    cluster = [0, *[n.song_id for n in near.neighbours]]
    outcomes: set[tuple[str, str]] = set()

    @settings(max_examples=HEAVY_ROUNDS, deadline=None, derandomize=False, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(round_=st.lists(st.tuples(heavy_requests(cluster),
                                     st.sampled_from([0.05, 0.3, CALL_TIMEOUT])),
                           min_size=2, max_size=4))
    def run(round_: list[tuple[tuple[str, Any], float]]) -> None:
        calls = [(name, request, timeout, heavy.calls[name].future(
            request.SerializeToString(), timeout=timeout, metadata=AUTH))
            for (name, request), timeout in round_]
        while not all(call.done() for *_, call in calls):
            probe = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=7, k=10),
                                      timeout=CALL_TIMEOUT)
            assert len(probe.neighbours) == 10
        for name, request, timeout, call in calls:
            error = call.exception()
            outcomes.add((name, "OK" if error is None else error.code().name))
            if error is None:
                check_answer(name, request, REQUESTS[name][2].FromString(call.result()))
                continue
            code = error.code()
            allowed = DELIBERATE | ({Code.DEADLINE_EXCEEDED} if timeout < CALL_TIMEOUT
                                    else set())
            assert code in allowed, f"{name}: {code.name}: {error.details()}"

    run()
    # Both RPCs were answered in full, and deadlines cut some calls short.
    assert {("SimilarSongsBatch", "OK"), ("ContinuePlaylist", "OK")} <= outcomes, outcomes
    assert any(code == "DEADLINE_EXCEEDED" for _, code in outcomes), outcomes
    assert_healthy(heavy)
    end = time.monotonic() + 30
    registry = heavy.live.server.state.metrics.registry
    while time.monotonic() < end and (registry.get_sample_value("songrec_heavy_calls")
                                      or registry.get_sample_value(
                                          "songrec_work_queued", {"lane": "heavy"})):
        time.sleep(0.05)
    assert registry.get_sample_value("songrec_heavy_calls") == 0
