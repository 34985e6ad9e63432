"""trainer.evaluate: the arena metric against hand-computed values, and what it refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer.evaluate import (
    ResultsError,
    Scores,
    batch_ndcg,
    main,
    ndcg,
    ndcg_per_playlist,
    score,
)

REPO = Path(__file__).resolve().parents[1]

# Discounts 1 / ln(i + 2) of the ranks used below.
D0 = 1 / math.log(2)  # 1.4426950
D1 = 1 / math.log(3)  # 0.9102392
D2 = 1 / math.log(4)  # 0.7213475
D99 = 1 / math.log(101)  # 0.2166710


def fill_songs(head: list[int], n: int = 100, start: int = 10_000) -> list[int]:
    """``head`` followed by songs no answer holds, up to ``n``."""
    return head + list(range(start, start + n - len(head)))


def fill_tags(head: list[str], n: int = 10) -> list[str]:
    return head + [f"filler{i}" for i in range(n - len(head))]


ANSWERS = [
    {"id": 7, "plylst_title": "a", "songs": [1, 2, 3], "tags": ["a", "b"]},
    {"id": 8, "plylst_title": "b", "songs": [5], "tags": []},
]
RESULTS = [
    # Playlist 8 first: results may come in any order.
    {"id": 8, "songs": fill_songs([])[:99] + [5], "tags": fill_tags([])},
    {"id": 7, "songs": fill_songs([1, 10, 2]), "tags": fill_tags(["x", "b"])},
]


def test_hand_computed_score() -> None:
    # Playlist 7, songs: hits at ranks 0 and 2 of 3 hidden songs
    #   DCG = D0 + D2 = 1.4426950 + 0.7213475 = 2.1640426
    #   IDCG = D0 + D1 + D2 = 3.0742818       -> nDCG = 0.7039181
    # Playlist 7, tags: hit at rank 1 of 2 hidden tags
    #   DCG = D1 = 0.9102392, IDCG = D0 + D1 = 2.3529343 -> nDCG = 0.3868528
    # Playlist 8, songs: its one hidden song at rank 99
    #   DCG = D99 = 1 / ln 101 = 0.2166710, IDCG = D0 = 1.4426950 -> nDCG = 0.1501905
    # Playlist 8, tags: nothing hidden -> 0, but the playlist still counts in the mean.
    # song = (0.7039181 + 0.1501905) / 2 = 0.4270543
    # tag  = (0.3868528 + 0) / 2        = 0.1934264
    # score = 0.85 * 0.4270543 + 0.15 * 0.1934264 = 0.3629961 + 0.0290140 = 0.3920101
    assert (D0 + D2) / (D0 + D1 + D2) == pytest.approx(0.7039181, abs=1e-7)
    result = score(ANSWERS, RESULTS)
    assert isinstance(result, Scores)
    assert result.song_ndcg == pytest.approx(0.4270543, abs=1e-7)
    assert result.tag_ndcg == pytest.approx(0.1934264, abs=1e-7)
    assert result.score == pytest.approx(0.3920101, abs=1e-7)
    assert str(result) == "song_ndcg=0.427054 tag_ndcg=0.193426 score=0.392010"


def test_per_playlist_values_in_answer_order() -> None:
    song, tag = ndcg_per_playlist(ANSWERS, RESULTS)
    assert song.tolist() == pytest.approx([0.7039181, 0.1501905], abs=1e-7)
    assert tag.tolist() == pytest.approx([0.3868528, 0.0], abs=1e-7)


def test_log_base_does_not_matter() -> None:
    # The same ratio with log2: (1 + 1/2) / (1 + 1/log2(3) + 1/2).
    assert ndcg([1, 2, 3], [1, 10, 2], 100) == pytest.approx(
        (1 + 0.5) / (1 + 1 / math.log2(3) + 0.5))


def test_perfect_and_empty_results() -> None:
    answers = [{"id": 1, "songs": list(range(100)), "tags": [f"t{i}" for i in range(10)]},
               {"id": 2, "songs": [3, 4], "tags": ["q"]}]
    perfect = [{"id": 1, "songs": list(range(100)), "tags": [f"t{i}" for i in range(10)]},
               {"id": 2, "songs": fill_songs([4, 3]), "tags": fill_tags(["q"])}]
    assert score(answers, perfect) == Scores(1.0, 1.0, 1.0)
    misses = [{"id": i, "songs": fill_songs([]), "tags": fill_tags([])} for i in (1, 2)]
    assert score(answers, misses) == Scores(0.0, 0.0, 0.0)


def test_answer_longer_than_cutoff_scores_one_when_perfect() -> None:
    # 150 hidden songs: IDCG sums over min(150, 100) ranks, so 100 hits make exactly 1.
    answers = [{"id": 1, "songs": list(range(150)), "tags": ["a"]}]
    results = [{"id": 1, "songs": list(range(50, 150)), "tags": fill_tags(["a"])}]
    assert score(answers, results).song_ndcg == pytest.approx(1.0)


def test_scalar_ndcg_edge_cases() -> None:
    assert ndcg([], [1, 2, 3], 100) == 0.0
    assert ndcg(["a"], ["b", "a"], 1) == 0.0  # beyond the cut-off
    assert ndcg(["a"], ["b", "a"], 2) == pytest.approx(D1 / D0)


@pytest.mark.parametrize("kind", ["int", "str", "huge-int"])
def test_batch_matches_scalar_definition(kind: str) -> None:
    rng = np.random.default_rng(4)
    n_rows, k = 300, 20
    pool = np.arange(60)
    relevant: list[list[Any]] = []
    ranked_rows: list[list[Any]] = []
    for _ in range(n_rows):
        hidden = rng.choice(pool, size=int(rng.integers(0, 30)), replace=False).tolist()
        ranked = rng.choice(pool, size=k, replace=False).tolist()
        if kind == "str":
            hidden, ranked = [f"tag{x}" for x in hidden], [f"tag{x}" for x in ranked]
        elif kind == "huge-int":  # too spread for row * span keys: the dictionary path
            hidden = [x * 2**56 for x in hidden]
            ranked = [x * 2**56 for x in ranked]
        relevant.append(hidden)
        ranked_rows.append(ranked)
    arr = np.array(ranked_rows, dtype=str if kind == "str" else np.int64)
    batch = batch_ndcg(relevant, arr)
    expected = [ndcg(h, r, k) for h, r in zip(relevant, ranked_rows, strict=True)]
    assert batch.tolist() == pytest.approx(expected, abs=1e-12)
    assert 0 < float(batch.mean()) < 1  # the random data has both hits and misses


def test_batch_hits_count_only_in_their_own_row() -> None:
    # Row 0's answer is row 1's recommendation and vice versa: no hits anywhere.
    out = batch_ndcg([[1, 2], [3, 4]], np.array([[3, 4], [1, 2]]))
    assert out.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------
# Results the arena refuses


def _good() -> list[dict[str, Any]]:
    return json.loads(json.dumps(RESULTS))


def _reject(results: Any, pattern: str) -> None:
    with pytest.raises(ResultsError, match=pattern):
        score(ANSWERS, results)


def test_missing_playlist() -> None:
    _reject(_good()[:1], r"results lack 1 answer playlist\(s\): 7")


def test_unknown_playlist() -> None:
    extra = _good() + [{"id": 99, "songs": fill_songs([]), "tags": fill_tags([])}]
    _reject(extra, "playlist 99: not among the answers")


def test_duplicate_playlist() -> None:
    _reject(_good() + _good()[:1], "playlist 8: appears twice")


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("songs", fill_songs([])[:99], "playlist 7: 99 songs, expected exactly 100"),
        ("songs", fill_songs([], n=101), "playlist 7: 101 songs, expected exactly 100"),
        ("songs", fill_songs([1, 1]), "playlist 7: song 1 is recommended twice"),
        ("songs", fill_songs(["1"]), "playlist 7: songs must be int, found '1'"),
        ("songs", fill_songs([1.0]), "playlist 7: songs must be int, found 1.0"),
        ("songs", fill_songs([2**64]), "playlist 7: song ids must fit in 64 bits"),
        ("songs", None, "playlist 7: 'songs' must be a list"),
        ("tags", fill_tags([])[:9], "playlist 7: 9 tags, expected exactly 10"),
        ("tags", fill_tags(["a", "a"]), "playlist 7: tag 'a' is recommended twice"),
        ("tags", fill_tags([3]), "playlist 7: tags must be str, found 3"),
    ],
)
def test_malformed_playlist(field: str, value: Any, pattern: str) -> None:
    results = _good()
    results[1][field] = value
    _reject(results, pattern)


def test_not_a_list_or_record() -> None:
    _reject({"id": 7}, "expected a list of playlists")
    _reject([_good()[0], ["x"]], "result 1: expected an object with an integer 'id'")
    _reject([_good()[0], {**_good()[1], "id": "7"}], "result 1: expected an object with an int")
    _reject([_good()[0], {**_good()[1], "id": [7]}], "result 1: expected an object with an int")


def test_malformed_answers() -> None:
    with pytest.raises(ResultsError, match="answers: no playlists to score"):
        score([], [])
    with pytest.raises(ResultsError, match=r"answer 1 \(playlist 8\): 'songs' must be a list"):
        score([ANSWERS[0], {"id": 8, "songs": "5", "tags": []}], RESULTS)
    with pytest.raises(ResultsError, match="answer 1: playlist 7 appears twice"):
        score([ANSWERS[0], ANSWERS[0]], RESULTS)


# ---------------------------------------------------------------------------------------
# Command line


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    answers, results = tmp_path / "val_answers.json", tmp_path / "results.json"
    answers.write_text(json.dumps(ANSWERS))
    results.write_text(json.dumps(RESULTS))
    return answers, results


def test_cli_prints_scores(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    answers, results = files
    assert main(["--answers", str(answers), "--results", str(results)]) == 0
    assert capsys.readouterr().out == "song_ndcg=0.427054 tag_ndcg=0.193426 score=0.392010\n"


def test_cli_rejects_bad_results_with_exit_2(files: tuple[Path, Path]) -> None:
    answers, results = files
    bad = _good()
    bad[0]["songs"] = bad[0]["songs"][:50]
    results.write_text(json.dumps(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--answers", str(answers),
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {results}: playlist 8: 50 songs, expected exactly 100"]


@pytest.mark.parametrize("which", ["answers", "results"])
def test_cli_unreadable_files(files: tuple[Path, Path], which: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    answers, results = files
    target = answers if which == "answers" else results
    target.write_text("[{")
    assert main(["--answers", str(answers), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "not valid JSON" in err
    target.unlink()
    assert main(["--answers", str(answers), "--results", str(results)]) == 2
    assert f"{target}: file not found" in capsys.readouterr().err


def test_cli_bad_answers_name_the_answers_file(files: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    answers, results = files
    answers.write_text(json.dumps({"id": 1}))
    assert main(["--answers", str(answers), "--results", str(results)]) == 2
    assert f"{answers}: answers: expected a list of playlists" in capsys.readouterr().err
