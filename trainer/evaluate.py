"""Scores playlist-continuation results with the Melon Playlist Continuation metric.

Score = 0.85 x song nDCG@100 + 0.15 x tag nDCG@10, averaged over every answer playlist, as
Kakao Arena's ``evaluate.py`` computes it. Relevance is binary; a hit at 0-based rank ``i``
adds ``1 / ln(i + 2)`` to the DCG and the ideal DCG sums that discount over the first
``len(answer)`` ranks. The official code uses the natural log (``np.log``); any base gives
the same ratio DCG / IDCG, so the choice cannot change a score.

Two cases the official evaluator does not handle are fixed here:

- An empty answer list (a playlist without tags, say) has IDCG 0; the official code divides
  by it and crashes. Here that part scores 0 and the playlist still counts in the average.
- An answer list longer than the cut-off (answers made by :mod:`trainer.split` never are)
  would index past the official IDCG table; here IDCG sums over ``min(len(answer), k)``
  ranks, so a perfect result scores exactly 1.

Results must hold exactly the answers' playlist ids, each once, each with exactly 100 unique
integer songs and 10 unique string tags; anything else raises :class:`ResultsError` naming the
playlist, as the official evaluator refuses such a submission.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import DataError, read_json

N_SONGS = 100
N_TAGS = 10
SONG_WEIGHT = 0.85
TAG_WEIGHT = 0.15


class ResultsError(ValueError):
    """Results or answers that cannot be scored; the message names the playlist."""


@dataclass(frozen=True)
class Scores:
    """Mean song nDCG@100, mean tag nDCG@10 and their weighted sum."""

    song_ndcg: float
    tag_ndcg: float
    score: float

    def __str__(self) -> str:
        return (f"song_ndcg={self.song_ndcg:.6f} tag_ndcg={self.tag_ndcg:.6f} "
                f"score={self.score:.6f}")


def discounts(k: int) -> np.ndarray:
    """``1 / ln(i + 2)`` for ranks ``i = 0 .. k-1``."""
    return 1.0 / np.log(np.arange(k, dtype=np.float64) + 2.0)


def ndcg(relevant: Sequence[Any], ranked: Sequence[Any], k: int) -> float:
    """nDCG@k of one ranked list against the hidden items (the plain, slow definition).

    Parameters
    ----------
    relevant
        The answer: the playlist's hidden songs or tags.
    ranked
        The recommendation, best first; only its first ``k`` items count.
    k
        The cut-off: 100 for songs, 10 for tags.

    Returns
    -------
    float
        DCG / IDCG in [0, 1]; 0 when ``relevant`` is empty.
    """
    disc = discounts(k)
    hidden = set(relevant)
    dcg = sum(float(disc[i]) for i, item in enumerate(ranked[:k]) if item in hidden)
    idcg = float(disc[: min(len(relevant), k)].sum())
    return dcg / idcg if idcg > 0 else 0.0


def batch_ndcg(relevant: Sequence[Sequence[Any]], ranked: np.ndarray) -> np.ndarray:
    """nDCG@k of many ranked lists at once, ``k = ranked.shape[1]``.

    Parameters
    ----------
    relevant
        ``relevant[r]`` is the answer list of row ``r`` (ints or strings).
    ranked
        Array ``(n_rows, k)`` of recommendations of the same kind as ``relevant``.

    Returns
    -------
    np.ndarray
        float64 ``(n_rows,)``; 0 for rows whose answer is empty.
    """
    n_rows, k = ranked.shape
    if len(relevant) != n_rows:
        raise ValueError(f"{len(relevant)} answer lists for {n_rows} ranked rows")
    lengths = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=n_rows)
    disc = discounts(k)
    # ideal[m] = IDCG of an answer with m items: the first min(m, k) discounts.
    ideal = np.concatenate([[0.0], np.cumsum(disc)])
    idcg = ideal[np.minimum(lengths, k)]
    flat = [item for row in relevant for item in row]
    if not flat:
        return np.zeros(n_rows)
    # Encode each (row, item) pair as one int64 key; a recommendation is a hit when its key
    # is among the sorted answer keys. One sort and one binary search for the whole batch.
    gt_code, rank_code, span = _encode(flat, ranked, n_rows)
    gt_keys = np.repeat(np.arange(n_rows, dtype=np.int64), lengths) * span + gt_code
    gt_keys.sort()
    rank_keys = np.arange(n_rows, dtype=np.int64)[:, None] * span + rank_code
    pos = np.minimum(np.searchsorted(gt_keys, rank_keys), len(gt_keys) - 1)
    hits = (rank_code >= 0) & (gt_keys[pos] == rank_keys)
    dcg = (hits * disc).sum(axis=1)
    out = np.zeros(n_rows)
    np.divide(dcg, idcg, out=out, where=idcg > 0)
    return out


def _encode(flat: list[Any], ranked: np.ndarray, n_rows: int
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes in ``[0, span)`` for answer items and recommendations; a recommended
    item that is in no answer may get -1 instead."""
    if ranked.dtype.kind in "iu":
        gt = np.asarray(flat, dtype=np.int64)
        lo = min(int(gt.min()), int(ranked.min()))
        span = max(int(gt.max()), int(ranked.max())) - lo + 1
        if span * n_rows < 2**62:  # row * span + code fits in int64
            return gt - lo, ranked.astype(np.int64) - lo, span
    # Strings, or ids too spread out: dense codes for the answer items only.
    index: dict[Any, int] = {}
    gt = np.fromiter((index.setdefault(x, len(index)) for x in flat), dtype=np.int64,
                     count=len(flat))
    rank = np.fromiter((index.get(x, -1) for x in ranked.ravel().tolist()), dtype=np.int64,
                       count=ranked.size).reshape(ranked.shape)
    return gt, rank, max(len(index), 1)


