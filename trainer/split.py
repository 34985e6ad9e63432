"""Makes a validation split the way the Melon Playlist Continuation organisers did.

Reproduces the rules of Kakao Arena's ``split_data.py``:

1. ``random.Random(seed).shuffle`` the playlists of ``train.json`` (the official script calls
   ``random.seed(777); random.shuffle(playlists)``, so the 80/20 split is the official one).
2. The first ``int(0.8 n)`` playlists are the new training set; the rest become questions.
3. The question playlists are cut, in order, into 30% songs only, 50% songs and tags,
   15% tags only and 5% title only (the official ``int(tot * 0.3)``, ... boundaries).
4. A *masked* list keeps a random ``floor(len / 2)`` of its items in the question, in their
   original order, and the rest in the answer; a *deleted* list is empty in the question and
   whole in the answer. Songs only masks songs and deletes tags, songs and tags masks both,
   tags only masks tags and deletes songs, title only deletes both. The title (and every
   other field) is always kept in both the question and the answer.
5. Answers keep at most 100 songs and 10 tags (``songs[:100]``, ``tags[:10]``).
6. Questions and answers are shuffled together.

The masks and the final shuffle draw from ``numpy.random.RandomState(seed)`` with exactly the
official sequence of ``shuffle`` calls. The official script draws them from numpy's *unseeded*
global generator, so its questions differ from run to run; this split equals the official
script run with ``np.random.seed(seed)`` added, and is deterministic for a seed.

Deliberate choices, where the official script is silent or would break:

- Answers are truncated to 100 songs / 10 tags for masked lists too (the official script only
  truncates deleted lists). This changes nothing on Melon (at most 200 songs and fewer than
  20 tags per playlist) and keeps the evaluator's promise that an answer has at most
  100 songs and 10 tags.
- Playlists are assigned to a question type by position only, as in the official script,
  whatever their lengths, so the type shares are exact. Halving sends ``ceil(len / 2)``
  items to the answer, so an answer list is empty only when the playlist's own list is
  empty (a playlist without tags, say); such a list scores 0 in :mod:`trainer.evaluate`.
- Duplicate playlist ids are rejected: the evaluator matches results to answers by id.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trainer.dataset import DataError, load_dataset, read_json

log = logging.getLogger(__name__)

DEFAULT_SEED = 777
TRAIN_SHARE = 0.8
MAX_ANSWER_SONGS = 100
MAX_ANSWER_TAGS = 10
_ANSWER_LIMIT = {"songs": MAX_ANSWER_SONGS, "tags": MAX_ANSWER_TAGS}
# (question type, masked lists, deleted lists, end of the type's slice as a share of the
# question playlists), in the official order: the order matters for the random stream.
QUESTION_TYPES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], float], ...] = (
    ("songs", ("songs",), ("tags",), 0.3),
    ("songs+tags", ("songs", "tags"), (), 0.8),
    ("tags", ("tags",), ("songs",), 0.95),
    ("title", (), ("songs", "tags"), 1.0),
)


def _mask(records: Sequence[dict[str, Any]], masked: Sequence[str], deleted: Sequence[str],
          rng: np.random.RandomState,
          progress: tqdm | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Questions and answers for one question type (the official ``_mask``)."""
    questions: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    for rec in records:
        # Every field but the two lists is a scalar, so shallow copies are independent.
        q = dict(rec)
        a = dict(rec)
        for col in deleted:
            q[col] = []
            a[col] = list(rec[col])[: _ANSWER_LIMIT[col]]
        for col in masked:
            items = list(rec[col])
            keep = np.zeros(len(items), dtype=bool)
            keep[: len(items) // 2] = True
            rng.shuffle(keep)  # the official np.random.shuffle(mask), one call per list
            q[col] = [x for x, k in zip(items, keep, strict=True) if k]
            a[col] = [x for x, k in zip(items, keep, strict=True) if not k][: _ANSWER_LIMIT[col]]
        questions.append(q)
        answers.append(a)
        if progress is not None:
            progress.update()
    return questions, answers


def split_playlists(records: Sequence[dict[str, Any]], seed: int = DEFAULT_SEED, *,
                    progress: bool = False
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split playlist records into training playlists, questions and answers.

    Parameters
    ----------
    records
        Playlists as in ``train.json``: dicts with at least ``id``, ``songs`` and ``tags``.
        Not modified.
    seed
        Seeds both the playlist shuffle (``random``) and the masks (``numpy``).
    progress
        Show a tqdm bar while masking.

    Returns
    -------
    train, questions, answers
        ``train`` holds 80% of the records (the input dicts themselves); ``questions[i]``
        and ``answers[i]`` are the two halves of one playlist (same ``id``).

    Raises
    ------
    ValueError
        When two records share a playlist id.
    """
    seen: set[int] = set()
    for i, rec in enumerate(records):
        if rec["id"] in seen:
            raise ValueError(f"record {i}: field 'id': duplicate playlist id {rec['id']}")
        seen.add(rec["id"])
    playlists = list(records)
    random.Random(seed).shuffle(playlists)
    n_train = int(len(playlists) * TRAIN_SHARE)
    train, held = playlists[:n_train], playlists[n_train:]

    rng = np.random.RandomState(seed)
    total = len(held)
    questions: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    start = 0
    bar = tqdm(total=total, desc="masking", unit="playlist") if progress else None
    for name, masked, deleted, end_share in QUESTION_TYPES:
        end = total if end_share == 1.0 else int(total * end_share)
        q, a = _mask(held[start:end], masked, deleted, rng, bar)
        log.info("%s: %d questions", name, len(q))
        questions += q
        answers += a
        start = end
    if bar is not None:
        bar.close()
    order = np.arange(total)
    rng.shuffle(order)
    return train, [questions[i] for i in order], [answers[i] for i in order]


def _write_json(data: Any, path: Path) -> None:
    # ensure_ascii=False keeps Korean titles and tags readable, as the official files are.
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_split(data_dir: str | Path, out_dir: str | Path, seed: int = DEFAULT_SEED, *,
                progress: bool = False, strict: bool = False) -> tuple[int, int]:
    """Split ``data_dir/train.json`` into a new dataset directory ``out_dir``.

    ``out_dir`` receives ``train.json``, ``val_questions.json``, ``val_answers.json`` and
    copies of ``song_meta.json`` and ``genre_gn_all.json``, so it loads with
    :func:`trainer.dataset.load_dataset` like any dataset. The records are split as they
    are written (the official split of the raw file): dirty values the loader reads
    leniently stay in the split files, and are read leniently again when it is loaded.
    ``strict`` refuses a dataset with any of them.

    Returns
    -------
    n_train, n_questions

    Raises
    ------
    DataError
        When the source dataset is missing or malformed (checked by loading it first).
    ValueError
        When ``train.json`` holds duplicate playlist ids.
    """
    src, out = Path(data_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source directory: its train.json would be lost")
    # Loading validates every record (types, song ids, dates) before anything is written.
    load_dataset(src, files=["train.json"], strict=strict)
    records = read_json(src / "train.json")
    try:
        train, questions, answers = split_playlists(records, seed, progress=progress)
    except ValueError as exc:
        raise DataError(src / "train.json", str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    _write_json(train, out / "train.json")
    _write_json(questions, out / "val_questions.json")
    _write_json(answers, out / "val_answers.json")
    for name in ("song_meta.json", "genre_gn_all.json"):
        if (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
    return len(train), len(questions)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m trainer.split --data DIR --out OUT [--seed 777]``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.split",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="dataset directory with train.json, song_meta.json, genre_gn_all.json")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the split to")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the shuffle and the masks (default: %(default)s)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse dirty values (impossible dates, null albums, repeated "
                             "songs, ...) instead of reading them leniently")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        n_train, n_questions = write_split(args.data, args.out, args.seed,
                                           progress=sys.stderr.isatty(), strict=args.strict)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n_train} training playlists, {n_questions} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
