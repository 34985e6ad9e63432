"""Training benchmark at Melon scale: epoch time against the FLOP floor, peak memory,
implicit ALS on the same matrix, and the HNSW index's recall and query time.

    python -m trainer.bench_train [--data data/melon-split] [--out docs/BENCHMARKS.md]
                                  [--bundle-out bundles/melon] [--skip-als]

The data is synthetic ``melon`` (707,989 songs), generated and split when missing. One
epoch runs at the write-up's layer sizes (D > 2048 > 1024 > 2048 > D, batch 2048). The
floor is the dense middle layers' FLOPs (fwd + bwd = 3 x 2 x (2048x1024 + 1024x2048) per
song) at the fp32 matmul speed measured in the same run. With ``--bundle-out`` the
one-epoch model is exported as a bundle (the serving benchmark uses it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.benchtools import REPO, machine, replace_marked, shown_command
from server.search import ExactSearch, HnswSearch, representatives
from trainer.export import build_index, export_bundle
from trainer.split import write_split
from trainer.synth import generate, write_dataset
from trainer.train import PRESETS, TrainConfig, Trainer, resolve_precision, set_threads

log = logging.getLogger(__name__)
MELON_DATA = REPO / "data" / "melon"
MELON_SPLIT = REPO / "data" / "melon-split"
START = "<!-- bench-train:start -->"
END = "<!-- bench-train:end -->"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def matmul_gflops(dtype_name: str, repeats: int = 20) -> float:
    """Speed of the 1024x2048 @ 2048x1024 (and back) matmuls the middle layers run."""
    dtype = getattr(torch, dtype_name)
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - start
    return 2 * 2048 * 2048 * 1024 * repeats / seconds / 1e9


def prepare_melon(data: Path) -> Path:
    if (data / "val_answers.json").exists():
        return data
    if not (MELON_DATA / "train.json").exists():
        write_dataset(generate("melon", seed=1, progress=True), MELON_DATA, progress=True)
    write_split(MELON_DATA, data, progress=True)
    return data


def time_als(matrix: Any, threads: int) -> float:
    """implicit ALS, 128 factors, 15 iterations, on the songs x columns matrix."""
    # implicit is optional (the 'als' extra): --skip-als runs without it.
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    model = AlternatingLeastSquares(factors=128, iterations=15, regularization=0.01,
                                    num_threads=threads, random_state=0)
    with threadpool_limits(1, "blas"):
        start = time.perf_counter()
        model.fit(matrix.tocsr(), show_progress=True)
        return time.perf_counter() - start


def index_quality(codes: np.ndarray, reps: np.ndarray, m: int, ef_construction: int,
                  ef: int, threads: int, n_queries: int = 1000, k: int = 100
                  ) -> dict[str, Any]:
    """Build the HNSW index over the distinct songs (``reps``) and compare it with exact
    search on random ones."""
    start = time.perf_counter()
    index, params = build_index(codes[reps], m, ef_construction, ef, threads, labels=reps)
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    queries = codes[rng.choice(reps, n_queries, replace=False)]
    exact = ExactSearch(codes[reps])
    start = time.perf_counter()
    truth, _ = exact.search(queries, k)
    truth = reps[truth]
    exact_s = (time.perf_counter() - start) / n_queries
    hnsw = HnswSearch(index)
    index.set_num_threads(1)  # per-query latency, as a server thread sees it
    start = time.perf_counter()
    got = [hnsw.search(q[None, :], k)[0][0] for q in queries]
    hnsw_s = (time.perf_counter() - start) / n_queries
    recall = float(np.mean([len(np.intersect1d(g, t)) / k for g, t in zip(got, truth,
                                                                          strict=True)]))
    index.set_num_threads(threads)
    return {"build_s": build_s, "recall": recall, "hnsw_ms": hnsw_s * 1e3,
            "exact_ms": exact_s * 1e3, "index": index, "params": params}


def render(rows: list[tuple[str, str]], command: str) -> str:
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"## Training at Melon scale\n\n`{command}` on a {machine()}, "
            f"{dt.date.today().isoformat()} (no GPU).\n\n| measure | value |\n|---|---|\n"
            f"{table}\n")


def replace_section(path: Path, body: str) -> None:
    replace_marked(path, body, START, END)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainer.bench_train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=MELON_SPLIT)
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file or -")
    p.add_argument("--bundle-out", type=Path, help="export the one-epoch model here")
    p.add_argument("--skip-als", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--max-steps", type=int, default=0, help="stop the epoch early (smoke)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-index", action="store_true",
                   help="stop after the epoch and ALS: no codes, index or bundle")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    set_threads(args.threads)
    data = prepare_melon(args.data)
    rows: list[tuple[str, str]] = []
    gflops = matmul_gflops("float32")
    gflops_bf16 = matmul_gflops("bfloat16")
    config = replace(TrainConfig(), **{**PRESETS["melon"], "epochs": 1},
                     threads=args.threads, precision=args.precision,
                     max_steps_per_epoch=args.max_steps)
    work = (args.bundle_out or REPO / "bundles" / "bench-train")
    work = work.with_name(work.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = Trainer(data, work, config)
    trainer.validation = None
    setup_s = time.perf_counter() - start
    n_rows = len(trainer.train_rows)
    stats = trainer.run_epoch()
    trainer.epoch = 1
    epoch_s = stats["seconds"]
    songs_done = stats["songs_per_s"] * epoch_s
    full_epoch_s = epoch_s * n_rows / max(songs_done, 1)
    flops_per_song = 3 * 2 * (2048 * 1024 + 1024 * 2048)
    floor_s = flops_per_song * n_rows / (gflops * 1e9)
    rss_train = peak_rss_gb()
    rows += [
        ("data", f"{trainer.matrix.shape[0]:,} songs, {n_rows:,} with playlists, "
                 f"{trainer.space.dim:,} columns {trainer.space.sizes()}, "
                 f"{trainer.matrix.nnz:,} non-zeros"),
        ("load + features + catalog", f"{setup_s:.1f} s"),
        ("precision of the dense layers", resolve_precision(args.precision)),
        ("one epoch (batch 2048, 1024 sampled columns)",
         f"{full_epoch_s:.1f} s ({full_epoch_s / 60:.2f} min)"
         + (f", extrapolated from {stats['steps']} steps" if args.max_steps else "")),
        ("songs / s", f"{stats['songs_per_s']:.0f}"),
        ("matmul speed, same run", f"fp32 {gflops:.0f} GFLOPS, bf16 {gflops_bf16:.0f} GFLOPS"),
        ("FLOP floor (middle layers at fp32 speed)", f"{floor_s:.1f} s"),
        ("epoch / floor", f"{full_epoch_s / floor_s:.2f} x"),
        ("peak RSS after the epoch", f"{rss_train:.2f} GB"),
    ]
    if not args.skip_als:
        als_s = time_als(trainer.matrix, args.threads)
        rows += [("implicit ALS, 128 factors, 15 iterations, same matrix", f"{als_s:.1f} s"),
                 ("AE epoch / ALS fit", f"{full_epoch_s / als_s:.2f} x")]
    if args.skip_index:
        body = render(rows, shown_command("python -m trainer.bench_train", argv))
        print(body)
        if args.out != "-":
            replace_section(Path(args.out), body)
        return 0
    codes_start = time.perf_counter()
    codes = trainer.song_codes()
    rows.append(("encode all songs (codes)", f"{time.perf_counter() - codes_start:.1f} s"))

    rep_of = representatives(trainer.matrix.indptr, trainer.matrix.indices)
    reps = np.nonzero(rep_of == np.arange(len(rep_of)))[0]
    quality = index_quality(codes, reps, config.index_m, config.ef_construction, config.ef,
                            args.threads)
    rows += [
        ("distinct songs indexed (identical inputs share one entry)", f"{len(reps):,}"),
        (f"HNSW build (M={config.index_m}, ef_construction={config.ef_construction}, "
         f"{len(reps):,} x {codes.shape[1]})", f"{quality['build_s']:.1f} s"),
        (f"HNSW recall@100 vs exact, 1000 random songs (ef={config.ef})",
         f"{quality['recall']:.4f}"),
        ("query time, HNSW (1 thread) / exact numpy (batched, 2 threads)",
         f"{quality['hnsw_ms']:.2f} ms / {quality['exact_ms']:.2f} ms per query"),
        ("peak RSS overall", f"{peak_rss_gb():.2f} GB"),
    ]
    if args.bundle_out:
        start = time.perf_counter()
        export_bundle(trainer.bundle_inputs(codes), args.bundle_out,
                      song_index=(quality["index"], quality["params"]))
        rows.append(("bundle export (ONNX, both indexes, arrays)",
                     f"{time.perf_counter() - start:.1f} s"))
    command = shown_command("python -m trainer.bench_train", argv)
    body = render(rows, command)
    print(body)
    if args.out != "-":
        replace_section(Path(args.out), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
