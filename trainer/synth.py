"""Generates synthetic data sets in the Melon Playlist Dataset format, shaped like the real data.

The five files (``song_meta.json``, ``genre_gn_all.json``, ``train.json``, ``val.json``,
``test.json``) use the real field names and types; ``val.json`` and ``test.json`` hold full
playlists (``trainer.split`` makes questions). Nothing is copied from the real data: the
default genre table has the real table's shape (30 major codes ``GNxx00``, 224 detailed
codes ``GNxxyy`` under them, with the same number of details per major) but names of its
own, and ``--genres FILE`` reads a real ``genre_gn_all.json`` at run time instead.

Generative model
----------------
*Artists* have a primary major genre (majors are Zipf-popular), a latent *taste community*
and a popularity (log-normal). There are about sqrt(n_songs)/3 communities, each tied to
2-4 major genres drawn independently, so a community cuts across genres: it stands for
the audiences that put, say, some ballads, some indie and some R&B together. An artist
joins a community that includes its genre; 10% of albums move to another community.

*Albums* (mostly singles and EPs, mean ~2.9 songs) belong to one artist and carry the
date, genres and mood their songs share. Album years follow the artist's career around a
centre year drawn from a distribution that doubles about every 6 years up to the data's
end (2020-04-23), so recent years are denser. Genres: 1 major (12% add a second) and 1-3
detailed genres of that major; detailed genres whose name names an era (``'90``,
``'60-'70``, ``'10-``) are picked only for albums of that era. Each album has a latent
mood (12 moods, a per-genre distribution) and 8% a season; 25% of songs redraw their mood.

*Songs*: 7% feature a second artist of the same community. A latent score (artist
popularity + album and song noise + recency) is ranked and turned into a Zipf-like weight
``(rank + r0) ** -0.9``, the bottom 9% damped: a few songs fill many playlists, most a few,
~15% none (in Melon ~615k of 707,989 songs are in train playlists). 2.5% of dates are written
``"00000000"`` and 1% ``"YYYY0000"``, both among the less popular songs. Song ids are a
random permutation, so ids say nothing about albums.

*Tags*: core tags per attribute (genre names, moods, seasons, activities, eras, charts,
generic words such as ``기분전환``, invented words per community) plus a long tail of
invented Korean-like and English compound words, each tied to one attribute. All tags
share one Zipf ranking; a playlist draws its tags from the pools of its theme's
attributes plus the generic pool. ~30k distinct tags appear at Melon scale.

*Playlists* each follow one latent theme, drawn as genre 24%, taste community 16%, mood
18%, activity 12%, season 6%, era 8%, chart 16%. A theme is a mixture of *parts*
(the songs of one major genre, detailed genre, genre x 5-year era, era, community, mood,
mood x genre, season or release month), and a song is drawn from a part in proportion to
its weight; most themes add the playlist owner's community (cross-genre taste) and the
global hit list. *Chart* playlists draw the hits (weight squared) released in a window of
consecutive months across all genres and are updated soon after it: the effect the
write-up saw, hit songs of the same months co-occurring whatever their genre. So
co-occurrence carries signal that metadata alone does not: communities and moods are
never written anywhere, and charts join songs of unrelated genres.
Lengths follow Melon: 1-200 songs (log-normal, mean ~46, median ~30) and 1-10 tags
(mean ~4); titles are made of words of the theme (its tags, genre, mood, season, month);
``like_cnt`` is log-normal. ``updt_date`` is drawn first (a third in the data's last months,
the rest thinning out back to 2005; a chart weeks after its window) and songs released
after it are redrawn, so it follows every song of the playlist and a release-date filter
helps, as on Melon. Everything is a function of ``--seed``.

Quirks
------
The real files are not clean, and a loader tried only on clean data fails on them. With
quirks (the default at ``melon`` scale, ``--quirks`` at any scale) the files carry the
real files' dirt on a few records, drawn from a stream of their own so that everything
else is unchanged: impossible issue dates (``"20105130"``: month 51; a September 31 or
February 30; a day 32; a day without a month), issue dates after the data's end (2021-2023),
null ``album_id``/``album_name``, artist name baskets of another length than their id
baskets, detailed genre codes that ``genre_gn_all.json`` lacks, a song repeated in a
playlist, empty playlist titles, and titles and tags with emoji and spaces. The dates
are as public analyses of the real ``song_meta.json`` document (a handful in 707,989
songs); the other rates are estimates of the same order (about one record in 10,000, tags
with emoji somewhat more), not measurements. Every quirk appears at least
:data:`QUIRK_RATES` ``minimum`` times at any scale, so small data sets carry each one.
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import logging
import math
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from trainer.dataset import DataError, read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scale:
    """How many songs and playlists (per output file) to generate."""

    n_songs: int
    n_train: int
    n_val: int
    n_test: int

    @property
    def n_playlists(self) -> int:
        return self.n_train + self.n_val + self.n_test


# Playlist counts keep the real train/val/test ratio (115,071 / 23,015 / 10,740).
SCALES: dict[str, Scale] = {
    "tiny": Scale(3_000, 1_160, 232, 108),
    "small": Scale(50_000, 7_732, 1_546, 722),
    "melon": Scale(707_989, 115_071, 23_015, 10_740),
}

DATA_END = np.datetime64("2020-04-23", "D")
FIRST_YEAR = 1950
_EPOCH_YEAR = 1970
BIN_YEARS = 5  # width of the era bins used by genre x era themes
N_BINS = (2020 - FIRST_YEAR) // BIN_YEARS + 1
N_MONTHS = (2020 - FIRST_YEAR) * 12 + 4  # release months up to April 2020

# Song popularity: weight (rank + POP_OFFSET * n) ** -POP_EXPONENT, and the last DORMANT
# share of songs (by score) weigh DORMANT_WEIGHT times less.
POP_EXPONENT = 0.9
POP_OFFSET = 2e-3
DORMANT = 0.09
DORMANT_WEIGHT = 0.03
CHART_POWER = 2.0  # charts draw with weight ** CHART_POWER: a month's hits, not its songs

# Playlist themes and their shares among playlists.
KINDS = ("genre", "taste", "mood", "activity", "season", "era", "chart")
KIND_SHARES = (0.24, 0.16, 0.18, 0.12, 0.06, 0.08, 0.16)

# ---------------------------------------------------------------------------------------
# Vocabularies (all invented or plain English / Korean words; none from the real data)

# The default genre table: 30 majors with as many details each as the real table has.
_GENRE_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Ballad", ("All Ballad", "'80s", "'90s", "'00s", "'10s-")),
    ("Dance", ("All Dance", "'80s", "'90s", "'00s", "'10s-")),
    ("Rap/Hip-hop", ("All Hip-hop", "Rap Style", "Vocal Style", "Underground", "By Era")),
    ("R&B/Soul", ("All R&B", "Urban", "Classic R&B")),
    ("Indie", ("All Indie", "Indie Folk", "Indie Rock", "Indie Electronic", "Indie Hip-hop",
               "Indie Ballad", "Indie '90s", "Indie '00s", "Indie '10s-")),
    ("Rock/Metal", ("All Rock", "'70s", "'80s", "'90s", "'00s", "'10s-")),
    ("Trot", ("All Trot", "New Trot", "Legend Trot", "Beat Trot", "Trot Medley",
              "Trot '60s-'70s", "Trot '80s-'90s", "Trot '00s-", "Adult Pop '80s-'90s",
              "Adult Pop '00s-")),
    ("Folk/Blues", ("All Folk", "Folk '60s-'70s", "Folk '80s-'90s", "Folk '00s", "Folk '10s-")),
    ("Pop", ("All Pop", "Alt Pop", "Oldies", "Contemporary Pop", "Teen Pop", "Euro Pop",
             "Dream Pop", "Synth Pop")),
    ("Electronica", ("All Electronica", "House", "Techno", "Trance", "Drum & Bass", "Dubstep",
                     "Ambient", "Chillout", "Big Beat", "Breakbeat", "Electro", "Downtempo",
                     "Trip-hop", "Future Bass")),
    ("World Rock", ("All World Rock", "Alternative", "Hard Rock", "Modern Rock", "Punk",
                    "Britpop", "Garage", "Psychedelic", "Prog Rock")),
    ("Metal", ("All Metal", "Heavy Metal", "Thrash", "Death Metal", "Nu Metal", "Metalcore",
               "Power Metal", "Doom", "Gothic Metal")),
    ("Soul/Funk", ("All Soul", "Funk", "Neo Soul", "Gospel Soul", "Motown", "Disco",
                   "Quiet Storm", "Contemporary R&B")),
    ("World Hip-hop", ("All World Hip-hop", "East Coast", "West Coast", "Trap", "Old School",
                       "Alt Hip-hop", "Southern")),
    ("OST", ("All OST", "Drama", "Film", "Musical", "Animation", "Game", "Local Film",
             "Foreign Film", "Documentary", "Web Drama")),
    ("Classical", ("All Classical", "Symphony", "Concerto", "Chamber", "Solo Piano", "Opera",
                   "Choral", "Baroque", "Romantic Era", "Modern Classical", "Ballet", "Sacred",
                   "Crossover Classical", "Orchestral Pops", "Lieder")),
    ("Jazz", ("All Jazz", "Swing", "Bebop", "Cool Jazz", "Fusion", "Vocal Jazz", "Latin Jazz",
              "Free Jazz", "Smooth Jazz", "Big Band")),
    ("New Age", ("All New Age", "New Age Piano", "Meditation", "Nature Sounds", "Healing Music",
                 "Guitar Instrumental", "Strings")),
    ("J-Pop", ("All J-Pop", "J-Rock", "J-Idol", "Anison", "City Pop", "Visual Kei", "J-Ballad",
               "J-Hiphop", "J-Indie", "J-Electronic", "Enka", "Shibuya-kei")),
    ("World Music", ("All World Music", "Latin", "Reggae", "Afrobeat", "Celtic", "Chanson",
                     "Fado", "Bossa Nova", "Flamenco", "Fusion Traditional")),
    ("CCM", ("All CCM", "Worship", "Praise", "Gospel", "Hymns", "Christian Rock",
             "Christian Hip-hop", "Christian Ballad", "Choir", "Kids CCM")),
    ("Kids", ("All Kids", "Nursery Rhymes", "Lullabies", "Cartoon Songs", "Learning Songs",
              "English Songs", "Fairy Tales", "Dance Along", "Sing Along", "Toddler",
              "Classics for Kids", "Baby Sleep", "Kids Pop", "Holiday Kids", "Stories",
              "Phonics")),
    ("Chant", ("All Chant", "Temple Chant")),
    ("Traditional", ("All Traditional", "Pansori", "Minyo", "Gugak Fusion", "Court Music",
                     "Folk Instrumental")),
    ("Instrumental", ("All Instrumental", "Piano Works", "Guitar Works", "String Works",
                      "Lo-fi Beats", "Study Beats")),
    ("Country", ("All Country", "Bluegrass", "Americana", "Country Pop")),
    ("Blues", ("All Blues", "Delta Blues", "Chicago Blues", "Blues Rock")),
    ("Idol", ("All Idol", "Boy Group", "Girl Group", "Solo Idol", "Project Group", "Unit")),
    ("Soundscape", ("All Soundscape", "ASMR", "White Noise")),
    ("Various", ()),
)

_MOODS: tuple[tuple[str, ...], ...] = (
    ("calm", "잔잔한", "chill", "mellow"),
    ("sad", "슬픔", "tears", "melancholy"),
    ("romantic", "사랑", "love", "설렘"),
    ("bright", "신나는", "happy", "sunny"),
    ("energetic", "에너지", "upbeat", "hype"),
    ("dreamy", "몽환", "dreamy", "floating"),
    ("groovy", "그루브", "groove", "funky"),
    ("nostalgic", "추억", "memories", "retro"),
    ("lonely", "외로움", "alone", "solitude"),
    ("hopeful", "위로", "comfort", "cheerup"),
    ("intense", "강렬한", "heavy", "loud"),
    ("cozy", "포근한", "warm", "soft"),
)
_SEASONS: tuple[tuple[str, ...], ...] = (  # season 1..4
    ("spring", "봄", "cherryblossom", "벚꽃"),
    ("summer", "여름", "beach", "바다"),
    ("autumn", "가을", "fall", "낙엽"),
    ("winter", "겨울", "christmas", "snow"),
)
_SEASON_MOODS = ((3, 2), (4, 6, 3), (7, 8, 0), (11, 1, 2))
# Activities: (tags, moods whose songs fit the activity).
_ACTIVITIES: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...] = (
    (("drive", "드라이브", "roadtrip"), (4, 3, 6)),
    (("workout", "운동", "gym", "running"), (4, 10)),
    (("study", "공부", "focus", "reading"), (0, 5)),
    (("sleep", "잠잘때", "bedtime"), (0, 5, 11)),
    (("cafe", "카페", "coffee"), (0, 11, 2)),
    (("party", "파티", "club"), (6, 4)),
    (("travel", "여행", "trip"), (3, 9)),
    (("rain", "비", "rainyday"), (1, 8, 0)),
    (("dawn", "새벽", "latenight"), (8, 5, 1)),
    (("breakup", "이별", "heartbreak"), (1, 8)),
    (("healing", "힐링", "휴식", "rest"), (0, 9)),
    (("commute", "출근길", "morning"), (3, 9, 4)),
)
_GENERAL_TAGS = ("기분전환", "감성", "moodboost", "favorites", "daily", "playlist", "kpop",
                 "newmusic", "allday", "취향저격")
_CHART_TAGS = ("chart", "hits", "top100", "최신곡", "인기곡", "hot", "bestof", "latest")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_FILLERS = ("songs", "playlist", "mix", "collection", "vibes", "for you", "best", "picks",
            "tracks", "노래", "모음", "플레이리스트", "듣기 좋은", "노래 모음", "감성 충전")
_ENGLISH = ("love", "night", "day", "summer", "rain", "star", "moon", "heart", "blue", "road",
            "dream", "light", "city", "sea", "wind", "fire", "snow", "flower", "sky", "time",
            "home", "song", "dance", "story", "letter", "window", "shadow", "river", "ocean",
            "paper", "glass", "gold", "silver", "echo", "wave", "spark", "midnight", "morning",
            "coffee", "neon", "velvet", "cloud", "garden", "secret", "promise", "memory",
            "winter", "spring", "autumn", "youth", "forever", "again", "alone", "together",
            "stay", "run", "fly", "fall", "shine", "hold", "miss", "lost", "found", "wild",
            "sweet", "bitter", "slow", "fast", "little", "young", "old", "first", "last",
            "hello", "goodbye", "tonight", "someday", "always", "never", "maybe", "baby",
            "sunset", "sunrise", "ribbon", "candle", "mirror", "train", "station", "island",
            "planet", "comet", "orbit", "signal", "radio", "melody", "rhythm", "tempo",
            "chorus", "piano", "guitar", "violin", "drum", "bloom", "petal", "breeze")
# Hangul jamo indices that make pronounceable syllables (initial, medial, final).
_INITIALS = (0, 2, 3, 5, 6, 7, 9, 11, 12, 14, 15, 16, 17, 18)
_MEDIALS = (0, 1, 4, 5, 8, 12, 13, 17, 18, 20)
_FINALS = (0, 0, 0, 0, 4, 8, 16, 17, 21)


def _hangul_word(prng: random.Random, n_syllables: int) -> str:
    return "".join(
        chr(0xAC00 + (prng.choice(_INITIALS) * 21 + prng.choice(_MEDIALS)) * 28
            + prng.choice(_FINALS))
        for _ in range(n_syllables))


def _word_bank(prng: random.Random, n_invented: int) -> list[str]:
    """English words plus invented Korean-like words, all distinct."""
    words = dict.fromkeys(_ENGLISH)
    while len(words) < len(_ENGLISH) + n_invented:
        words.setdefault(_hangul_word(prng, prng.choice((1, 2, 2, 2, 3))))
    return list(words)


# ---------------------------------------------------------------------------------------
# Genre table


@dataclass(frozen=True)
class GenreTable:
    """A ``genre_gn_all.json`` table split into majors and the details under them."""

    mapping: dict[str, str]
    codes: list[str]  # all codes, file order
    majors: list[int]  # code index of each major
    details: list[list[int]]  # per major (position in ``majors``): its detail code indices
    era: dict[int, tuple[int, int]]  # detail code index -> (first, last) year it names

    @property
    def n_majors(self) -> int:
        return len(self.majors)


_CODE = re.compile(r"^GN\d{4}$")
_ERA = re.compile(r"'(\d\d)")


def default_genres() -> dict[str, str]:
    """The built-in genre table: the real table's code structure, names of our own."""
    table: dict[str, str] = {}
    for i, (major, details) in enumerate(_GENRE_TABLE, start=1):
        table[f"GN{i:02d}00"] = major
        for j, name in enumerate(details, start=1):
            table[f"GN{i:02d}{j:02d}"] = name
    return table


