"""Cold-start evaluation: hold out the newest songs, train without them, add them through the
server's add path (metadata only), and measure how every strategy recommends them.

    python -m trainer.coldstart --data data/demo-split --out coldstart-demo.json \\
        [--fraction 0.1] [--preset small] [--compacted] [--markdown docs/BENCHMARKS.md --name demo]

The newest ``--fraction`` of the songs that training playlists hold (by ``issue_date``,
ties by id) are removed from the training playlists and from ``song_meta.json`` of a copy
of the split; a bundle is trained on that copy (``trainer.train --preset P --groups
...``, metadata groups included: a new song has nothing else); the held-out songs are then
added to the loaded model by :meth:`server.live.LiveModel.replay`, the code AddSongs and
the write-ahead log replay run (encoder on metadata, then the added songs' graph). Every
validation question is answered by every strategy with and without the added songs, and by
metadata baselines:

- ``baseline-popular-new``: the held-out songs, most popular artist first (an artist's
  popularity: how many training playlist entries its songs have), the same list for every
  question;
- ``baseline-artist-new``: the held-out songs by the seeds' artists, most popular artist
  first, then ``baseline-popular-new``'s list;
- ``baseline-S-artist-new-tail-K`` (S the default strategy; K 10, 30, 60): S's answer
  without the added songs with its last K places given to ``baseline-artist-new``'s first
  songs: what a fixed tail of new songs costs and finds.

With ``--compacted`` every strategy is scored once more (``compacted-S``) on the bundle
with the held-out songs compacted into it (:func:`trainer.compact.compact_songs`): bundle
songs in no training playlist, placed by value instead of in the tail, and scored by
``ranked``'s ranker.

The first two fill 100 songs with new songs only and answer the most popular tags. Per
strategy and baseline the report holds the score (0.85 song nDCG@100 + 0.15 tag
nDCG@10), the recall@100 of held-out songs among the answers (``new_song_recall``: hits
over held-out songs in the answers, all questions pooled), their share of the song nDCG
(``new_song_ndcg``: the DCG of held-out hits over each answer's ideal DCG, averaged) and
the hit rate of each ten places (``place_hit_rates``). Work (the split copy, the bundle)
is kept in ``OUT.work`` and reused when the same command runs again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clients.benchtools import REPO, machine, replace_marked, shown_command
from server.columns import SongMeta
from server.live import LiveModel
from server.melon import parse_issue_date, question_updt_date
from server.validation import ContinueParams, NewSong
from trainer.compact import compact_songs
from trainer.dataset import DataError, read_json
from trainer.evaluate import N_SONGS, N_TAGS, batch_ndcg, score

log = logging.getLogger(__name__)

# Metadata groups on top of the default ones: a song added at run time has only these.
GROUPS = "playlists,tags,genres,detail_genres,artists,years"
# The places of the fixed-tail baselines (``baseline-S-artist-new-tail-K``).
TAIL_PLACES = (10, 30, 60)
START = "<!-- coldstart-{name}:start -->"
END = "<!-- coldstart-{name}:end -->"


def _date(record: dict[str, Any]) -> int:
    try:
        return parse_issue_date(str(record.get("issue_date", "") or ""))[0]
    except ValueError:
        return 0


def held_out_songs(train: Sequence[dict[str, Any]], meta: Sequence[dict[str, Any]],
                   fraction: float) -> set[int]:
    """The newest ``fraction`` of the songs training playlists hold (by issue date, then
    id, newest first)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--fraction {fraction}: must be between 0 and 1")
    in_playlists = {int(s) for p in train for s in p.get("songs", [])}
    date_of = {int(m["id"]): _date(m) for m in meta}
    ranked = sorted(in_playlists, key=lambda s: (date_of.get(s, 0), s), reverse=True)
    return set(ranked[: int(round(fraction * len(ranked)))])


