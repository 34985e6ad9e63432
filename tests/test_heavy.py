"""Heavy calls (issue 11): exclusions checked by flag, lists deepened only where exclusions
took places, work in pieces in a light and a heavy lane, callers that give up stop their
call at the next piece, and probes answered while the heaviest calls run. Timing is never
asserted here (bench: ``python -m clients.bench_heavy``); only what happened, in order."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server import validation
from server.config import ServerConfig
from server.engine import Engine, SongMeta
from server.errors import DeadlineExceeded, ResourceExhausted
from server.lists import drop_marked
from server.live import LiveModel
from server.metrics import Metrics
from server.testing import ServerThread
from server.validation import ContinueParams, NewSong, SimilarParams
from server.workers import Budget, Progress, Workers

OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


# ---------------------------------------------------------------- exclusions


def test_drop_marked_is_isin_and_leaves_no_flag_behind() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 500, 300)
    offsets = np.asarray([0, 40, 40, 170, 300])
    shared = rng.integers(0, 500, 60)
    marked = [rng.integers(0, 800, 10), np.zeros(0, dtype=np.int64), shared, shared]
    keep = np.ones(len(labels), dtype=bool)
    drop_marked(keep, labels, offsets, marked)
    for i, rows in enumerate(marked):
        part = slice(offsets[i], offsets[i + 1])
        np.testing.assert_array_equal(keep[part], ~np.isin(labels[part], rows))
    # The scratch flags are clear again: a second use with nothing marked drops nothing.
    again = np.ones(len(labels), dtype=bool)
    drop_marked(again, labels, offsets, [np.asarray([799])] * 4)
    assert again.all()


def _reference(songs: Any, row: int, k: int, excluded: np.ndarray
               ) -> tuple[list[int], list[float]]:
    """The definition: the first k of the list k + 1 + len(excluded) deep, without the
    song itself and the excluded songs."""
    labels, sims, _ = songs.neighbour_lists(np.asarray([row]), k + 1 + len(excluded))
    keep = (labels != row) & ~np.isin(labels, excluded)
    return labels[keep][:k].tolist(), sims[keep][:k].tolist()


def test_similar_lists_equal_the_full_depth_definition(tiny_bundle: Path) -> None:
    """Where the table answers every depth involved (k + 1 + exclusions within it), the
    lists deepened only where exclusions took places are exactly the definition's."""
    engine = Engine.load(tiny_bundle)
    songs = engine.songs
    rng = np.random.default_rng(1)
    rows = rng.choice(engine.catalog.n_songs, 30, replace=False)
    for k in (1, 10, 40):
        for kind in ("none", "random", "nearest"):
            excluded = []
            for row in rows.tolist():
                if kind == "none":
                    excluded.append(np.zeros(0, dtype=np.int64))
                elif kind == "random":
                    excluded.append(rng.choice(engine.catalog.n_songs, 20, replace=False))
                else:  # its own nearest songs: the list must go deeper
                    near, _ = _reference(songs, row, 30, np.zeros(0, dtype=np.int64))
                    excluded.append(np.asarray(near[::2], dtype=np.int64))
            assert max(k + 1 + len(e) for e in excluded) <= songs.table_depth + 1
            labels, sims, offsets = songs.similar_lists(rows, k, excluded)
            for i, row in enumerate(rows.tolist()):
                got = labels[offsets[i]:offsets[i + 1]].tolist()
                want, want_sims = _reference(songs, row, k, excluded[i])
                assert got == want, (k, kind, row)
                assert sims[offsets[i]:offsets[i + 1]].tolist() == want_sims


def test_deep_exclusions_keep_their_promises(tiny_bundle: Path) -> None:
    """Exclusions past the table: k songs, none excluded, not the song itself, best
    first, nearly the exact nearest allowed songs."""
    engine = Engine.load(tiny_bundle)
    songs = engine.songs
    unit = songs.vectors(np.arange(engine.catalog.n_songs))
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    centre = int(engine.catalog.popularity.argmax())
    cluster, _ = _reference(songs, centre, 99, np.zeros(0, dtype=np.int64))
    excluded = np.asarray([centre, *cluster], dtype=np.int64)
    rows = excluded[:20]
    labels, sims, offsets = songs.similar_lists(rows, 50, [excluded] * len(rows))
    overlap = []
    for i, row in enumerate(rows.tolist()):
        got = labels[offsets[i]:offsets[i + 1]]
        assert len(got) == 50 and row not in got and not np.isin(got, excluded).any()
        assert (np.diff(sims[offsets[i]:offsets[i + 1]]) <= 1e-6).all()
        exact = unit @ unit[row]
        exact[excluded] = -np.inf
        overlap.append(len(np.intersect1d(got, np.argsort(-exact)[:50])) / 50)
    assert np.mean(overlap) > 0.9


