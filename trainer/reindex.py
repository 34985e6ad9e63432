"""Rebuilds a bundle's song index with other HNSW parameters and reports its recall.

    python -m trainer.reindex --bundle bundles/melon --m 32 --ef-construction 200 \\
        [--ef 400] [--queries 300] [--dry-run] [--out docs/BENCHMARKS.md]

The codes are read back from the existing index (no model, no data needed), a new index is
built, recall@100 against exact search is measured at several ``ef`` on random songs, and
(unless ``--dry-run``) the new index and a re-checksummed manifest replace the old ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

from clients.benchtools import machine, replace_marked, shown_command
from server import bundle as bundle_files
from trainer.export import build_index

START = "<!-- reindex:start -->"
END = "<!-- reindex:end -->"


def recall_at(index: object, codes: np.ndarray, labels: np.ndarray, efs: list[int],
              n_queries: int, k: int = 100) -> list[tuple[int, float, float]]:
    rng = np.random.default_rng(0)
    picks = rng.choice(len(codes), n_queries, replace=False)
    queries = codes[picks]
    truth = np.empty((n_queries, k), dtype=np.int64)
    for start in range(0, n_queries, 50):
        sims = queries[start : start + 50] @ codes.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        truth[start : start + 50] = labels[top]
    out = []
    index.set_num_threads(1)  # type: ignore[attr-defined]
    for ef in efs:
        index.set_ef(ef)  # type: ignore[attr-defined]
        start = time.perf_counter()
        got, _ = index.knn_query(queries, k=k)  # type: ignore[attr-defined]
        per_query = (time.perf_counter() - start) / n_queries
        recall = float(np.mean([len(np.intersect1d(g, t)) / k for g, t in zip(got, truth,
                                                                              strict=True)]))
        out.append((ef, recall, per_query * 1e3))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainer.reindex",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--ef-construction", type=int, required=True)
    p.add_argument("--ef", type=int, help="ef stored in the manifest (default: the smallest "
                   "measured ef reaching recall 0.95, else the largest measured)")
    p.add_argument("--efs", default="100,200,400,800", help="ef values to measure")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="measure only; keep the bundle")
    p.add_argument("--out", default="-", help="markdown file for a reindex section, or -")
    args = p.parse_args(argv)
    try:
        manifest = bundle_files.read_manifest(args.bundle)
        old = bundle_files.load_hnsw(args.bundle, manifest.song_index, bundle_files.SONG_INDEX)
    except bundle_files.BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = np.asarray(old.get_ids_list(), dtype=np.int64)
    labels.sort()
    codes = bundle_files.read_codes(old, labels)
    del old
    start = time.perf_counter()
    index, params = build_index(codes, args.m, args.ef_construction, args.ef or 200,
                                args.threads, labels=labels)
    build_s = time.perf_counter() - start
    efs = [int(x) for x in args.efs.split(",")]
    measured = recall_at(index, codes, labels, efs, args.queries)
    ef = args.ef or next((e for e, r, _ in measured if r >= 0.95), efs[-1])
    index.set_ef(ef)
    rows = [f"| {e} | {r:.4f} | {ms:.2f} ms |" for e, r, ms in measured]
    body = (f"## Song index rebuilt: M={args.m}, ef_construction={args.ef_construction}\n\n"
            f"`{shown_command('python -m trainer.reindex', argv)}` on a {machine()}, "
            f"{dt.date.today()}: {len(labels):,} x {codes.shape[1]} codes, build "
            f"{build_s:.0f} s ({args.threads} threads); recall@100 against exact search on "
            f"{args.queries} random songs, one query thread.\n\n| ef | recall@100 | query |\n"
            "|---|---|---|\n" + "\n".join(rows) + f"\n\nManifest ef: {ef}.\n")
    print(body)
    if args.out != "-":
        replace_marked(Path(args.out), body, START, END)
    if args.dry_run:
        return 0
    index.save_index(str(args.bundle / bundle_files.SONG_INDEX))
    fields = manifest.to_json()
    fields["song_index"] = dataclasses.asdict(dataclasses.replace(params, ef=ef))
    fields["hyper_parameters"] = {**manifest.hyper_parameters, "index_m": args.m,
                                  "ef_construction": args.ef_construction, "ef": ef}
    bundle_files.write_manifest(args.bundle, fields)
    print(f"rewrote {args.bundle / bundle_files.SONG_INDEX} and its manifest", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
