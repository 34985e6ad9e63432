"""Training benchmark at Melon scale: epoch time against the FLOP floor, peak memory,
implicit ALS on the same matrix, and the HNSW index's recall and query time.

    python -m trainer.bench_train [--data data/melon-split] [--out docs/BENCHMARKS.md]
                                  [--bundle-out bundles/melon] [--skip-als]
    python -m trainer.bench_train --ddp 1,2 [--max-steps 30] [--neighbour-blocks 16]

``--ddp`` times data-parallel training instead, under torchrun with each listed number of
processes on this machine (the cores split between them): Melon-scale training steps,
extrapolated to an epoch, and a fixed subset of the exact neighbour-table blocks, split by
rank; it writes its own section (bench-ddp) of the markdown file.

The data is synthetic ``melon`` (707,989 songs), generated and split when missing. One
epoch runs at the write-up's layer sizes (D > 2048 > 1024 > 2048 > D, batch 2048). The
floor is the dense middle layers' FLOPs (fwd + bwd = 3 x 2 x (2048x1024 + 1024x2048) per
song) at the fp32 matmul speed measured in the same run. With ``--bundle-out`` the
one-epoch model is exported as a bundle (the serving benchmark uses it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.benchtools import REPO, machine, replace_marked, shown_command
from server.search import ExactSearch, HnswSearch, representatives
from trainer.distributed import broadcast_object, init_from_env, shutdown
from trainer.export import build_index, export_bundle
from trainer.neighbours import sharded_neighbours
from trainer.split import write_split
from trainer.synth import generate, write_dataset
from trainer.train import PRESETS, TrainConfig, Trainer, resolve_precision, set_threads

log = logging.getLogger(__name__)
MELON_DATA = REPO / "data" / "melon"
MELON_SPLIT = REPO / "data" / "melon-split"
START = "<!-- bench-train:start -->"
END = "<!-- bench-train:end -->"
DDP_START = "<!-- bench-ddp:start -->"
DDP_END = "<!-- bench-ddp:end -->"
WARMUP_STEPS = 3  # numba compilation and first allocations, not timed
CODE_DIM = 1024  # the melon preset's code size


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


def _load() -> float:
    return os.getloadavg()[0]


def ddp_train_worker(data: Path, max_steps: int, precision: str, out: Path) -> None:
    """One torchrun worker: Melon-scale training steps, timed after a warm-up."""
    dist = init_from_env()
    threads = max(1, (os.cpu_count() or 1) // dist.local_world)
    set_threads(threads)
    config = replace(TrainConfig(), **{**PRESETS["melon"], "epochs": 1}, threads=threads,
                     precision=precision, max_steps_per_epoch=WARMUP_STEPS)
    work = REPO / "bundles" / "bench-ddp.work"
    start = time.perf_counter()
    trainer = Trainer(data, work, config, dist)
    trainer.validation = None
    setup_s = time.perf_counter() - start
    trainer.run_epoch()
    trainer.config = replace(config, max_steps_per_epoch=max_steps)
    load_before, cpu_before = _load(), time.process_time()
    stats = trainer.run_epoch()

    rep_of = representatives(trainer.matrix.indptr, trainer.matrix.indices)
    # Rows of the D-row tables one step touches (its songs' columns + the sampled ones):
    # what average_row_grads exchanges per table, and what a row-sharded table would fetch.
    rng = np.random.default_rng(0)
    touched = [len(np.union1d(trainer.matrix[rng.choice(trainer.train_rows, config.batch_size,
                                                         replace=False)].indices,
                              rng.integers(0, trainer.space.dim, config.negative_samples)))
               for _ in range(10)]
    result = {"touched_rows": float(np.mean(touched)), "hidden0": config.hidden[0],
              "rank": dist.rank, "world": dist.world, "threads": threads, "setup_s": setup_s,
              "seconds": stats["seconds"], "steps": stats["steps"],
              "cpu_s": time.process_time() - cpu_before, "load_before": load_before,
              "load_after": _load(), "rss_gb": peak_rss_gb(),
              "n_rows": len(trainer.train_rows), "batch_size": config.batch_size,
              "columns": trainer.space.dim, "songs": trainer.matrix.shape[0],
              "distinct": int((rep_of == np.arange(len(rep_of))).sum()),
              "loss": stats["loss"], "exchange_s": stats.get("row_exchange_seconds", 0.0)}
    (out / f"train-{dist.world}-{dist.rank}.json").write_text(json.dumps(result))
    shutdown(dist)


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` random unit vectors, float32, made in chunks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        chunk = rng.standard_normal((min(65_536, n - start), dim), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start : start + len(chunk)] = chunk
    return out


def ddp_neighbour_worker(n: int, blocks: int, out: Path) -> None:
    """One torchrun worker: the first ``blocks`` query blocks of the neighbour step over
    ``n`` vectors, split by rank, merged on rank 0."""
    dist = init_from_env()
    threads = max(1, (os.cpu_count() or 1) // dist.local_world)
    unit = random_unit(n, CODE_DIM)
    broadcast_object(None, dist)  # every rank holds its vectors: start the clock together
    load_before, cpu_before = _load(), time.process_time()
    start = time.perf_counter()
    tables = sharded_neighbours(unit, 100, dist, threads=threads, progress=False,
                                queries=blocks * 1024)
    seconds = time.perf_counter() - start
    assert (tables is not None) == dist.is_main
    result = {"rank": dist.rank, "world": dist.world, "threads": threads, "n": n,
              "blocks": blocks, "seconds": seconds, "cpu_s": time.process_time() - cpu_before,
              "load_before": load_before, "load_after": _load(), "rss_gb": peak_rss_gb()}
    (out / f"neighbours-{dist.world}-{dist.rank}.json").write_text(json.dumps(result))
    shutdown(dist)


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "trainer.bench_train", *args]
    log.info("running %s", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO)


def _rss(res: list[dict[str, Any]]) -> str:
    return " / ".join(f"{r['rss_gb']:.1f}" for r in res)


def _results(folder: Path, stage: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((folder / f"{stage}-{world}-{r}.json").read_text())
            for r in range(world)]


DDP_RESULTS = REPO / "bundles" / "bench-ddp.work" / "results"


def run_ddp(data: Path, worlds: list[int], max_steps: int, blocks: int, precision: str,
            command: str) -> None:
    """Run the workers under torchrun for each world size; their JSON results (with the
    command and date) land in :data:`DDP_RESULTS`, replacing the previous run's."""
    shutil.rmtree(DDP_RESULTS, ignore_errors=True)
    DDP_RESULTS.mkdir(parents=True)
    (DDP_RESULTS / "run.json").write_text(json.dumps({
        "command": command, "date": dt.date.today().isoformat(), "machine": machine(),
        "worlds": worlds, "max_steps": max_steps, "blocks": blocks}))
    for world in worlds:
        _torchrun(world, "--ddp-worker", "train", "--data", str(data), "--max-steps",
                  str(max_steps), "--precision", precision, "--result", str(DDP_RESULTS))
    n = json.loads((DDP_RESULTS / f"train-{worlds[0]}-0.json").read_text())["distinct"]
    for world in worlds:
        _torchrun(world, "--ddp-worker", "neighbours", "--neighbour-rows", str(n),
                  "--neighbour-blocks", str(blocks), "--result", str(DDP_RESULTS))


