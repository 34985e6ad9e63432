"""Growth benchmark: SimilarSongs, EncodeSong and ContinuePlaylist cost with N songs added at
run time against none, as a markdown table.

    python -m clients.bench_growth --bundle bundles/demo --data data/demo-split \\
        [--steps 25000,50000,100000] [--calls 300] [--out docs/BENCHMARKS.md]

Two models of the same bundle are loaded in this process: one stays as loaded, the other
grows by AddSongs' own path (``LiveModel.encode_new`` then ``LiveModel.insert``: encoder,
the added songs' graph, the links that keep SimilarSongs a lookup). The songs added are
the split's ``song_meta.json`` records under fresh ids (metadata only), cycled. At each
step both models answer the same calls one at a time, alternating, and the table gives each
model's median (p50) and p90 latency and the ratio grown / as loaded, so noise from other
work on the machine hits both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clients.benchtools import machine, replace_marked, shown_command
from server.columns import SongMeta
from server.live import LiveModel
from server.melon import parse_issue_date, question_updt_date
from server.validation import ContinueParams, EncodeParams, NewSong, SimilarParams


def markers(name: str) -> tuple[str, str]:
    """The section a run owns: ``bench-growth``, or ``bench-growth-NAME`` (``--name``)."""
    tag = "bench-growth" + (f"-{name}" if name else "")
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"

ID_BASE = 900_000_000
# Recall against exact search: queries per kind and step, and the depth.
RECALL_QUERIES = 200
RECALL_K = 10


def meta_of_record(record: dict[str, Any]) -> SongMeta:
    """A song_meta.json record as the metadata AddSongs sends (an unreadable issue date: 0)."""
    try:
        date = parse_issue_date(str(record.get("issue_date", "") or ""))[0]
    except ValueError:
        date = 0
    return SongMeta(genres=tuple(record.get("song_gn_gnr_basket") or ()),
                    detail_genres=tuple(record.get("song_gn_dtl_gnr_basket") or ()),
                    artists=tuple(int(a) for a in record.get("artist_id_basket") or ()),
                    issue_date=date)


def grow(model: LiveModel, records: Sequence[dict[str, Any]], target: int,
         chunk: int = 1000) -> float:
    """Add songs (AddSongs' path) until ``model`` holds ``target`` added; seconds spent."""
    started = time.perf_counter()
    with tqdm(total=target, initial=model.n_added, desc="adding songs", unit="song",
              disable=None, leave=False) as bar:
        while model.n_added < target:
            start = model.n_added
            count = min(chunk, target - start)
            songs = [NewSong(ID_BASE + i, meta_of_record(records[i % len(records)]))
                     for i in range(start, start + count)]
            fields = [f"songs[{i}].metadata" for i in range(count)]
            model.insert(songs, model.encode_new(songs, fields))
            bar.update(count)
    return time.perf_counter() - started


def timed(calls: Sequence[Callable[[], object]]) -> np.ndarray:
    out = np.empty(len(calls))
    for i, call in enumerate(calls):
        t0 = time.perf_counter()
        call()
        out[i] = time.perf_counter() - t0
    return out * 1e3


def workloads(model: LiveModel, questions: Sequence[dict[str, Any]],
              records: Sequence[dict[str, Any]], n_calls: int, seed: int = 0
              ) -> dict[str, list[Callable[[], object]]]:
    """The calls each step repeats, per RPC (same arguments for both models)."""
    rng = np.random.default_rng(seed)
    ids = model.engine.catalog.song_ids
    song_ids = ids[rng.integers(0, len(ids), n_calls)].tolist()
    metas = [meta_of_record(records[i]) for i in rng.integers(0, len(records), n_calls).tolist()]
    out: dict[str, list[Callable[[], object]]] = {
        "SimilarSongs k=10": [partial(model.similar_one,
                                      SimilarParams((s,), 10, frozenset(), False))
                              for s in song_ids],
        "EncodeSong k=10": [partial(model.encode, EncodeParams(m, 10, False)) for m in metas],
    }
    for strategy in model.engine.strategies:
        shown = f"ContinuePlaylist {strategy}" + (" (default)" if strategy ==
                                                  model.engine.default_strategy else "")
        out[shown] = [partial(model.continue_playlist, ContinueParams(
            tuple(q["songs"]), tuple(q["tags"]), q.get("plylst_title", ""),
            question_updt_date(q), 100, 10, strategy, False, False))
            for q in questions[: max(n_calls // 3, 1)]]
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True),
                                            1e-12)
    return unit


def kth_exact(model: LiveModel, queries: np.ndarray, own: np.ndarray, k: int,
              block: int = 65_536) -> np.ndarray:
    """Per unit query, the ``k``-th best cosine similarity over every song, bundle and
    added (rows ``own[i]`` left out: a song is not its own neighbour; -1 for none),
    scanned exactly in blocks of rows."""
    songs = model.engine.songs
    total = model.n_bundle + model.n_added
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, total, block):
        rows = np.arange(start, min(start + block, total), dtype=np.int64)
        sims = queries @ _unit(songs.vectors(rows)).T
        mine = (own >= start) & (own < start + len(rows))
        sims[np.flatnonzero(mine), own[mine] - start] = -np.inf
        both = np.concatenate([best, sims], axis=1)
        best = -np.partition(-both, k - 1, axis=1)[:, :k]
    kth: np.ndarray = best.min(axis=1)
    return kth


def recall_at(model: LiveModel, queries: np.ndarray, own: np.ndarray,
              found: Sequence[Sequence[int]], k: int) -> np.ndarray:
    """Per query, the share of its ``k`` exact nearest songs that ``found`` (song ids)
    holds, counted by similarity (a found song as near as the ``k``-th exact one counts:
    songs with identical codes tie)."""
    kth = kth_exact(model, queries, own, k)
    out = np.empty(len(queries))
    for i, ids in enumerate(found):
        rows = model.rows_of(list(ids))[0]
        vecs = _unit(model.engine.songs.vectors(rows[rows >= 0]))
        out[i] = min(int((vecs @ queries[i] >= kth[i] - 1e-5).sum()), k) / k
    return out


def recalls(model: LiveModel, song_ids: Sequence[int], metas: Sequence[SongMeta], k: int
            ) -> dict[str, np.ndarray]:
    """SimilarSongs' and EncodeSong's recall@k against exact search over bundle and
    added songs together (:func:`recall_at`)."""
    songs = model.engine.songs
    rows = np.asarray([model.row_of(s) for s in song_ids], dtype=np.int64)
    unit = _unit(songs.vectors(rows))
    similar = [model.similar_one(SimilarParams((s,), k, frozenset(), False)).ids
               for s in song_ids]
    out = {"SimilarSongs": recall_at(model, unit, rows, similar, k)}
    if metas:
        encoded = [model.encode(EncodeParams(m, k, False)) for m in metas]
        codes = _unit(np.asarray([e.code for e in encoded], dtype=np.float32))
        out["EncodeSong"] = recall_at(model, codes, np.full(len(metas), -1),
                                      [e.neighbours.ids for e in encoded], k)
    return out


def run(bundle: Path, data: Path, steps: Sequence[int], n_calls: int
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    records = json.loads((data / "song_meta.json").read_text(encoding="utf-8"))
    questions = json.loads((data / "val_questions.json").read_text(encoding="utf-8"))
    capacity = max(steps)
    base = LiveModel.load(bundle, verify=True, capacity=capacity, threads=1)
    grown = LiveModel.load(bundle, verify=True, capacity=capacity, threads=1)
    loads = {"base": workloads(base, questions, records, n_calls),
             "grown": workloads(grown, questions, records, n_calls)}
    rows: list[dict[str, Any]] = []
    recall_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for step in steps:
        seconds = grow(grown, records, step)
        if step:
            notes.append(f"{step:,} added: {seconds:.0f} s to add the last batch of steps "
                         f"(encoder, graph, links).")
        for name in loads["base"]:
            for _ in range(2):  # warm both once, then measure
                timed(loads["base"][name][:5])
                timed(loads["grown"][name][:5])
            b = timed(loads["base"][name])
            g = timed(loads["grown"][name])
            rows.append({"added": step, "call": name, "base_p50": float(np.median(b)),
                         "grown_p50": float(np.median(g)),
                         "base_p90": float(np.percentile(b, 90)),
                         "grown_p90": float(np.percentile(g, 90))})
            print(f"{step} {name}: p50 {np.median(b):.3f} ms -> {np.median(g):.3f} ms",
                  file=sys.stderr)
        # Recall of the grown model's searches against exact search over bundle and added
        # songs together: bundle songs' SimilarSongs (table lookups with the links of
        # added songs merged in), added songs' SimilarSongs (their graph and the bundle's)
        # and EncodeSong.
        rng = np.random.default_rng(step)
        n_bundle = grown.n_bundle
        picks = {"bundle": grown.ids_of(rng.integers(0, n_bundle, RECALL_QUERIES))}
        if grown.n_added:
            picks["added"] = grown.ids_of(rng.integers(n_bundle, n_bundle + grown.n_added,
                                                       RECALL_QUERIES))
        metas = [meta_of_record(records[i]) for i in rng.integers(0, len(records),
                                                         RECALL_QUERIES).tolist()]
        for kind, ids in picks.items():
            got = recalls(grown, ids, metas if kind == "bundle" else [], RECALL_K)
            for call, values in got.items():
                asked = "metadata records" if call == "EncodeSong" else f"{kind} songs"
                recall_rows.append({"added": step, "call": call, "asked": asked,
                                    "mean": float(values.mean()),
                                    "p5": float(np.percentile(values, 5))})
    songs = grown.engine.songs
    notes.append(f"The added songs' graphs grew {songs.added.resizes} time(s) past their "
                 f"room (--capacity {capacity:,}); {songs.added.in_graph:,} distinct codes, "
                 f"{songs.added.orphans:,} of them also in the orphan graphs (lost by the "
                 f"graph before); {len(songs.added.near):,} bundle songs have added songs "
                 f"among their {songs.near_depth} nearest.")
    return rows, recall_rows, notes


def render(rows: Sequence[dict[str, Any]], recall_rows: Sequence[dict[str, Any]],
           notes: Sequence[str], command: str, bundle_note: str) -> str:
    lines = ["| songs added | call | p50 as loaded ms | p50 grown ms | p50 ratio | "
             "p90 as loaded ms | p90 grown ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['added']:,} | {r['call']} | {r['base_p50']:.3f} | "
                     f"{r['grown_p50']:.3f} | {r['grown_p50'] / r['base_p50']:.2f} | "
                     f"{r['base_p90']:.3f} | {r['grown_p90']:.3f} |")
    return ("## Catalogue growth\n\n"
            f"`{command}` on a {machine()}, {dt.date.today().isoformat()}. {bundle_note} "
            "In-process calls through `LiveModel` (no gRPC), one at a time, the model as "
            "loaded and the grown one alternating.\n\n" + "\n".join(lines) + "\n\n"
            + recall_table(recall_rows) + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


def recall_table(recall_rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"Recall@{RECALL_K} of the grown model against exact search over bundle and "
             f"added songs together ({RECALL_QUERIES} queries of each kind per step: "
             "SimilarSongs of bundle songs and of added songs, EncodeSong of metadata "
             "records; a song as near as the exact k-th counts):", "",
             "| songs added | call | queries | recall mean | recall 5th percentile |",
             "|---|---|---|---|---|"]
    for r in recall_rows:
        lines.append(f"| {r['added']:,} | {r['call']} | {r['asked']} | "
                     f"{r['mean']:.4f} | {r['p5']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m clients.bench_growth",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    p.add_argument("--data", type=Path, default=Path("data/demo-split"),
                   help="split whose song_meta.json (songs to add) and val_questions.json")
    p.add_argument("--steps", default="0,25000,50000,100000",
                   help="added-song counts to measure at (comma-separated, ascending)")
    p.add_argument("--calls", type=int, default=300, help="calls per RPC and step")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file, or - to print")
    p.add_argument("--name", default="", help="section suffix for another bundle (e.g. "
                   "melon: the bench-growth-melon section)")
    args = p.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    rows, recall_rows, notes = run(args.bundle, args.data, steps, args.calls)
    model = json.loads((args.bundle / "manifest.json").read_text())
    bundle_note = (f"Bundle {args.bundle.name} (model {model['model_version']}, "
                   f"{model['extra'].get('n_songs', '?'):,} songs, code dim "
                   f"{model['code_dim']}).")
    body = render(rows, recall_rows, notes, shown_command("python -m clients.bench_growth", argv),
                  bundle_note)
    if args.out != "-":
        replace_marked(Path(args.out), body, *markers(args.name))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
