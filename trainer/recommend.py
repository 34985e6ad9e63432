"""Answer a question file with any registered model and write arena-format results.

    python -m trainer.recommend --data data/demo-split \\
        --questions data/demo-split/val_questions.json --model playlist-knn --out results.json

``--data`` is a dataset directory whose ``train.json`` is the training data. Every answer
holds exactly 100 unique songs and 10 unique tags, seeds excluded (:func:`base.complete`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.dataset import DataError, Dataset, load_dataset
from trainer.recommenders.base import (
    Popularity,
    Question,
    Recommender,
    complete,
    questions_from,
)
from trainer.recommenders.registry import MODELS, make_recommender, parse_option

log = logging.getLogger(__name__)


def run_model(data: Dataset, questions: Sequence[Question], model: Recommender, *,
              n_songs: int = 100, n_tags: int = 10,
              progress: bool = True) -> tuple[list[dict[str, Any]], float, float]:
    """Fit ``model`` on ``data`` and answer every question.

    Parameters
    ----------
    data
        The training dataset (``data.train`` is what the model learns from).
    questions
        Questions to answer, e.g. from :func:`base.questions_from`.
    model
        An unfitted recommender.
    n_songs, n_tags
        Answer sizes (the arena's are 100 and 10).
    progress
        Show a tqdm bar on stderr while answering.

    Returns
    -------
    results, fit_s, predict_s
        Arena-format answers ``{"id", "songs", "tags"}`` in question order, and the
        wall-clock seconds of fitting and of answering (including :func:`complete`).
    """
    start = time.perf_counter()
    model.fit(data)
    fit_s = time.perf_counter() - start
    popular = Popularity.of(data)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for question in tqdm(questions, desc=getattr(model, "name", "recommend"), unit="q",
                         disable=not progress, leave=False):
        rec = complete(model.recommend(question, n_songs, n_tags), question, popular,
                       n_songs, n_tags)
        results.append({"id": question.id, "songs": rec.songs.tolist(), "tags": rec.tags})
    predict_s = time.perf_counter() - start
    return results, fit_s, predict_s


def load_questions(data: Dataset, path: Path) -> list[Question]:
    """Parse a question file (arena playlist format) against ``data``'s songs and tags."""
    return questions_from(data.load_playlists(path), data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.recommend",
        description="Answer playlist-continuation questions with a registered model.")
    parser.add_argument("--data", type=Path, required=True,
                        help="dataset directory; its train.json is the training data")
    parser.add_argument("--questions", type=Path, required=True,
                        help="question file, e.g. val_questions.json")
    parser.add_argument("--model", required=True,
                        help=f"model name, one of: {', '.join(sorted(MODELS))}")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--bundle", type=Path,
                        help="trained bundle directory, for models that need one")
    parser.add_argument("--drop-future", action="store_true",
                        help="skip songs issued after each question's updt_date")
    parser.add_argument("--set", dest="options", action="append", default=[],
                        metavar="KEY=VALUE", help="model option, e.g. --set k=200 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--strict", action="store_true",
                        help="refuse dirty values in the data and question files instead of "
                             "reading them leniently")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = dict(parse_option(o) for o in args.options)
        if args.bundle is not None:
            options["bundle"] = str(args.bundle)
        if args.drop_future:
            options["drop_future"] = True
        model = make_recommender(args.model, **options)
        data = load_dataset(args.data, files=["train.json"], strict=args.strict)
        questions = load_questions(data, args.questions)
        results, fit_s, predict_s = run_model(data, questions, model,
                                              progress=not args.no_progress)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", encoding="utf-8") as fh:
            json.dump(results, fh, ensure_ascii=False)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    per_q = 1000 * predict_s / max(len(questions), 1)
    print(f"{args.model}: fit {fit_s:.2f} s, predict {predict_s:.2f} s "
          f"({len(questions)} questions, {per_q:.2f} ms each) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
