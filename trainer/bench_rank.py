"""The learned second stage on a bundle: candidate recall per source, and CPU per question.

    python -m trainer.bench_rank --bundle bundles/demo --data data/demo-split
    python -m trainer.bench_rank --bundle B --data SPLIT --questions 500 --out -

Recall: the share of each validation answer's songs among a source's candidates, and
among the union (what ``ranked`` can reach at best), averaged over questions with hidden
songs. CPU: thread CPU seconds per question of ``ranked`` and ``ae-hybrid``, in one process,
on the same questions, interleaved so that both see the same machine state. Results go
into the bench-rank section of ``--out`` (docs/BENCHMARKS.md by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.benchtools import machine, replace_marked, shown_command
from server.bundle import BundleError
from server.engine import Engine
from server.rankdata import SOURCES
from server.ranking import candidate_features
from server.strategies import RANKED
from trainer.dataset import DataError, load_dataset, read_json
from trainer.recommenders.ae import EmbeddingStrategy
from trainer.recommenders.base import questions_from


def markers(name: str) -> tuple[str, str]:
    """The section of docs/BENCHMARKS.md a run owns: ``bench-rank``, or ``bench-rank-NAME``
    for another bundle (e.g. ``--name melon``)."""
    tag = "bench-rank" + (f"-{name}" if name else "")
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"



def measure(bundle: Path, split: Path, n_questions: int) -> dict[str, Any]:
    engine = Engine.load(bundle, verify=False)
    if engine.ranker is None:
        raise ValueError(f"{bundle} has no ranker: python -m trainer.rank --bundle {bundle}")
    data = load_dataset(split)
    questions = questions_from(data.load_playlists(split / "val_questions.json"), data)
    answers = read_json(split / "val_answers.json")
    order = np.random.default_rng(0).permutation(len(questions))[:n_questions]
    mapper = EmbeddingStrategy(RANKED, engine.catalog, engine.songs, engine.playlists)
    hits = np.zeros(len(SOURCES) + 1)
    counted = 0
    cpu: dict[str, list[float]] = {"ranked": [], "ae-hybrid": []}
    for n, i in enumerate(order.tolist()):
        query = mapper.query(questions[i], 100, 10)
        truth = data.songs.rows(answers[i]["songs"])
        cand, _ = candidate_features(engine.catalog, engine.songs, engine.playlists,
                                     engine.ranker.data, query)
        if len(truth):
            counted += 1
            found = np.isin(cand.rows, truth)
            hits[:-1] += ((cand.ranks < 1000) & found[:, None]).sum(axis=0) / len(truth)
            hits[-1] += found.sum() / len(truth)
        # Alternate which runs first, so neither always finds the caches warm.
        names = ["ranked", "ae-hybrid"] if n % 2 == 0 else ["ae-hybrid", "ranked"]
        for name in names:
            start = time.thread_time()
            engine.continue_playlist(name, query)
            cpu[name].append(time.thread_time() - start)
    recall = {s: float(hits[j] / max(counted, 1)) for j, s in enumerate(SOURCES)}
    recall["union"] = float(hits[-1] / max(counted, 1))
    return {"recall": recall, "cpu": {k: np.asarray(v) for k, v in cpu.items()},
            "questions": len(order), "songs": engine.catalog.n_songs,
            "playlists": len(engine.catalog.playlist_ids),
            "candidates": engine.ranker.data.sizes, "model": engine.manifest.model_version,
            "trees": engine.manifest.extra.get("ranker", {}).get("best_iteration", "?"),
            "als": ("its inner-product index (als.hnsw)" if engine.ranker.data.als_index
                    is not None else "an exact scan of every song's factors")}


def render(result: dict[str, Any], command: str, name: str = "") -> str:
    rec = result["recall"]
    cpu = result["cpu"]
    lines = ["## Learned second stage: candidate recall and CPU per question"
             + (f" ({name})" if name else ""), "",
             f"`{command}` on a {machine()}: {result['questions']} validation questions, "
             f"{result['songs']:,} songs, {result['playlists']:,} training playlists "
             f"(model {result['model']}, ranker of {result['trees']} trees); candidates per "
             f"source {result['candidates']}; the ALS source from {result['als']}.", "",
             "| source | " + " | ".join([*SOURCES, "union"]) + " |",
             "|---|" + "---|" * (len(SOURCES) + 1),
             "| recall of the hidden songs | " + " | ".join(
                 f"{rec[s]:.3f}" for s in [*SOURCES, "union"]) + " |", "",
             "| strategy | CPU ms / question, mean | p50 | p99 |", "|---|---|---|---|"]
    for name in ("ae-hybrid", "ranked"):
        ms = cpu[name] * 1000
        lines.append(f"| {name} | {ms.mean():.2f} | {np.percentile(ms, 50):.2f} | "
                     f"{np.percentile(ms, 99):.2f} |")
    ratio = cpu["ranked"].mean() / max(cpu["ae-hybrid"].mean(), 1e-12)
    lines += ["", f"ranked / ae-hybrid CPU: {ratio:.2f}x (thread CPU time, one process)."]
    return "\n".join(lines) + "\n"




def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainer.bench_rank",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="the split (val questions, "
                   "answers) the bundle was trained on")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file, or - to print")
    p.add_argument("--name", default="", help="section suffix for a bundle other than the "
                   "demo's (e.g. melon: the bench-rank-melon section)")
    args = p.parse_args(argv)
    try:
        result = measure(args.bundle, args.data, args.questions)
    except (BundleError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    body = render(result, shown_command("python -m trainer.bench_rank", argv), args.name)
    print(body)
    if args.out != "-":
        replace_marked(Path(args.out), body, *markers(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