def test_table_rows_answer_alike_beside_added_songs(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    """A bundle song's list is the table's even when another row of the same lookup is a
    song added at run time (which needs the graph)."""
    engine = Engine.load(copy_bundle())
    songs = engine.songs
    n = engine.catalog.n_songs
    songs.add(songs.vectors(np.asarray([3])) * 2.0, np.asarray([n]))
    alone = songs.neighbour_lists(np.asarray([5, 9]), 30)
    mixed = songs.neighbour_lists(np.asarray([5, n, 9]), 30)
    bounds = mixed[2].tolist()
    np.testing.assert_array_equal(np.concatenate([mixed[0][bounds[0]:bounds[1]],
                                                  mixed[0][bounds[2]:bounds[3]]]), alone[0])
    assert mixed[0][bounds[1]:bounds[2]][0] in (n, songs.rep_of[3])


# ---------------------------------------------------------------- pieces


def test_progress_covers_every_item_once_in_slices() -> None:
    seen: list[tuple[int, int]] = []
    progress = Progress(100, first=7)
    steps = 0
    while not progress.step(Budget(0.0), lambda a, b: seen.append((a, b))):
        steps += 1
    assert seen[0] == (0, 7) and seen[-1][1] == 100
    assert all(a == prev[1] for prev, (a, _) in zip(seen, seen[1:], strict=False))
    assert steps == len(seen) - 1  # a spent budget ends the piece after one slice
    costs = np.asarray([1, 1, 1, 50, 1, 1])
    weighted = Progress(6, first=3, costs=costs)
    spans: list[tuple[int, int]] = []
    weighted.step(Budget(0.0), lambda a, b: spans.append((a, b)))
    assert spans == [(0, 3)]  # the 4th item alone is over the first slice's cost
    whole = Progress(6, first=1, costs=costs)
    whole.step(Budget(None), lambda a, b: spans.append((a, b)))
    assert spans[-1] == (0, 6)  # no time limit: the rest at once


def _added_model(bundle: Path, n_added: int) -> tuple[LiveModel, list[int]]:
    model = LiveModel.load(bundle, verify=False, capacity=100, threads=1)
    songs = [NewSong(10_000_000 + i, SongMeta(genres=("GN0100",), detail_genres=("GN0101",),
                                              issue_date=20100101 + i))
             for i in range(n_added)]
    model.insert(songs, model.encode_new(songs, ["x"] * len(songs)))
    return model, [s.song_id for s in songs]


@pytest.mark.parametrize("strategy", ["ae-quota", "ae-hybrid"])
def test_a_continuation_in_pieces_equals_one_in_one_go(tiny_bundle: Path,
                                                       strategy: str) -> None:
    """Seeds added at run time need graph searches: they are done a slice per piece, and
    the answer is the one the strategy gives in one go."""
    model, added = _added_model(tiny_bundle, 30)
    ids = model.engine.catalog.song_ids
    params = ContinueParams((*added, *ids[:40:4].tolist()), ("nope",), "", 0, 200, 10,
                            strategy, False, True)
    whole = model.continue_playlist(params)
    job = model.continuation(params)
    pieces = 1
    while not job.step(Budget(0.0)):
        pieces += 1
    assert pieces > 2 and job.result == whole
    assert whole.unknown_tags == ["nope"] and len(whole.song_ids) == 200


def test_a_batch_in_pieces_equals_one_in_one_go(tiny_bundle: Path) -> None:
    model = LiveModel.load(tiny_bundle, verify=False, capacity=100, threads=1)
    ids = model.engine.catalog.song_ids
    params = SimilarParams((*ids[:300].tolist(), -5), 20, frozenset(ids[::50].tolist()), True)
    whole = model.similar(params)
    results: list[Any] = []
    unknown: list[int] = []
    job = model.similar_batch(params, lambda r, u: (results.extend(r), unknown.extend(u)))
    pieces = 1
    while not job.step(Budget(0.0)):
        pieces += 1
    assert pieces > 2 and (results, unknown) == (whole[0], whole[1]) and unknown == [-5]


# ---------------------------------------------------------------- the worker lanes


def test_light_work_goes_first_and_heavy_work_ages_into_priority() -> None:
    async def order(heavy_age: float) -> list[str]:
        workers = Workers(1, heavy_age=heavy_age)
        gate = threading.Event()
        ran: list[str] = []
        blocker = asyncio.ensure_future(workers.run(gate.wait))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(workers.run(lambda: ran.append("heavy"), heavy=True)),
                  asyncio.ensure_future(workers.run(lambda: ran.append("light")))]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *queued)
        workers.shutdown()
        return ran

    assert asyncio.run(order(heavy_age=60.0)) == ["light", "heavy"]
    assert asyncio.run(order(heavy_age=0.0)) == ["heavy", "light"]


