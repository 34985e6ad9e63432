"""trainer.dataset on tiny hand-written dataset directories: arrays and every error path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer.dataset import DataError, load_dataset

REPO = Path(__file__).resolve().parents[1]

GENRES = {"GN0100": "Ballad", "GN0101": "Ballad (old)", "GN0200": "Dance", "GN0201": "Dance pop"}


def song(sid: int, *, genres: list[str] | None = None, detail: list[str] | None = None,
         artists: list[int] | None = None, issue_date: str = "20200101") -> dict[str, Any]:
    return {
        "id": sid,
        "song_name": f"song {sid}",
        "album_id": 1000 + sid,
        "album_name": f"album {sid}",
        "artist_id_basket": artists if artists is not None else [sid % 3],
        "artist_name_basket": [f"artist {a}" for a in (artists or [sid % 3])],
        "song_gn_gnr_basket": genres if genres is not None else ["GN0100"],
        "song_gn_dtl_gnr_basket": detail if detail is not None else ["GN0101"],
        "issue_date": issue_date,
    }


def playlist(pid: int, songs: list[int], tags: list[str], *,
             updt_date: str = "2020-04-23 10:09:08.000", like_cnt: int = 1) -> dict[str, Any]:
    return {"id": pid, "plylst_title": f"title {pid}", "tags": tags, "songs": songs,
            "like_cnt": like_cnt, "updt_date": updt_date}


# Song ids are deliberately not 0..n-1 and not sorted, so rows and ids differ.
SONGS = [
    song(30, genres=["GN0200"], detail=["GN0201"], artists=[7, 8], issue_date="20191231"),
    song(10, issue_date="00000000"),
    song(20, genres=["GN0100", "GN0200"], detail=[], issue_date="20200100"),
    song(5, genres=["GN9900"], detail=[], artists=[], issue_date="19991105"),
]
TRAIN = [
    playlist(1, [20, 30], ["rock", "night"], updt_date="2013-12-19 18:36:19.000"),
    playlist(2, [5], [], updt_date="2020-01-02 00:00:00.000"),
    playlist(3, [], ["night"]),
]
VAL = [playlist(9, [10, 5, 20], ["night", "rain"], updt_date="2017-07-07 07:07:07.000")]


def write_dataset(root: Path, *, songs: Any = None, genres: Any = None,
                  **files: Any) -> Path:
    """Write a dataset directory; ``files`` maps a stem (``train``) to its JSON content,
    a string is written as raw text (for invalid JSON)."""
    root.mkdir(parents=True, exist_ok=True)
    contents = {"song_meta": SONGS if songs is None else songs,
                "genre_gn_all": GENRES if genres is None else genres, **files}
    for stem, content in contents.items():
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        (root / f"{stem}.json").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", train=TRAIN, val=VAL)


# ---------------------------------------------------------------------------------------
# What a good directory loads into


def test_songs_arrays(data_dir: Path) -> None:
    data = load_dataset(data_dir)
    songs = data.songs
    assert songs.ids.tolist() == [30, 10, 20, 5]
    assert songs.names[2] == "song 20"
    assert songs.album_ids.tolist() == [1030, 1010, 1020, 1005]
    # Unknown date -> 0, a partly known YYYYMM00 kept as it is.
    assert songs.issue_dates.tolist() == [20191231, 0, 20200100, 19991105]
    assert songs.row_of_id[[30, 10, 20, 5]].tolist() == [0, 1, 2, 3]
    assert songs.row_of_id[[0, 11, 29]].tolist() == [-1, -1, -1]
    assert songs.rows([5, 30, 999, -4]).tolist() == [3, 0, -1, -1]
    assert songs.artists.row(0).tolist() == [7, 8]
    assert songs.artists.row(3).tolist() == []
    assert songs.artist_names[7] == "artist 7"
    codes = data.genres.codes
    assert [codes.items[g] for g in songs.genres.row(2)] == ["GN0100", "GN0200"]
    assert [codes.items[g] for g in songs.detail_genres.row(0)] == ["GN0201"]
    assert songs.detail_genres.row(2).tolist() == []


def test_genre_code_missing_from_table_joins_vocabulary(data_dir: Path) -> None:
    data = load_dataset(data_dir)
    genres = data.genres
    assert genres.codes.items[:4] == list(GENRES)
    idx = genres.codes.get("GN9900")
    assert idx == 4 and genres.names[idx] == "GN9900"  # named after its code
    assert genres.names[:4] == list(GENRES.values())
    assert genres.is_major("GN0200") and not genres.is_major("GN0201")


def test_playlists_are_csr_over_song_rows_and_tag_indices(data_dir: Path) -> None:
    data = load_dataset(data_dir)
    assert set(data.playlists) == {"train", "val"}
    train = data.train
    assert train.source == "train"
    assert train.ids.tolist() == [1, 2, 3]
    assert train.titles == ["title 1", "title 2", "title 3"]
    assert train.songs.indptr.tolist() == [0, 2, 3, 3]
    # Song ids 20, 30 | 5 | - as rows 2, 0 | 3 | -
    assert train.songs.values.tolist() == [2, 0, 3]
    assert train.songs.lengths().tolist() == [2, 1, 0]
    assert train.songs.row_ids().tolist() == [0, 0, 1]
    assert train.songs.values.dtype == np.int32
    assert train.tags.indptr.tolist() == [0, 2, 2, 3]
    assert [data.tags.items[t] for t in train.tags.values] == ["rock", "night", "night"]
    assert train.like_cnt.tolist() == [1, 1, 1]
    assert train.updt_dates.tolist() == [20131219, 20200102, 20200423]


def test_tag_vocabulary_is_shared_across_files(data_dir: Path) -> None:
    data = load_dataset(data_dir)
    assert data.tags.items == ["rock", "night", "rain"]
    val = data.playlists["val"]
    # "night" has train's index in val too; "rain" is new and appended.
    assert val.tags.values.tolist() == [1, 2]
    assert val.songs.values.tolist() == [1, 3, 2]
    assert val.updt_dates.tolist() == [20170707]


def test_files_argument_and_load_playlists(data_dir: Path, tmp_path: Path) -> None:
    data = load_dataset(data_dir, files=["train.json"])
    assert set(data.playlists) == {"train"}
    extra = tmp_path / "questions.json"
    extra.write_text(json.dumps([playlist(50, [30], ["rock", "unseen"])]))
    known_only = data.load_playlists(extra, extend_tags=False)
    assert known_only.tags.values.tolist() == [0]  # "unseen" dropped
    assert len(data.tags) == 2
    grown = data.load_playlists(extra)
    assert grown.tags.values.tolist() == [0, 2] and data.tags.items[2] == "unseen"


def test_optional_playlist_fields(tmp_path: Path) -> None:
    bare = [{"id": 4, "plylst_title": "", "tags": [], "songs": [10]}]
    data = load_dataset(write_dataset(tmp_path / "d", train=bare))
    assert data.train.like_cnt.tolist() == [0]
    assert data.train.updt_dates.tolist() == [0]


def test_train_property_without_train_file(tmp_path: Path) -> None:
    data = load_dataset(write_dataset(tmp_path / "d", val=VAL))
    with pytest.raises(DataError, match=r"train\.json: file not found"):
        _ = data.train


# ---------------------------------------------------------------------------------------
# Error paths: each message names the file, the record and the field


def _error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(root)
    return str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    assert "dataset directory not found" in _error(tmp_path / "nope")


@pytest.mark.parametrize("name", ["song_meta.json", "genre_gn_all.json"])
def test_missing_file(data_dir: Path, name: str) -> None:
    (data_dir / name).unlink()
    msg = _error(data_dir)
    assert name in msg and "file not found" in msg


def test_missing_requested_playlist_file(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"test\.json: file not found"):
        load_dataset(data_dir, files=["test.json"])


@pytest.mark.parametrize("stem", ["train", "song_meta", "genre_gn_all"])
def test_invalid_json(tmp_path: Path, stem: str) -> None:
    root = write_dataset(tmp_path / "d", **({"train": TRAIN} | {stem: '[{"id": 1,'}))
    msg = _error(root)
    assert f"{stem}.json" in msg and "not valid JSON" in msg


@pytest.mark.parametrize(
    ("stem", "content", "expected"),
    [
        ("train", {"id": 1}, "train.json: expected a list of playlists, got dict"),
        ("song_meta", {"id": 1}, "song_meta.json: expected a list of songs, got dict"),
        ("genre_gn_all", ["GN0100"], "genre_gn_all.json: expected an object"),
        ("genre_gn_all", {"GN0100": 3}, "genre_gn_all.json: genre 'GN0100': expected a name"),
    ],
)
def test_wrong_top_level_type(tmp_path: Path, stem: str, content: Any, expected: str) -> None:
    root = write_dataset(tmp_path / "d", **({"train": TRAIN} | {stem: content}))
    assert expected in _error(root)


def _with(records: list[dict[str, Any]], index: int, **changes: Any) -> list[dict[str, Any]]:
    out = [dict(r) for r in records]
    for key, value in changes.items():
        if value is _DROP:
            del out[index][key]
        else:
            out[index][key] = value
    return out


_DROP = object()


@pytest.mark.parametrize(
    ("index", "changes", "field", "detail"),
    [
        (1, {"songs": _DROP}, "songs", "missing field"),
        (2, {"plylst_title": _DROP}, "plylst_title", "missing field"),
        (0, {"id": "1"}, "id", "expected an integer, got '1'"),
        (0, {"id": True}, "id", "expected an integer, got True"),
        (1, {"songs": 5}, "songs", "expected a list, got 5"),
        (1, {"songs": [5, "20"]}, "songs", "expected a list of int, found '20'"),
        (2, {"tags": ["ok", 3]}, "tags", "expected a list of str, found 3"),
        (0, {"like_cnt": "many"}, "like_cnt", "expected an integer"),
        (2, {"songs": [10, 11]}, "songs", "song id 11 not in song_meta.json"),
        (2, {"songs": [-1]}, "songs", "song id -1 not in song_meta.json"),
        (0, {"updt_date": "2020-04-23 x"}, "updt_date", "'2020-04-23 x' is not a date"),
        (0, {"updt_date": "2020-13-01 00:00:00.000"}, "updt_date", "is not a date"),
        (0, {"updt_date": "2020-02-30 00:00:00.000"}, "updt_date", "is not a date"),
        (0, {"updt_date": 20200101}, "updt_date", "expected a string"),
    ],
)
def test_bad_playlist_record(tmp_path: Path, index: int, changes: dict[str, Any], field: str,
                             detail: str) -> None:
    root = write_dataset(tmp_path / "d", train=_with(TRAIN, index, **changes))
    msg = _error(root)
    assert msg.startswith(f"train.json: record {index}: field '{field}': ")
    assert detail in msg


def test_bad_record_in_second_playlist_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", train=TRAIN, val=_with(VAL, 0, songs=[10, 404]))
    assert _error(root).startswith(
        "val.json: record 0: field 'songs': song id 404 not in song_meta.json (1 of 2 song "
        "entries are not, more than the 1% dropped leniently")


def test_playlist_record_not_an_object(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", train=[TRAIN[0], [1, 2]])
    assert _error(root) == "train.json: record 1: expected an object, got list"


@pytest.mark.parametrize(
    ("index", "changes", "field", "detail"),
    [
        (2, {"song_name": _DROP}, "song_name", "missing field"),
        (1, {"id": 1.5}, "id", "expected an integer, got 1.5"),
        (3, {"artist_id_basket": "7"}, "artist_id_basket", "expected a list"),
        (0, {"song_gn_gnr_basket": [1]}, "song_gn_gnr_basket", "expected a list of str"),
        (0, {"song_gn_dtl_gnr_basket": _DROP}, "song_gn_dtl_gnr_basket", "missing field"),
        (1, {"issue_date": "2020-01-01"}, "issue_date", "'2020-01-01' is not YYYYMMDD"),
        (1, {"issue_date": "2020010"}, "issue_date", "'2020010' is not YYYYMMDD"),
        (1, {"issue_date": 20200101}, "issue_date", "expected a string"),
        (1, {"album_id": "1010"}, "album_id", "expected int or null, got '1010'"),
        (1, {"album_name": 3}, "album_name", "expected str or null, got 3"),
        (1, {"artist_name_basket": "x"}, "artist_name_basket", "expected a list"),
        (2, {"id": 30}, "id", "duplicate song id 30"),
        (3, {"id": -5}, "id", "negative song id -5"),
    ],
)
def test_bad_song_record(tmp_path: Path, index: int, changes: dict[str, Any], field: str,
                         detail: str) -> None:
    root = write_dataset(tmp_path / "d", songs=_with(SONGS, index, **changes), train=TRAIN)
    msg = _error(root)
    assert msg.startswith(f"song_meta.json: record {index}: field '{field}': ")
    assert detail in msg


def test_split_cli_on_malformed_dataset_exits_2_with_one_line(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", train=_with(TRAIN, 1, songs=[5, 77]))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.split", "--data", str(root), "--out",
         str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.json: record 1: field 'songs': song id 77 not in song_meta.json" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a bad dataset