def write_training_split(split: Path, out: Path, held: set[int]) -> None:
    """A copy of ``split`` without the held-out songs: removed from training playlists,
    from ``song_meta.json`` and from the validation files the trainer's early stopping
    reads (the evaluation itself reads the original split's)."""
    out.mkdir(parents=True, exist_ok=True)
    train = read_json(split / "train.json")
    for p in train:
        p["songs"] = [s for s in p["songs"] if int(s) not in held]
    meta = [m for m in read_json(split / "song_meta.json") if int(m["id"]) not in held]
    files: dict[str, Any] = {"train.json": train, "song_meta.json": meta}
    for name in ("val_questions.json", "val_answers.json"):
        files[name] = read_json(split / name)
        for q in files[name]:
            q["songs"] = [s for s in q["songs"] if int(s) not in held]
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("genre_gn_all.json",):
        if (split / name).exists():
            shutil.copy2(split / name, out / name)


def new_song(record: dict[str, Any]) -> NewSong:
    """A ``song_meta.json`` record as AddSongs receives it (metadata only)."""
    return NewSong(int(record["id"]), SongMeta(
        genres=tuple(str(g) for g in record.get("song_gn_gnr_basket") or ()),
        detail_genres=tuple(str(g) for g in record.get("song_gn_dtl_gnr_basket") or ()),
        artists=tuple(int(a) for a in record.get("artist_id_basket") or ()),
        issue_date=_date(record)), str(record.get("song_name", "")),
        ", ".join(str(a) for a in record.get("artist_name_basket") or ()))


def answer_all(model: LiveModel, strategy: str, questions: Sequence[dict[str, Any]],
               desc: str) -> list[dict[str, Any]]:
    """Results of ``strategy`` for every question, through ``LiveModel.continue_playlist``
    (the server's path, ids in and out)."""
    results = []
    for q in tqdm(questions, desc=desc, unit="q", disable=None, leave=False):
        # The question's date goes with it, as a client sends it (the ranker's date
        # features read it; bench_quality's questions carry it too).
        params = ContinueParams(tuple(int(s) for s in q["songs"]), tuple(q["tags"]),
                                q.get("plylst_title", "") or "", question_updt_date(q),
                                N_SONGS, N_TAGS, strategy, False, False)
        got = model.continue_playlist(params)
        results.append({"id": q["id"], "songs": got.song_ids, "tags": got.tags})
    return results


def baselines(questions: Sequence[dict[str, Any]], held_meta: Sequence[dict[str, Any]],
              train: Sequence[dict[str, Any]], meta: Sequence[dict[str, Any]],
              popular_tags: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The two metadata baselines' results (see the module docstring)."""
    plays: dict[int, int] = {}
    for p in train:
        for s in p["songs"]:
            plays[int(s)] = plays.get(int(s), 0) + 1
    artist_pop: dict[int, int] = {}
    artists_of: dict[int, list[int]] = {}
    for m in meta:
        artists = [int(a) for a in m.get("artist_id_basket") or ()]
        artists_of[int(m["id"])] = artists
        for a in artists:
            artist_pop[a] = artist_pop.get(a, 0) + plays.get(int(m["id"]), 0)

    def pop(m: dict[str, Any]) -> int:
        return max((artist_pop.get(int(a), 0) for a in m.get("artist_id_basket") or ()),
                   default=0)

    ranked = sorted(held_meta, key=lambda m: (-pop(m), -_date(m), int(m["id"])))
    popular_new = [int(m["id"]) for m in ranked]
    rank_of = {s: i for i, s in enumerate(popular_new)}
    by_artist: dict[int, list[int]] = {}
    for m in ranked:
        for a in m.get("artist_id_basket") or ():
            by_artist.setdefault(int(a), []).append(int(m["id"]))
    tags = popular_tags[:N_TAGS]
    out: dict[str, list[dict[str, Any]]] = {"baseline-popular-new": [],
                                            "baseline-artist-new": []}
    for q in questions:
        seeds = {int(s) for s in q["songs"]}
        seed_artists = {a for s in seeds for a in artists_of.get(s, ())}
        own = sorted({s for a in seed_artists for s in by_artist.get(a, ())},
                     key=rank_of.__getitem__) if seed_artists else []
        for name, head in (("baseline-popular-new", []), ("baseline-artist-new", own)):
            songs: list[int] = []
            seen = set(seeds)
            for s in [*head, *popular_new]:
                if s not in seen:
                    seen.add(s)
                    songs.append(s)
                if len(songs) == N_SONGS:
                    break
            out[name].append({"id": q["id"], "songs": songs,
                              "tags": [t for t in tags if t not in q["tags"]][:N_TAGS]})
    return out


def new_song_metrics(answers: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]],
                     held: set[int]) -> tuple[float, float]:
    """(recall@100 of held-out songs, their mean nDCG@100 contribution)."""
    by_id = {r["id"]: r for r in results}
    hits = total = 0
    for a in answers:
        new = {int(s) for s in a["songs"]} & held
        got = by_id[a["id"]]["songs"][:N_SONGS]
        total += len(new)
        hits += sum(1 for s in got if s in new)
    ranked = np.full((len(answers), N_SONGS), -1, dtype=np.int64)
    for i, a in enumerate(answers):
        got = [s if s in held else -1 for s in by_id[a["id"]]["songs"][:N_SONGS]]
        ranked[i, : len(got)] = got
    # Only held-out hits count in the DCG; the ideal is over the whole answer.
    ndcg = batch_ndcg([a["songs"] for a in answers], ranked)
    return (hits / total if total else 0.0), float(ndcg.mean())