def test_a_call_stops_between_pieces_when_its_deadline_passes_or_its_caller_leaves(
        ) -> None:
    metrics = Metrics()

    async def scenario() -> tuple[int, int]:
        workers = Workers(2, metrics)
        ran = {"deadline": 0, "cancelled": 0}

        def step_of(reason: str) -> Any:
            def step(budget: Budget) -> bool:
                time.sleep(0.01)
                ran[reason] += 1
                return ran[reason] >= 1000

            return step

        with pytest.raises(DeadlineExceeded):
            await workers.run_pieces(step_of("deadline"), time.monotonic() + 0.1, heavy=True)
        call = asyncio.ensure_future(workers.run_pieces(step_of("cancelled"), None))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.05)  # the piece that was running when it left ends
        stopped = dict(ran)
        await asyncio.sleep(0.1)  # and nothing more runs for either call
        assert ran == stopped
        assert workers.heavy_calls == 0
        workers.shutdown()
        return ran["deadline"], ran["cancelled"]

    deadline_pieces, cancelled_pieces = asyncio.run(scenario())
    assert 1 <= deadline_pieces < 100 and 1 <= cancelled_pieces < 100
    assert metrics.registry.get_sample_value("songrec_stopped_calls_total",
                                             {"reason": "deadline"}) == 1
    assert metrics.registry.get_sample_value("songrec_stopped_calls_total",
                                             {"reason": "cancelled"}) == 1


def test_heavy_calls_past_the_limit_are_refused() -> None:
    async def scenario() -> None:
        workers = Workers(2, heavy_calls=1)
        gate = threading.Event()
        first = asyncio.ensure_future(workers.run_pieces(lambda b: gate.wait() or True,
                                                         None, heavy=True))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="1 heavy calls in progress"):
            await workers.run_pieces(lambda b: True, None, heavy=True)
        assert await workers.run_pieces(lambda b: True, None) == 1  # light calls pass
        gate.set()
        assert await first == 1
        assert await workers.run_pieces(lambda b: True, None, heavy=True) == 1
        workers.shutdown()

    asyncio.run(scenario())


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def heavy_server(tiny_bundle: Path) -> Iterator[ServerThread]:
    with ServerThread(ServerConfig(bundle=tiny_bundle, port=0, workers=2)) as live:
        yield live


def _deep_batch(stub: Any) -> pb2.SimilarSongsBatchRequest:
    """The heaviest shape: 1000 ids, k 100, and the same 1000 ids excluded, all near one
    another, so that every list must reach past most of the exclusions."""
    near = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=0, k=999), timeout=60)
    cluster = [0, *[n.song_id for n in near.neighbours]][:1000]
    return pb2.SimilarSongsBatchRequest(song_ids=cluster, k=100, exclude_song_ids=cluster)


def _sample(live: ServerThread, name: str, labels: dict[str, str] | None = None) -> float:
    value = live.server.state.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _wait_idle(live: ServerThread) -> None:
    end = time.monotonic() + 60
    while _sample(live, "songrec_in_flight_requests") > 0 and time.monotonic() < end:
        time.sleep(0.02)


