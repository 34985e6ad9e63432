"""trainer.synth: Melon file formats, determinism, and the structure the generator promises."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from trainer.dataset import load_dataset
from trainer.synth import (
    KINDS,
    SCALES,
    SynthData,
    default_genres,
    generate,
    genre_table,
    load_genre_table,
    main,
    write_dataset,
)

REAL_GENRES = Path(__file__).resolve().parents[2] / "shared/data/melon-genres/genre_gn_all.json"
PLAYLIST_KEYS = {"id", "plylst_title", "tags", "songs", "like_cnt", "updt_date"}
SONG_KEYS = {"id", "song_name", "album_id", "album_name", "artist_id_basket",
             "artist_name_basket", "song_gn_gnr_basket", "song_gn_dtl_gnr_basket", "issue_date"}
UPDT = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.000$")
SEED = 7


@pytest.fixture(scope="module")
def data() -> SynthData:
    return generate("tiny", SEED)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    assert main(["--scale", "tiny", "--seed", str(SEED), "--out", str(out)]) == 0
    return out


def read(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def pair_sample(data: SynthData, selected: np.ndarray, per_playlist: int = 20
                ) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs of distinct songs from the same playlist, over the selected playlists."""
    rng = np.random.default_rng(0)
    a: list[np.ndarray] = []
    b: list[np.ndarray] = []
    p = data.playlists
    for i in np.nonzero(selected)[0].tolist():
        songs = p.songs_of(i)
        if len(songs) < 2:
            continue
        x, y = rng.integers(0, len(songs), (2, per_playlist))
        a.append(songs[x[x != y]])
        b.append(songs[y[x != y]])
    return np.concatenate(a), np.concatenate(b)