def _era_of(name: str) -> tuple[int, int] | None:
    """Years a detailed genre's name covers: ``'90`` -> 1990-1999, ``'10-`` -> 2010 on."""
    decades = [1900 + d if d >= 30 else 2000 + d for d in map(int, _ERA.findall(name))]
    if not decades:
        return None
    last = 2100 if name.rstrip().endswith("-") else max(decades) + 9
    return min(decades), last


def genre_table(mapping: dict[str, Any], source: str | Path = "genre_gn_all.json") -> GenreTable:
    """Check a ``{code: name}`` table and index its majors and details.

    Parameters
    ----------
    mapping
        Codes ``GNxx00`` (major) and ``GNxxyy`` (detailed, under ``GNxx00``) to names.
    source
        File name used in error messages.

    Raises
    ------
    DataError
        A code or name is malformed, a detail has no major, or no major has details.
    """
    if not isinstance(mapping, dict):
        raise DataError(source, f"expected an object {{code: name}}, got {type(mapping).__name__}")
    codes = list(mapping)
    position = {c: i for i, c in enumerate(codes)}
    majors: list[int] = []
    major_pos: dict[str, int] = {}
    for code in codes:
        name = mapping[code]
        if not _CODE.match(code):
            raise DataError(source, f"genre code {code!r}: expected 'GN' and 4 digits")
        if not isinstance(name, str) or not name.strip():
            raise DataError(source, f"genre {code!r}: expected a non-empty name, got {name!r}")
        if code.endswith("00"):
            major_pos[code[:4]] = len(majors)
            majors.append(position[code])
    details: list[list[int]] = [[] for _ in majors]
    era: dict[int, tuple[int, int]] = {}
    for code in codes:
        if code.endswith("00"):
            continue
        if code[:4] not in major_pos:
            raise DataError(source, f"genre {code!r}: its major genre {code[:4]}00 is missing")
        details[major_pos[code[:4]]].append(position[code])
        span = _era_of(mapping[code])
        if span is not None:
            era[position[code]] = span
    if not any(details):
        raise DataError(source, "no major genre (GNxx00) has detailed genres under it")
    return GenreTable(dict(mapping), codes, majors, details, era)