def test_probes_are_answered_while_heavy_calls_run(heavy_server: ServerThread) -> None:
    with heavy_server.channel(options=OPTIONS) as channel:
        stub = pb2_grpc.RecommenderStub(channel)
        request = _deep_batch(stub)
        pieces = _sample(heavy_server, "songrec_work_piece_seconds_count", {"lane": "heavy"})
        heavy = [stub.SimilarSongsBatch.future(request, timeout=120) for _ in range(4)]
        probes_during = 0
        while not all(call.done() for call in heavy):
            answer = stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=7, k=10), timeout=60)
            assert len(answer.neighbours) == 10
            probes_during += not all(call.done() for call in heavy)
        results = [call.result() for call in heavy]
    assert probes_during >= 3  # answered while the heavy calls were still running
    assert all(len(r.results) == 1000 for r in results)
    for result in results:
        excluded = set(request.exclude_song_ids)
        assert all(len(r.neighbours) == 100 and not {n.song_id for n in r.neighbours} & excluded
                   for r in result.results)
    # Each heavy call ran in many pieces, in the heavy lane.
    assert _sample(heavy_server, "songrec_work_piece_seconds_count", {"lane": "heavy"}) - pieces > 8


@pytest.mark.parametrize("how", ["deadline", "cancelled"])
def test_a_heavy_call_whose_caller_gives_up_stops_early(heavy_server: ServerThread,
                                                        how: str) -> None:
    """Measured in pieces, not time: the call stops between pieces, long before the
    pieces a whole call takes (it gives up after 50 ms; pieces are ~20 ms, and a whole
    call takes some 15 of them on the tiny bundle)."""
    _wait_idle(heavy_server)
    with heavy_server.channel(options=OPTIONS) as channel:
        stub = pb2_grpc.RecommenderStub(channel)
        request = _deep_batch(stub)

        def heavy_pieces() -> float:
            return _sample(heavy_server, "songrec_work_piece_seconds_count", {"lane": "heavy"})

        before = heavy_pieces()
        stub.SimilarSongsBatch(request, timeout=120)
        whole = heavy_pieces() - before
        stopped = _sample(heavy_server, "songrec_stopped_calls_total", {"reason": how})
        before = heavy_pieces()
        if how == "deadline":
            with pytest.raises(grpc.RpcError) as err:
                stub.SimilarSongsBatch(request, timeout=0.05)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            call = stub.SimilarSongsBatch.future(request, timeout=120)
            time.sleep(0.05)
            assert call.cancel()
        _wait_idle(heavy_server)
        time.sleep(0.1)
        assert _sample(heavy_server, "songrec_stopped_calls_total", {"reason": how}) \
            == stopped + 1
        assert heavy_pieces() - before < whole / 2
        # And the server serves on.
        assert len(stub.SimilarSongs(pb2.SimilarSongsRequest(song_id=7, k=5),
                                     timeout=30).neighbours) == 5


def test_the_cost_model_sorts_the_lanes() -> None:
    light = SimilarParams((1,), 100, frozenset(), False)
    heavy = SimilarParams(tuple(range(1000)), 100, frozenset(range(1000)), False)
    assert validation.similar_cost(light) == 101
    assert validation.similar_cost(heavy) == 1000 * 2 * 1101 > validation.HEAVY_COST
    question = ContinueParams(tuple(range(20)), (), "", 0, 100, 10, "ae-hybrid", False, False)
    assert validation.continue_cost(question) < validation.HEAVY_COST
    biggest = ContinueParams(tuple(range(1000)), (), "", 0, 1000, 10, "ae-hybrid", False,
                             False)
    assert validation.continue_cost(biggest) > validation.HEAVY_COST


def test_a_big_insert_goes_in_pieces_that_let_queries_in(tiny_bundle: Path) -> None:
    """Songs are inserted a piece at a time (queries run between pieces); every song gets
    its row, in order, and is found by its own code."""
    model, _ = _added_model(tiny_bundle, 0)
    songs = [NewSong(20_000_000 + i, SongMeta(genres=("GN0100",), artists=(i % 40,),
                                              issue_date=19900101 + i % 28), f"s{i}")
             for i in range(3000)]
    codes = model.encode_new(songs, ["x"] * len(songs))
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            with model.lock.read():
                seen.append(model.n_added)

    thread = threading.Thread(target=reader)
    thread.start()
    model.insert(songs, codes)
    done.set()
    thread.join()
    assert model.n_added == 3000 and seen == sorted(seen)
    rows = model.rows_or_missing([s.song_id for s in songs])
    assert rows.tolist() == list(range(model.n_bundle, model.n_bundle + 3000))
    found = model.similar_one(SimilarParams((songs[5].song_id,), 3, frozenset(), True))
    assert found.song_id == songs[5].song_id and len(found.ids) == 3