def place_hit_rates(answers: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]],
                    width: int = 10) -> list[float]:
    """The share of hits among each ``width`` places of the answers (places 1-10, 11-20,
    ...), all questions pooled: where a list's hits sit, so that new songs can be weighed
    against the places they would take (docs/BENCHMARKS.md, *Cold start*)."""
    by_id = {r["id"]: r for r in results}
    hits = np.zeros(N_SONGS)
    for a in answers:
        truth = {int(s) for s in a["songs"]}
        got = by_id[a["id"]]["songs"][:N_SONGS]
        hits[: len(got)] += [int(s) in truth for s in got]
    rates: list[float] = (hits.reshape(-1, width).sum(axis=1)
                          / (width * max(len(answers), 1))).tolist()
    return rates


def with_tail(results: Sequence[dict[str, Any]], tails: Sequence[dict[str, Any]], k: int
              ) -> list[dict[str, Any]]:
    """Each result's first ``N_SONGS - k`` songs, then the first ``k`` songs of the same
    question's ``tails`` result that are not among them (tags from ``results``)."""
    by_id = {t["id"]: t["songs"] for t in tails}
    out = []
    for r in results:
        head = list(r["songs"][: N_SONGS - k])
        seen = set(head)
        tail = [s for s in by_id[r["id"]] if s not in seen][:k]
        out.append({"id": r["id"], "songs": head + tail, "tags": r["tags"]})
    return out


def _padded(results: list[dict[str, Any]], fill: Sequence[int], tags: Sequence[str]
            ) -> list[dict[str, Any]]:
    """Results topped up to exactly 100 songs and 10 tags (the metric's format)."""
    out = []
    for r in results:
        songs = list(dict.fromkeys(r["songs"]))[:N_SONGS]
        seen = set(songs)
        for s in fill:
            if len(songs) >= N_SONGS:
                break
            if s not in seen:
                seen.add(s)
                songs.append(int(s))
        got_tags = list(dict.fromkeys(r["tags"]))[:N_TAGS]
        for t in tags:
            if len(got_tags) >= N_TAGS:
                break
            if t not in got_tags:
                got_tags.append(t)
        out.append({"id": r["id"], "songs": songs, "tags": got_tags})
    return out


def train_bundle(data: Path, bundle: Path, preset: str, groups: str, epochs: int | None
                 ) -> float:
    """Train the cold-start bundle unless the work directory has it (seconds spent)."""
    if (bundle / "manifest.json").exists():
        log.info("reusing %s", bundle)
        return 0.0
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "trainer.train", "--data", str(data), "--out", str(bundle),
           "--preset", preset, "--groups", groups]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise ValueError(f"training failed: {' '.join(cmd)} exited {proc.returncode}")
    return time.perf_counter() - start


