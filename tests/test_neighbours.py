"""Precomputed neighbour lists: exact against brute force, resumable, and served by the
song search exactly as a graph search of the same songs would answer (plus added songs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server import bundle as bundle_files
from server.engine import Engine
from server.search import ExactSearch, HnswSearch
from trainer import neighbours
from trainer.neighbours import exact_neighbours, recall_against_fp32, table_arrays


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_lists_equal_brute_force_without_self() -> None:
    unit = _unit(700, 24)
    pos, sim = exact_neighbours(unit, 30, block=128, margin=8, progress=False)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :30]
    assert pos.shape == (700, 30) and pos.dtype == np.int32
    assert (pos != np.arange(700)[:, None]).all()
    # Same sets (ties may order differently); similarities exact fp32, best first.
    assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(pos, truth, strict=True)]) == 30
    np.testing.assert_allclose(sim, np.take_along_axis(sims, pos.astype(np.int64), axis=1),
                               rtol=1e-5, atol=1e-6)
    assert (np.diff(sim, axis=1) <= 1e-7).all()
    assert recall_against_fp32(unit, pos, n_queries=200) == 1.0


def test_an_interrupted_run_resumes_from_saved_blocks(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    unit = _unit(300, 16, seed=1)
    first = exact_neighbours(unit, 10, block=64, work_dir=tmp_path, progress=False)
    blocks = sorted(tmp_path.rglob("block-*.npz"))
    assert len(blocks) == 5
    blocks[2].unlink()  # as if killed before the third block was saved
    calls: list[int] = []
    real = neighbours._rerank

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(neighbours, "_rerank", counting)
    again = exact_neighbours(unit, 10, block=64, work_dir=tmp_path, progress=False)
    assert len(calls) == 1  # only the missing block was computed
    np.testing.assert_array_equal(first[0], again[0])
    # Other vectors never reuse these blocks.
    exact_neighbours(_unit(300, 16, seed=2), 10, block=64, work_dir=tmp_path, progress=False)
    assert len(calls) == 1 + 5


def test_exported_bundle_has_a_table_the_server_loads(tiny_bundle: Path) -> None:
    manifest = bundle_files.read_manifest(tiny_bundle)
    table = bundle_files.load_neighbours(tiny_bundle, manifest)
    assert table is not None
    assert manifest.extra["song_neighbours"]["k"] == table["rows"].shape[1]
    engine = Engine.load(tiny_bundle)
    assert engine.songs.table_depth == table["rows"].shape[1]


def _graph_only(engine: Engine) -> HnswSearch:
    return HnswSearch(engine.songs.index, engine.songs.rep_of)


def test_table_lookup_matches_exact_search_with_duplicate_groups(tiny_bundle: Path) -> None:
    engine = Engine.load(tiny_bundle)
    songs = engine.songs
    rep_of = songs.rep_of
    assert rep_of is not None and (rep_of != np.arange(len(rep_of))).any()
    reps = np.nonzero(rep_of == np.arange(len(rep_of)))[0]
    # The reference reads the graph's float32 vectors (the bundle's copy is float16).
    exact = ExactSearch(np.asarray(songs.index.get_items(songs._labels(np.arange(len(rep_of)))),
                                   dtype=np.float32))
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(len(rep_of), 40, replace=False),
                           np.nonzero(rep_of != np.arange(len(rep_of)))[0][:5]])
    for row, (labels, sims) in zip(rows, songs.neighbours(rows, 50), strict=True):
        assert len(labels) == 50 and labels[0] == rep_of[row] and sims[0] == 1.0
        # Every listed song is one of the truly nearest (duplicates share a similarity).
        truth, truth_sims = exact.search(exact.vectors([row]), 50)
        assert sims[-1] >= truth_sims[0][-1] - 1e-5
        np.testing.assert_allclose(sims, np.sort(sims)[::-1])
        assert set(labels) <= set(truth[0]) | set(np.nonzero(np.isin(rep_of, reps))[0])


def test_added_songs_join_the_table_answers(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    engine = Engine.load(copy_bundle())
    songs = engine.songs
    n = len(songs.rep_of)
    target = 7
    twin = songs.vectors(np.asarray([target]))
    songs.add(twin * 3.0, np.asarray([n]))  # same direction, other norm: cosine 1
    labels, sims = songs.neighbours(np.asarray([target]), 20)[0]
    assert n in labels[:3].tolist()
    assert sims[labels.tolist().index(n)] == pytest.approx(1.0, abs=1e-3)  # float16 copy
    # The added song's own neighbours come from the graph, itself first.
    own, _ = songs.neighbours(np.asarray([n]), 5)[0]
    assert own[0] in (n, songs.rep_of[target])
    # Same answers as the graph alone for a question it can answer exactly.
    graph = _graph_only(engine)
    graph_labels, _ = graph.search(graph.vectors(np.asarray([target])), 20)
    assert len(set(graph_labels[0]) & set(labels)) >= 18


def test_a_damaged_table_is_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    manifest = bundle_files.read_manifest(root)
    table = bundle_files.load_neighbours(root, manifest)
    assert table is not None
    bundle_files.save_neighbours(root, {**table, "rows": table["rows"][:-1]})
    with pytest.raises(bundle_files.BundleError, match="sha256|truncated"):
        bundle_files.read_manifest(root)
    bundle_files.write_manifest(root, manifest.to_json())  # checksums agree, shapes do not
    with pytest.raises(bundle_files.BundleError, match="do not fit"):
        Engine.load(root)


def test_table_arrays_map_positions_to_song_rows() -> None:
    labels = np.asarray([3, 5, 9])
    pos = np.asarray([[1, 2], [0, 2], [1, 0]], dtype=np.int32)
    out = table_arrays(labels, pos, np.ones((3, 2), dtype=np.float32))
    assert out["rows"].tolist() == [[5, 9], [3, 9], [5, 3]]


def test_stored_codes_answer_vectors_like_the_graph(tiny_bundle: Path) -> None:
    engine = Engine.load(tiny_bundle)
    songs = engine.songs
    assert (tiny_bundle / bundle_files.CODES).is_file()
    rows = np.arange(0, len(songs.rep_of), 7)
    from_codes = songs.vectors(rows)
    from_graph = np.asarray(songs.index.get_items(songs._labels(rows)), dtype=np.float32)
    np.testing.assert_allclose(from_codes, from_graph, atol=2e-3)  # float16 storage
    # Songs added at run time are read back from the graph.
    songs.add(from_graph[:1], np.asarray([len(songs.rep_of)]))
    both = songs.vectors(np.asarray([rows[0], len(songs.rep_of)]))
    np.testing.assert_allclose(both[1], from_graph[0], atol=1e-6)


def test_codes_of_the_wrong_shape_are_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    manifest = bundle_files.read_manifest(root)
    codes = np.load(root / bundle_files.CODES)
    bundle_files.save_codes(root, codes[:, :-1])
    bundle_files.write_manifest(root, manifest.to_json())
    with pytest.raises(bundle_files.BundleError, match="codes.npy: shape"):
        Engine.load(root)


def test_a_table_hop_lifts_graph_recall_for_songs_the_index_lacks(tiny_bundle: Path) -> None:
    manifest = bundle_files.read_manifest(tiny_bundle)
    index = bundle_files.load_hnsw(tiny_bundle, manifest.song_index, bundle_files.SONG_INDEX)
    table = bundle_files.load_neighbours(tiny_bundle, manifest)
    codes = bundle_files.load_codes(tiny_bundle, manifest)
    labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
    unit = np.asarray(index.get_items(labels), dtype=np.float32)
    graph, hop = HnswSearch(index), HnswSearch(index, table=table, codes=codes)
    index.set_ef(10)  # a deliberately poor graph search
    queries = np.arange(0, len(labels), 5)
    recall = {"graph": 0.0, "hop": 0.0}
    for q in queries:
        sims = unit @ unit[q]
        sims[q] = -np.inf
        truth = labels[np.argsort(-sims)[:20]]
        for name, search in (("graph", graph), ("hop", hop)):
            got, got_sims = search.search(unit[q], 20, skip=labels[q : q + 1])
            assert labels[q] not in got[0]  # leave-one-out really leaves it out
            assert (np.diff(got_sims[0]) <= 1e-6).all()
            recall[name] += len(np.intersect1d(got[0], truth)) / 20 / len(queries)
    assert recall["hop"] > recall["graph"]
    assert recall["hop"] > 0.95


def test_hits_expand_to_their_duplicate_groups_in_order() -> None:
    import hnswlib

    rng = np.random.default_rng(5)
    n = 60
    rep_of = np.arange(n)
    for row in range(n):  # some rows duplicate an earlier one
        if row > 5 and rng.random() < 0.4:
            rep_of[row] = rep_of[int(rng.integers(0, row))]
    reps = np.nonzero(rep_of == np.arange(n))[0]
    index = hnswlib.Index(space="cosine", dim=4)
    index.init_index(max_elements=n + 5)
    index.add_items(rng.normal(size=(len(reps), 4)).astype(np.float32), reps)
    search = HnswSearch(index, rep_of)
    groups = {int(r): [int(r)] + [int(x) for x in np.nonzero(rep_of == r)[0] if x != r]
              for r in reps}
    for _ in range(100):
        # A batch of questions, each with its own hits, expanded in one pass.
        hits = np.stack([rng.choice(np.concatenate([reps, [n, n + 1]]), 12, replace=False)
                         for _ in range(4)]).astype(np.int64)
        sims = np.sort(rng.random((4, 12)), axis=1)[:, ::-1].astype(np.float32)
        k = int(rng.integers(1, 40))
        got_rows, got_sims, offsets = search._expand_rows(hits, sims, k)
        for q in range(4):
            want_rows, want_sims = [], []
            for label, sim in zip(hits[q].tolist(), sims[q].tolist(), strict=True):
                members = groups.get(label, [label])  # run-time rows are their own group
                want_rows += members
                want_sims += [sim] * len(members)
            part = slice(offsets[q], offsets[q + 1])
            assert got_rows[part].tolist() == want_rows[:k]
            np.testing.assert_array_equal(got_sims[part],
                                          np.asarray(want_sims[:k], dtype=np.float32))


def test_added_songs_have_their_own_graph_with_recall_against_exact_search(
        copy_bundle) -> None:  # type: ignore[no-untyped-def]
    """Songs added at run time are searched through their own graph (not a scan), and
    every search over bundle and added songs together keeps recall@20 >= 0.95 against
    exact search over both."""
    engine = Engine.load(copy_bundle(), capacity=100)
    songs = engine.songs
    n = len(songs.rep_of)
    rng = np.random.default_rng(3)
    bundle_unit = songs.vectors(np.arange(n))
    # New songs near bundle songs (mixtures plus noise), past the capacity so the
    # graph has to grow.
    mix = bundle_unit[rng.integers(0, n, 400)] + bundle_unit[rng.integers(0, n, 400)]
    added = mix + 0.3 * rng.normal(size=mix.shape).astype(np.float32) * float(
        np.abs(bundle_unit).mean())
    added = added.astype(np.float32)
    for start in range(0, len(added), 100):
        songs.add(added[start : start + 100], np.arange(n + start, n + start + 100))
    assert songs.added.count == 400 and songs.added.resizes >= 1
    assert songs.count() == songs.index.get_current_count() + int(
        (songs.rep_of != np.arange(n)).sum()) + 400
    exact = ExactSearch(np.concatenate([bundle_unit, added]))
    queries = np.concatenate([np.arange(0, n, max(n // 60, 1)), n + np.arange(0, 400, 7)])
    hit = total = 0
    tie = 1e-3  # float16 codes: similarities this close are a tie
    for lists in (songs.neighbours(queries, 20),):
        truth, _ = exact.search(exact.vectors(queries), 21)
        for row, (labels, _) in zip(queries.tolist(), lists, strict=True):
            want = [x for x in truth[queries.tolist().index(row)].tolist() if x != row][:20]
            got = set(labels.tolist())
            # Duplicates of a bundle song are equally near: count a twin as a hit. So is a
            # song the answer's last one ties with (the table keeps float16 codes).
            query = exact.vectors(np.asarray([row]))[0]
            sim = {x: float(exact.vectors(np.asarray([x]))[0] @ query) for x in want}
            last = min(float(exact.vectors(np.asarray([g]))[0] @ query) for g in got)
            hit += sum(1 for x in want if x in got or (x < n and songs.rep_of[x] in {
                songs.rep_of[g] for g in got if g < n}) or sim[x] <= last + tie)
            total += len(want)
    assert hit / total >= 0.95, hit / total
    # Searching by code (EncodeSong's path) reaches added songs too.
    labels, sims = songs.search(added[:5], 5)
    assert (labels[:, 0] == n + np.arange(5)).all()
    assert np.allclose(sims[:, 0], 1.0, atol=1e-4)


def test_added_twins_stay_searchable() -> None:
    """Many added songs with identical codes (identical metadata) go into the added
    songs' graph once and come back as a group, where exact duplicates would break it."""
    from server.added import AddedSongs

    added = AddedSongs(8, first=100, capacity=4)
    base = _unit(5, 8, seed=4)
    codes = np.concatenate([np.repeat(base[:1], 60, axis=0), base[1:]])
    for start in range(0, len(codes), 16):
        part = codes[start : start + 16]
        added.add(part, np.arange(100 + start, 100 + start + len(part)))
    assert added.count == 64 and added.in_graph == 5
    labels, sims = added.search(base[:1], 10)
    assert labels.shape == (1, 10) and set(labels[0].tolist()) <= set(range(100, 160))
    assert np.allclose(sims, 1.0, atol=1e-5)
    labels, _ = added.search(base[4:5], 1)
    assert labels[0, 0] == 163