def random_pairs(data: SynthData, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of playlist slots drawn at random: songs weighted by popularity, no theme."""
    rng = np.random.default_rng(1)
    return rng.choice(data.playlists.songs, n), rng.choice(data.playlists.songs, n)


def kind_mask(data: SynthData, kind: str) -> np.ndarray:
    return data.playlists.kind == KINDS.index(kind)


# ---------------------------------------------------------------------------------------
# Files and formats


def test_files_load_with_the_dataset_reader(data_dir: Path) -> None:
    scale = SCALES["tiny"]
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "genre_gn_all.json", "song_meta.json", "test.json", "train.json", "val.json"]
    ds = load_dataset(data_dir)
    assert len(ds.songs) == scale.n_songs
    assert np.array_equal(ds.songs.ids, np.arange(scale.n_songs))
    assert {k: len(v) for k, v in ds.playlists.items()} == {
        "train": scale.n_train, "val": scale.n_val, "test": scale.n_test}
    ids = np.concatenate([p.ids for p in ds.playlists.values()])
    assert len(np.unique(ids)) == len(ids)
    assert len(ds.genres.codes) == 254


def test_playlist_records_have_the_melon_fields(data_dir: Path) -> None:
    for name in ("train.json", "val.json", "test.json"):
        for rec in read(data_dir / name):
            assert set(rec) == PLAYLIST_KEYS
            assert isinstance(rec["id"], int) and isinstance(rec["plylst_title"], str)
            assert rec["plylst_title"].strip()
            assert isinstance(rec["like_cnt"], int) and rec["like_cnt"] >= 0
            assert UPDT.match(rec["updt_date"]), rec["updt_date"]
            assert 1 <= len(rec["tags"]) <= 10 and len(set(rec["tags"])) == len(rec["tags"])
            assert all(isinstance(t, str) and t and " " not in t for t in rec["tags"])
            assert 1 <= len(rec["songs"]) <= 200
            assert len(set(rec["songs"])) == len(rec["songs"])
            assert all(isinstance(s, int) and 0 <= s < 3000 for s in rec["songs"])


def test_song_records_have_the_melon_fields(data_dir: Path) -> None:
    genres = read(data_dir / "genre_gn_all.json")
    songs = read(data_dir / "song_meta.json")
    assert [s["id"] for s in songs] == list(range(len(songs)))
    dates = []
    for s in songs:
        assert set(s) == SONG_KEYS
        assert isinstance(s["song_name"], str) and s["song_name"]
        assert isinstance(s["album_id"], int) and isinstance(s["album_name"], str)
        assert 1 <= len(s["artist_id_basket"]) <= 3
        assert len(s["artist_name_basket"]) == len(s["artist_id_basket"])
        assert all(isinstance(a, int) for a in s["artist_id_basket"])
        majors, details = s["song_gn_gnr_basket"], s["song_gn_dtl_gnr_basket"]
        assert 1 <= len(majors) <= 2 and all(m.endswith("00") and m in genres for m in majors)
        assert 1 <= len(details) <= 3 and all(d in genres and not d.endswith("00")
                                              for d in details)
        assert all(d[:4] + "00" in majors for d in details), s  # details under their major
        assert re.fullmatch(r"\d{8}", s["issue_date"])
        dates.append(int(s["issue_date"]))
    dates_arr = np.array(dates)
    assert 0.01 <= (dates_arr == 0).mean() <= 0.06  # unknown dates: a few percent
    known = dates_arr[dates_arr > 0] // 10000
    assert known.min() < 1990 and known.max() == 2020
    # Recent years are denser than older ones.
    assert (known >= 2010).sum() > 2 * ((known >= 2000) & (known < 2010)).sum() > 0


def test_albums_and_artists_hold_several_songs(data: SynthData) -> None:
    s = data.songs
    _, per_album = np.unique(s.album_ids, return_counts=True)
    _, per_artist = np.unique(s.artists[:, 0], return_counts=True)
    assert 1.8 <= per_album.mean() <= 4 and per_album.max() >= 6
    assert per_artist.mean() >= 4 and per_artist.max() >= 15
    # Songs of one album share its release date and genres.
    first: dict[int, tuple[int, int]] = {}
    for album, day, major in zip(s.album_ids.tolist(), s.days.tolist(), s.majors[:, 0].tolist(),
                                 strict=True):
        assert first.setdefault(album, (day, major)) == (day, major)


def test_default_genre_table_has_the_real_structure() -> None:
    table = genre_table(default_genres())
    assert len(table.codes) == 254 and table.n_majors == 30
    assert sum(len(d) for d in table.details) == 224
    assert all(table.codes[m].endswith("00") for m in table.majors)
    # Era-named details know their years: '10s- is open-ended.
    names = {table.mapping[table.codes[d]]: span for d, span in table.era.items()}
    assert names["Trot '60s-'70s"] == (1960, 1979) and names["'10s-"][0] == 2010


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path, data_dir: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    assert main(["--scale", "tiny", "--seed", str(SEED), "--out", str(again)]) == 0
    assert main(["--scale", "tiny", "--seed", str(SEED + 1), "--out", str(other)]) == 0
    for name in ("song_meta.json", "train.json", "val.json", "test.json"):
        assert (again / name).read_bytes() == (data_dir / name).read_bytes(), name
        assert (other / name).read_bytes() != (data_dir / name).read_bytes(), name


def test_tiny_scale_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_dataset(generate("tiny", 11), tmp_path)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------------
# Statistics of the real data


def test_lengths_are_melon_like(data: SynthData) -> None:
    p = data.playlists
    n_songs, n_tags = np.diff(p.song_indptr), np.diff(p.tag_indptr)
    assert n_songs.min() >= 1 and n_songs.max() == 200
    assert 38 <= n_songs.mean() <= 55 and 22 <= np.median(n_songs) <= 38
    assert n_tags.min() == 1 and n_tags.max() == 10 and 3.3 <= n_tags.mean() <= 4.8
    assert p.like_cnt.min() == 0 and p.like_cnt.max() > 50 * np.median(p.like_cnt)


def test_song_popularity_is_heavy_tailed(data: SynthData) -> None:
    p = data.playlists
    train = p.songs[: p.song_indptr[data.split["train"]]]
    counts = np.sort(np.bincount(train, minlength=len(data.songs)))
    share = counts[::-1].cumsum() / counts.sum()
    n = len(counts)
    assert share[n // 100 - 1] >= 0.05  # the top 1% hold at least 5x their share
    assert share[n // 10 - 1] >= 0.25
    gini = (2 * np.arange(1, n + 1) - n - 1) @ counts / (n * counts.sum())
    assert gini >= 0.35
    assert (counts == 0).mean() < 0.2  # but most songs are in some playlist


def test_tags_are_zipf_and_tied_to_genres(data: SynthData) -> None:
    p = data.playlists
    counts = np.bincount(p.tags)
    counts = np.sort(counts[counts > 0])[::-1]
    assert len(counts) >= 300
    assert counts[0] >= 20 * np.median(counts)
    # Playlists tagged with a genre's name hold far more songs of that genre.
    ballad = data.table.majors.index(0)  # GN0100 "Ballad" in the built-in table
    owner = np.repeat(np.arange(len(p)), np.diff(p.song_indptr))
    tagged = np.array(["Ballad" in p.tags_of(i) for i in range(len(p))])
    is_ballad = data.songs.majors[p.songs, 0] == ballad
    assert tagged.sum() >= 10
    assert is_ballad[tagged[owner]].mean() >= 1.5 * is_ballad.mean()


def test_titles_use_words_of_the_theme(data: SynthData) -> None:
    p = data.playlists
    shares_a_tag = [any(t in p.titles[i].split() for t in p.tags_of(i)) for i in range(len(p))]
    assert np.mean(shares_a_tag) >= 0.2
    charts = np.nonzero(kind_mask(data, "chart"))[0]
    years = [re.search(r"20[012]\d", p.titles[i]) for i in charts]
    assert np.mean([y is not None for y in years]) >= 0.8


def test_updt_date_follows_every_song(data_dir: Path) -> None:
    issue = np.array([int(s["issue_date"]) for s in read(data_dir / "song_meta.json")])
    updt_years = []
    for name in ("train.json", "val.json", "test.json"):
        for rec in read(data_dir / name):
            updt = int(rec["updt_date"][:10].replace("-", ""))
            assert updt >= issue[rec["songs"]].max(), rec["id"]
            updt_years.append(updt // 10000)
    years = np.array(updt_years)
    assert 2005 <= years.min() and years.max() == 2020
    assert 0.2 <= (years == 2020).mean() <= 0.6  # recent, but not only recent


# ---------------------------------------------------------------------------------------
# The structure the method exploits


def test_non_chart_playlists_are_genre_coherent(data: SynthData) -> None:
    major = data.songs.majors[:, 0]
    ra, rb = random_pairs(data)
    random_rate = (major[ra] == major[rb]).mean()
    a, b = pair_sample(data, ~kind_mask(data, "chart"))
    assert (major[a] == major[b]).mean() >= 1.5 * random_rate
    a, b = pair_sample(data, kind_mask(data, "genre"))
    assert (major[a] == major[b]).mean() >= 2.0 * random_rate


def test_taste_communities_join_songs_across_genres(data: SynthData) -> None:
    # Songs of different genres put together share a latent community (which no file
    # states) far more often than random songs of different genres: signal that genre
    # metadata does not carry.
    major, comm = data.songs.majors[:, 0], data.songs.community
    a, b = pair_sample(data, kind_mask(data, "taste"))
    cross = major[a] != major[b]
    ra, rb = random_pairs(data)
    random_cross = major[ra] != major[rb]
    assert cross.mean() >= 0.4
    assert (comm[a] == comm[b])[cross].mean() >= 3 * (comm[ra] == comm[rb])[random_cross].mean()


def test_chart_playlists_mix_genres_of_the_same_months(data: SynthData) -> None:
    p, s = data.playlists, data.songs
    major = s.majors[:, 0]

    def genres_per_playlist(kind: str) -> float:
        rows = [i for i in np.nonzero(kind_mask(data, kind))[0].tolist()
                if 20 <= len(p.songs_of(i)) <= 60]
        return float(np.mean([len(np.unique(major[p.songs_of(i)])) for i in rows]))

    assert genres_per_playlist("chart") >= 4
    assert genres_per_playlist("chart") > genres_per_playlist("genre")
    a, b = pair_sample(data, kind_mask(data, "chart"))
    ra, rb = random_pairs(data)
    chart_gap = np.median(np.abs(s.days[a] - s.days[b]))
    assert chart_gap <= 120  # days
    assert chart_gap <= 0.1 * np.median(np.abs(s.days[ra] - s.days[rb]))
    assert (major[a] != major[b]).mean() >= 0.5


# ---------------------------------------------------------------------------------------
# --genres


def write_genres(path: Path) -> dict[str, str]:
    table = {"GN0100": "Alpha", "GN0101": "Alpha all", "GN0102": "Alpha '90", "GN0103":
             "Alpha '10-", "GN0104": "Soft", "GN0200": "Beta", "GN0201": "Beta all",
             "GN0202": "Hard", "GN0300": "Gamma", "GN0301": "Gamma all", "GN0400": "Misc"}
    path.write_bytes(orjson.dumps(table))
    return table


def test_genres_option_uses_the_given_table(tmp_path: Path) -> None:
    table = write_genres(tmp_path / "genres.json")
    out = tmp_path / "out"
    assert main(["--scale", "tiny", "--seed", "1", "--out", str(out),
                 "--genres", str(tmp_path / "genres.json")]) == 0
    assert read(out / "genre_gn_all.json") == table
    songs = read(out / "song_meta.json")
    used = {c for s in songs for c in s["song_gn_gnr_basket"] + s["song_gn_dtl_gnr_basket"]}
    assert used <= set(table) and {"GN0100", "GN0200", "GN0300"} <= used
    for s in songs:
        year = int(s["issue_date"]) // 10000
        assert s["song_gn_gnr_basket"][0] != "GN0400"  # a major without details: second only
        if year and "GN0102" in s["song_gn_dtl_gnr_basket"]:
            assert 1990 <= year <= 1999
        if year and "GN0103" in s["song_gn_dtl_gnr_basket"]:
            assert year >= 2010
    ds = load_dataset(out)
    assert "Alpha" in ds.tags.index and "Hard" in ds.tags.index


@pytest.mark.parametrize("content, message", [
    (b'{"GN01": "x"}', "genre code 'GN01'"),
    (b'{"GN0100": "x", "GN0201": "y"}', "major genre GN0200 is missing"),
    (b'{"GN0100": "x"}', "no major genre"),
    (b'["GN0100"]', "expected an object"),
    (b'{"GN0100": ', "not valid JSON"),
])
def test_bad_genre_file_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           content: bytes, message: str) -> None:
    path = tmp_path / "genres.json"
    path.write_bytes(content)
    assert main(["--out", str(tmp_path / "out"), "--genres", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "genres.json" in err and message in err


@pytest.mark.skipif(not REAL_GENRES.exists(), reason="../shared genre table not present")
def test_real_genre_table_drives_the_genres() -> None:
    table = load_genre_table(REAL_GENRES)
    assert len(table.codes) == 254 and table.n_majors == 30
    data = generate("tiny", 2, table)
    s = data.songs
    assert data.table.mapping == read(REAL_GENRES)
    assert set(s.details[s.details >= 0].tolist()) <= set(range(len(table.codes)))
    years = s.days.astype("datetime64[D]").astype("datetime64[Y]").astype(int) + 1970
    for row, dets in enumerate(s.details.tolist()):  # era-named details match the song's era
        for d in dets:
            if d in table.era:
                first, last = table.era[d]
                assert first <= years[row] <= last, (table.codes[d], years[row])