def _check_answers(answers: Sequence[Any]) -> dict[Any, int]:
    """Row of each answer id; raises ResultsError for a malformed answer file."""
    if not isinstance(answers, list | tuple):
        raise ResultsError(f"answers: expected a list of playlists, got {type(answers).__name__}")
    if not answers:
        raise ResultsError("answers: no playlists to score")
    row_of: dict[Any, int] = {}
    for i, ans in enumerate(answers):
        if not isinstance(ans, dict) or type(ans.get("id")) is not int:
            raise ResultsError(f"answer {i}: expected an object with an integer 'id'")
        pid = ans["id"]
        for name, kind in (("songs", int), ("tags", str)):
            items = ans.get(name)
            if not isinstance(items, list) or not all(type(x) is kind for x in items):
                raise ResultsError(
                    f"answer {i} (playlist {pid}): '{name}' must be a list of {kind.__name__}")
            if kind is int and items and not (-(2**63) <= min(items) and max(items) < 2**63):
                raise ResultsError(f"answer {i} (playlist {pid}): song ids must fit in 64 bits")
        if pid in row_of:
            raise ResultsError(f"answer {i}: playlist {pid} appears twice in the answers")
        row_of[pid] = i
    return row_of


def _check_list(pid: Any, rec: dict[str, Any], name: str, kind: type, n: int) -> list[Any]:
    items = rec.get(name)
    if not isinstance(items, list):
        raise ResultsError(f"playlist {pid}: '{name}' must be a list, got {items!r}")
    if len(items) != n:
        raise ResultsError(f"playlist {pid}: {len(items)} {name}, expected exactly {n}")
    for x in items:
        if type(x) is not kind:
            raise ResultsError(f"playlist {pid}: {name} must be {kind.__name__}, found {x!r}")
    if kind is int and not (-(2**63) <= min(items) and max(items) < 2**63):
        raise ResultsError(f"playlist {pid}: song ids must fit in 64 bits")
    if len(set(items)) != n:
        seen: set[Any] = set()
        for x in items:
            if x in seen:
                raise ResultsError(f"playlist {pid}: {name[:-1]} {x!r} is recommended twice")
            seen.add(x)
    return items