def test_a_hub_keeps_its_nearest_links_only() -> None:
    """A bundle song near very many added songs keeps (at least) its NEAR_DEPTH nearest
    links and never much more, so its lookups stay short."""
    from server.added import NEAR_DEPTH, AddedSongs

    added = AddedSongs(4, first=100, capacity=10)
    sims = np.random.default_rng(5).random(5 * NEAR_DEPTH).astype(np.float32)
    for i, sim in enumerate(sims.tolist()):
        added.link(np.asarray([7]), np.asarray([100 + i]), np.asarray([sim]))
    songs, got = added.near_of(7)
    assert len(songs) < 2 * NEAR_DEPTH
    best = np.sort(sims)[::-1][:NEAR_DEPTH]
    assert set(best.tolist()) <= set(got.tolist())


def test_near_lists_read_every_songs_links_as_near_of_does() -> None:
    from server.added import AddedSongs

    added = AddedSongs(4, first=100, capacity=10)
    rng = np.random.default_rng(8)
    reps = np.asarray([3, 9, 3, 12, 9, 3], dtype=np.int64)
    added.link(reps, 100 + np.arange(len(reps)), rng.random(len(reps)).astype(np.float32))
    asked = np.asarray([9, 5, 3, 12, 3], dtype=np.int64)

    def check() -> None:
        songs, sims, offsets = added.near_lists(asked)
        for i, rep in enumerate(asked.tolist()):
            want_songs, want_sims = added.near_of(rep)
            np.testing.assert_array_equal(songs[offsets[i]:offsets[i + 1]], want_songs)
            np.testing.assert_array_equal(sims[offsets[i]:offsets[i + 1]], want_sims)

    check()
    # Links added after a read are seen by the next one.
    added.link(np.asarray([5, 12]), np.asarray([106, 107]), np.asarray([0.5, 0.25], np.float32))
    check()
    assert added.near_lists(np.asarray([5]))[0].tolist() == [106]
    empty = AddedSongs(4, first=100, capacity=10)
    songs, _, offsets = empty.near_lists(asked)
    assert len(songs) == 0 and offsets.tolist() == [0] * (len(asked) + 1)


