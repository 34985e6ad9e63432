"""trainer.split: the official Melon split rules, determinism, and the command line."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer.dataset import load_dataset
from trainer.split import main, split_playlists


def make_playlists(n: int, *, n_songs: int = 8, n_tags: int = 4) -> list[dict[str, Any]]:
    """``n`` playlists whose songs and tags are unique to each playlist, so every item's
    origin is known."""
    return [
        {"id": 1000 + i, "plylst_title": f"title {i}",
         "tags": [f"t{i}_{j}" for j in range(n_tags)],
         "songs": [i * 1000 + j for j in range(n_songs)],
         "like_cnt": i, "updt_date": "2020-01-01 00:00:00.000"}
        for i in range(n)
    ]


def question_type(q: dict[str, Any]) -> str:
    return {(True, False): "songs", (True, True): "songs+tags", (False, True): "tags",
            (False, False): "title"}[(bool(q["songs"]), bool(q["tags"]))]


def is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    it = iter(whole)
    return all(x in it for x in part)


def test_shares_of_train_and_question_types() -> None:
    records = make_playlists(200)
    train, questions, answers = split_playlists(records, seed=777)
    # 80/20: int(200 * 0.8) = 160 training playlists, 40 questions; of the 40,
    # int(40 * 0.3) = 12 songs only, int(40 * 0.8) - 12 = 20 songs+tags,
    # int(40 * 0.95) - 32 = 6 tags only, 40 - 38 = 2 title only.
    assert len(train) == 160 and len(questions) == len(answers) == 40
    assert Counter(question_type(q) for q in questions) == {
        "songs": 12, "songs+tags": 20, "tags": 6, "title": 2}
    ids = [r["id"] for r in records]
    assert sorted([p["id"] for p in train] + [q["id"] for q in questions]) == sorted(ids)
    assert [q["id"] for q in questions] == [a["id"] for a in answers]


def test_train_part_is_the_official_random_shuffle() -> None:
    records = make_playlists(57)
    official = copy.deepcopy(records)
    random.seed(777)  # what split_data.py does before random.shuffle(playlists)
    random.shuffle(official)
    train, questions, _ = split_playlists(records, seed=777)
    assert train == official[: int(57 * 0.8)]
    assert {q["id"] for q in questions} == {p["id"] for p in official[int(57 * 0.8):]}


def test_questions_equal_the_official_script_with_seeded_numpy() -> None:
    """An independent restatement of split_data.py's masking, drawing from numpy's global
    generator after np.random.seed(seed): the split must match it record for record."""
    records = make_playlists(120, n_songs=9, n_tags=5)
    seed = 31
    playlists = copy.deepcopy(records)
    random.seed(seed)
    random.shuffle(playlists)
    held = playlists[int(len(playlists) * 0.8):]
    np.random.seed(seed)
    tot = len(held)
    bounds = [0, int(tot * 0.3), int(tot * 0.8), int(tot * 0.95), tot]
    plans = [(["songs"], ["tags"]), (["songs", "tags"], []), (["tags"], ["songs"]),
             ([], ["songs", "tags"])]
    exp_q: list[dict[str, Any]] = []
    exp_a: list[dict[str, Any]] = []
    for (masked, deleted), lo, hi in zip(plans, bounds, bounds[1:], strict=False):
        for p in held[lo:hi]:
            q, a = copy.deepcopy(p), copy.deepcopy(p)
            for col in deleted:
                q[col] = []
                a[col] = a[col][: {"songs": 100, "tags": 10}[col]]
            for col in masked:
                mask = np.full(len(p[col]), False)
                mask[: len(p[col]) // 2] = True
                np.random.shuffle(mask)
                q[col] = [x for x, m in zip(p[col], mask, strict=True) if m]
                a[col] = [x for x, m in zip(p[col], mask, strict=True) if not m]
            exp_q.append(q)
            exp_a.append(a)
    order = np.arange(tot)
    np.random.shuffle(order)
    _, questions, answers = split_playlists(records, seed=seed)
    assert questions == [exp_q[i] for i in order]
    assert answers == [exp_a[i] for i in order]


def test_masking_rules_per_question_type() -> None:
    records = make_playlists(300, n_songs=7, n_tags=5)
    by_id = {r["id"]: r for r in records}
    _, questions, answers = split_playlists(records, seed=5)
    for q, a in zip(questions, answers, strict=True):
        orig = by_id[q["id"]]
        kind = question_type(q)
        # Everything but songs and tags is kept on both sides, title included.
        for key in ("plylst_title", "like_cnt", "updt_date"):
            assert q[key] == a[key] == orig[key]
        masked = {"songs": ["songs"], "songs+tags": ["songs", "tags"], "tags": ["tags"],
                  "title": []}[kind]
        for col in ("songs", "tags"):
            if col in masked:
                # floor(7 / 2) = 3 songs, floor(5 / 2) = 2 tags asked; the rest answered,
                # each side in the playlist's own order.
                assert len(q[col]) == len(orig[col]) // 2
                assert sorted(q[col] + a[col]) == sorted(orig[col])
                assert not set(q[col]) & set(a[col])
                assert is_subsequence(q[col], orig[col])
                assert is_subsequence(a[col], orig[col])
            else:
                assert q[col] == [] and a[col] == orig[col]


def test_answers_are_truncated_to_100_songs_and_10_tags() -> None:
    # Deleted lists: songs[:100] / tags[:10]. Masked lists: 250 songs -> 125 asked and
    # 125 hidden, of which the first 100 are kept; 30 tags -> 15 hidden, 10 kept.
    records = make_playlists(100, n_songs=250, n_tags=30)
    by_id = {r["id"]: r for r in records}
    _, questions, answers = split_playlists(records, seed=1)
    seen = set()
    for q, a in zip(questions, answers, strict=True):
        orig = by_id[q["id"]]
        kind = question_type(q)
        seen.add(kind)
        assert len(a["songs"]) == 100 and len(a["tags"]) == 10
        if kind in ("tags", "title"):
            assert a["songs"] == orig["songs"][:100]
        else:
            assert len(q["songs"]) == 125
            hidden = [s for s in orig["songs"] if s not in set(q["songs"])]
            assert a["songs"] == hidden[:100]
        if kind in ("songs", "title"):
            assert a["tags"] == orig["tags"][:10]
        else:
            assert len(q["tags"]) == 15
    assert seen == {"songs", "songs+tags", "tags", "title"}


def test_short_lists_keep_a_non_empty_answer() -> None:
    # One song and one tag: floor(1 / 2) = 0 asked, so the one item is the answer.
    records = make_playlists(200, n_songs=1, n_tags=1)
    _, questions, answers = split_playlists(records, seed=777)
    assert all(len(a["songs"]) == 1 and len(a["tags"]) == 1 for a in answers)
    assert all(q["songs"] == [] and q["tags"] == [] for q in questions)


def test_empty_lists_stay_empty() -> None:
    # Playlists without tags still get their positional type; their tag answer is empty.
    records = make_playlists(50, n_songs=4, n_tags=0)
    _, questions, answers = split_playlists(records, seed=777)
    assert all(a["tags"] == [] for a in answers)
    assert sum(bool(q["songs"]) for q in questions) == int(10 * 0.8)  # songs, songs+tags


def test_deterministic_for_a_seed_and_input_untouched() -> None:
    records = make_playlists(80)
    before = copy.deepcopy(records)
    first = split_playlists(records, seed=9)
    assert records == before
    assert split_playlists(records, seed=9) == first
    other = split_playlists(records, seed=10)
    assert other[1] != first[1]


def test_tiny_inputs() -> None:
    assert split_playlists([], seed=1) == ([], [], [])
    train, questions, answers = split_playlists(make_playlists(1), seed=1)
    # int(1 * 0.8) = 0 training playlists; the single question falls in "title only".
    assert train == [] and len(questions) == 1
    assert questions[0]["songs"] == [] and questions[0]["tags"] == []
    assert len(answers[0]["songs"]) == 8


def test_duplicate_playlist_id_is_rejected() -> None:
    records = make_playlists(5)
    records[3]["id"] = records[1]["id"]
    with pytest.raises(ValueError, match="record 3: field 'id': duplicate playlist id 1001"):
        split_playlists(records, seed=1)


# ---------------------------------------------------------------------------------------
# Command line


def _write_source(root: Path, playlists: list[dict[str, Any]]) -> Path:
    root.mkdir()
    song_ids = sorted({s for p in playlists for s in p["songs"]})
    songs = [{"id": sid, "song_name": f"s{sid}", "album_id": 1, "album_name": "a",
              "artist_id_basket": [1], "artist_name_basket": ["x"],
              "song_gn_gnr_basket": ["GN0100"], "song_gn_dtl_gnr_basket": [],
              "issue_date": "20200101"} for sid in song_ids]
    (root / "song_meta.json").write_text(json.dumps(songs))
    (root / "genre_gn_all.json").write_text(json.dumps({"GN0100": "발라드"}, ensure_ascii=False))
    (root / "train.json").write_text(json.dumps(playlists, ensure_ascii=False))
    return root


def test_cli_writes_a_dataset_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    playlists = make_playlists(40)
    playlists[0]["plylst_title"] = "비 오는 날"  # non-ASCII kept as it is
    src = _write_source(tmp_path / "src", playlists)
    out = tmp_path / "out"
    assert main(["--data", str(src), "--out", str(out), "--seed", "3"]) == 0
    assert "32 training playlists, 8 questions" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "genre_gn_all.json", "song_meta.json", "train.json", "val_answers.json",
        "val_questions.json"]
    assert (out / "song_meta.json").read_bytes() == (src / "song_meta.json").read_bytes()
    expected = split_playlists(playlists, seed=3)
    for name, part in zip(("train", "val_questions", "val_answers"), expected, strict=True):
        assert json.loads((out / f"{name}.json").read_text(encoding="utf-8")) == part
    data = load_dataset(out)
    assert set(data.playlists) == {"train", "val_questions", "val_answers"}
    assert len(data.playlists["val_answers"]) == 8


def test_cli_refuses_to_overwrite_its_source(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_source(tmp_path / "src", make_playlists(10))
    before = (src / "train.json").read_bytes()
    assert main(["--data", str(src), "--out", str(src)]) == 2
    assert "source directory" in capsys.readouterr().err
    assert (src / "train.json").read_bytes() == before


def test_cli_duplicate_ids_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    playlists = make_playlists(10)
    playlists[4]["id"] = playlists[2]["id"]
    src = _write_source(tmp_path / "src", playlists)
    assert main(["--data", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.json: record 4: field 'id': duplicate playlist id 1002" in err


def test_cli_missing_train_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_source(tmp_path / "src", make_playlists(3))
    (src / "train.json").unlink()
    assert main(["--data", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "train.json: file not found" in capsys.readouterr().err