def evaluate(split: Path, work: Path, fraction: float, preset: str, groups: str,
             epochs: int | None, strategies: Sequence[str] | None, limit: int | None,
             compacted: bool = False) -> dict[str, Any]:
    """Run the whole evaluation; returns the report."""
    train = read_json(split / "train.json")
    meta = read_json(split / "song_meta.json")
    held = held_out_songs(train, meta, fraction)
    marker = work / "held_out.json"
    if marker.exists() and set(read_json(marker)) != held:
        raise ValueError(f"{work}: made for other held-out songs; delete it or use --work")
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_training_split(split, work / "split", held)
        marker.write_text(json.dumps(sorted(held)))
    train_s = train_bundle(work / "split", work / "bundle", preset, groups, epochs)
    questions = read_json(split / "val_questions.json")
    answers = read_json(split / "val_answers.json")
    if limit:
        questions, answers = questions[:limit], answers[:limit]
    model = LiveModel.load(work / "bundle", verify=True, capacity=len(held), threads=1)
    # The strategy an empty ContinuePlaylist.strategy gets (``ranked`` with a ranker) is
    # always scored: the goal is set on it.
    default = model.engine.default_strategy
    names = list(dict.fromkeys([*(strategies or model.engine.strategies), default]))
    catalog = model.engine.catalog
    popular_ids = catalog.song_ids[catalog.popular_songs].tolist()
    popular_tags = [catalog.tags[t] for t in catalog.popular_tags[:50].tolist()]
    report_rows: dict[str, dict[str, Any]] = {}

    def record(name: str, results: list[dict[str, Any]]) -> None:
        results = _padded(results, popular_ids, popular_tags)
        scores = score(answers, results)
        recall, new_ndcg = new_song_metrics(answers, results, held)
        report_rows[name] = {"score": scores.score, "song_ndcg": scores.song_ndcg,
                             "tag_ndcg": scores.tag_ndcg, "new_song_recall": recall,
                             "new_song_ndcg": new_ndcg,
                             "place_hit_rates": place_hit_rates(answers, results)}
        print(f"{name}: score {scores.score:.4f} new_song_recall {recall:.4f} "
              f"new_song_ndcg {new_ndcg:.5f}", file=sys.stderr)

    without: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        without[name] = answer_all(model, name, questions, f"{name} without new songs")
        record(f"baseline-{name}-without-new", without[name])
    held_meta = [m for m in meta if int(m["id"]) in held]
    started = time.perf_counter()
    held_songs = [new_song(m) for m in held_meta]
    added, skipped = model.replay(held_songs)
    add_s = time.perf_counter() - started
    for name in names:
        record(name, answer_all(model, name, questions, name))
    kept_meta = [m for m in meta if int(m["id"]) not in held]
    for name, results in baselines(questions, held_meta, read_json(work / "split" /
                                                                   "train.json"),
                                   kept_meta, popular_tags).items():
        record(name, results)
        if name == "baseline-artist-new":
            # A fixed tail: the default's answer without new songs, its last k places
            # given to this baseline's first new songs.
            head = _padded(without[default], popular_ids, popular_tags)
            for k in TAIL_PLACES:
                record(f"baseline-{default}-artist-new-tail-{k}",
                       with_tail(head, results, k))
    if compacted:
        # The same songs compacted into the bundle (trainer.compact): bundle songs in no
        # training playlist now, placed by value and, by ``ranked``, scored by its ranker.
        out = work / "compacted"
        if out.exists():  # the bundle may have changed (a retrained ranker): rebuild
            shutil.rmtree(out)
        compact_songs(work / "bundle", held_songs, out, threads=2, progress=False)
        compacted_model = LiveModel.load(out, verify=True, capacity=1, threads=1)
        for name in names:
            record(f"compacted-{name}", answer_all(compacted_model, name, questions,
                                                   f"{name} compacted"))
    in_answers = sum(len({int(s) for s in a["songs"]} & held) for a in answers)
    return {"default_strategy": default, "results": report_rows,
            "held_out_songs": len(held), "added": added, "unplaceable": skipped,
            "add_seconds": round(add_s, 2), "train_seconds": round(train_s, 1),
            "questions": len(questions), "held_out_in_answers": in_answers,
            "fraction": fraction, "preset": preset, "groups": groups}


