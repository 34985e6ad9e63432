"""End-to-end tests of ``python -m trainer.recommend`` and ``trainer.bench_quality`` helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.bench_quality import replace_section, results_table
from trainer.dataset import load_dataset
from trainer.recommend import load_questions, run_model
from trainer.recommenders.registry import make_recommender

REPO = Path(__file__).resolve().parents[1]
N_SONGS, N_TAGS = 120, 14


def write_dataset(root: Path) -> Path:
    """120 songs, 14 tags, 30 training playlists of overlapping song windows, 3 questions."""
    root.mkdir(parents=True, exist_ok=True)
    songs = [{"id": 10 * i, "song_name": f"s{i}", "album_id": i, "album_name": "a",
              "artist_id_basket": [i % 7], "artist_name_basket": [f"ar{i % 7}"],
              "song_gn_gnr_basket": [], "song_gn_dtl_gnr_basket": [],
              "issue_date": "20150101"} for i in range(N_SONGS)]
    train = [{"id": p, "plylst_title": f"playlist {p % 5} 좋은 노래",
              "tags": [f"t{p % N_TAGS}", f"t{(p + 3) % N_TAGS}"],
              "songs": [10 * ((4 * p + j) % N_SONGS) for j in range(12)],
              "like_cnt": 0, "updt_date": "2020-01-01 00:00:00.000"} for p in range(30)]
    questions = [
        {"id": 900, "plylst_title": "", "tags": ["t1"], "songs": [40, 50, 60],
         "like_cnt": 0, "updt_date": "2020-01-01 00:00:00.000"},
        {"id": 901, "plylst_title": "좋은 노래", "tags": [], "songs": [],
         "like_cnt": 0, "updt_date": "2020-01-01 00:00:00.000"},
        {"id": 902, "plylst_title": "", "tags": ["brand-new-tag"], "songs": [],
         "like_cnt": 0, "updt_date": "2020-01-01 00:00:00.000"},
    ]
    for name, obj in [("song_meta.json", songs), ("genre_gn_all.json", {}),
                      ("train.json", train), ("val_questions.json", questions)]:
        (root / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer.recommend", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def check_results(results: list[dict], questions: list[dict]) -> None:
    assert [r["id"] for r in results] == [q["id"] for q in questions]
    valid = {10 * i for i in range(N_SONGS)}
    for res, q in zip(results, questions, strict=True):
        assert set(res) == {"id", "songs", "tags"}
        assert len(res["songs"]) == 100 == len(set(res["songs"]))
        assert len(res["tags"]) == 10 == len(set(res["tags"]))
        assert set(res["songs"]) <= valid and not set(res["songs"]) & set(q["songs"])
        assert not set(res["tags"]) & set(q["tags"])


@pytest.mark.parametrize("model", ["playlist-knn", "most-popular"])
def test_cli_end_to_end(tmp_path: Path, model: str) -> None:
    data = write_dataset(tmp_path / "d")
    out = tmp_path / "out" / "results.json"
    proc = run_cli("--data", str(data), "--questions", str(data / "val_questions.json"),
                   "--model", model, "--out", str(out), "--drop-future", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "fit" in proc.stdout and "predict" in proc.stdout
    questions = json.loads((data / "val_questions.json").read_text(encoding="utf-8"))
    check_results(json.loads(out.read_text(encoding="utf-8")), questions)


def test_cli_unknown_model_exits_2(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    proc = run_cli("--data", str(data), "--questions", str(data / "val_questions.json"),
                   "--model", "nope", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert "unknown model 'nope'" in proc.stderr and "playlist-knn" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_cli_bad_question_file_exits_2(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"id": 1, "plylst_title": "x", "tags": [], "songs": [99999]}]))
    proc = run_cli("--data", str(data), "--questions", str(bad), "--model", "most-popular",
                   "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert "q.json: record 0: field 'songs'" in proc.stderr and "99999" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bundle_for_model_without_one_exits_2(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    proc = run_cli("--data", str(data), "--questions", str(data / "val_questions.json"),
                   "--model", "playlist-knn", "--bundle", "x", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "has no option 'bundle'" in proc.stderr


def test_run_model_in_process(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    data = load_dataset(root, files=["train.json"])
    questions = load_questions(data, root / "val_questions.json")
    results, fit_s, predict_s = run_model(data, questions,
                                          make_recommender("playlist-knn", k=10),
                                          progress=False)
    check_results(results, json.loads((root / "val_questions.json").read_text("utf-8")))
    assert fit_s >= 0 and predict_s >= 0
    # Seeds 40, 50, 60 sit in playlists 29, 0 and 1 (windows of 12 rows, step 4); song 70
    # is the one non-seed song all three hold, so it leads.
    assert results[0]["songs"][0] == 70


def test_results_table_and_section_replacement(tmp_path: Path) -> None:
    rows = [{"dataset": "demo", "model": "most-popular", "song_ndcg": 0.01234,
             "tag_ndcg": 0.5, "score": 0.0855, "fit_s": 0.1, "predict_s": 2.25}]
    table = results_table(rows)
    assert "| demo | most-popular | 0.0123 | 0.5000 | 0.0855 | 0.10 | 2.25 |" in table
    doc = tmp_path / "BENCH.md"
    replace_section(doc, "first")
    replace_section(doc, "second")
    text = doc.read_text(encoding="utf-8")
    assert "second" in text and "first" not in text
    assert text.count("<!-- bench-quality:start -->") == 1
    doc.write_text("# Head\n\nkept above\n", encoding="utf-8")
    replace_section(doc, "third")
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Head\n\nkept above\n") and "third" in text
