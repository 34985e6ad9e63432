"""The learned second stage: candidates, features, the ALS fold-in, the ONNX ranker in the
bundle, and strategy ``ranked`` in-process (tests/test_server.py runs it over gRPC)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.bundle import (
    ALS_INDEX,
    RANKER_ARRAYS,
    RANKER_ONNX,
    BundleError,
    read_manifest,
    write_manifest,
)
from server.engine import Engine
from server.rankdata import FEATURES, SOURCES
from server.ranking import candidate_features
from server.strategies import (
    RANKED,
    REASON_ARTIST,
    REASON_PLAYLIST,
    REASON_SEED,
    STRATEGIES,
    Query,
    run_strategy,
)


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:
    return Engine.load(tiny_bundle)


def _seeds(engine: Engine, picks: list[int]) -> np.ndarray:
    return np.argsort(-engine.catalog.popularity, kind="stable")[picks].astype(np.int64)


def test_trained_bundle_lists_the_ranker_and_defaults_to_it(tiny_bundle: Path,
                                                           engine: Engine) -> None:
    manifest = read_manifest(tiny_bundle)
    for name in (RANKER_ONNX, RANKER_ARRAYS):
        assert len(manifest.files[name]["sha256"]) == 64
    info = manifest.extra["ranker"]
    assert info["features"] == list(engine.ranker.data.features)  # type: ignore[union-attr]
    assert set(info["recall"]) == {*SOURCES, "union"}
    assert info["recall"]["union"] >= max(info["recall"][s] for s in SOURCES)
    assert info["onnx_max_abs_diff"] < 1e-5
    assert engine.strategies == STRATEGIES and engine.default_strategy == RANKED
    assert engine.resolve_strategy("") == RANKED


def test_ranked_answers_are_valid_and_every_reason_is_true(engine: Engine) -> None:
    seeds = _seeds(engine, [2, 7, 30])
    query = Query(seeds, np.asarray([0], np.int32), "", n_songs=100)
    answer = run_strategy(RANKED, engine.catalog, engine.songs, engine.playlists, query,
                          engine.ranker)
    songs = answer.songs.tolist()
    assert len(songs) == 100 and len(set(songs)) == 100 and not set(songs) & set(seeds.tolist())
    assert answer.song_scores.tolist() == sorted(answer.song_scores.tolist(), reverse=True)
    assert len(answer.tags) == 10 and 0 not in answer.tags.tolist()
    catalog = engine.catalog
    artists = engine.ranker.data.song_artists  # type: ignore[union-attr]
    kinds = set()
    for row, (kind, source) in zip(songs, answer.reasons, strict=True):
        kinds.add(kind)
        if kind == REASON_PLAYLIST:  # a catalog position (LiveModel names the playlist)
            assert 0 <= source < len(catalog.playlist_ids)
            assert row in catalog.playlist_songs.row(source).tolist()
        elif kind in (REASON_SEED, REASON_ARTIST):
            assert source in seeds.tolist()
        if kind == REASON_ARTIST:
            assert set(artists.row(row).tolist()) & set(artists.row(source).tolist())
    assert len(kinds) >= 2  # several sources made it into the answer


def test_features_are_one_row_per_candidate_without_nan(engine: Engine) -> None:
    ranker = engine.ranker
    assert ranker is not None
    for query in (Query(_seeds(engine, [0, 1, 2, 3]), np.zeros(0, np.int32), "x"),
                  Query(np.zeros(0, np.int64), np.asarray([1, 2], np.int32), ""),
                  Query(np.zeros(0, np.int64), np.zeros(0, np.int32),
                        engine.catalog.words[0])):
        cand, x = candidate_features(engine.catalog, engine.songs, engine.playlists,
                                     ranker.data, query)
        assert x.shape == (len(cand.rows), len(ranker.data.features))
        assert len(cand.rows) == len(set(cand.rows.tolist())) > 0
        assert np.isfinite(x).all()
        assert not set(cand.rows.tolist()) & set(query.seeds.tolist())
        # Every candidate was proposed by at least one source.
        assert (cand.ranks.min(axis=1) < 1000).all()


def test_als_fold_in_solves_what_implicit_solves(tiny_split: Path) -> None:
    from trainer.catalog import build_catalog
    from trainer.dataset import load_dataset
    from trainer.rank import als_factors
    from trainer.recommenders.als import ALSRecommender
    from trainer.recommenders.base import questions_from

    data = load_dataset(tiny_split, files=["train.json"])
    als = ALSRecommender(factors=16, iterations=5, num_threads=1).fit(data)
    factors = als_factors(als, build_catalog(data))
    questions = questions_from(data.load_playlists(tiny_split / "val_questions.json"), data)
    checked = 0
    for q in questions[:20]:
        row = als.user_row(q)
        if row.nnz == 0:
            continue
        want = np.asarray(als._model.recalculate_user(0, row))
        seeds = np.unique(data.songs.rows(q.songs))
        tags = np.asarray(sorted({data.tags.get(t) for t in q.tags} - {-1}), np.int64)
        got = factors.fold_in(seeds, tags, q.title)
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        checked += 1
    assert checked >= 10


def test_onnx_ranker_scores_match_lightgbm_on_10000_rows(tiny_split: Path,
                                                         tiny_bundle: Path) -> None:
    from trainer.catalog import build_catalog
    from trainer.dataset import load_dataset
    from trainer.rank import (
        RankConfig,
        build_rank_data,
        fit_ranker,
        held_out,
        onnx_gap,
        playlist_search,
        question_rows,
        to_onnx,
    )

    engine = Engine.load(tiny_bundle)
    config = RankConfig(rounds=60, threads=1)
    masked, questions, answers = held_out(load_dataset(tiny_split),
                                          config)
    catalog = build_catalog(masked)
    data = build_rank_data(masked, catalog, None, config)
    rows = question_rows(catalog, engine.songs, playlist_search(engine.songs, catalog), data,
                         masked, questions, answers, progress=False)
    assert len(rows.x) >= 10_000
    booster, info = fit_ranker(rows, config, data.features)
    assert set(info["importance_gain"]) == set(data.features)
    onnx_bytes = to_onnx(booster, len(data.features))
    x = rows.x[np.random.default_rng(1).permutation(len(rows.x))[:10_000]]
    assert onnx_gap(booster, onnx_bytes, x) <= 1e-5
    # And through the server's session (threads set, no arena), on the same rows.
    from server.ranking import Ranker

    path = tiny_bundle.parent / "check-ranker.onnx"
    path.write_bytes(onnx_bytes)
    served = Ranker(path, data).score(x)
    np.testing.assert_allclose(served, booster.predict(x), atol=1e-5)


def _rewrite(bundle: Path) -> None:
    fields = json.loads((bundle / "manifest.json").read_text())
    for key in ("files", "schema_version", "manifest_sha256"):
        fields.pop(key, None)
    if not (bundle / ALS_INDEX).exists():
        fields.pop("als_index", None)
    fields["files"] = {}
    write_manifest(bundle, fields)


def test_ranker_arrays_that_do_not_fit_the_bundle_are_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = copy_bundle()
    with np.load(bundle / RANKER_ARRAYS) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["playlist_years"] = arrays["playlist_years"][:-1]
    np.savez(bundle / RANKER_ARRAYS, **arrays)
    _rewrite(bundle)
    with pytest.raises(BundleError, match="playlist_years has"):
        Engine.load(bundle)


def test_ranker_onnx_of_another_width_is_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = copy_bundle()
    with np.load(bundle / RANKER_ARRAYS) as npz:
        arrays = {k: npz[k] for k in npz.files}
    from server.bundle import pack_strings

    arrays["feature_blob"], arrays["feature_offsets"] = pack_strings(list(FEATURES[:-1]))
    np.savez(bundle / RANKER_ARRAYS, **arrays)
    _rewrite(bundle)
    with pytest.raises(BundleError, match="features"):
        Engine.load(bundle)


def test_a_manifest_with_half_a_ranker_is_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = copy_bundle()
    (bundle / RANKER_ARRAYS).unlink()
    _rewrite(bundle)
    with pytest.raises(BundleError, match="ranker needs both"):
        Engine.load(bundle)


def test_bundle_without_ranker_answers_ranked_with_hybrid(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = copy_bundle()
    for name in (RANKER_ONNX, RANKER_ARRAYS, ALS_INDEX):
        (bundle / name).unlink()
    _rewrite(bundle)
    engine = Engine.load(bundle)
    assert RANKED not in engine.strategies
    assert engine.default_strategy == "ae-hybrid" == engine.resolve_strategy(RANKED)


def test_recommend_cli_runs_ranked_offline(tiny_split: Path, tiny_bundle: Path,
                                           tmp_path: Path) -> None:
    from trainer.recommend import main

    out = tmp_path / "ranked.json"
    assert main(["--data", str(tiny_split), "--questions",
                 str(tiny_split / "val_questions.json"), "--model", "ranked", "--bundle",
                 str(tiny_bundle), "--out", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert len(results) == len(json.loads((tiny_split / "val_questions.json").read_text()))
    assert all(len(r["songs"]) == 100 and len(r["tags"]) == 10 for r in results)


def test_rank_cli_refuses_unknown_ablation(tiny_split: Path, tmp_path: Path) -> None:
    from trainer.rank import main

    shutil.copytree(tiny_split, tmp_path / "s")
    assert main(["--data", str(tmp_path / "s"), "--bundle", str(tmp_path / "b"),
                 "--without", "nope"]) == 2


def test_rank_cli_refuses_an_undated_share_outside_0_to_1(tiny_split: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from trainer.rank import main

    assert main(["--data", str(tiny_split), "--bundle", str(tmp_path / "b"),
                 "--undated-share", "1.5"]) == 2
    assert "--undated-share 1.5" in capsys.readouterr().err


def test_a_share_of_training_questions_is_asked_without_its_date() -> None:
    from trainer.rank import without_dates

    questions = [{"id": i, "songs": [i], "updt_date": "2020-01-02 03:04:05.000"}
                 for i in range(2000)]
    asked = without_dates(questions, 0.25, seed=7)
    undated = [q["id"] for q in asked if "updt_date" not in q]
    assert 400 < len(undated) < 600
    # Only the date goes; the rest of each question, and the caller's records, stay.
    assert [q["songs"] for q in asked] == [q["songs"] for q in questions]
    assert all("updt_date" in q for q in questions)
    # The same seed strips the same questions; shares 0 and 1 strip none and all.
    assert undated == [q["id"] for q in without_dates(questions, 0.25, 7)
                       if "updt_date" not in q]
    assert without_dates(questions, 0.0, 7) == questions
    assert not any("updt_date" in q for q in without_dates(questions, 1.0, 7))


def test_a_compressed_ranker_npz_is_refused_naming_the_file(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = copy_bundle()
    with np.load(bundle / RANKER_ARRAYS) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.savez_compressed(bundle / RANKER_ARRAYS, **arrays)  # a possible decompression bomb
    _rewrite(bundle)
    with pytest.raises(BundleError, match=r"ranker\.npz: member .* is compressed"):
        Engine.load(bundle)


def test_train_no_ranker_writes_a_bundle_without_one(tiny_split: Path, tmp_path: Path) -> None:
    from trainer.train import main

    out = tmp_path / "plain"
    assert main(["--data", str(tiny_split), "--out", str(out), "--preset", "tiny",
                 "--epochs", "1", "--val-every", "1", "--no-ranker"]) == 0
    manifest = read_manifest(out)
    assert RANKER_ONNX not in manifest.files and RANKER_ARRAYS not in manifest.files
    assert not (out / RANKER_ONNX).exists() and "ranker" not in manifest.extra
    engine = Engine.load(out)
    assert RANKED not in engine.strategies and engine.default_strategy == "ae-hybrid"


def test_bench_rank_writes_its_named_section(tiny_bundle: Path, tiny_split: Path,
                                             tmp_path: Path) -> None:
    from trainer.bench_rank import main

    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\n<!-- bench-rank:start -->\nkept\n<!-- bench-rank:end -->\n")
    assert main(["--bundle", str(tiny_bundle), "--data", str(tiny_split), "--questions",
                 "20", "--out", str(doc), "--name", "tiny"]) == 0
    text = doc.read_text()
    assert "kept" in text  # the demo's section is left alone
    section = text[text.index("<!-- bench-rank-tiny:start -->"):]
    assert "| recall of the hidden songs |" in section
    assert "| ranked |" in section and "| ae-hybrid |" in section
    assert "ranked / ae-hybrid CPU:" in section


@pytest.mark.parametrize("exact", [False, True])
def test_unleaked_songs_search_the_graph_and_the_replaced_codes_as_one(engine: Engine,
                                                                       exact: bool) -> None:
    from server.search import ExactSearch
    from trainer.rank import UnleakedSongs

    n = engine.songs.count()
    every = engine.songs.vectors(np.arange(n, dtype=np.int64))
    rng = np.random.default_rng(3)
    replaced = np.sort(rng.choice(n, size=n // 4, replace=False)).astype(np.int64)
    new = rng.standard_normal((len(replaced), every.shape[1])).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    # Some replaced songs keep a code near their old one: they must still be found.
    new[::2] = every[replaced[::2]] + 0.05 * new[::2]
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    base = ExactSearch(every) if exact else engine.songs
    songs = UnleakedSongs(base, replaced[::-1].copy(), new[::-1].copy(), exact=exact)
    want = every.copy()
    want[replaced] = new
    reference = ExactSearch(want)

    assert songs.count() == n
    probe = np.concatenate([replaced[:5], np.setdiff1d(np.arange(n), replaced)[:5]])
    np.testing.assert_allclose(songs.vectors(probe), want[probe], atol=1e-3)
    queries = rng.choice(n, size=40, replace=False).astype(np.int64)
    got = songs.neighbours(queries, 20)
    truth, _ = reference.search(want[queries], 20)
    recall = np.mean([len(np.intersect1d(g, t)) / 20 for (g, _), t in zip(got, truth,
                                                                          strict=True)])
    assert recall >= (0.999 if exact else 0.9)
    for q, (rows, sims) in zip(queries, got, strict=True):
        assert rows[0] == q or sims[0] == pytest.approx(1.0, abs=1e-3)
        assert np.all(np.diff(sims) <= 1e-6)
        # A replaced song is never found by its old code: its similarity is the new one's.
        np.testing.assert_allclose(sims, want[rows] @ want[q], atol=2e-3)