def test_added_songs_search_rescores_linked_candidates_with_the_graphs_hits() -> None:
    """Linked candidates (the added songs linked to a query's best bundle hits) join the
    graph's hits: re-scored exactly, each song once, best first."""
    from server.added import AddedSongs

    rng = np.random.default_rng(5)
    codes = rng.normal(size=(300, 16)).astype(np.float32)
    added = AddedSongs(16, first=1000, capacity=300)
    added.add(codes, np.arange(1000, 1300))
    unit = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    # Every song linked to every query: the answer is the exact top 5, without repeats.
    labels, sims = added.search(queries, 5, [np.arange(1000, 1300)] * 3)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(q @ unit.T), axis=1)[:, :5] + 1000
    assert labels.tolist() == exact.tolist()
    assert np.allclose(sims, np.take_along_axis(q @ unit.T, exact - 1000, axis=1), atol=1e-6)
    # Linked songs the graph found too count once.
    labels, _ = added.search(queries, 5, [exact[i] for i in range(3)])
    assert labels.tolist() == exact.tolist()


def test_songs_the_added_graph_loses_are_found_through_the_orphan_graphs() -> None:
    """hnswlib's graph loses songs where codes crowd (clusters of near-identical codes
    inserted cluster by cluster, as metadata-only codes arrive): a search for such a
    song's own code does not find it. The songs a graph loses go into an orphan graph,
    which every search asks too."""
    from server import added as added_module
    from server.added import AddedSongs

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    codes = (np.repeat(centres, 100, axis=0) + 0.2 * rng.normal(size=(4000, 32))).astype(
        np.float32)
    ids = np.arange(len(codes))

    def lost_share(max_graphs: int) -> float:
        songs = AddedSongs(32, first=0, capacity=500, m=4, ef_construction=20, ef=50)
        old = added_module.MAX_GRAPHS
        added_module.MAX_GRAPHS = max_graphs
        try:
            for start in range(0, len(codes), 10):
                songs.add(codes[start : start + 10], ids[start : start + 10])
        finally:
            added_module.MAX_GRAPHS = old
        assert (songs.orphans > 0) == (max_graphs > 1)
        labels, sims = songs.search(codes, 1)
        return float(np.mean((labels[:, 0] != ids) & (sims[:, 0] < 1 - 1e-6)))

    alone, with_orphans = lost_share(1), lost_share(added_module.MAX_GRAPHS)
    assert alone > 0.10, alone
    assert with_orphans < alone / 3, (alone, with_orphans)


def test_bench_added_measures_the_first_graph_against_all_graphs(
        tiny_bundle: Path, tiny_split: Path, tmp_path: Path) -> None:
    from trainer.bench_added import main

    doc = tmp_path / "B.md"
    assert main(["--data", str(tiny_split), "--bundle", str(tiny_bundle), "--songs", "600",
                 "--out", str(doc), "--name", "tiny"]) == 0
    text = doc.read_text()
    assert "<!-- bench-added-tiny:start -->" in text
    rows = [line.split(" | ") for line in text.splitlines()
            if line.startswith(("| first graph only |", "| all graphs |"))]
    assert len(rows) == 2
    for row in rows:  # own code found, recall mean: shares
        assert 0.0 < float(row[1]) <= 1.0 and 0.0 < float(row[2]) <= 1.0
    # All graphs hold the first graph's songs and more: never fewer found.
    assert float(rows[1][1]) >= float(rows[0][1])
    assert "600 songs added" in text