def load_genre_table(path: str | Path) -> GenreTable:
    """Read and check a ``genre_gn_all.json`` file (see :func:`genre_table`)."""
    path = Path(path)
    return genre_table(read_json(path), path)


# ---------------------------------------------------------------------------------------
# Weighted draws within groups


class _Parts:
    """Items grouped by a key, with cumulative weights for vectorised draws within a group."""

    def __init__(self, keys: np.ndarray, weights: np.ndarray, n_keys: int) -> None:
        self.order = np.argsort(keys, kind="stable").astype(np.int64)
        self.cum = np.zeros(len(keys) + 1)
        np.cumsum(weights[self.order], out=self.cum[1:])
        bounds = np.searchsorted(keys[self.order], np.arange(n_keys + 1))
        self.start, self.end = bounds[:-1], bounds[1:]
        self.total = self.cum[self.end] - self.cum[self.start]

    def draw(self, parts: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per entry of ``parts`` (each with positive total), weighted."""
        lo, hi = self.cum[self.start[parts]], self.cum[self.end[parts]]
        pos = np.searchsorted(self.cum, lo + u * (hi - lo), side="right") - 1
        return self.order[np.clip(pos, self.start[parts], self.end[parts] - 1)]


@dataclass
class _Mixture:
    """Per-owner mixtures of parts: component ``c`` belongs to owner ``owner[c]``."""

    owner: list[int]
    index: list[int]
    part: list[int]
    weight: list[float]

    @staticmethod
    def empty() -> _Mixture:
        return _Mixture([], [], [], [])

    def add(self, owner: int, index: int, part: int, weight: float) -> None:
        self.owner.append(owner)
        self.index.append(index)
        self.part.append(part)
        self.weight.append(weight)


def _draw_mixture(parts: Sequence[_Parts], owner: np.ndarray, index: np.ndarray,
                  part: np.ndarray, weight: np.ndarray, n_draws: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_draws[o]`` items for each owner ``o`` from its mixture of parts.

    Components must be sorted by owner, have positive weights where used, and every owner
    with draws needs at least one component. Returns (owner, item) per draw, owner-sorted.
    """
    n_owners = len(n_draws)
    total = np.bincount(owner, weight, minlength=n_owners)
    within = np.cumsum(weight / total[owner])
    first = np.searchsorted(owner, np.arange(n_owners))
    has = np.bincount(owner, minlength=n_owners) > 0
    offset = np.zeros(n_owners)
    offset[has] = within[first[has]] - (weight / total[owner])[first[has]]
    # Owner o's components tile [o, o + 1); the last one ends at exactly o + 1.
    ends = owner + within - offset[owner]
    last = np.r_[owner[1:] != owner[:-1], True]
    ends[last] = owner[last] + 1.0
    draw_owner = np.repeat(np.arange(n_owners), n_draws)
    comp = np.searchsorted(ends, draw_owner + rng.random(len(draw_owner)), side="right")
    comp = np.minimum(comp, len(ends) - 1)
    items = np.empty(len(draw_owner), dtype=np.int64)
    u = rng.random(len(draw_owner))
    comp_index = index[comp]
    for i, p in enumerate(parts):
        mask = comp_index == i
        if mask.any():
            items[mask] = p.draw(part[comp[mask]], u[mask])
    return draw_owner, items


def _first_unique(owner: np.ndarray, items: np.ndarray, n_items: int, limit: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated (owner, item) pairs keeping draw order, then keep ``limit[o]`` each."""
    _, first = np.unique(owner * n_items + items, return_index=True)
    first.sort()
    owner, items = owner[first], items[first]
    start = np.searchsorted(owner, np.arange(len(limit)))
    rank = np.arange(len(owner)) - start[owner]
    keep = rank < limit[owner]
    return owner[keep], items[keep]


# ---------------------------------------------------------------------------------------
# Songs


def _days(dates: np.ndarray | np.datetime64) -> np.ndarray:
    return dates.astype("datetime64[D]").astype(np.int64)


def _ymd(days: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 -> YYYYMMDD ints."""
    d = days.astype("datetime64[D]")
    y = d.astype("datetime64[Y]").astype(np.int64) + _EPOCH_YEAR
    m = d.astype("datetime64[M]").astype(np.int64) % 12 + 1
    day = (d - d.astype("datetime64[M]")).astype(np.int64) + 1
    return y * 10000 + m * 100 + day


def _year(days: np.ndarray) -> np.ndarray:
    return days.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + _EPOCH_YEAR


def _month_index(days: np.ndarray) -> np.ndarray:
    """Months since January of FIRST_YEAR."""
    months = days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
    return months - (FIRST_YEAR - _EPOCH_YEAR) * 12


@dataclass
class SynthSongs:
    """Generated songs, row ``i`` = song id ``i``, with the latent attributes that shaped them."""

    names: list[str]
    album_ids: np.ndarray  # int64
    album_names: list[str]  # per song
    artists: np.ndarray  # int64 (n, 3) artist positions, -1 padded
    artist_ids: np.ndarray  # int64 per artist position
    artist_names: list[str]  # per artist position
    majors: np.ndarray  # int64 (n, 2) major positions (GenreTable.majors), -1 padded
    details: np.ndarray  # int64 (n, 3) detail code indices, -1 padded
    issue_dates: np.ndarray  # int64 YYYYMMDD as written (0 unknown, YYYY0000 partial)
    days: np.ndarray  # int64 true release day (days since 1970), known or not
    weight: np.ndarray  # float64 popularity weight
    mood: np.ndarray  # int64 latent mood
    season: np.ndarray  # int64 latent season, 0 = none
    community: np.ndarray  # int64 latent taste community

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class _World:
    """Song-side facts the playlist themes need."""

    songs: SynthSongs
    table: GenreTable
    n_communities: int
    community_majors: list[list[int]]
    communities_of_major: list[list[int]]
    community_size: np.ndarray
    mood_given_major: np.ndarray  # (n_majors, n_moods)


def _pick_names(rng: np.random.Generator, bank: Sequence[str], n: int, max_words: int,
                title_case: bool = False) -> list[str]:
    """``n`` names of 1..max_words words from ``bank``."""
    k = rng.integers(1, max_words + 1, n)
    words = rng.integers(0, len(bank), (n, max_words))
    names: list[str] = [""] * n
    src = [w.title() if title_case else w for w in bank]
    for width in range(1, max_words + 1):
        rows = np.nonzero(k == width)[0]
        cols = [words[rows, j].tolist() for j in range(width)]
        for r, combo in zip(rows.tolist(), zip(*cols, strict=True), strict=True):
            names[r] = " ".join(src[w] for w in combo)
    return names


def _categorical(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One draw per entry of ``rows`` from the distribution ``probs[row]``."""
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    u = rng.random(len(rows))
    return (u[:, None] > cum[rows]).sum(axis=1)


def _make_songs(scale: Scale, table: GenreTable, rng: np.random.Generator,
                prng: random.Random) -> _World:
    n = scale.n_songs
    n_majors = table.n_majors
    has_details = np.array([len(d) > 0 for d in table.details])
    # Major genres: Zipf-like shares in table order (the real table lists ballad, dance
    # and hip-hop first), jittered so that the order is not exact.
    share = (np.arange(1, n_majors + 1) ** -0.9) * rng.lognormal(0.0, 0.4, n_majors)
    primary_share = np.where(has_details, share, 0.0)
    primary_share /= primary_share.sum()

    # Taste communities: each spans 2-4 majors drawn independently of each other.
    n_comm = int(np.clip(round(math.sqrt(n) / 3), 12, 400))
    comm_size = rng.permutation(np.arange(1, n_comm + 1) ** -0.7)
    community_majors: list[list[int]] = []
    for _ in range(n_comm):
        k = min(n_majors, 2 + int(rng.integers(0, 3)))
        first = int(rng.choice(n_majors, p=primary_share))
        others = rng.choice(n_majors, size=k, replace=False, p=share / share.sum()).tolist()
        community_majors.append(list(dict.fromkeys([first, *others]))[:k])
    for m in np.nonzero(has_details)[0].tolist():  # every usable major has a community
        if not any(m in cm for cm in community_majors):
            community_majors[int(rng.integers(n_comm))].append(m)
    comms_of_major: list[list[int]] = [[] for _ in range(n_majors)]
    for c, cm in enumerate(community_majors):
        for m in cm:
            comms_of_major[m].append(c)

    # Artists.
    n_artists = max(20, round(n / 6.6))
    a_major = rng.choice(n_majors, size=n_artists, p=primary_share)
    a_comm = np.empty(n_artists, dtype=np.int64)
    for m in range(n_majors):
        rows = np.nonzero(a_major == m)[0]
        if len(rows):
            cands = np.array(comms_of_major[m])
            p = comm_size[cands] / comm_size[cands].sum()
            a_comm[rows] = cands[rng.choice(len(cands), size=len(rows), p=p)]
    a_pop = rng.lognormal(0.0, 1.0, n_artists)
    years = np.arange(FIRST_YEAR, 2021)
    year_p = np.exp((years - 2020) / 9.0)
    a_centre = rng.choice(years, size=n_artists, p=year_p / year_p.sum()) + rng.random(n_artists)
    a_spread = 1.0 + rng.exponential(2.5, n_artists)
    a_ids = np.cumsum(rng.integers(1, 60, n_artists)) + 100

    # Albums: singles, EPs and LPs; the last album is cut to hit n songs exactly.
    kind = rng.choice(3, size=n, p=(0.65, 0.27, 0.08))
    sizes = np.where(kind == 0, rng.integers(1, 3, n),
                     np.where(kind == 1, rng.integers(3, 6, n), rng.integers(6, 15, n)))
    n_albums = int(np.searchsorted(np.cumsum(sizes), n)) + 1
    sizes = sizes[:n_albums]
    sizes[-1] -= sizes.sum() - n
    productivity = rng.lognormal(0.0, 0.9, n_artists) * (0.5 + a_pop / a_pop.mean())
    al_artist = rng.choice(n_artists, size=n_albums, p=productivity / productivity.sum())
    end_day = int(_days(DATA_END))
    first_day = int(_days(np.datetime64(f"{FIRST_YEAR}-01-01")))
    al_year = a_centre[al_artist] + rng.normal(0.0, 1.0, n_albums) * a_spread[al_artist]
    al_day = _days(np.datetime64("1970-01-01")) + (al_year - _EPOCH_YEAR) * 365.25
    al_day = al_day.astype(np.int64)
    al_day = np.where(al_day > end_day, 2 * end_day - al_day, al_day)  # reflect, no pile-up
    al_day = np.clip(al_day, first_day, end_day)
    al_major = a_major[al_artist].copy()
    al_comm = a_comm[al_artist].copy()
    moved = rng.random(n_albums) < 0.10
    al_comm[moved] = rng.choice(n_comm, size=int(moved.sum()), p=comm_size / comm_size.sum())
    al_second = np.full(n_albums, -1, dtype=np.int64)
    al_details = np.full((n_albums, 3), -1, dtype=np.int64)
    al_year_int = _year(al_day)
    # Details: era-named ones only for albums of that era, the rest Zipf in table order.
    plain = [[d for d in ds if d not in table.era] for ds in table.details]
    plain_w = [[1.0 / (j + 1) for j in range(len(p))] for p in plain]
    n_det = rng.choice((1, 2, 3), size=n_albums, p=(0.45, 0.4, 0.15)).tolist()
    second = (rng.random(n_albums) < 0.12).tolist()
    for a in range(n_albums):
        m = int(al_major[a])
        year = int(al_year_int[a])
        picks: list[int] = []
        eras = [d for d in table.details[m] if d in table.era
                and table.era[d][0] <= year <= table.era[d][1]]
        if eras and prng.random() < 0.75:
            picks.append(prng.choice(eras))
        pool, weights = list(plain[m]), list(plain_w[m])
        while len(picks) < n_det[a] and pool:
            j = prng.choices(range(len(pool)), weights)[0]
            picks.append(pool.pop(j))
            weights.pop(j)
        if not picks:  # a major whose details all name other eras
            picks.append(prng.choice(table.details[m]))
        al_details[a, : len(picks)] = picks
        if second[a]:
            cm = [x for x in community_majors[int(al_comm[a])] if x != m]
            if cm:
                al_second[a] = prng.choice(cm)
    al_mood = _categorical(rng, rng.dirichlet(np.full(len(_MOODS), 0.6), n_majors), al_major)
    mood_given_major = np.zeros((n_majors, len(_MOODS)))
    np.add.at(mood_given_major, (al_major, al_mood), sizes)
    mood_given_major += 0.01
    mood_given_major /= mood_given_major.sum(axis=1, keepdims=True)
    al_season = np.where(rng.random(n_albums) < 0.08, rng.integers(1, 5, n_albums), 0)
    al_noise = rng.normal(0.0, 0.7, n_albums)
    # Album ids grow with release date, with gaps, as catalogue ids do.
    al_ids = np.empty(n_albums, dtype=np.int64)
    al_ids[np.argsort(al_day, kind="stable")] = np.cumsum(rng.integers(1, 40, n_albums)) + 1000

    # Songs in album order, permuted at the end so that ids carry no structure.
    album = np.repeat(np.arange(n_albums), sizes)
    days = al_day[album]
    mood = al_mood[album].copy()
    redraw = rng.random(n) < 0.25
    mood[redraw] = _categorical(rng, mood_given_major, al_major[album[redraw]])
    season = np.where(rng.random(n) < 0.6, al_season[album], 0)
    lone = (season == 0) & (rng.random(n) < 0.03)
    season[lone] = rng.integers(1, 5, int(lone.sum()))
    score = (np.log(a_pop[al_artist[album]]) + al_noise[album] + rng.normal(0.0, 0.8, n)
             + 0.06 * (_year(days) - 2020))
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-score, kind="stable")] = np.arange(n)
    weight = (rank + max(1.0, POP_OFFSET * n)) ** -POP_EXPONENT
    # The bottom of the catalogue is dormant: Melon lists ~93k songs no playlist holds.
    weight[rank >= round((1.0 - DORMANT) * n)] *= DORMANT_WEIGHT

    artists = np.full((n, 3), -1, dtype=np.int64)
    artists[:, 0] = al_artist[album]
    by_comm = np.argsort(a_comm, kind="stable")
    comm_start = np.searchsorted(a_comm[by_comm], np.arange(n_comm + 1))
    song_comm = al_comm[album]
    for col, p in ((1, 0.07), (2, 0.015)):
        feat = np.nonzero((rng.random(n) < p) & (artists[:, col - 1] >= 0))[0]
        lo, hi = comm_start[song_comm[feat]], comm_start[song_comm[feat] + 1]
        ok = hi > lo
        feat, lo, hi = feat[ok], lo[ok], hi[ok]
        guest = by_comm[lo + (rng.random(len(feat)) * (hi - lo)).astype(np.int64)]
        fresh = (guest != artists[feat, 0]) & (guest != artists[feat, 1])
        artists[feat[fresh], col] = guest[fresh]

    issue = _ymd(days)
    obscure = np.nonzero(rank >= n // 5)[0]
    hidden = rng.choice(obscure, size=min(len(obscure), round(0.035 * n)), replace=False)
    partial, unknown = hidden[: round(0.01 * n)], hidden[round(0.01 * n):]
    issue[partial] = issue[partial] // 10000 * 10000
    issue[unknown] = 0

    majors = np.stack([al_major[album], al_second[album]], axis=1)
    details = al_details[album]

    # A quarter of the words in names are English, the rest invented Korean-like words.
    invented = _word_bank(prng, 3000)
    bank = invented + list(_ENGLISH) * 6
    names = _pick_names(rng, bank, n, 3)
    seasonal = np.nonzero((season > 0) & (rng.random(n) < 0.5))[0]
    for r in seasonal.tolist():  # seasonal songs say so in their title now and then
        names[r] = f"{names[r]} {_SEASONS[season[r] - 1][prng.choice((0, 1))]}"
    album_name_list = _pick_names(rng, bank, n_albums, 3, title_case=True)
    artist_names = _pick_names(rng, bank, n_artists, 2, title_case=True)

    perm = rng.permutation(n)
    songs = SynthSongs(
        names=[names[i] for i in perm.tolist()],
        album_ids=al_ids[album][perm],
        album_names=[album_name_list[a] for a in album[perm].tolist()],
        artists=artists[perm],
        artist_ids=a_ids,
        artist_names=artist_names,
        majors=majors[perm],
        details=details[perm],
        issue_dates=issue[perm],
        days=days[perm],
        weight=weight[perm],
        mood=mood[perm],
        season=season[perm],
        community=song_comm[perm],
    )
    return _World(songs, table, n_comm, community_majors, comms_of_major, comm_size,
                  mood_given_major)


# ---------------------------------------------------------------------------------------
# Tags


@dataclass
class _Tags:
    names: list[str]
    key: np.ndarray  # attribute key of each tag
    weight: np.ndarray  # global Zipf weight
    core: list[list[str]]  # per key: its core tags, for titles
    k_mood: int
    k_season: int  # key of season 1 (seasons are 1..4)
    k_activity: int
    k_era: int  # key of the 1950s; decade d -> k_era + (d - 1950) // 10
    k_chart: int
    k_general: int
    k_community: int

    @property
    def n_keys(self) -> int:
        return len(self.core)


def _tag_form(name: str) -> str:
    """Tags carry no spaces (as on Melon): 'Drum & Bass' -> 'Drum&Bass'."""
    return "".join(name.split())


def _make_tags(world: _World, n_tail: int, rng: np.random.Generator,
               prng: random.Random) -> _Tags:
    table = world.table
    core: list[list[str]] = []
    for m, code in enumerate(table.majors):
        words = [_tag_form(w) for w in table.mapping[table.codes[code]].split("/")]
        # The first detail is the catch-all ("all subgenres"); era names make poor tags.
        words += [_tag_form(table.mapping[table.codes[d]]) for d in table.details[m][1:]
                  if d not in table.era]
        core.append(words)
    k_mood = len(core)
    core += [list(m) for m in _MOODS]
    k_season = len(core)
    core += [list(s) for s in _SEASONS]
    k_activity = len(core)
    core += [list(a) for a, _ in _ACTIVITIES]
    k_era = len(core)
    for decade in range(FIRST_YEAR, 2030, 10):
        short = f"{decade % 100:02d}" if decade < 2000 else str(decade)
        core.append([f"{short}s", f"{short}년대"] + (["oldies"] if decade < 1980 else []))
    k_chart = len(core)
    core.append(list(_CHART_TAGS))
    k_general = len(core)
    core.append(list(_GENERAL_TAGS))
    k_community = len(core)
    bank = _word_bank(prng, 300)
    for _ in range(world.n_communities):
        core.append([prng.choice(bank) + prng.choice(bank) for _ in range(prng.randint(1, 3))])

    seen: dict[str, int] = {}
    keys: list[int] = []
    for k, words in enumerate(core):
        kept = []
        for w in words:
            if w and w not in seen:
                seen[w] = len(keys)
                keys.append(k)
                kept.append(w)
        core[k] = kept or words[:1]
    n_core = len(keys)
    # Long tail: invented words and compounds, 30% generic, the rest spread over keys.
    eng = list(_ENGLISH) + [w for ws in core for w in ws if w.isascii()]
    tail_keys = np.where(rng.random(n_tail) < 0.3, k_general,
                         rng.integers(0, len(core), n_tail)).tolist()
    made = 0
    while made < n_tail:
        r = prng.random()
        if r < 0.45:
            word = _hangul_word(prng, prng.choice((2, 2, 3, 3, 4)))
        elif r < 0.9:
            word = prng.choice(eng).lower() + prng.choice(eng).lower()
        else:
            word = prng.choice(eng).lower() + "_" + _hangul_word(prng, 2)
        if word not in seen:
            seen[word] = len(keys)
            keys.append(tail_keys[made])
            made += 1
    names = list(seen)
    # One Zipf ranking over all tags: generic and mood tags first, other core tags next.
    head = rng.permutation(n_core) + np.where(
        np.isin(np.array(keys[:n_core]), [k_general, *range(k_mood, k_season)]), 0, n_core)
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(head, kind="stable")] = np.arange(n_core)
    rank[n_core:] = n_core + rng.permutation(n_tail)
    weight = (rank + 1.0) ** -1.0
    return _Tags(names, np.array(keys, dtype=np.int64), weight, core, k_mood, k_season,
                 k_activity, k_era, k_chart, k_general, k_community)


# ---------------------------------------------------------------------------------------
# Playlists

# Part indices (the first argument of _Mixture.add for songs).
_ALL, _MAJOR, _DETAIL, _MAJOR_BIN, _BIN, _COMMUNITY, _MOOD, _MOOD_MAJOR, _SEASON, _MONTH = range(10)


def _song_parts(world: _World) -> list[_Parts]:
    s, table = world.songs, world.table
    n_majors, n_moods = table.n_majors, len(_MOODS)
    w = s.weight / s.weight.max()
    major = s.majors[:, 0]
    bins = np.clip((_year(s.days) - FIRST_YEAR) // BIN_YEARS, 0, N_BINS - 1)
    month = np.clip(_month_index(s.days), 0, N_MONTHS - 1)
    return [
        _Parts(np.zeros(len(s), dtype=np.int64), w, 1),
        _Parts(major, w, n_majors),
        _Parts(s.details[:, 0], w, len(table.codes)),
        _Parts(major * N_BINS + bins, w, n_majors * N_BINS),
        _Parts(bins, w, N_BINS),
        _Parts(s.community, w, world.n_communities),
        _Parts(s.mood, w, n_moods),
        _Parts(s.mood * n_majors + major, w, n_moods * n_majors),
        _Parts(s.season, w, 5),
        # Charts are about hits: squaring the weight concentrates a month on its top songs.
        _Parts(month, w ** CHART_POWER, N_MONTHS),
    ]


@dataclass
class SynthPlaylists:
    """Generated playlists (all three files, in order), with their latent theme."""

    ids: np.ndarray  # int64
    titles: list[str]
    song_indptr: np.ndarray  # int64
    songs: np.ndarray  # int64 song ids
    tag_indptr: np.ndarray
    tags: np.ndarray  # indices into tag_names
    tag_names: list[str]
    like_cnt: np.ndarray
    updt_dates: list[str]  # "YYYY-MM-DD hh:mm:ss.000"
    kind: np.ndarray  # index into KINDS

    def __len__(self) -> int:
        return len(self.ids)

    def songs_of(self, i: int) -> np.ndarray:
        return self.songs[self.song_indptr[i]: self.song_indptr[i + 1]]

    def tags_of(self, i: int) -> list[str]:
        return [self.tag_names[t] for t in self.tags[self.tag_indptr[i]: self.tag_indptr[i + 1]]]


class _Themes:
    """Builds each playlist's song mixture, tag mixture and title from its theme."""

    def __init__(self, world: _World, tags: _Tags, parts: list[_Parts], prng: random.Random,
                 month_counts: np.ndarray) -> None:
        self.world, self.tags, self.parts, self.prng = world, tags, parts, prng
        self.month_counts = month_counts
        # Python lists: this runs per playlist, where numpy scalar access is slow.
        self.nonempty: list[list[bool]] = [(p.total > 0).tolist() for p in parts]
        table = world.table
        major_total = parts[_MAJOR].total
        self.majors = [m for m in range(table.n_majors) if major_total[m] > 0]
        self.major_w = [float(major_total[m]) ** 0.5 for m in self.majors]
        self.comms = [c for c in range(world.n_communities) if parts[_COMMUNITY].total[c] > 0]
        self.comm_w = [float(parts[_COMMUNITY].total[c]) ** 0.5 for c in self.comms]
        self.moods = [m for m in range(len(_MOODS)) if parts[_MOOD].total[m] > 0]
        self.mood_w = [float(parts[_MOOD].total[m]) ** 0.5 for m in self.moods]
        self.bins = [b for b in range(N_BINS) if parts[_BIN].total[b] > 0]
        self.bin_w = [float(parts[_BIN].total[b]) ** 0.5 for b in self.bins]
        self.bin_start = [FIRST_YEAR + b * BIN_YEARS for b in self.bins]
        months = np.arange(N_MONTHS)
        since_2005 = months >= (2005 - FIRST_YEAR) * 12
        chart_w = np.exp((months - N_MONTHS) / 36.0) * (month_counts > 0) * since_2005
        if chart_w.sum() == 0:
            chart_w = (month_counts > 0).astype(float)
        self.chart_months = np.nonzero(chart_w)[0].tolist()
        self.chart_cum = np.cumsum(chart_w[self.chart_months]).tolist()

    # -- small helpers ------------------------------------------------------------------
    def _ok(self, index: int, part: int) -> bool:
        return self.nonempty[index][part]

    def _choice(self, items: Sequence[int], weights: Sequence[float]) -> int:
        return self.prng.choices(items, weights)[0]

    def _major_comm(self, major: int) -> int:
        cands = [c for c in self.world.communities_of_major[major] if self._ok(_COMMUNITY, c)]
        if not cands:
            return self._choice(self.comms, self.comm_w)
        return self._choice(cands, [float(self.world.community_size[c]) for c in cands])

    def _mood_of_major(self, major: int) -> int:
        p = self.world.mood_given_major[major]
        return self._choice(range(len(p)), p.tolist())

    def _era_key(self, year: int) -> int:
        decade = min(max(year, FIRST_YEAR), 2029) // 10 * 10
        return self.tags.k_era + (decade - FIRST_YEAR) // 10

    def _word(self, key: int) -> str:
        return self.prng.choice(self.tags.core[key])

    # -- one playlist -------------------------------------------------------------------
    def build(self, i: int, kind: str, target: int, updt_month: int, songs: _Mixture,
              tags: _Mixture) -> tuple[str, int]:
        """Add playlist ``i``'s song and tag components.

        Returns the title and, for a chart, the last month of its window (else -1): the
        playlist's update date moves to just after it.
        """
        prng, t = self.prng, self.tags
        words: list[str]
        if kind == "genre":
            g = self._choice(self.majors, self.major_w)
            gs = [g]
            if prng.random() < 0.3:
                cm = self.world.community_majors[self._major_comm(g)]
                other = [m for m in cm if m != g and self._ok(_MAJOR, m)]
                if other:
                    gs.append(prng.choice(other))
            era = None
            if prng.random() < 0.3:
                bins = [b for b in self.bins if self._ok(_MAJOR_BIN, g * N_BINS + b)]
                era = self._choice(bins, [self.parts[_MAJOR_BIN].total[g * N_BINS + b]
                                          for b in bins])
            for m in gs:
                share = 0.75 / len(gs)
                if era is not None and self._ok(_MAJOR_BIN, m * N_BINS + era):
                    songs.add(i, _MAJOR_BIN, m * N_BINS + era, share)
                    continue
                songs.add(i, _MAJOR, m, share * 0.4)
                dets = [d for d in self.world.table.details[m] if self._ok(_DETAIL, d)]
                for d in prng.sample(dets, min(len(dets), prng.randint(1, 3))):
                    songs.add(i, _DETAIL, d, share * 0.6 / min(len(dets), 3))
            songs.add(i, _COMMUNITY, self._major_comm(g), 0.15)
            songs.add(i, _ALL, 0, 0.10)
            mood = self._mood_of_major(g)
            for m in gs:
                tags.add(i, 0, m, 0.45 / len(gs))
            tags.add(i, 0, t.k_mood + mood, 0.15)
            words = [self._word(g), self._word(t.k_mood + mood)]
            if era is not None:
                key = self._era_key(FIRST_YEAR + era * BIN_YEARS)
                tags.add(i, 0, key, 0.15)
                words.insert(0, self._word(key))
        elif kind == "taste":
            c = self._choice(self.comms, self.comm_w)
            cs = [c]
            if prng.random() < 0.3:
                cs.append(self._major_comm(prng.choice(self.world.community_majors[c])))
            for x in dict.fromkeys(cs):
                songs.add(i, _COMMUNITY, x, 0.85 / len(cs))
                tags.add(i, 0, t.k_community + x, 0.35 / len(cs))
            songs.add(i, _ALL, 0, 0.15)
            cm = self.world.community_majors[c][:2]
            for m in cm:
                tags.add(i, 0, m, 0.2 / len(cm))
            mood = self._choice(self.moods, self.mood_w)
            tags.add(i, 0, t.k_mood + mood, 0.15)
            words = [self._word(t.k_community + c), self._word(cm[0])]
        elif kind == "mood":
            mood = self._choice(self.moods, self.mood_w)
            g = None
            if prng.random() < 0.4:
                cands = [m for m in self.majors if self._ok(_MOOD_MAJOR, mood * self.world.table
                                                            .n_majors + m)]
                if cands:
                    g = self._choice(cands, [self.parts[_MOOD_MAJOR].total[
                        mood * self.world.table.n_majors + m] for m in cands])
            songs.add(i, _MOOD, mood, 0.5 if g is not None else 0.8)
            words = [self._word(t.k_mood + mood)]
            if g is not None:
                songs.add(i, _MOOD_MAJOR, mood * self.world.table.n_majors + g, 0.3)
                tags.add(i, 0, g, 0.15)
                words.append(self._word(g))
            songs.add(i, _COMMUNITY, self._choice(self.comms, self.comm_w), 0.1)
            songs.add(i, _ALL, 0, 0.1)
            tags.add(i, 0, t.k_mood + mood, 0.5)
        elif kind in ("activity", "season"):
            if kind == "activity":
                a = prng.randrange(len(_ACTIVITIES))
                key, moods = t.k_activity + a, _ACTIVITIES[a][1]
                mood_share = 0.8
            else:
                s = prng.randrange(4)
                key, moods = t.k_season + s, _SEASON_MOODS[s]
                mood_share = 0.35
                if self._ok(_SEASON, s + 1):
                    songs.add(i, _SEASON, s + 1, 0.45)
            moods = tuple(m for m in moods if self._ok(_MOOD, m)) or (self.moods[0],)
            for m in moods:
                songs.add(i, _MOOD, m, mood_share / len(moods))
                tags.add(i, 0, t.k_mood + m, 0.2 / len(moods))
            songs.add(i, _ALL, 0, 0.2)
            tags.add(i, 0, key, 0.5)
            words = [self._word(key), self._word(t.k_mood + moods[0])]
        elif kind == "era":
            # Only eras that had begun when the playlist was made.
            k = max(1, bisect.bisect_right(self.bin_start, updt_month // 12 + FIRST_YEAR))
            b = self._choice(self.bins[:k], self.bin_w[:k])
            songs.add(i, _BIN, b, 0.5)
            key = self._era_key(FIRST_YEAR + b * BIN_YEARS)
            tags.add(i, 0, key, 0.55)
            words = [self._word(key)]
            gs = [m for m in self.majors if self._ok(_MAJOR_BIN, m * N_BINS + b)]
            gs = prng.sample(gs, min(len(gs), prng.randint(0, 2)))
            for m in gs:
                songs.add(i, _MAJOR_BIN, m * N_BINS + b, 0.4 / len(gs))
                tags.add(i, 0, m, 0.15 / len(gs))
                words.append(self._word(m))
            if not gs:
                songs.add(i, _BIN, b, 0.4)
        else:  # chart: the hits of a window of months, ending at a recent month
            k = max(1, bisect.bisect_right(self.chart_months, updt_month))
            end = prng.choices(self.chart_months[:k], cum_weights=self.chart_cum[:k])[0]
            start, have = end, int(self.month_counts[end])
            # Widen the window until it holds enough songs for the playlist (<= 2 years).
            while start > 0 and end - start < 23 and have < 1.5 * target + 10:
                start -= 1
                have += int(self.month_counts[start])
            months = [m for m in range(start, end + 1) if self.month_counts[m] > 0]
            for m in months:
                songs.add(i, _MONTH, m, 1.0 / len(months))
            year, month = FIRST_YEAR + end // 12, end % 12 + 1
            season = (month % 12) // 3  # Dec-Feb winter (3), Mar-May spring (0), ...
            season = (season - 1) % 4
            tags.add(i, 0, t.k_chart, 0.5)
            tags.add(i, 0, t.k_season + season, 0.15)
            tags.add(i, 0, self._era_key(year), 0.1)
            return (prng.choice((
                f"{year} {_MONTHS[month - 1]} chart", f"{year}년 {month}월 인기곡",
                f"best of {year}", f"{_MONTHS[month - 1]} {year} hits",
                f"{year} {self._word(t.k_season + season)} {self._word(t.k_chart)}",
                f"{self._word(t.k_chart)} {year}.{month:02d}")), end)
        tags.add(i, 0, t.k_general, 0.25)
        return self._title(words), -1

    def _title(self, words: list[str]) -> str:
        prng = self.prng
        picked = words[: prng.choice((1, 1, 2, 2, 3))]
        if prng.random() < 0.15:
            picked.append(self._word(self.tags.k_general))
        form = prng.random()
        filler = prng.choice(_FILLERS)
        if form < 0.45:
            return f"{' '.join(picked)} {filler}"
        if form < 0.6:
            return f"my {' '.join(picked)} {filler}"
        if form < 0.75:
            return f"{filler} : {' '.join(picked)}"
        return " ".join(picked)


def _lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Target song and tag counts: log-normal 1-200 (mean ~46), 1-10 (mean ~4)."""
    n_songs = np.clip(np.rint(np.exp(rng.normal(3.43, 0.95, n))), 1, 200).astype(np.int64)
    n_tags = 1 + np.minimum(9, rng.negative_binomial(2.0, 2.0 / 5.1, n))
    return n_songs, n_tags


def _updt_days(rng: np.random.Generator, n: int) -> np.ndarray:
    """When each playlist was last updated (days since 1970): a third in the data's last
    months, the rest spread over 2005-2020, thinning out into the past."""
    end = int(_days(DATA_END))
    years = np.arange(2005, 2021)
    p = np.exp((years - 2020) / 3.0)
    year_day = _days((years - _EPOCH_YEAR).astype("datetime64[Y]"))
    past = year_day[rng.choice(len(years), size=n, p=p / p.sum())] + rng.integers(0, 365, n)
    recent = end - rng.exponential(120.0, n).astype(np.int64)
    return np.clip(np.where(rng.random(n) < 0.35, recent, past), year_day[0], end)


def _updt_strings(rng: np.random.Generator, days: np.ndarray) -> list[str]:
    """Days since 1970 -> ``"YYYY-MM-DD hh:mm:ss.000"`` at a random time of day."""
    ymd = _ymd(days).tolist()
    secs = rng.integers(0, 86400, len(days)).tolist()
    return [f"{d // 10000:04d}-{d // 100 % 100:02d}-{d % 100:02d} "
            f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}.000"
            for d, t in zip(ymd, secs, strict=True)]


def _make_playlists(scale: Scale, world: _World, tags: _Tags, rng: np.random.Generator,
                    prng: random.Random, progress: bool) -> SynthPlaylists:
    n = scale.n_playlists
    s = world.songs
    parts = _song_parts(world)
    month_counts = np.bincount(np.clip(_month_index(s.days), 0, N_MONTHS - 1),
                               minlength=N_MONTHS)
    themes = _Themes(world, tags, parts, prng, month_counts)
    kind = rng.choice(len(KINDS), size=n, p=KIND_SHARES)
    target, n_tags = _lengths(rng, n)
    updt = _updt_days(rng, n)
    song_mix, tag_mix = _Mixture.empty(), _Mixture.empty()
    titles: list[str] = []
    chart_end = np.full(n, -1, dtype=np.int64)
    for i, (k, tl, um) in enumerate(zip(kind.tolist(), target.tolist(),
                                        _month_index(updt).tolist(), strict=True)):
        title, chart_end[i] = themes.build(i, KINDS[k], tl, um, song_mix, tag_mix)
        titles.append(title)
    # A chart is made (or last touched) within weeks after its window.
    charts = chart_end >= 0
    month_end = _days((np.arange(N_MONTHS) + (FIRST_YEAR - _EPOCH_YEAR) * 12 + 1)
                      .astype("datetime64[M]")) - 1
    updt[charts] = np.minimum(month_end[chart_end[charts]]
                              + rng.exponential(45.0, int(charts.sum())).astype(np.int64),
                              int(_days(DATA_END)))
    tag_parts = [_Parts(tags.key, tags.weight, tags.n_keys)]
    comp = {name: np.asarray(getattr(song_mix, name)) for name in ("owner", "index", "part",
                                                                   "weight")}
    tcomp = {name: np.asarray(getattr(tag_mix, name)) for name in ("owner", "index", "part",
                                                                   "weight")}
    # A component over an empty part must never be drawn (a key whose words all belong
    # to other keys has no tags); every playlist keeps a non-empty one (generic or chart).
    for mix, index_parts in ((comp, parts), (tcomp, tag_parts)):
        keep = mix["weight"] > 0
        for i, p in enumerate(index_parts):
            sel = mix["index"] == i
            keep[sel] &= p.total[mix["part"][sel]] > 0
        for name in mix:
            mix[name] = mix[name][keep]

    out_owner: list[np.ndarray] = []
    out_items: list[np.ndarray] = []
    tag_owner: list[np.ndarray] = []
    tag_items: list[np.ndarray] = []
    batch = 8192
    for lo in tqdm(range(0, n, batch), desc="playlists", unit="batch", disable=not progress):
        hi = min(n, lo + batch)
        owner, items = _fill(parts, comp, lo, hi, target[lo:hi], updt[lo:hi], s.days, rng)
        out_owner.append(owner + lo)
        out_items.append(items)
        a, b = np.searchsorted(tcomp["owner"], [lo, hi])
        tow, tit = _draw_mixture(tag_parts, tcomp["owner"][a:b] - lo, tcomp["index"][a:b],
                                 tcomp["part"][a:b], tcomp["weight"][a:b],
                                 3 * n_tags[lo:hi] + 2, rng)
        tow, tit = _first_unique(tow, tit, len(tags.names), n_tags[lo:hi])
        tag_owner.append(tow + lo)
        tag_items.append(tit)
    owner, items = np.concatenate(out_owner), np.concatenate(out_items)
    song_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n), out=song_indptr[1:])
    towner, titems = np.concatenate(tag_owner), np.concatenate(tag_items)
    tag_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(towner, minlength=n), out=tag_indptr[1:])

    # _fill moved the date of a playlist it could only fill with later songs.
    updt = np.maximum(updt, np.maximum.reduceat(s.days[items], song_indptr[:-1]))
    like = np.minimum(np.exp(rng.normal(1.6, 2.0, n)).astype(np.int64), 200_000)
    ids = rng.permutation(n).astype(np.int64)
    return SynthPlaylists(ids, titles, song_indptr, items, tag_indptr, titems, tags.names, like,
                          _updt_strings(rng, updt), kind)


def _fill(parts: list[_Parts], comp: dict[str, np.ndarray], lo: int, hi: int,
          target: np.ndarray, updt: np.ndarray, song_days: np.ndarray,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Songs of playlists ``lo:hi``: draw, drop songs released after the playlist's update
    date and repeats, and redraw for the playlists left short."""
    a, b = np.searchsorted(comp["owner"], [lo, hi])
    owner, index = comp["owner"][a:b] - lo, comp["index"][a:b]
    part, weight = comp["part"][a:b], comp["weight"][a:b]
    n, n_songs = hi - lo, len(song_days)
    kept_o = kept_i = np.zeros(0, dtype=np.int64)
    more = np.ceil(target * 1.4).astype(np.int64) + 2
    for attempt in range(6):
        o2, i2, p2, w2 = owner, index, part, weight
        if attempt >= 2:
            # Later rounds lean on the global hit list: a part may hold too few songs
            # released before the playlist's date.
            needy = np.nonzero(more)[0]
            o2 = np.concatenate([o2, needy])
            i2 = np.concatenate([i2, np.full(len(needy), _ALL)])
            p2 = np.concatenate([p2, np.zeros(len(needy), dtype=np.int64)])
            w2 = np.concatenate([w2, np.full(len(needy), 0.5 * attempt)])
            order = np.argsort(o2, kind="stable")
            o2, i2, p2, w2 = o2[order], i2[order], p2[order], w2[order]
        sel = more[o2] > 0
        new_o, new_i = _draw_mixture(parts, o2[sel], i2[sel], p2[sel], w2[sel], more, rng)
        if attempt < 5:
            ok = song_days[new_i] <= updt[new_o]
            new_o, new_i = new_o[ok], new_i[ok]
        # else: a last resort for playlists still empty; the caller moves their date.
        all_o = np.concatenate([kept_o, new_o])
        all_i = np.concatenate([kept_i, new_i])
        order = np.argsort(all_o, kind="stable")  # earlier draws stay first
        kept_o, kept_i = _first_unique(all_o[order], all_i[order], n_songs, target)
        have = np.bincount(kept_o, minlength=n)
        short = target - have
        if attempt < 4:
            more = np.where(short > 0, 3 * short + 4, 0)
        else:
            more = np.where(have == 0, 3, 0)
        if not more.any():
            break
    return kept_o, kept_i


# ---------------------------------------------------------------------------------------
# Whole data set and files


# ---------------------------------------------------------------------------------------
# Quirks: the real files' dirt

# quirk -> (share of songs or playlists, minimum count at any scale)
QUIRK_RATES: dict[str, tuple[float, int]] = {
    "impossible_dates": (1e-5, 4),  # one of each form below, at least
    "future_dates": (3e-6, 2),
    "null_albums": (1e-4, 2),  # album_id and album_name null, or album_name only
    "artist_names": (1e-4, 2),
    "unknown_genres": (1e-4, 2),
    "repeated_songs": (5e-4, 2),  # per playlist
    "empty_titles": (5e-4, 2),
    "emoji_titles": (5e-4, 2),
    "emoji_tags": (2e-3, 3),
}
_EMOJI_TAGS = ("🎧", "여름🌊", "드라이브 🚗", "❤️", "힐링 음악", "chill vibes ✨", "비 오는 날☔")
_EMOJI_TITLES = ("🎵", "☕ 카페 ☕", "✨", "🌙 밤에 듣는 노래")


@dataclass
class Quirks:
    """The dirt written into the files, keyed by song row or playlist row."""

    issue_dates: dict[int, str]  # song -> the issue_date written (impossible or future)
    null_album_ids: set[int]  # songs whose album_id (and album_name) is null
    null_album_names: set[int]  # songs whose album_name is null
    artist_names: set[int]  # songs whose name basket loses its last name (or gains one)
    unknown_genres: dict[int, str]  # song -> a detailed code the genre table lacks
    repeated_songs: dict[int, int]  # playlist -> a song of it written a second time
    titles: dict[int, str]  # playlist -> its title ("" or with emoji)
    tags: dict[int, str]  # playlist -> a tag with emoji or a space, added

    def counts(self) -> dict[str, int]:
        future = sum(1 for d in self.issue_dates.values() if d[:4] > "2020")
        return {"impossible_dates": len(self.issue_dates) - future, "future_dates": future,
                "null_albums": len(self.null_album_ids) + len(self.null_album_names),
                "artist_names": len(self.artist_names),
                "unknown_genres": len(self.unknown_genres),
                "repeated_songs": len(self.repeated_songs),
                "empty_titles": sum(1 for t in self.titles.values() if not t),
                "emoji_titles": sum(1 for t in self.titles.values() if t),
                "emoji_tags": len(self.tags)}


def quirks_by_default(scale: str | Scale) -> bool:
    """The ``melon`` scale carries the real files' dirt unless told not to; others do not."""
    return scale == "melon" or scale == SCALES["melon"]


def _quirk_count(name: str, n: int) -> int:
    rate, minimum = QUIRK_RATES[name]
    return min(n, max(minimum, round(rate * n)))


def _impossible_date(k: int, ymd: int, rng: np.random.Generator) -> str:
    """Form ``k % 4`` of an impossible date in the year (and month) of ``ymd``."""
    year, month = ymd // 10000, ymd // 100 % 100
    form = k % 4
    if form == 0:  # "20105130": a month past 12
        return f"{year:04d}{int(rng.integers(13, 100)):02d}{ymd % 100:02d}"
    if form == 1:  # a September 31, a February 30: the day after the month's last
        return f"{year:04d}{month:02d}{calendar.monthrange(year, month)[1] + 1:02d}"
    if form == 2:  # a day 32
        return f"{year:04d}{month:02d}32"
    return f"{year:04d}00{int(rng.integers(1, 29)):02d}"  # a day without a month


def _make_quirks(songs: SynthSongs, playlists: SynthPlaylists, table: GenreTable,
                 rng: np.random.Generator) -> Quirks:
    n_songs, n_lists = len(songs), len(playlists)
    full = np.nonzero(songs.issue_dates % 100 > 0)[0]
    order = rng.permutation(full)
    take = iter(order.tolist())
    n_bad = _quirk_count("impossible_dates", n_songs)
    dates = {next(take): "" for _ in range(n_bad)}
    for k, row in enumerate(dates):
        dates[row] = _impossible_date(k, int(songs.issue_dates[row]), rng)
    for _ in range(_quirk_count("future_dates", n_songs)):
        day = rng.integers(0, 3 * 365)
        dates[next(take)] = str(np.datetime64("2021-01-01") + day).replace("-", "")
    rest = np.setdiff1d(np.arange(n_songs), np.fromiter(dates, np.int64), assume_unique=True)
    rest = rng.permutation(rest).tolist()
    n_null = _quirk_count("null_albums", n_songs)
    null_ids, null_names = set(rest[: n_null // 2]), set(rest[n_null // 2: n_null])
    rest = rest[n_null:]
    n_art = _quirk_count("artist_names", n_songs)
    artist_names, rest = set(rest[:n_art]), rest[n_art:]
    codes = set(table.codes)
    unknown: dict[int, str] = {}
    for row in rest[: _quirk_count("unknown_genres", n_songs)]:
        major = table.codes[table.majors[int(songs.majors[row, 0])]]
        unknown[row] = next(c for c in (f"{major[:4]}{d:02d}" for d in range(99, 0, -1))
                            if c not in codes)
    lists = rng.permutation(n_lists).tolist()
    n_rep = _quirk_count("repeated_songs", n_lists)
    repeated = {p: int(rng.choice(playlists.songs_of(p))) for p in lists[:n_rep]}
    lists = rng.permutation(n_lists).tolist()
    n_empty = _quirk_count("empty_titles", n_lists)
    n_emoji = _quirk_count("emoji_titles", n_lists)
    titles = {p: "" for p in lists[:n_empty]}
    for p in lists[n_empty: n_empty + n_emoji]:
        titles[p] = f"{playlists.titles[p]} {_EMOJI_TITLES[p % len(_EMOJI_TITLES)]}"
    lists = rng.permutation(n_lists).tolist()
    tags = {p: _EMOJI_TAGS[k % len(_EMOJI_TAGS)]
            for k, p in enumerate(lists[: _quirk_count("emoji_tags", n_lists)])}
    return Quirks(dates, null_ids, null_names, artist_names, unknown, repeated, titles, tags)


@dataclass
class SynthData:
    """A generated data set: genre table, songs, playlists and the train/val/test sizes;
    ``quirks`` is the dirt the files carry (None: clean files)."""

    table: GenreTable
    songs: SynthSongs
    playlists: SynthPlaylists
    split: dict[str, int]  # file stem -> number of playlists, in file order
    quirks: Quirks | None = None


def generate(scale: str | Scale, seed: int, genres: GenreTable | None = None, *,
             progress: bool = False, quirks: bool | None = None) -> SynthData:
    """Generate a data set in memory.

    Parameters
    ----------
    scale
        A name from :data:`SCALES` or a :class:`Scale`.
    seed
        Random seed; the same seed (and genre table) gives the same data.
    genres
        Genre table to use; the built-in :func:`default_genres` when None.
    progress
        Show tqdm progress bars.
    quirks
        Write the real files' dirt into a few records (see the module's docstring);
        None: at ``melon`` scale only. The clean part is the same either way.
    """
    if quirks is None:
        quirks = quirks_by_default(scale)
    if isinstance(scale, str):
        try:
            scale = SCALES[scale]
        except KeyError:
            raise ValueError(f"unknown scale {scale!r}: expected one of {sorted(SCALES)}"
                             ) from None
    if scale.n_songs < 100 or min(scale.n_train, scale.n_val, scale.n_test) < 0:
        raise ValueError(f"bad scale {scale}: need >= 100 songs and non-negative counts")
    table = genres if genres is not None else genre_table(default_genres(), "built-in")
    # A fourth stream for the quirks: the first three (and so the clean data) do not change.
    seeds = np.random.SeedSequence(seed).spawn(4)
    rngs = [np.random.default_rng(s) for s in seeds[:3]]
    prngs = [random.Random(int(s.generate_state(1)[0])) for s in seeds[:3]]
    world = _make_songs(scale, table, rngs[0], prngs[0])
    # The tail grows with the playlists: 0.25 gave 24.7k distinct train tags at Melon
    # scale, so 0.33 aims at the real ~30k.
    tags = _make_tags(world, max(200, round(0.33 * scale.n_playlists)), rngs[1], prngs[1])
    playlists = _make_playlists(scale, world, tags, rngs[2], prngs[2], progress)
    split = {"train": scale.n_train, "val": scale.n_val, "test": scale.n_test}
    dirt = (_make_quirks(world.songs, playlists, table, np.random.default_rng(seeds[3]))
            if quirks else None)
    return SynthData(table, world.songs, playlists, split, dirt)


def _write_json_list(path: Path, records: Iterable[list[dict[str, Any]]]) -> None:
    """Write a JSON list from chunks of records without holding all of them at once."""
    with path.open("wb") as f:
        f.write(b"[")
        first = True
        for chunk in records:
            if not chunk:
                continue
            if not first:
                f.write(b",")
            f.write(orjson.dumps(chunk)[1:-1])
            first = False
        f.write(b"]")


_CHUNK = 50_000


def _song_records(data: SynthData) -> Iterable[list[dict[str, Any]]]:
    s, table, q = data.songs, data.table, data.quirks
    codes = table.codes
    major_codes = [codes[c] for c in table.majors]
    artist_ids = s.artist_ids.tolist()
    for lo in range(0, len(s), _CHUNK):
        hi = min(len(s), lo + _CHUNK)
        issue = s.issue_dates[lo:hi].tolist()
        records = []
        for j, (arts, majors, dets) in enumerate(zip(s.artists[lo:hi].tolist(),
                                                     s.majors[lo:hi].tolist(),
                                                     s.details[lo:hi].tolist(), strict=True)):
            i = lo + j
            arts = [a for a in arts if a >= 0]
            records.append({
                "id": i,
                "song_name": s.names[i],
                "album_id": int(s.album_ids[i]),
                "album_name": s.album_names[i],
                "artist_id_basket": [artist_ids[a] for a in arts],
                "artist_name_basket": [s.artist_names[a] for a in arts],
                "song_gn_gnr_basket": [major_codes[m] for m in majors if m >= 0],
                "song_gn_dtl_gnr_basket": [codes[d] for d in dets if d >= 0],
                "issue_date": f"{issue[j]:08d}",
            })
            if q is not None:
                _dirty_song(records[-1], i, q)
        yield records


def _dirty_song(rec: dict[str, Any], i: int, q: Quirks) -> None:
    if i in q.issue_dates:
        rec["issue_date"] = q.issue_dates[i]
    if i in q.null_album_ids:
        rec["album_id"] = rec["album_name"] = None
    if i in q.null_album_names:
        rec["album_name"] = None
    if i in q.artist_names:
        names = rec["artist_name_basket"]
        rec["artist_name_basket"] = names[:-1] if len(names) > 1 else names + ["Various"]
    if i in q.unknown_genres:
        rec["song_gn_dtl_gnr_basket"].append(q.unknown_genres[i])


def _playlist_records(p: SynthPlaylists, lo: int, hi: int,
                      q: Quirks | None) -> Iterable[list[dict[str, Any]]]:
    for a in range(lo, hi, _CHUNK):
        b = min(hi, a + _CHUNK)
        ids, likes = p.ids[a:b].tolist(), p.like_cnt[a:b].tolist()
        records = [{
            "id": ids[i - a],
            "plylst_title": p.titles[i],
            "tags": p.tags_of(i),
            "songs": p.songs_of(i).tolist(),
            "like_cnt": likes[i - a],
            "updt_date": p.updt_dates[i],
        } for i in range(a, b)]
        if q is not None:
            for i, rec in zip(range(a, b), records, strict=True):
                _dirty_playlist(rec, i, q)
        yield records


def _dirty_playlist(rec: dict[str, Any], i: int, q: Quirks) -> None:
    if i in q.repeated_songs:  # written again later in the list, as a second add would
        songs = rec["songs"]
        songs.insert(len(songs) if len(songs) < 200 else 199, q.repeated_songs[i])
        if len(songs) > 200:
            songs.pop()
    if i in q.titles:
        rec["plylst_title"] = q.titles[i]
    if i in q.tags and q.tags[i] not in rec["tags"]:
        tags = rec["tags"]
        tags[min(len(tags), 9):] = [q.tags[i]]


def write_dataset(data: SynthData, out: str | Path, *, progress: bool = False) -> None:
    """Write the five Melon files of ``data`` into directory ``out`` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "genre_gn_all.json").write_bytes(
        orjson.dumps(data.table.mapping, option=orjson.OPT_INDENT_2))
    steps = tqdm(total=1 + len(data.split), desc="writing", unit="file", disable=not progress)
    _write_json_list(out / "song_meta.json", _song_records(data))
    steps.update()
    lo = 0
    for stem, count in data.split.items():
        _write_json_list(out / f"{stem}.json",
                         _playlist_records(data.playlists, lo, lo + count, data.quirks))
        lo += count
        steps.update()
    steps.close()


def summary(data: SynthData) -> str:
    """One line of statistics for logs: sizes, coverage, lengths, tags."""
    p = data.playlists
    n_train = data.split["train"]
    train_songs = p.songs[: p.song_indptr[n_train]]
    lengths = np.diff(p.song_indptr)
    n_tags = np.diff(p.tag_indptr)
    distinct_tags = len(np.unique(p.tags[: p.tag_indptr[n_train]]))
    quirks = ("no quirks" if data.quirks is None else "quirks: " + ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in data.quirks.counts().items()))
    return (f"{len(data.songs)} songs ({len(np.unique(train_songs))} in train), "
            f"{len(p)} playlists ({', '.join(f'{k}={v}' for k, v in data.split.items())}), "
            f"songs/playlist mean {lengths.mean():.1f} median {np.median(lengths):.0f}, "
            f"tags/playlist mean {n_tags.mean():.2f}, {distinct_tags} distinct train tags; "
            f"{quirks}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.synth",
        description="Generate a synthetic data set in the Melon Playlist Dataset format.")
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                        help="tiny (3k songs), small (50k), melon (707,989 songs, real sizes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--genres", type=Path, default=None,
                        help="a genre_gn_all.json to use instead of the built-in table")
    parser.add_argument("--quirks", action=argparse.BooleanOptionalAction, default=None,
                        help="write the real files' dirt (impossible and future issue dates, "
                             "nulls, repeated songs, unknown genre codes, empty titles, emoji "
                             "tags) into a few records (default: at melon scale only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = args.scale == "melon"
    try:
        table = load_genre_table(args.genres) if args.genres is not None else None
        data = generate(args.scale, args.seed, table, progress=progress, quirks=args.quirks)
        write_dataset(data, args.out, progress=progress)
    except (DataError, ValueError, OSError) as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s: %s", args.out, summary(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
