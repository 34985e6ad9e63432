"""Contract and known-answer tests of the baseline recommenders on a tiny block dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from server.catalog import tokenize
from trainer.dataset import Dataset, load_dataset
from trainer.recommenders.base import Popularity, Question, Recommendation, complete
from trainer.recommenders.knn import PlaylistKNN, gather
from trainer.recommenders.popular import MostPopular, future_mask, top_k
from trainer.recommenders.registry import (
    MODELS,
    make_recommender,
    model_options,
    needs_bundle,
    parse_option,
    register,
)

# Six disjoint blocks of 25 songs (150 songs, ids 1000 + row) and 3 tags each (18 tags).
# Every playlist of block b holds the block's 10 "core" songs and 6 of its 15 others, the
# core tag of the block and one of its two other tags, and a title word of its own.
N_BLOCKS, BLOCK, CORE, PER_BLOCK = 6, 25, 10, 8
TITLE_WORDS = ["rock", "발라드", "jazz", "힙합", "edm", "クラブ"]
FUTURE_SONG = 1000 + 2 * BLOCK + CORE  # a non-core song of block 2, issued in 2030
UPDT = "2020-01-01 00:00:00.000"


def song_id(block: int, i: int) -> int:
    return 1000 + block * BLOCK + i


def block_tags(block: int) -> list[str]:
    return [f"core{block}", f"mood{block}a", f"mood{block}b"]


def write_blocks(root: Path) -> Path:
    """Write the block dataset (song_meta, genres, train.json) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    songs = []
    for b in range(N_BLOCKS):
        for i in range(BLOCK):
            sid = song_id(b, i)
            songs.append({
                "id": sid, "song_name": f"song {sid}", "album_id": sid,
                "album_name": f"album {sid}", "artist_id_basket": [b * 100 + i % 5],
                "artist_name_basket": [f"artist {b}-{i % 5}"],
                "song_gn_gnr_basket": ["GN0100"], "song_gn_dtl_gnr_basket": ["GN0101"],
                "issue_date": "20300101" if sid == FUTURE_SONG else "20100101",
            })
    playlists = []
    for b in range(N_BLOCKS):
        for j in range(PER_BLOCK):
            extra = [song_id(b, CORE + (j * 2 + k) % (BLOCK - CORE)) for k in range(6)]
            playlists.append({
                "id": len(playlists), "plylst_title": f"{TITLE_WORDS[b]} mix {j}",
                "tags": [f"core{b}", block_tags(b)[1 + j % 2]],
                "songs": [song_id(b, i) for i in range(CORE)] + extra,
                "like_cnt": j, "updt_date": UPDT,
            })
    (root / "song_meta.json").write_text(json.dumps(songs), encoding="utf-8")
    (root / "genre_gn_all.json").write_text(json.dumps({"GN0100": "pop", "GN0101": "x"}),
                                            encoding="utf-8")
    (root / "train.json").write_text(json.dumps(playlists, ensure_ascii=False),
                                     encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blocks(tmp_path_factory.mktemp("blocks") / "data")


@pytest.fixture(scope="module")
def data(blocks: Path) -> Dataset:
    return load_dataset(blocks)


@pytest.fixture(scope="module")
def block_bundle(blocks: Path) -> Path:
    """An autoencoder trained on the block dataset (``tiny`` preset, seconds)."""
    from trainer.train import main

    out = blocks.parent / "bundle"
    assert main(["--data", str(blocks), "--out", str(out), "--preset", "tiny",
                 "--epochs", "2"]) == 0
    return out


def question(songs: list[int] = (), tags: list[str] = (), title: str = "",
             updt_date: int = 20200101) -> Question:
    return Question(id=7, songs=np.asarray(songs, dtype=np.int64), tags=list(tags),
                    title=title, updt_date=updt_date)


def block_question(block: int, held_out: int = CORE - 1) -> Question:
    """Every core song of ``block`` but one."""
    return question([song_id(block, i) for i in range(CORE) if i != held_out])


# Every registered model; whether its optional package is installed is checked by each
# test (a collection-time skip would silently drop every model's tests).
MODEL_NAMES = sorted(MODELS)
FIT_MODELS = [name for name in MODEL_NAMES if not needs_bundle(name)]


def fitted(name: str, data: Dataset, bundle: Path | None = None):
    if name == "als":
        pytest.importorskip("implicit")
    options: dict[str, object] = {"factors": 8, "iterations": 10} if name == "als" else {}
    if needs_bundle(name):
        assert bundle is not None
        options["bundle"] = str(bundle)
    return make_recommender(name, **options).fit(data)


# ---------------------------------------------------------------------------------------
# The contract every registered model keeps.

QUESTIONS = {
    "songs": block_question(1),
    "songs+tags": question([song_id(3, 0), song_id(3, 1)], ["core3"]),
    "tags": question(tags=["core4", "mood4a"]),
    "title": question(title="발라드 모음"),
    "empty": question(),
    "unknown": question(tags=["never-seen"], title="zzz qqq"),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("kind", sorted(QUESTIONS))
def test_contract(request: pytest.FixtureRequest, data: Dataset, name: str,
                  kind: str) -> None:
    # The bundle models (the autoencoder strategies) keep it too, on a model trained here.
    bundle = request.getfixturevalue("block_bundle") if needs_bundle(name) else None
    model = fitted(name, data, bundle)
    q = QUESTIONS[kind]
    rec = model.recommend(q, 100, 10)
    assert isinstance(rec, Recommendation)
    assert rec.songs.dtype == np.int64 and rec.songs.ndim == 1
    assert len(rec.songs) == len(rec.song_scores) and len(rec.tags) == len(rec.tag_scores)
    assert np.isin(rec.songs, data.songs.ids).all()
    assert all(isinstance(t, str) and t in data.tags.index for t in rec.tags)
    # Ranked: best first. ae-quota (the write-up's order) lists each seed's share in turn,
    # each share best first: the scores may rise only where one seed's share ends.
    rises = int((np.diff(rec.song_scores) > 1e-6).sum())
    assert rises <= (max(len(q.songs) - 1, 0) if name == "ae-quota" else 0)
    assert (np.diff(rec.tag_scores) <= 1e-6).all()
    assert len(rec.songs) <= 100 and len(rec.tags) <= 10

    done = complete(rec, q, Popularity.of(data))
    assert len(done.songs) == 100 == len(set(done.songs.tolist()))
    assert len(done.tags) == 10 == len(set(done.tags))
    assert not set(done.songs.tolist()) & set(q.songs.tolist())
    assert not set(done.tags) & set(q.tags)


@pytest.mark.parametrize("name", FIT_MODELS)
def test_models_fill_a_full_answer_themselves(data: Dataset, name: str) -> None:
    # complete() only repairs; a model should not lean on it for a plain songs question.
    rec = fitted(name, data).recommend(block_question(0), 100, 10)
    assert len(set(rec.songs.tolist()) - set(block_question(0).songs.tolist())) == 100
    assert len(rec.tags) == 10


# ---------------------------------------------------------------------------------------
# Known answers.


@pytest.mark.parametrize("block", range(N_BLOCKS))
def test_knn_ranks_held_out_core_song_first(data: Dataset, block: int) -> None:
    rec = PlaylistKNN(k=20).fit(data).recommend(block_question(block, held_out=4), 100, 10)
    assert rec.songs[0] == song_id(block, 4)
    # The next 15 are the rest of the block, before any other block's song.
    rest = {song_id(block, i) for i in [4, *range(CORE, BLOCK)]}
    assert set(rec.songs[:16].tolist()) == rest
    assert rec.tags[0] == f"core{block}"
    assert set(rec.tags[:3]) == set(block_tags(block))


def test_knn_title_only_question_uses_title_words(data: Dataset) -> None:
    rec = PlaylistKNN().fit(data).recommend(question(title="잔잔한 발라드!"), 100, 10)
    assert set(rec.songs[:CORE].tolist()) == {song_id(1, i) for i in range(CORE)}
    assert rec.tags[0] == "core1"


def test_knn_tag_only_question(data: Dataset) -> None:
    rec = PlaylistKNN().fit(data).recommend(question(tags=["core5"]), 100, 10)
    assert set(rec.songs[:CORE].tolist()) == {song_id(5, i) for i in range(CORE)}
    assert "core5" not in rec.tags and set(rec.tags[:2]) == {"mood5a", "mood5b"}


def test_knn_empty_question_is_popularity(data: Dataset) -> None:
    knn = PlaylistKNN().fit(data).recommend(question(), 100, 10)
    pop = MostPopular().fit(data).recommend(question(), 100, 10)
    # Core songs (in 8 playlists) lead both rankings.
    core = {song_id(b, i) for b in range(N_BLOCKS) for i in range(CORE)}
    assert set(knn.songs[:60].tolist()) == core == set(pop.songs[:60].tolist())
    assert set(knn.tags[:6]) == {f"core{b}" for b in range(N_BLOCKS)}


def test_knn_block_weights_matter(data: Dataset) -> None:
    # With title words switched off a title-only question has nothing to go on.
    model = PlaylistKNN(title_weight=0.0).fit(data)
    nbrs, _ = model.neighbours(question(title="jazz"))
    assert len(nbrs) == 0
    nbrs, sims = PlaylistKNN().fit(data).neighbours(question(title="jazz"))
    assert len(nbrs) == PER_BLOCK and (sims > 0).all()


def test_knn_drop_future(data: Dataset) -> None:
    q = block_question(2)
    plain = PlaylistKNN().fit(data).recommend(q, 100, 10)
    assert FUTURE_SONG in plain.songs[:BLOCK].tolist()
    dropped = PlaylistKNN(drop_future=True).fit(data).recommend(q, 100, 10)
    assert FUTURE_SONG not in dropped.songs.tolist()
    assert len(dropped.songs) == 100
    # An unknown update date keeps every song.
    unknown = PlaylistKNN(drop_future=True).fit(data).recommend(
        question(q.songs.tolist(), updt_date=0), 100, 10)
    assert FUTURE_SONG in unknown.songs[:BLOCK].tolist()


@pytest.mark.parametrize("name", ["most-popular", "als"])
def test_other_models_drop_future(data: Dataset, name: str) -> None:
    if name == "als":
        pytest.importorskip("implicit")
    options = {"factors": 8} if name == "als" else {}
    q = block_question(2)
    plain = make_recommender(name, **options).fit(data).recommend(q, 150, 10)
    assert FUTURE_SONG in plain.songs.tolist()
    dropped = make_recommender(name, drop_future=True, **options).fit(data).recommend(
        q, 150, 10)
    assert FUTURE_SONG not in dropped.songs.tolist()


def test_most_popular_order(data: Dataset) -> None:
    rec = MostPopular().fit(data).recommend(question([song_id(0, 0)], ["core0"]), 100, 10)
    assert song_id(0, 0) not in rec.songs.tolist() and "core0" not in rec.tags
    assert rec.song_scores[0] == PER_BLOCK
    assert rec.tags[:5] == ["core1", "core2", "core3", "core4", "core5"]


def test_als_ranks_block_songs_first(data: Dataset) -> None:
    pytest.importorskip("implicit")
    model = make_recommender("als", factors=16, iterations=15).fit(data)
    rec = model.recommend(block_question(3, held_out=2), 100, 10)
    assert song_id(3, 2) in rec.songs[:3].tolist()
    assert set(rec.songs[:10].tolist()) <= {song_id(3, i) for i in range(BLOCK)}
    assert rec.tags[0] == "core3"


# ---------------------------------------------------------------------------------------
# Helpers and the registry.


def test_title_words_unicode() -> None:
    assert tokenize("Chill-Out 잔잔한 밤, vol.2") == ["chill", "out", "잔잔한", "밤", "vol", "2"]
    assert tokenize("  !!  ") == []
    assert tokenize("Rock rock ROCK roll") == ["rock", "roll"]


def test_gather_reads_many_rows() -> None:
    from trainer.dataset import CSR

    csr = CSR.from_lists([[1, 2], [], [3], [4, 5, 6]])
    owner, values = gather(csr, np.asarray([3, 0, 1, 3]))
    assert values.tolist() == [4, 5, 6, 1, 2, 4, 5, 6]
    assert owner.tolist() == [0, 0, 0, 1, 1, 3, 3, 3]


def test_top_k_and_future_mask() -> None:
    scores = np.asarray([0.1, 0.5, 0.5, 0.9, 0.0])
    assert top_k(scores, 3).tolist() == [3, 1, 2]
    assert top_k(scores, 10).tolist() == [3, 1, 2, 0, 4]
    assert top_k(scores, 0).tolist() == []
    dates = np.asarray([0, 20190101, 20200102, 20200101])
    assert future_mask(dates, 20200101).tolist() == [False, False, True, False]
    assert not future_mask(dates, 0).any()


def test_unknown_model_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'.*most-popular.*playlist-knn"):
        make_recommender("nope")


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        make_recommender("playlist-knn", bogus=1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        make_recommender("playlist-knn", k=0)
    assert "drop_future" in model_options("most-popular")


def test_register_passes_options_and_flags_bundle_models() -> None:
    class Fake(MostPopular):
        def __init__(self, bundle: str, quota: int = 3) -> None:
            super().__init__()
            self.bundle, self.quota = bundle, quota

    try:
        register("fake-bundle")(Fake)
        assert needs_bundle("fake-bundle") and not needs_bundle("playlist-knn")
        model = make_recommender("fake-bundle", bundle="b/x", quota=5)
        assert isinstance(model, Fake) and (model.bundle, model.quota) == ("b/x", 5)
        with pytest.raises(ValueError, match="needs option 'bundle'"):
            make_recommender("fake-bundle")
        with pytest.raises(ValueError, match="already registered"):
            register("fake-bundle")(MostPopular)
    finally:
        MODELS.pop("fake-bundle", None)


def test_parse_option() -> None:
    assert parse_option("k=200") == ("k", 200)
    assert parse_option("alpha=1.5") == ("alpha", 1.5)
    assert parse_option("idf=false") == ("idf", False)
    assert parse_option("bundle=a=b") == ("bundle", "a=b")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_option("k")


def test_als_without_implicit_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "implicit", None)
    monkeypatch.setitem(sys.modules, "implicit.cpu.als", None)
    with pytest.raises(ValueError, match=r"needs the 'implicit' package.*\[als\]"):
        make_recommender("als")