def check_results(results: Any, row_of: dict[Any, int]) -> list[int]:
    """Validate results against the answer ids.

    Parameters
    ----------
    results
        Parsed results JSON: ``[{id, songs: [100 ints], tags: [10 str]}]``.
    row_of
        Answer row of each playlist id.

    Returns
    -------
    list[int]
        For each result, the answer row it scores against.

    Raises
    ------
    ResultsError
        Naming the playlist: an id missing, unknown or repeated, or a playlist without
        exactly 100 unique songs and 10 unique tags.
    """
    if not isinstance(results, list | tuple):
        raise ResultsError(f"expected a list of playlists, got {type(results).__name__}")
    rows: list[int] = []
    seen: set[Any] = set()
    for i, rec in enumerate(results):
        if not isinstance(rec, dict) or type(rec.get("id")) is not int:
            raise ResultsError(f"result {i}: expected an object with an integer 'id'")
        pid = rec["id"]
        if pid in seen:
            raise ResultsError(f"playlist {pid}: appears twice in the results")
        seen.add(pid)
        if pid not in row_of:
            raise ResultsError(f"playlist {pid}: not among the answers' playlists")
        _check_list(pid, rec, "songs", int, N_SONGS)
        _check_list(pid, rec, "tags", str, N_TAGS)
        rows.append(row_of[pid])
    if len(seen) != len(row_of):
        missing = [pid for pid in row_of if pid not in seen]
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ResultsError(f"results lack {len(missing)} answer playlist(s): {shown}{more}")
    return rows


def ndcg_per_playlist(answers: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Song nDCG@100 and tag nDCG@10 of every answer playlist, in the answers' order.

    Validates both lists first (see :func:`check_results`).
    """
    row_of = _check_answers(answers)
    rows = check_results(results, row_of)
    return _ndcg_checked(answers, results, rows)


def _ndcg_checked(answers: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]],
                  rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    # Reorder the results to the answers' order so row r of both arrays is one playlist.
    order = [0] * len(rows)
    for j, row in enumerate(rows):
        order[row] = j
    songs = np.array([results[j]["songs"] for j in order], dtype=np.int64)
    tags = np.array([results[j]["tags"] for j in order], dtype=np.str_)
    song = batch_ndcg([a["songs"] for a in answers], songs)
    tag = batch_ndcg([a["tags"] for a in answers], tags)
    return song, tag


def score(answers: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> Scores:
    """The arena score of ``results`` against ``answers``.

    Parameters
    ----------
    answers
        Hidden halves, as in ``val_answers.json``: ``[{id, songs, tags, ...}]``.
    results
        Recommendations: ``[{id, songs: [100 ints], tags: [10 str]}]``, any order.

    Returns
    -------
    Scores
        Means over all answer playlists and ``0.85 x song + 0.15 x tag``.

    Raises
    ------
    ResultsError
        When the results (or answers) cannot be scored; the message names the playlist.
    """
    return _mean_scores(*ndcg_per_playlist(answers, results))


def _mean_scores(song: np.ndarray, tag: np.ndarray) -> Scores:
    song_mean, tag_mean = float(song.mean()), float(tag.mean())
    return Scores(song_mean, tag_mean, SONG_WEIGHT * song_mean + TAG_WEIGHT * tag_mean)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m trainer.evaluate --answers A.json --results R.json``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--answers", required=True, type=Path,
                        help="hidden halves, e.g. val_answers.json of a split")
    parser.add_argument("--results", required=True, type=Path,
                        help="recommendations: [{id, songs: [100], tags: [10]}]")
    args = parser.parse_args(argv)
    try:
        answers = read_json(args.answers)
        try:
            row_of = _check_answers(answers)
        except ResultsError as exc:
            raise DataError(args.answers, str(exc)) from None
        results = read_json(args.results)
        try:
            rows = check_results(results, row_of)
        except ResultsError as exc:
            raise DataError(args.results, str(exc)) from None
        scores = _mean_scores(*_ndcg_checked(answers, results, rows))
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
