"""The soft-field policy on the real files' dirt: each quirk read leniently (or refused with
``--strict``) by the loader, through ``trainer.dataset --check`` and through AddSongs on a
real server; clean data reads exactly as before; one date parser for trainer and server."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_dataset import SONGS, TRAIN, playlist, song
from test_dataset import write_dataset as write_files

from clients.__main__ import main as client_main
from protos.songrec.v1 import songrec_pb2 as pb2
from server import melon, validation
from server.config import ServerConfig
from server.errors import InvalidArgument
from server.store import default_url, open_store
from server.testing import ServerThread
from trainer.dataset import DataError, Dataset, load_dataset
from trainer.split import write_split
from trainer.synth import (
    QUIRK_RATES,
    SCALES,
    Scale,
    SynthData,
    generate,
    quirks_by_default,
    write_dataset,
)
from trainer.synth import main as synth_main

REPO = Path(__file__).resolve().parents[1]
ADMIN = "dirty-data-admin"


# Song 5 of SONGS has a genre code the table lacks and an artist name without an id: the
# base fixture is dirty itself, so these tests start from a clean copy of it.
CLEAN_SONGS = [dict(s) for s in SONGS[:3]] + [song(5, artists=[2], issue_date="19991105")]


def shared_data(name: str) -> Path | None:
    """``../shared/data/NAME`` beside the repository (or beside a worktree's parents)."""
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / name
        if candidate.is_dir():
            return candidate
    return None


def load(root: Path, **kwargs: Any) -> Dataset:
    return load_dataset(root, **kwargs)


def lines_of(data: Dataset) -> list[str]:
    return [line for reads in data.lenient.values() for line in reads.lines()]


# ---------------------------------------------------------------------------------------
# The shared date parsers


@pytest.mark.parametrize(("text", "value", "repaired"), [
    ("20191231", 20191231, False), ("00000000", 0, False), ("", 0, False),
    ("19910000", 19910000, False), ("20200100", 20200100, False),
    ("20220615", 20220615, False),  # a future date is kept
    ("20105130", 20100000, True),  # song 692325 of the real file: month 51
    ("20150931", 20150900, True),  # a September 31
    ("20200132", 20200100, True),  # a day 32
    ("20190229", 20190200, True), ("20200229", 20200229, False),  # leap years
    ("20100015", 20100000, True),  # a day without a month
    ("00000315", 0, True),  # a month and day without a year
])
def test_issue_date_partial_dates(text: str, value: int, repaired: bool) -> None:
    number, why = melon.parse_issue_date(text)
    assert number == value and (why is not None) == repaired
    # The server reads it the same way.
    assert validation.parse_issue_date(text, "d") == value


@pytest.mark.parametrize("text", ["2019-12-31", "2019123", "201912310", "١٩٩١٠١٠١", "abcdefgh"])
def test_issue_date_structure_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not YYYYMMDD"):
        melon.parse_issue_date(text)
    with pytest.raises(InvalidArgument, match="d: .* is not YYYYMMDD"):
        validation.parse_issue_date(text, "d")


UPDT_TEXTS = ["2020-02-29 10:00:00.000", "2020-02-30 00:00:00.000", "2019-02-29",
              "2020-04-23", "2020-04-23 24:00:00", "2020-13-01 00:00:00.000", "2020-4-23",
              "2013-12-19 18:36:19.000", "2013-12-19T18:36:19", "yesterday"]


@pytest.mark.parametrize("text", UPDT_TEXTS)
def test_trainer_and_server_agree_on_updt_date(tmp_path: Path, text: str) -> None:
    """Issue 11: trainer.split accepted "2020-02-30", which the server refused."""
    try:
        served: int | None = validation.parse_updt_date(text)
    except InvalidArgument:
        served = None
    root = write_files(tmp_path / "d", train=[playlist(1, [10], [], updt_date=text)])
    try:
        loaded: int | None = int(load(root).train.updt_dates[0])
    except DataError as exc:
        assert str(exc).startswith("train.json: record 0: field 'updt_date': ")
        loaded = None
    assert loaded == served


def test_split_and_recommend_refuse_an_impossible_updt_date(tmp_path: Path) -> None:
    root = write_files(tmp_path / "d", train=[
        playlist(1, [10], [], updt_date="2020-02-30 00:00:00.000")])
    for args in (["trainer.split", "--data", str(root), "--out", str(tmp_path / "s")],
                 ["trainer.recommend", "--data", str(root), "--questions",
                  str(root / "train.json"), "--model", "most-popular", "--out",
                  str(tmp_path / "r.json")]):
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            "error: train.json: record 0: field 'updt_date': '2020-02-30 00:00:00.000' is "
            "not a date; expected YYYY-MM-DD, YYYY-MM-DD hh:mm:ss or YYYY-MM-DD hh:mm:ss.fff")