def ddp_section(folder: Path) -> str:
    """The bench-ddp section from a run's results."""
    run = json.loads((folder / "run.json").read_text())
    train_rows, nb_rows = [], []
    base_epoch = base_nb = 0.0
    info: dict[str, Any] = {}
    for world in run["worlds"]:
        res = _results(folder, "train", world)
        head = res[0]
        info = info or head
        wall = max(r["seconds"] for r in res)
        per_step = wall / max(head["steps"], 1)
        epoch_s = per_step * -(-head["n_rows"] // head["batch_size"])
        base_epoch = base_epoch or epoch_s
        cpu = sum(r["cpu_s"] for r in res)
        train_rows.append(
            f"| {world} | {head['threads']} | {head['steps']} | {per_step:.2f} s | "
            f"{epoch_s:.0f} s ({epoch_s / 60:.1f} min) | {base_epoch / epoch_s:.2f} x | "
            f"{head['batch_size'] * head['steps'] / wall:.0f} | {cpu / wall:.2f} | "
            f"{cpu / max(head['steps'], 1):.2f} s | "
            + (f"{max(r['exchange_s'] for r in res) / max(head['steps'], 1):.2f} s | "
               if world > 1 else "none | ") +
            f"{_rss(res)} GB | "
            f"{max(r['setup_s'] for r in res):.0f} s | "
            f"{head['load_before']:.1f} / {head['load_after']:.1f} |")
    total_blocks = -(-int(info["distinct"]) // 1024)
    for world in run["worlds"]:
        res = _results(folder, "neighbours", world)
        seconds = res[0]["seconds"]  # rank 0: its share, then the merge
        blocks = res[0]["blocks"]
        base_nb = base_nb or seconds
        cpu = sum(r["cpu_s"] for r in res)
        full = seconds * total_blocks / blocks
        nb_rows.append(
            f"| {world} | {res[0]['threads']} | {blocks} of {total_blocks} | "
            f"{seconds:.1f} s | {seconds / blocks:.2f} s | "
            f"{full:.0f} s ({full / 60:.0f} min) | {base_nb / seconds:.2f} x | "
            f"{cpu / seconds:.2f} | {cpu / blocks:.2f} s | {_rss(res)} GB | "
            f"{res[0]['load_before']:.1f} / {res[0]['load_after']:.1f} |")
    return render_ddp(train_rows, nb_rows, info, run)


def render_ddp(train_rows: list[str], nb_rows: list[str], info: dict[str, Any],
               run: dict[str, Any]) -> str:
    n = int(info["distinct"])
    command, max_steps = run["command"], run["max_steps"]
    return (
        f"## Data-parallel training and the sharded neighbour step (torchrun)\n\n"
        f"`{command}` on a {run['machine']}, {run['date']} (no GPU was lent "
        f"to this run). Each process count runs under `torchrun --standalone "
        f"--nproc_per_node=N` with the cores split between the processes; the machine "
        f"was shared with other jobs, so the load average (1 min, before / after the "
        f"timed part) and the CPU the processes actually got (CPU seconds / wall "
        f"seconds, summed over the processes; 2.0 = both cores) are in the tables, with "
        f"the CPU seconds each step or block cost, summed over the processes (the work, "
        f"nearly independent of the load).\n\n"
        f"Training: the melon preset on {info['songs']:,} songs ({info['n_rows']:,} "
        f"training rows, {info['columns']:,} columns), batch {info['batch_size']} split "
        f"between the ranks, {max_steps} steps timed after {WARMUP_STEPS} warm-up steps, "
        f"the epoch extrapolated as s/step x {-(-info['n_rows'] // info['batch_size'])} "
        f"steps. One step touches {info['touched_rows']:,.0f} rows of each D-row table on "
        f"average (10 random batches), so the ranks exchange about "
        f"{info['touched_rows'] * info['hidden0'] * 4 / 1e6:,.0f} MB of row gradients per "
        f"table per step (all-reduce of the union of their rows), next to "
        f"{info['columns'] * info['hidden0'] * 4 / 1e6:,.0f} MB for a dense all-reduce of a "
        f"whole table. The exchange column is the time each step spends in "
        f"`average_row_grads`, waiting for the slower rank included.\n\n"
        f"| processes | threads each | steps timed | s / step | one epoch (extrapolated) | "
        f"speed-up | songs / s | CPU got | CPU s / step | row-gradient exchange / step | "
        f"peak RSS per process | set-up (load, features) | load avg |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(train_rows) + "\n\n"
        f"Exact neighbour tables (`sharded_neighbours`, k = 100, blocks of 1024 queries): "
        f"a fixed subset, the first blocks of the {n:,} distinct songs' table, timed on "
        f"rank 0 from a common start to the merged result (its blocks plus the gather). "
        f"The vectors are random unit vectors of the Melon table's shape ({n:,} x "
        f"{CODE_DIM}): a block's cost (bf16 product against all rows, top-k, fp32 "
        f"re-rank) does not depend on the values. Every block costs the same, so the "
        f"full step is extrapolated as time x total blocks / blocks timed.\n\n"
        f"| ranks | threads each | blocks | time | per block | full step (extrapolated) | "
        f"speed-up | CPU got | CPU s / block | peak RSS per rank | load avg |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(nb_rows) + "\n")


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
    p.add_argument("--ddp", help="data-parallel benchmark instead, for these process "
                   "counts, e.g. 1,2 (writes the bench-ddp section)")
    p.add_argument("--neighbour-blocks", type=int, default=16,
                   help="with --ddp: neighbour-table blocks of 1024 songs to time")
    p.add_argument("--ddp-reuse", action="store_true",
                   help="with --ddp: rewrite the section from the last run's results "
                   "(bundles/bench-ddp.work/results) without measuring again")
    p.add_argument("--ddp-worker", choices=["train", "neighbours"], help=argparse.SUPPRESS)
    p.add_argument("--neighbour-rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.ddp_worker == "train":
        ddp_train_worker(args.data, args.max_steps, args.precision, args.result)
        return 0
    if args.ddp_worker == "neighbours":
        ddp_neighbour_worker(args.neighbour_rows, args.neighbour_blocks, args.result)
        return 0
    if args.ddp:
        if not args.ddp_reuse:
            run_ddp(prepare_melon(args.data), [int(x) for x in args.ddp.split(",")],
                    args.max_steps or 30, args.neighbour_blocks, args.precision,
                    shown_command("python -m trainer.bench_train", argv))
        body = ddp_section(DDP_RESULTS)
        print(body)
        if args.out != "-":
            replace_marked(Path(args.out), body, DDP_START, DDP_END)
        return 0

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