def table(report: dict[str, Any]) -> str:
    lines = ["| strategy | score | song nDCG | tag nDCG | new-song recall@100 | "
             "new-song nDCG |", "|---|---|---|---|---|---|"]
    default = report["default_strategy"]
    for name, r in report["results"].items():
        shown = f"**{name}** (default)" if name == default else name
        lines.append(f"| {shown} | {r['score']:.4f} | {r['song_ndcg']:.4f} | "
                     f"{r['tag_ndcg']:.4f} | {r['new_song_recall']:.4f} | "
                     f"{r['new_song_ndcg']:.5f} |")
    return "\n".join(lines)


def place_table(report: dict[str, Any]) -> str:
    """Hit rates (%) by answer place of the default strategy (with and without the added
    songs) and of the baselines: a new song is worth a place only where it is more likely
    a hit than the song it displaces."""
    default = report["default_strategy"]
    names = [f"baseline-{default}-without-new", default, f"compacted-{default}",
             "baseline-artist-new", "baseline-popular-new"]
    lines = ["| hit rate % by place | " + " | ".join(f"{i + 1}-{i + 10}"
                                                    for i in range(0, N_SONGS, 10)) + " |",
             "|---|" + "---|" * (N_SONGS // 10)]
    for name in names:
        rates = report["results"].get(name, {}).get("place_hit_rates")
        if rates:
            lines.append(f"| {name} | " + " | ".join(f"{100 * r:.2f}" for r in rates) + " |")
    return "\n".join(lines)


def render(report: dict[str, Any], name: str, command: str) -> str:
    return (f"### Cold start: {name}\n\n"
            f"`{command}` on a {machine()}, {dt.date.today().isoformat()}.\n"
            f"{report['held_out_songs']} held-out songs (the newest "
            f"{report['fraction']:.0%} of those training playlists hold), "
            f"{report['added']} added through the add path ({report['unplaceable']} "
            f"unplaceable) in "
            f"{report['add_seconds']} s; {report['questions']} validation questions whose "
            f"answers hold {report['held_out_in_answers']} held-out songs; bundle: "
            f"`--preset {report['preset']} --groups {report['groups']}`.\n\n"
            f"{table(report)}\n\n{place_table(report)}\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.coldstart",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a split (trainer.split) directory")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="share of the songs in training playlists to hold out (newest)")
    p.add_argument("--preset", default="small", help="trainer preset of the bundle")
    p.add_argument("--groups", default=GROUPS, help="trainer column groups of the bundle")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--strategies", help="comma-separated (default: all the bundle serves)")
    p.add_argument("--limit", type=int, help="score only the first N questions")
    p.add_argument("--work", type=Path, help="work directory (default: OUT.work)")
    p.add_argument("--compacted", action="store_true",
                   help="also score every strategy on the bundle with the held-out songs "
                        "compacted into it (trainer.compact; recomputes its neighbour table)")
    p.add_argument("--markdown", type=Path, help="also write the table into this file")
    p.add_argument("--name", default="demo", help="dataset name of the markdown section")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for name in ("train.json", "song_meta.json", "val_questions.json", "val_answers.json"):
            if not (args.data / name).exists():
                raise ValueError(f"{args.data / name}: missing (is {args.data} a split?)")
        strategies = ([s.strip() for s in args.strategies.split(",") if s.strip()]
                      if args.strategies else None)
        report = evaluate(args.data, args.work or args.out.with_name(args.out.name + ".work"),
                          args.fraction, args.preset, args.groups, args.epochs, strategies,
                          args.limit, args.compacted)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        replace_marked(args.markdown, render(report, args.name,
                                             shown_command("python -m trainer.coldstart",
                                                           argv)),
                       START.format(name=args.name), END.format(name=args.name))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