def test_split_cli_reads_the_real_files_month_51_and_strict_refuses_it(tmp_path: Path
                                                                       ) -> None:
    """The issue's first step: song 692325's "20105130" failed trainer.split."""
    songs = [dict(s) for s in CLEAN_SONGS]
    songs[1]["issue_date"] = "20105130"
    root = write_files(tmp_path / "d", songs=songs, train=[
        playlist(p, [10, 20, 30, 5][: 1 + p % 4], ["x"]) for p in range(10)])
    args = [sys.executable, "-m", "trainer.split", "--data", str(root)]
    proc = subprocess.run([*args, "--out", str(tmp_path / "s")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert ("WARNING trainer.dataset: song_meta.json: 1 issue dates out of range read as "
            "partial dates (ids 10)") in proc.stderr.splitlines()
    assert load(tmp_path / "s").songs.issue_dates[1] == 20100000
    proc = subprocess.run([*args, "--out", str(tmp_path / "t"), "--strict"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and not (tmp_path / "t").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: song_meta.json: record 1: field 'issue_date': '20105130': month 51 is out of "
        "range 01..12 (--strict)")


# ---------------------------------------------------------------------------------------
# Each quirk in the loader: read leniently and reported once, or refused with --strict

_DROP = object()


def _song_with(index: int, **changes: Any) -> list[dict[str, Any]]:
    out = [dict(s) for s in CLEAN_SONGS]
    for key, value in changes.items():
        if value is _DROP:
            del out[index][key]
        else:
            out[index][key] = value
    return out


# (song record 1 is song id 10) changes, what the loader reads, the summary line's start
SONG_QUIRKS: list[tuple[dict[str, Any], tuple[str, Any], str]] = [
    ({"issue_date": "20105130"}, ("issue_date", 20100000),
     "song_meta.json: 1 issue dates out of range read as partial dates (ids 10)"),
    ({"issue_date": "20150931"}, ("issue_date", 20150900),
     "song_meta.json: 1 issue dates out of range read as partial dates (ids 10)"),
    ({"issue_date": "20200132"}, ("issue_date", 20200100),
     "song_meta.json: 1 issue dates out of range read as partial dates (ids 10)"),
    ({"issue_date": None}, ("issue_date", 0),
     "song_meta.json: 1 null or empty issue dates read as unknown (ids 10)"),
    ({"issue_date": ""}, ("issue_date", 0),
     "song_meta.json: 1 null or empty issue dates read as unknown (ids 10)"),
    ({"album_id": None}, ("album_id", -1),
     "song_meta.json: 1 null or missing album ids read as unknown (ids 10)"),
    ({"album_id": _DROP}, ("album_id", -1),
     "song_meta.json: 1 null or missing album ids read as unknown (ids 10)"),
    ({"album_name": None}, ("album_name", ""),
     "song_meta.json: 1 null or missing album names read as empty (ids 10)"),
    ({"artist_id_basket": [1, 2], "artist_name_basket": ["one"]}, ("artists", [1, 2]),
     "song_meta.json: 1 artist name baskets of another length than their id baskets"),
    ({"artist_name_basket": None}, ("artists", [1]),
     "song_meta.json: 1 artist name baskets of another length than their id baskets"),
    ({"song_gn_dtl_gnr_basket": ["GN0101", "GN0177"]}, ("detail", ["GN0101", "GN0177"]),
     "song_meta.json: 1 songs with genre codes missing from genre_gn_all.json, kept as codes "
     "(ids 10)"),
]


def _read(data: Dataset, what: str) -> Any:
    songs, row = data.songs, 1
    return {"issue_date": lambda: int(songs.issue_dates[row]),
            "album_id": lambda: int(songs.album_ids[row]),
            "album_name": lambda: songs.album_names[row],
            "artists": lambda: songs.artists.row(row).tolist(),
            "detail": lambda: [data.genres.codes.items[c]
                               for c in songs.detail_genres.row(row)]}[what]()


@pytest.mark.parametrize(("changes", "expected", "line"), SONG_QUIRKS,
                         ids=[f"{list(c)[0]}={list(c.values())[0]!r}" for c, _, _ in
                              SONG_QUIRKS])
def test_song_quirk_is_read_leniently(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      changes: dict[str, Any], expected: tuple[str, Any],
                                      line: str) -> None:
    songs = [dict(s) for s in CLEAN_SONGS]
    for key, value in changes.items():
        if value is _DROP:
            del songs[1][key]
        else:
            songs[1][key] = value
    root = write_files(tmp_path / "d", songs=songs, train=TRAIN)
    with caplog.at_level(logging.WARNING, logger="trainer.dataset"):
        data = load(root)
    what, value = expected
    assert _read(data, what) == value
    assert [r.getMessage() for r in caplog.records] == lines_of(data)
    assert len(lines_of(data)) == 1 and lines_of(data)[0].startswith(line)
    # --strict: the refusal, naming file, record and field.
    with pytest.raises(DataError) as info:
        load(root, strict=True)
    message = str(info.value)
    field = {"detail": "song_gn_dtl_gnr_basket", "artists": "artist_name_basket"}.get(what,
                                                                                       what)
    assert message.startswith(f"song_meta.json: record 1: field '{field}': ")
    assert message.endswith("(--strict)")


def test_clean_copy_of_the_fixture_is_clean(tmp_path: Path) -> None:
    data = load(write_files(tmp_path / "d", songs=CLEAN_SONGS, train=TRAIN), strict=True)
    assert data.lenient == {}


def test_summary_is_one_line_per_kind_with_the_first_ids(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    songs = [song(100 + i, issue_date="20105130" if i % 2 else "20200101") for i in range(12)]
    root = write_files(tmp_path / "d", songs=songs, train=[])
    with caplog.at_level(logging.WARNING, logger="trainer.dataset"):
        load(root)
    assert [r.getMessage() for r in caplog.records] == [
        "song_meta.json: 6 issue dates out of range read as partial dates "
        "(ids 101, 103, 105, ...)"]


def test_lenient_reads_count_records_once_per_kind() -> None:
    reads = melon.LenientReads("f.json", first=2)
    kind, other = melon.Kind("things read leniently"), melon.Kind("others", "playlists")
    assert not reads and reads.lines() == []
    reads.note(kind, 7)
    reads.note(kind, 7)  # a second value of record 7: one record
    reads.note(other, 7, count=3)
    reads.note(kind, 8)
    reads.note(kind, 9)
    assert reads.lines() == ["f.json: 3 things read leniently (ids 7, 8, ...)",
                             "f.json: 3 others (playlists 7)"]
    anonymous = melon.LenientReads("EncodeSong")
    anonymous.note(kind, None)
    assert anonymous.lines() == ["EncodeSong: 1 things read leniently"]


def test_future_issue_date_is_kept_and_reported(tmp_path: Path) -> None:
    root = write_files(tmp_path / "d", songs=_song_with(1, issue_date="20220301"), train=TRAIN)
    for strict in (False, True):
        data = load(root, strict=strict)
        assert int(data.songs.issue_dates[1]) == 20220301
    assert any(line.startswith("song_meta.json: 1 issue dates after the last playlist update "
                               "(2020-04-23), kept (ids 10)") for line in lines_of(data))


def test_repeated_song_in_a_playlist_kept_once(tmp_path: Path) -> None:
    train = [dict(TRAIN[0], songs=[20, 30, 20, 5, 30, 20]), *TRAIN[1:]]
    root = write_files(tmp_path / "d", songs=CLEAN_SONGS, train=train)
    data = load(root)
    # Ids 20, 30, 5 at rows 2, 0, 3: first places kept, in order.
    assert data.train.songs.row(0).tolist() == [2, 0, 3]
    assert lines_of(data) == [
        "train.json: 3 repeated songs in a playlist dropped after the first (playlists 1)"]
    with pytest.raises(DataError, match=r"^train\.json: record 0: field 'songs': song id 20 "
                                        r"repeats in the playlist \(--strict\)$"):
        load(root, strict=True)


def test_songs_missing_from_song_meta_dropped_up_to_a_small_share(tmp_path: Path) -> None:
    songs = [song(i) for i in range(150)]
    train = [playlist(p, list(range(p, p + 100)), ["x"]) for p in range(5)]  # 500 entries
    train[3]["songs"][7] = 9999
    train[4]["songs"][:2] = [8888, 7777]
    root = write_files(tmp_path / "d", songs=songs, train=train)
    data = load(root)
    assert data.train.songs.lengths().tolist() == [100, 100, 100, 99, 98]
    assert 9999 not in data.songs.ids[data.train.songs.values]
    assert lines_of(data) == [
        "train.json: 3 songs not in song_meta.json dropped (playlists 3, 4)"]
    with pytest.raises(DataError, match=r"record 3: field 'songs': song id 9999 not in "
                                        r"song_meta.json \(--strict\)"):
        load(root, strict=True)
    # Above the share (1% of the entries) the files do not belong together.
    for p in range(5):
        train[p]["songs"][50] = 5000 + p
    with pytest.raises(DataError) as info:
        load(write_files(tmp_path / "e", songs=songs, train=train))
    assert str(info.value) == (
        "train.json: record 0: field 'songs': song id 5000 not in song_meta.json (8 of 500 "
        "song entries are not, more than the 1% dropped leniently: is this song_meta.json "
        "the playlists' own?)")


def test_titles_and_tags_keep_spaces_and_emoji(tmp_path: Path) -> None:
    tags = ["여름🌊", " 드라이브 ", "chill vibes ✨", "🎧"]
    train = [dict(TRAIN[0], plylst_title="  ☕ 카페 음악 ☕ ", tags=tags),
             dict(TRAIN[1], plylst_title="")]
    data = load(write_files(tmp_path / "d", songs=CLEAN_SONGS, train=train), strict=True)
    assert data.train.titles == ["  ☕ 카페 음악 ☕ ", ""]
    assert [data.tags.items[t] for t in data.train.tags.row(0)] == tags
    assert data.lenient == {}


def test_structural_faults_still_refuse_without_strict(tmp_path: Path) -> None:
    for changes, field in (({"id": None}, "id"), ({"artist_id_basket": None},
                                                  "artist_id_basket"),
                           ({"song_gn_gnr_basket": "GN0100"}, "song_gn_gnr_basket"),
                           ({"id": 30}, "id")):
        root = write_files(tmp_path / field, songs=_song_with(1, **changes), train=TRAIN)
        with pytest.raises(DataError, match=rf"^song_meta\.json: record 1: field '{field}'"):
            load(root)


# ---------------------------------------------------------------------------------------
# Synthetic quirks: every one of them, read back to the clean data


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthData, Path, Path]:
    """One tiny data set written clean and with quirks (same seed)."""
    base = tmp_path_factory.mktemp("twins")
    data = generate("tiny", 5, quirks=True)
    write_dataset(data, base / "quirky")
    write_dataset(generate("tiny", 5), base / "clean")
    return data, base / "clean", base / "quirky"


def test_generator_writes_every_quirk(twins: tuple[SynthData, Path, Path]) -> None:
    data, _, quirky = twins
    assert data.quirks is not None
    counts = data.quirks.counts()
    assert set(counts) == set(QUIRK_RATES)
    assert all(counts[name] >= minimum for name, (_, minimum) in QUIRK_RATES.items())
    songs = json.loads((quirky / "song_meta.json").read_text(encoding="utf-8"))
    dates = [s["issue_date"] for s in songs]
    repaired = [d for d in dates if melon.parse_issue_date(d)[1] is not None]
    assert len(repaired) == counts["impossible_dates"]
    assert sum(d > "20210000" for d in dates) == counts["future_dates"]
    assert any(s["album_id"] is None for s in songs)
    assert any(s["album_name"] is None and s["album_id"] is not None for s in songs)
    assert any(len(s["artist_name_basket"]) != len(s["artist_id_basket"]) for s in songs)
    playlists = json.loads((quirky / "train.json").read_text(encoding="utf-8"))
    playlists += json.loads((quirky / "val.json").read_text(encoding="utf-8"))
    playlists += json.loads((quirky / "test.json").read_text(encoding="utf-8"))
    assert sum(len(set(p["songs"])) < len(p["songs"]) for p in playlists) == \
        counts["repeated_songs"]
    assert sum(p["plylst_title"] == "" for p in playlists) == counts["empty_titles"]
    assert all(1 <= len(p["tags"]) <= 10 and len(p["songs"]) <= 200 for p in playlists)


def test_quirks_by_default_at_melon_scale_and_deterministic(tmp_path: Path) -> None:
    assert quirks_by_default("melon") and quirks_by_default(SCALES["melon"])
    assert not quirks_by_default("small") and not quirks_by_default(Scale(500, 10, 2, 2))
    for name in ("a", "b"):
        assert synth_main(["--scale", "tiny", "--seed", "3", "--quirks", "--out",
                           str(tmp_path / name)]) == 0
    assert synth_main(["--scale", "tiny", "--seed", "3", "--out", str(tmp_path / "c")]) == 0
    for name in ("song_meta.json", "train.json", "val.json", "test.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "song_meta.json").read_bytes() != \
        (tmp_path / "c" / "song_meta.json").read_bytes()


def test_quirks_leave_the_clean_data_unchanged(twins: tuple[SynthData, Path, Path]) -> None:
    """Same seed with and without quirks: the clean part of the files is identical, and the
    lenient reads give back the clean data but for the documented repairs."""
    data, clean_dir, quirky_dir = twins
    assert data.quirks is not None
    clean, quirky = load(clean_dir, strict=True), load(quirky_dir)
    assert clean.lenient == {}
    q = data.quirks
    s0, s1 = clean.songs, quirky.songs
    assert np.array_equal(s0.ids, s1.ids) and s0.names == s1.names
    assert np.array_equal(s0.artists.values, s1.artists.values)
    assert np.array_equal(s0.genres.values, s1.genres.values)
    dates = s0.issue_dates.copy()
    for row, text in q.issue_dates.items():
        value = int(text)
        dates[row] = value if text > "2021" else melon.parse_issue_date(text)[0]
        if text < "2021":  # a partial date keeps the year (and the month when it can)
            assert dates[row] // 10000 == s0.issue_dates[row] // 10000
    assert np.array_equal(s1.issue_dates, dates)
    nulls = sorted(q.null_album_ids)
    albums = s0.album_ids.copy()
    albums[nulls] = -1
    assert np.array_equal(s1.album_ids, albums)
    assert all(s1.album_names[r] == "" for r in q.null_album_ids | q.null_album_names)
    unknown = sorted(q.unknown_genres)
    for row in range(len(s0)):
        extra = [q.unknown_genres[row]] if row in q.unknown_genres else []
        assert [quirky.genres.codes.items[c] for c in s1.detail_genres.row(row)] == \
            [clean.genres.codes.items[c] for c in s0.detail_genres.row(row)] + extra
    assert unknown
    for stem in ("train", "val", "test"):
        p0, p1 = clean.playlists[stem], quirky.playlists[stem]
        # Repeated songs dropped: the song lists are the clean ones, entry for entry.
        assert np.array_equal(p0.songs.indptr, p1.songs.indptr)
        assert np.array_equal(p0.songs.values, p1.songs.values)
        assert np.array_equal(p0.updt_dates, p1.updt_dates)
    kinds = {line.split(": ", 1)[0] + ": " + line.split(" ", 2)[2].split(" (")[0]
             for line in lines_of(quirky)}
    assert any("issue dates out of range read as partial dates" in k for k in kinds)
    assert any("repeated songs in a playlist" in k for k in kinds)


def test_lenient_reads_change_nothing_on_clean_data(twins: tuple[SynthData, Path, Path],
                                                   tmp_path: Path) -> None:
    """Item 4: without anomalies, lenient and strict reads (and the official split made
    from them) are identical."""
    _, clean_dir, _ = twins
    lenient, strict = load(clean_dir), load(clean_dir, strict=True)
    assert lenient.lenient == {} == strict.lenient
    for a, b in ((lenient.songs, strict.songs),):
        for name in ("ids", "album_ids", "issue_dates", "row_of_id"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
        assert a.names == b.names and a.album_names == b.album_names
        assert a.artist_names == b.artist_names
    for stem, p in lenient.playlists.items():
        other = strict.playlists[stem]
        for name in ("ids", "like_cnt", "updt_dates"):
            assert np.array_equal(getattr(p, name), getattr(other, name))
        assert np.array_equal(p.songs.values, other.songs.values)
        assert np.array_equal(p.tags.values, other.tags.values)
    assert lenient.tags.items == strict.tags.items
    write_split(clean_dir, tmp_path / "lenient")
    write_split(clean_dir, tmp_path / "strict", strict=True)
    for name in ("train.json", "val_questions.json", "val_answers.json"):
        assert (tmp_path / "lenient" / name).read_bytes() == \
            (tmp_path / "strict" / name).read_bytes()


# ---------------------------------------------------------------------------------------
# python -m trainer.dataset --check


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.dataset", "--check", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_check_reports_counts_and_every_lenient_read(twins: tuple[SynthData, Path, Path]
                                                     ) -> None:
    data, _, quirky = twins
    proc = check(str(quirky))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert proc.stderr == ""
    assert "songs: 3000, " in out and "issue dates: " in out
    assert "genres: 254 codes in genre_gn_all.json (30 major)" in out
    assert "train.json: 1160 playlists" in out and "updt_date 20" in out
    assert "tags: " in out and out.rstrip().endswith("usable")
    assert data.quirks is not None
    counts = data.quirks.counts()
    assert (f"song_meta.json: {counts['impossible_dates']} issue dates out of range read as "
            f"partial dates (ids ") in out
    reads = out.split("lenient reads: ", 1)[1].splitlines()
    assert int(reads[0]) == len(reads) - 2  # the count, the lines, "usable"
    strict = check(str(quirky), "--strict")
    assert strict.returncode == 2 and strict.stdout == ""
    assert len(strict.stderr.strip().splitlines()) == 1
    assert strict.stderr.startswith("error: song_meta.json: record ")


def test_check_refuses_an_unusable_directory(tmp_path: Path) -> None:
    root = write_files(tmp_path / "d", train=[playlist(1, [404], [])])
    proc = check(str(root))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: train.json: record 0: field 'songs': song id 404 not in song_meta.json (1 of "
        "1 song entries are not, more than the 1% dropped leniently: is this song_meta.json "
        "the playlists' own?)"]
    assert check(str(tmp_path / "nope")).returncode == 2


def test_check_loads_the_real_spotify_sample() -> None:
    root = shared_data("spotify-playlists")
    if root is None:
        pytest.skip("../shared/data/spotify-playlists is not here")
    proc = check(str(root))
    assert proc.returncode == 0, proc.stderr
    assert "songs: 28356, " in proc.stdout and "train.json: 470 playlists" in proc.stdout


# ---------------------------------------------------------------------------------------
# Through AddSongs: the real file's records as clients add-songs sends them


def test_add_songs_reads_the_dirt_as_the_trainer_does(
        tiny_bundle: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    quirks = generate("tiny", 7, quirks=True).quirks  # what conftest's tiny_data carries
    assert quirks is not None
    rows = (set(quirks.issue_dates) | quirks.null_album_ids | quirks.null_album_names
            | quirks.artist_names | set(quirks.unknown_genres))
    songs = json.loads((tiny_data / "song_meta.json").read_text(encoding="utf-8"))
    records = [dict(songs[r], id=5_000_000 + r) for r in sorted(rows)]
    records[0]["tags"] = ["여름🌊", " 드라이브 ", "🎧"]
    records[0]["song_name"] = ""
    file = tmp_path / "new.json"
    file.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    state = tmp_path / "state"
    config = ServerConfig(bundle=tiny_bundle, port=0, admin_token=ADMIN, data_dir=state,
                          verify=False)
    with ServerThread(config) as live, caplog.at_level(logging.WARNING,
                                                      logger="server.validation"):
        status = client_main(["add-songs", str(file), "--target", live.target,
                              "--token", ADMIN])
        out, err = capsys.readouterr()
        assert status == 0, err
        assert out.startswith(f"added {len(records)} songs, 0 already served")
        bad = sorted(5_000_000 + r for r, d in quirks.issue_dates.items() if d < "2021")
        assert [r.getMessage() for r in caplog.records] == [
            f"AddSongs: {len(bad)} issue dates out of range read as partial dates "
            f"(ids {', '.join(map(str, bad[:3]))}, ...)"]
        # EncodeSong reads the same metadata the same way.
        with live.channel() as channel:
            from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc

            stub = pb2_grpc.RecommenderStub(channel)
            row = bad[0] - 5_000_000
            meta = pb2.SongMetadata(genres=songs[row]["song_gn_gnr_basket"],
                                    issue_date=quirks.issue_dates[row])
            answer = stub.EncodeSong(pb2.EncodeSongRequest(song=meta, k=0))
            assert answer.known_columns > 0
        assert caplog.records[-1].getMessage() == (
            "EncodeSong: 1 issue dates out of range read as partial dates")
    # What was logged durably is what the trainer reads from the same records.
    store = open_store(default_url(state))
    logged = {s.song.song_id: s.song for s in store.all()}
    store.close()
    assert set(logged) == {r["id"] for r in records}
    trainer_view = load(tiny_data, files=[])
    for rec in records:
        row = rec["id"] - 5_000_000
        meta = logged[rec["id"]].meta
        assert meta.issue_date == int(trainer_view.songs.issue_dates[row])
        assert meta.detail_genres == tuple(rec["song_gn_dtl_gnr_basket"])
        assert meta.artists == tuple(rec["artist_id_basket"])
    assert logged[records[0]["id"]].meta.tags == ("여름🌊", " 드라이브 ", "🎧")


def test_add_songs_request_reads_partial_dates() -> None:
    request = pb2.AddSongsRequest(songs=[
        pb2.NewSong(song_id=692325, metadata=pb2.SongMetadata(genres=["GN0100"],
                                                              issue_date="20105130")),
        pb2.NewSong(song_id=168071, metadata=pb2.SongMetadata(genres=["GN0100"],
                                                              issue_date="20150931")),
        pb2.NewSong(song_id=3, metadata=pb2.SongMetadata(genres=["GN9900"],
                                                         issue_date="20220101"))])
    songs = validation.new_songs(request)
    assert [s.meta.issue_date for s in songs] == [20100000, 20150900, 20220101]
    assert songs[2].meta.genres == ("GN9900",)
