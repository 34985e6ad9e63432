"""Playlist-continuation strategies on the song embeddings (numpy + a vector index, no torch).

Shared by the offline evaluation (``trainer.recommend --model ae-...``) and the gRPC server.

* ``ae-quota`` (the write-up): the requested song count is split as evenly as possible over
  the seed songs ([34, 33, 33] for three seeds); each seed's share is filled from its
  nearest songs by cosine similarity, skipping seeds and songs already taken; whatever is
  still missing comes from popularity. Tags are voted: every recommended song votes once
  for every tag ever attached to a training playlist containing it; the top tags win.
* ``ae-neighbours`` (the write-up's later improvement): the seeds' codes are summed, the
  nearest training playlists to that sum are found (a playlist's code is the mean of its
  songs' codes), and their songs and tags are scored by similarity.
* ``ae-hybrid``: the votes of ``ae-neighbours`` blended with those of neighbour CF (the
  ``playlist-knn`` baseline's IDF-weighted cosine over songs, tags, title words and
  artists, fitted by the trainer and stored in the bundle). With weight 0 on the
  autoencoder it is exactly neighbour CF, which is how the ablation isolates what the
  autoencoder adds.

New songs (no training playlist holds them: added at run time, compacted, or only in
validation playlists) join ``ae-neighbours``, ``ae-hybrid`` and ``ranked`` through
:func:`with_new_songs`: the seeds' nearest ones by code, and the seeds' artists' ones
(:mod:`server.artists`), each valued against the answer; bundle songs are placed by value,
songs added at run time only in the answer's last places (``new_tail``).

Cold starts, for both: tags only -> each tag's most frequent songs (``ae-quota`` fills from
them, ``ae-neighbours`` uses them as pseudo-seeds); title only -> the title's words mapped to
the songs and tags of training playlists whose titles used them; nothing -> most popular.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from server import voting
from server.artists import ArtistIndex
from server.catalog import Catalog, RowLists, gather_rows, tokenize
from server.search import VectorSearch
from server.voting import best_first

STRATEGIES = ("ae-quota", "ae-neighbours", "ae-hybrid", "ranked")
# Songs no playlist holds, found among the seeds' nearest songs: how deep each seed's list
# is searched, and the exponent on their similarity (see _seed_neighbours).
NEW_DEPTH = 50
NEW_SHARE = 0.35  # strategy option new_share (0: no new songs)
NEW_POWER = 12.0  # strategy option new_power
# New songs of the seeds' artists (server.artists, see _artist_songs): their weight
# against the answer's cut-off score, and the exponent on their code similarity to a seed.
ARTIST_SHARE = 1.4  # strategy option artist_share (0: none)
ARTIST_POWER = 20.0  # strategy option artist_power
# The share of an answer's places (its last ones) new songs may take: strategy option
# new_tail (see with_new_songs).
NEW_TAIL = 0.3
# An artist-song's source in the votes: ARTIST_SOURCE - its seed's row (a REASON_ARTIST).
ARTIST_SOURCE = -(1 << 40)
# Best candidates that stand in for the seeds of a question without any (artist songs).
PSEUDO_SEEDS = 20
# The default of a bundle without a ranker: the best hand-set strategy in docs/BENCHMARKS.md
# (bench-quality). A bundle with one answers ``ranked`` by default (server.ranking).
DEFAULT_STRATEGY = "ae-hybrid"
RANKED = "ranked"

# Reason codes attached to each recommended song.
REASON_SEED = "seed"  # the nearest song of seed `source`
REASON_PLAYLIST = "playlist"  # a song of neighbour playlist `source`
REASON_TAG = "tag"  # a frequent song of question tag `source` (tag index)
REASON_TITLE = "title"  # a song learned from title words
REASON_POPULAR = "popular"  # top-up from popularity
REASON_ALS = "als"  # a song the question's folded-in ALS factor scores high (ranked)
REASON_ARTIST = "artist"  # a song of an artist of seed `source` (ranked; new songs: all)


@dataclass(frozen=True)
class Query:
    """A validated question in row/index space."""

    seeds: np.ndarray  # int64 song rows known to the index
    tags: np.ndarray  # int32 tag indices known to the catalog
    title: str = ""
    updt_date: int = 0
    n_songs: int = 100
    n_tags: int = 10
    drop_future: bool = False
    # The new songs of each artist (server.artists); None: no artist new-song source.
    artists: ArtistIndex | None = None


@dataclass(frozen=True)
class Answer:
    """Ranked song rows and tag indices, with scores and, per song, why it was chosen."""

    songs: np.ndarray  # int64 song rows
    song_scores: np.ndarray  # float32
    # (REASON_*, source) per song; source: the seed's song row, the neighbour playlist's
    # position, the question tag's index, or -1
    reasons: list[tuple[str, int]]
    tags: np.ndarray  # int32 tag indices
    tag_scores: np.ndarray  # float32
    strategy: str = ""  # the strategy that answered (set by run_strategy)


def quotas(total: int, parts: int) -> list[int]:
    """Split ``total`` as evenly as possible over ``parts``, larger shares first."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Picker:
    """Collects unique songs in order, refusing excluded ones (seeds, future releases)."""

    def __init__(self, catalog: Catalog, query: Query, n_total_rows: int) -> None:
        self.catalog = catalog
        self.query = query
        self.n_total_rows = n_total_rows
        # A set, not a bool array over every song: an answer touches a few hundred rows,
        # and zeroing 700k flags per call cost more than all the lookups.
        self.excluded: set[int] = set(query.seeds.tolist())
        self.rows: list[int] = []
        self.scores: list[float] = []
        self.reasons: list[tuple[str, int]] = []

    def allowed(self, row: int) -> bool:
        if row < 0 or row >= self.n_total_rows or row in self.excluded:
            return False
        if self.query.drop_future and self.query.updt_date and row < self.catalog.n_songs:
            issued = int(self.catalog.issue_dates[row])
            if issued > self.query.updt_date:
                return False
        return True

    def take(self, row: int, score: float, reason: tuple[str, int]) -> bool:
        if not self.allowed(row):
            return False
        self.excluded.add(row)
        self.rows.append(row)
        self.scores.append(score)
        self.reasons.append(reason)
        return True

    def allowed_many(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`allowed` of each of ``rows`` at once."""
        ok: np.ndarray = (rows >= 0) & (rows < self.n_total_rows)
        if self.excluded:
            ok &= ~np.isin(rows, np.fromiter(self.excluded, np.int64, len(self.excluded)))
        if self.query.drop_future and self.query.updt_date:
            inside = ok & (rows < self.catalog.n_songs)
            issued = self.catalog.issue_dates[np.where(inside, rows, 0)]
            ok &= ~(inside & (issued > self.query.updt_date))
        return ok

    def take_all(self, rows: list[int], scores: list[float],
                 reasons: list[tuple[str, int]]) -> None:
        """Take distinct ``rows`` that :meth:`allowed_many` allowed, as many as fit."""
        room = self.room
        self.excluded.update(rows[:room])
        self.rows.extend(rows[:room])
        self.scores.extend(scores[:room])
        self.reasons.extend(reasons[:room])

    @property
    def room(self) -> int:
        return max(self.query.n_songs - len(self.rows), 0)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.query.n_songs

    def fill_popular(self) -> None:
        # In slices: listing all the popular songs (every song) cost more than the answer.
        popular = self.catalog.popular_songs
        start = 0
        while not self.full and start < len(popular):
            end = start + self.room + len(self.excluded)
            for row in popular[start:end].tolist():
                if self.full:
                    return
                self.take(row, 0.0, (REASON_POPULAR, -1))
            start = end


def vote_tags(catalog: Catalog, song_rows: Sequence[int], exclude: np.ndarray,
              n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Each song votes once for every tag ever attached to a playlist containing it."""
    rows = np.asarray(song_rows, dtype=np.int64)
    rows = rows[(rows >= 0) & (rows < catalog.song_tags.n_rows)]  # added songs have no tags
    _, tags, _ = gather_rows(catalog.song_tags, rows)
    votes = np.bincount(tags, minlength=len(catalog.tags)).astype(np.float32)
    return _top_tags(catalog, votes, exclude, n_tags)


def _top_tags(catalog: Catalog, scores: np.ndarray, exclude: np.ndarray,
              n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_tags`` best finite scores; ties (and tags nobody voted for) break by overall
    popularity, then by tag index: the tags are ranked in ``tag_order`` (popularity, then
    index), so a tie on score keeps that order."""
    scores = scores.copy()
    scores[exclude] = -np.inf
    n = min(n_tags, int(np.isfinite(scores).sum()))
    picked = catalog.tag_order[best_first(scores[catalog.tag_order], n)].astype(np.int32)
    return picked, np.maximum(scores[picked], 0.0).astype(np.float32)


def _title_words(catalog: Catalog, title: str) -> list[int]:
    """The title's words known to the catalog (their indices), in title order."""
    return [catalog.word_index[w] for w in tokenize(title) if w in catalog.word_index]


def _title_songs(catalog: Catalog, words: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The songs that title words ``words`` name (ascending) and their summed float32
    weights (learned from titles): the nonzero part of a dense song score array."""
    lists = catalog.word_songs
    rows, scores = voting.word_scores(lists.indptr, lists.indices, lists.weights,
                                      np.asarray(words, dtype=np.int64))
    return rows, scores


def _title_tag_scores(catalog: Catalog, words: list[int]) -> np.ndarray:
    tag_scores = np.zeros(len(catalog.tags), dtype=np.float32)
    for w in words:
        tags, tweights = catalog.word_tags.row(w), catalog.word_tags.row_weights(w)
        tag_scores[tags] += tweights
    return tag_scores


def _title_scores(catalog: Catalog, title: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Song and tag scores from the title's known words (weights learned from titles)."""
    known = _title_words(catalog, title)
    song_scores = np.zeros(catalog.n_songs, dtype=np.float32)
    rows, scores = _title_songs(catalog, known)
    song_scores[rows] = scores
    return song_scores, _title_tag_scores(catalog, known), known


def _best_scored(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` best positive scores, by score then row. Only the few thousand
    songs a title's words reach are ranked: sorting all 700k took 3.5 ms, a tenth of
    the questions (the title-only ones) paying for it."""
    positive = np.flatnonzero(scores > 0)
    chosen: np.ndarray = positive[best_first(scores[positive], n)]
    return chosen


def _tag_seed_songs(catalog: Catalog, tags: np.ndarray, per_tag: int) -> np.ndarray:
    rows = [catalog.tag_songs.row(int(t))[:per_tag] for t in tags]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def _finish(catalog: Catalog, picker: _Picker, query: Query,
            tag_scores: np.ndarray | None = None) -> Answer:
    picker.fill_popular()
    if tag_scores is None:
        tags, tscores = vote_tags(catalog, picker.rows, query.tags, query.n_tags)
    else:
        tags, tscores = _top_tags(catalog, tag_scores, query.tags, query.n_tags)
    return Answer(np.asarray(picker.rows, dtype=np.int64),
                  np.asarray(picker.scores, dtype=np.float32), picker.reasons, tags, tscores)


def _cold_start(catalog: Catalog, picker: _Picker, query: Query) -> np.ndarray | None:
    """Questions without seed songs: tags -> tag songs; title -> word songs/tags; nothing ->
    popularity. Returns the tag scores to rank by (title words, or popularity when nothing
    is known), or None when tags are to be voted by the songs."""
    if len(query.tags):
        for tag, share in zip(query.tags.tolist(), quotas(query.n_songs, len(query.tags)),
                              strict=True):
            taken = 0
            for rank, row in enumerate(catalog.tag_songs.row(tag).tolist()):
                if taken >= share:
                    break
                if picker.take(row, 1.0 / (rank + 1), (REASON_TAG, tag)):
                    taken += 1
        return None
    if query.title:
        song_scores, tag_scores, known = _title_scores(catalog, query.title)
        if known:
            for row in _best_scored(song_scores, query.n_songs * 2).tolist():
                if picker.full:
                    break
                picker.take(row, float(song_scores[row]), (REASON_TITLE, -1))
            return tag_scores
    # Nothing known at all: the most popular songs (filled by _finish) and tags.
    return catalog.tag_popularity.astype(np.float32)


def quota_lists(query: Query) -> tuple[np.ndarray, int]:
    """The neighbour lists ``ae-quota`` reads: the seeds with a share (``quotas``), each
    list as deep as the whole answer plus the seeds (the write-up kept 100 similar songs
    per song), so that earlier seeds' picks rarely exhaust a later seed's list. Asked
    with ``allow_short``."""
    seeds = query.seeds
    active = seeds[: min(query.n_songs, len(seeds))]  # quotas: shares > 0 come first
    return active, query.n_songs + len(seeds)


def ae_quota(catalog: Catalog, songs: VectorSearch, query: Query) -> Answer:
    """The write-up's per-seed quota filling with tag voting."""
    picker = _Picker(catalog, query, songs.count())
    seeds = query.seeds
    if len(seeds) == 0:
        return _finish(catalog, picker, query, _cold_start(catalog, picker, query))
    shares = quotas(query.n_songs, len(seeds))
    active = [i for i, s in enumerate(shares) if s > 0]
    # Filtering happens here, in numpy order, not in an index callback.
    rows, k = quota_lists(query)
    lists = songs.neighbours(rows, k, allow_short=True)
    for pos, i in enumerate(active):
        taken = 0
        labels, sims = lists[pos]
        for row, sim in zip(labels.tolist(), sims.tolist(), strict=True):
            if taken >= shares[i]:
                break
            if picker.take(row, sim, (REASON_SEED, int(seeds[i]))):
                taken += 1
    return _finish(catalog, picker, query)


@dataclass
class Votes:
    """Candidates (song rows or tags) with summed neighbour weights and their best source."""

    items: np.ndarray
    scores: np.ndarray
    source: np.ndarray  # the playlist (position) that gave each candidate its largest vote

    @staticmethod
    def empty() -> Votes:
        return Votes(np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))

    @staticmethod
    def of(lists: RowLists, playlists: np.ndarray, weights: np.ndarray) -> Votes:
        """Each playlist votes ``weight`` for each of its items."""
        if len(playlists) == 0:
            return Votes.empty()
        # One compiled pass (the numpy version sorted for np.unique and gathered the CSR
        # rows in a dozen calls, all holding the GIL).
        cand, scores, source = voting.tally(lists.indptr, lists.indices, lists.item_bound,
                                            playlists, weights)
        return Votes(cand, scores, source)

    def normalised(self) -> Votes:
        top = float(self.scores.max()) if len(self.scores) else 0.0
        return Votes(self.items, self.scores / top if top > 0 else self.scores, self.source)

    def blend(self, other: Votes, weight: float) -> Votes:
        """self + weight x other, both normalised to a maximum of 1 first; each item keeps
        the source of its larger part (self's on a tie)."""
        a, b = self.normalised(), other.normalised()
        cand, inverse = np.unique(np.concatenate([a.items, b.items]), return_inverse=True)
        part_a = np.full(len(cand), -np.inf)
        part_b = np.full(len(cand), -np.inf)
        part_a[inverse[: len(a.items)]] = a.scores
        part_b[inverse[len(a.items) :]] = weight * b.scores
        source = np.zeros(len(cand), dtype=np.int64)
        source[inverse[: len(a.items)]] = a.source
        from_b = part_b > part_a
        source[from_b] = b.source[np.searchsorted(b.items, cand[from_b])]
        total = np.where(np.isfinite(part_a), part_a, 0.0) + np.where(np.isfinite(part_b),
                                                                      part_b, 0.0)
        return Votes(cand, total, source)

    def ranked(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items by score (ties: smaller item first); with ``limit``, only the first
        ``limit`` of that order, found without sorting the rest."""
        order = best_first(self.scores, limit)
        return self.items[order], self.scores[order], self.source[order]


def _ae_playlists(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                  query: Query, n_playlists: int, alpha: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Nearest training playlists to the summed codes of the seeds (or, for cold starts,
    of the question's tag songs or title songs), weighted by similarity ** alpha; also the
    title's tag scores for title-only questions."""
    seeds = query.seeds
    title_tags: np.ndarray | None = None
    if len(seeds) == 0 and len(query.tags):
        seeds = _tag_seed_songs(catalog, query.tags, per_tag=10)
    elif len(seeds) == 0 and query.title:
        song_scores, title_tags, known = _title_scores(catalog, query.title)
        if known:
            seeds = _best_scored(song_scores, 20)
    if len(seeds) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), title_tags
    labels, sims = playlists.search(songs.vectors(seeds).sum(axis=0, keepdims=True),
                                    n_playlists)
    return labels[0], np.maximum(sims[0].astype(np.float64), 0.0) ** alpha, title_tags


Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]  # (rows, values, sources)


def _seed_neighbours(catalog: Catalog, songs: VectorSearch, query: Query, best: float,
                     share: float, power: float) -> Candidates:
    """The seeds' nearest songs by code that no training playlist holds (added at run time,
    compacted, or only in validation playlists), each scored ``share x best x similarity **
    power`` (``best``: the best vote) by its nearest seed, with that seed as the source:
    (rows, values, sources), rows distinct."""
    if share <= 0 or not len(query.seeds):
        return _NO_CANDIDATES
    lists = songs.neighbours(query.seeds, NEW_DEPTH, allow_short=True)
    owner = np.concatenate([np.full(len(rows), i) for i, (rows, _) in enumerate(lists)])
    rows = np.concatenate([rows for rows, _ in lists]).astype(np.int64)
    sims = np.concatenate([sims for _, sims in lists]).astype(np.float64)
    cold = _is_new(catalog, rows)
    if not cold.any():
        return _NO_CANDIDATES
    value = share * best * np.maximum(sims[cold], 0.0) ** power
    # A seed-neighbour's source is its seed, stored as -1 - row (a REASON_SEED reason).
    return _best_of([(rows[cold], value, -1 - query.seeds[owner[cold]])])


_NO_CANDIDATES = (np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))


def _is_new(catalog: Catalog, rows: np.ndarray) -> np.ndarray:
    """Whether each row is a song no training playlist holds."""
    cold = rows >= catalog.n_songs
    inside = ~cold
    cold[inside] = catalog.popularity[rows[inside]] == 0
    return cold


def _artist_songs(songs: VectorSearch, query: Query, votes: Votes, cut: float, share: float,
                  power: float) -> Candidates:
    """The new songs of the seeds' artists (``query.artists``, see :mod:`server.artists`),
    each scored ``cut x share x similarity ** power x sqrt(shared)``: ``cut``, the score a
    vote needs to make the answer; its code similarity to the nearest seed by its artist;
    ``shared``, how many seeds are by its artist. So a new song qualifies for the answer
    when ``share x similarity ** power x sqrt(shared) > 1``, the higher the stronger it is:
    on the cold-start data a new song by a seed's artist is about as likely to be played
    as the last songs of an answer when its code is nearly its seed's (similarity > 0.98),
    and more likely the more seeds share its artist (docs/BENCHMARKS.md, *Cold start*).
    Ties go to the more popular artist (its training playlist entries; popularity itself
    predicts less: a popular artist has many new songs, each less likely). Its source is
    that nearest seed (a REASON_ARTIST reason): (rows, values, sources), rows distinct."""
    if share <= 0 or query.artists is None or not query.artists.has_new:
        return _NO_CANDIDATES
    seeds = query.seeds
    if not len(seeds):
        # A question without seeds (tags, a title): its best candidates stand in for
        # them, as the tag and title songs stand in for seeds in ae-neighbours.
        seeds = votes.ranked(PSEUDO_SEEDS)[0]
    found = query.artists.songs_of(seeds)
    if not len(found.rows):
        return _NO_CANDIDATES
    cand, inverse = np.unique(found.rows, return_inverse=True)
    owners, owner_at = np.unique(found.seeds, return_inverse=True)
    # Every candidate against every seed that has one (a small product), not one vector
    # pair gathered per (song, seed) pair.
    sims = (songs.vectors(cand) @ songs.vectors(owners).T)[inverse, owner_at]
    # Distinct seeds per candidate (a song with two of a seed's artists counts once).
    shared = np.bincount(np.unique(inverse * len(owners) + owner_at) // len(owners),
                         minlength=len(cand))
    # The largest similarity (from 0), the pair that first reaches it, the artist's fame.
    best_sim, best_pair, fame = voting.best_of_groups(
        inverse.astype(np.int64), len(cand), sims.astype(np.float64),
        found.artist_popularity.astype(np.float64))
    value = (cut * share * best_sim ** power * np.sqrt(shared)
             * (1.0 + 1e-6 * np.log1p(fame)))
    # The seed of each candidate's largest similarity (the first on a tie).
    return cand, value, ARTIST_SOURCE - found.seeds[best_pair]


def _split(catalog: Catalog, found: Candidates) -> tuple[Candidates, Candidates]:
    """Candidates as (by value, in the tail): songs added at run time, and the songs a seed
    added at run time proposes, go to the tail (see :func:`with_new_songs`)."""
    seed = np.where(found[2] <= ARTIST_SOURCE, ARTIST_SOURCE - found[2], -1 - found[2])
    added = (found[0] >= catalog.n_songs) | (seed >= catalog.n_songs)
    return (found[0][~added], found[1][~added], found[2][~added]), \
        (found[0][added], found[1][added], found[2][added])


def _best_of(parts: Sequence[Candidates]) -> Candidates:
    """Candidates of several sources merged: each distinct row with its largest value and
    that value's source (the earlier part's on a tie), ordered by value, then row."""
    rows = np.concatenate([p[0] for p in parts])
    value = np.concatenate([p[1] for p in parts])
    source = np.concatenate([p[2] for p in parts])
    order = np.lexsort((np.arange(len(rows)), -value, rows))
    first = np.ones(len(order), dtype=bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    keep = order[first]
    keep = keep[np.lexsort((rows[keep], -value[keep]))]
    return rows[keep], value[keep], source[keep]


def _add_candidates(votes: Votes, rows: np.ndarray, value: np.ndarray, source: np.ndarray
                    ) -> Votes:
    """``votes`` plus distinct ``rows`` scored ``value`` with ``source``; a row already
    among the votes keeps the larger score (and that score's source)."""
    if not len(rows):
        return votes
    known = np.isin(rows, votes.items)
    scores, sources = votes.scores, votes.source
    if known.any():
        # Already a candidate (never for playlist votes; ``ranked``'s seed source, or the
        # other new-song source, can propose one): it keeps the larger of the two.
        sort = np.argsort(votes.items, kind="stable")
        at = sort[np.searchsorted(votes.items, rows[known], sorter=sort)]
        higher = value[known] > scores[at]
        scores, sources = scores.astype(np.float64), sources.copy()
        scores[at[higher]] = value[known][higher]
        sources[at[higher]] = source[known][higher]
    items = np.concatenate([votes.items, rows[~known]])
    order = np.argsort(items, kind="stable")
    return Votes(items[order], np.concatenate([scores, value[~known]])[order],
                 np.concatenate([sources, source[~known]])[order])


def _cut(votes: Votes, n: int) -> float:
    """The score a vote needs to make an answer of ``n`` songs: the ``n``-th best (the
    lowest when fewer; 1, the scale of a normalised vote, when there are none)."""
    if len(votes.items) >= n:
        cut = float(np.partition(votes.scores, len(votes.items) - n)[len(votes.items) - n])
    else:
        cut = float(votes.scores.min()) if len(votes.items) else 1.0
    return max(cut, 1e-9)


def _in_tail(votes: Votes, query: Query, found: Candidates, cut: float, tail: float
             ) -> Votes:
    """``votes`` plus the candidates ``found`` (best first) valued above ``cut``, at most
    ``tail x n_songs`` of them, placed right after the answer's first ``n_songs - m``
    votes (``m``: how many are placed; the seeds left out, as the answer leaves them),
    in value order; a row the votes or the seeds hold is left out."""
    n = query.n_songs
    places = min(int(tail * n), n)
    rows, value, source = found
    fresh = ~np.isin(rows, votes.items) & ~np.isin(rows, query.seeds)
    # The votes as the answer will hold them (the seeds are never answered), best first.
    scores = votes.scores[~np.isin(votes.items, query.seeds)]
    top = -np.sort(-scores)[:n].astype(np.float64)
    if len(top) >= n:  # fewer votes than places: every candidate fits
        fresh &= value > cut
    rows, source = rows[fresh][:max(places, 0)], source[fresh][:max(places, 0)]
    m = len(rows)
    if not m:
        return votes
    # Scores strictly between the (n - m)-th best vote (with every vote tied to it) and
    # the next lower vote, in value order.
    at = n - m
    if not len(top):
        hi, lo = 1.0, 0.5
    elif at == 0:
        hi, lo = 2.0 * float(top[0]) + 1.0, float(top[0])
    else:
        hi = float(top[min(at, len(top)) - 1])
        lower = scores[scores < hi]
        lo = float(lower.max()) if len(lower) else 0.5 * hi
    placed = lo + (hi - lo) * (m - np.arange(m)) / (m + 1)
    return _add_candidates(votes, rows, placed, source)


def with_new_songs(catalog: Catalog, songs: VectorSearch, query: Query, votes: Votes,
                   new_share: float = NEW_SHARE, new_power: float = NEW_POWER,
                   artist_share: float = ARTIST_SHARE, artist_power: float = ARTIST_POWER,
                   new_tail: float = NEW_TAIL) -> Votes:
    """The votes plus the new songs (no training playlist holds them) of both sources: the
    seeds' nearest ones by code (:func:`_seed_neighbours`, valued against the best vote)
    and their artists' ones (:func:`_artist_songs`, valued against ``cut``, the score a
    vote needs to make the answer, once the first source's bundle songs are in).

    Bundle songs (rows below ``catalog.n_songs``: compacted ones, and on real data songs
    only validation playlists hold) are placed by value among the votes; one the votes
    already hold (``ranked`` scores bundle songs in no playlist) keeps the larger score.
    Songs added at run time (rows from ``catalog.n_songs``: AddSongs, their codes from
    metadata alone), and any new song whose source is a seed added at run time, valued
    above ``cut`` qualify, and the best ``new_tail x n_songs`` of them take the places
    right after the answer's first ``n_songs - m`` votes (``m``: how many qualified):
    they end the answer and never push a vote out of its head. A metadata-only code is
    nearly its seed's, or a metadata-only seed's nearly its new songs' (similarity near
    1), so by value such songs reached the head of answers where they are about as
    likely to be played as the last songs (demo, ``ranked``: -0.0025 song nDCG by value,
    score above the answers without added songs in the tail); bundle songs in no
    playlist proposed by bundle seeds are hits far more often (Spotify sample: a quarter
    of them), and confining those to the tail cut ``ae-hybrid`` there from 0.3096 to
    0.1831 (docs/BENCHMARKS.md, *Cold start*). Sources: playlist positions (>= 0), then
    those of :func:`new_song_reason`."""
    if new_share <= 0 and artist_share <= 0:
        return votes
    n = query.n_songs
    best = float(votes.scores.max()) if len(votes.items) else 0.0
    near, near_added = _split(catalog, _seed_neighbours(
        catalog, songs, query, best, new_share if len(votes.items) else 0.0, new_power))
    votes = _add_candidates(votes, *near)
    cut = _cut(votes, n)
    by_artist, by_artist_added = _split(catalog, _artist_songs(
        songs, query, votes, cut, artist_share, artist_power))
    votes = _add_candidates(votes, *by_artist)
    if not len(near_added[0]) and not len(by_artist_added[0]):
        return votes
    return _in_tail(votes, query, _best_of([near_added, by_artist_added]), cut, new_tail)


def new_song_reason(source: int) -> tuple[str, int]:
    """The reason of a new song's source (negative) in :func:`with_new_songs`' votes."""
    if source <= ARTIST_SOURCE:
        return REASON_ARTIST, ARTIST_SOURCE - source
    return REASON_SEED, -1 - source


def _answer_from_votes(catalog: Catalog, songs: VectorSearch, query: Query, song_votes: Votes,
                       tag_votes: Votes, title_tags: np.ndarray | None,
                       new_share: float = NEW_SHARE, new_power: float = NEW_POWER,
                       artist_share: float = ARTIST_SHARE,
                       artist_power: float = ARTIST_POWER,
                       new_tail: float = NEW_TAIL) -> Answer:
    picker = _Picker(catalog, query, songs.count())
    song_votes = with_new_songs(catalog, songs, query, song_votes, new_share, new_power,
                                artist_share, artist_power, new_tail)
    # Most answers fill from the best few hundred candidates: rank only those first.
    limit = 2 * query.n_songs + len(query.seeds)
    rows, scores, sources = song_votes.ranked(limit)
    done = 0
    while True:
        for row, score, source in zip(rows[done:].tolist(), scores[done:].tolist(),
                                      sources[done:].tolist(), strict=True):
            if picker.full:
                break
            picker.take(row, score, (REASON_PLAYLIST, source) if source >= 0
                        else new_song_reason(source))
        if picker.full or len(rows) == len(song_votes.items):
            break
        done = len(rows)
        rows, scores, sources = song_votes.ranked()
    if len(query.seeds) and not picker.full:
        # Neighbour playlists seldom hold every song a big seed list needs: fill the rest
        # per seed, as ae-quota does, before falling back to popularity.
        rest = ae_quota(catalog, songs, query)
        for row, score, reason in zip(rest.songs.tolist(), rest.song_scores.tolist(),
                                      rest.reasons, strict=True):
            if picker.full:
                break
            picker.take(row, score * 1e-3, reason)
    if len(rows) == 0 and len(query.seeds) == 0 and not len(tag_votes.items):
        return _finish(catalog, picker, query, _cold_start(catalog, picker, query))
    tag_score: np.ndarray = np.zeros(len(catalog.tags), dtype=np.float32)
    tag_score[tag_votes.items] = tag_votes.normalised().scores
    if title_tags is not None and title_tags.any():
        tag_score = tag_score + title_tags / max(float(title_tags.max()), 1e-9)
    return _finish(catalog, picker, query, tag_score if tag_score.any() else None)


def ae_neighbours(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                  query: Query, n_playlists: int = 50, alpha: float = 2.0,
                  new_share: float = NEW_SHARE, new_power: float = NEW_POWER,
                  artist_share: float = ARTIST_SHARE, artist_power: float = ARTIST_POWER,
                  new_tail: float = NEW_TAIL) -> Answer:
    """Sum of seed codes -> nearest training playlists -> their songs and tags, plus the
    new songs no playlist holds (see :func:`with_new_songs`)."""
    pls, weights, title_tags = _ae_playlists(catalog, songs, playlists, query, n_playlists,
                                             alpha)
    return _answer_from_votes(catalog, songs, query,
                              Votes.of(catalog.playlist_songs, pls, weights),
                              Votes.of(catalog.playlist_tags, pls, weights), title_tags,
                              new_share, new_power, artist_share, artist_power, new_tail)


def ae_hybrid(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch, query: Query,
              ae_weight: float = 0.25, n_playlists: int = 50, alpha: float = 2.0,
              new_share: float = NEW_SHARE, new_power: float = NEW_POWER,
              artist_share: float = ARTIST_SHARE, artist_power: float = ARTIST_POWER,
              new_tail: float = NEW_TAIL) -> Answer:
    """Neighbour-CF votes + ``ae_weight`` x ``ae-neighbours`` votes (each normalised), plus
    the new songs no playlist holds (see :func:`with_new_songs`)."""
    if catalog.cf is None:
        raise ValueError("this bundle has no neighbour-CF arrays: ae-hybrid needs a bundle "
                         "exported by a trainer with it (retrain)")
    cf = catalog.cf
    cf_pls, cf_sims = cf.neighbours(query.seeds, query.tags, query.title)
    cf_weights = cf_sims.astype(np.float64) ** cf.alpha
    song_votes = Votes.of(catalog.playlist_songs, cf_pls, cf_weights)
    tag_votes = Votes.of(catalog.playlist_tags, cf_pls, cf_weights)
    title_tags = None
    if ae_weight > 0:
        pls, weights, title_tags = _ae_playlists(catalog, songs, playlists, query,
                                                 n_playlists, alpha)
        song_votes = song_votes.blend(Votes.of(catalog.playlist_songs, pls, weights),
                                      ae_weight)
        tag_votes = tag_votes.blend(Votes.of(catalog.playlist_tags, pls, weights), ae_weight)
    return _answer_from_votes(catalog, songs, query, song_votes, tag_votes, title_tags,
                              new_share, new_power, artist_share, artist_power, new_tail)


class RankerLike(Protocol):
    """The learned second stage (``server.ranking.Ranker``), as ``run_strategy`` sees it:
    a protocol, so that this module does not import the one that builds on it."""

    def answer(self, catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
               query: Query, new_share: float = ..., new_power: float = ...,
               artist_share: float = ..., artist_power: float = ...,
               new_tail: float = ...) -> Answer: ...


def run_strategy(name: str, catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                 query: Query, ranker: RankerLike | None = None,
                 artists: ArtistIndex | None = None, **options: float) -> Answer:
    """Dispatch by strategy name (one of :data:`STRATEGIES`); ``options`` are the
    strategy's keyword parameters (e.g. ``ae_weight`` for ae-hybrid); ``ranked`` needs the
    bundle's ``ranker``; ``artists``, when given, is the new songs by artist the query
    uses (unless it carries its own). The answer names the strategy."""
    if artists is not None and query.artists is None and name != "ae-quota":
        query = replace(query, artists=artists)
    if name == RANKED:
        if ranker is None:
            raise ValueError("strategy 'ranked' needs a bundle with a ranker (trainer.rank)")
        answer = ranker.answer(catalog, songs, playlists, query, **options)
    elif name == "ae-quota":
        answer = ae_quota(catalog, songs, query)
    elif name == "ae-neighbours":
        answer = ae_neighbours(catalog, songs, playlists, query, **options)  # type: ignore[arg-type]
    elif name == "ae-hybrid":
        answer = ae_hybrid(catalog, songs, playlists, query, **options)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return replace(answer, strategy=name)
