"""Exact top-k neighbour lists of every indexed song, precomputed at export.

    python -m trainer.neighbours --bundle bundles/melon [--k 100] [--block 1024]
    torchrun --nproc_per_node=N -m trainer.neighbours --bundle bundles/melon

The write-up kept each song's 100 most similar songs; so does the bundle
(``neighbours.npz``): a lookup there is exact and costs microseconds, where an HNSW query
over 1024-dimensional codes costs milliseconds and misses some true neighbours (recall@100
0.90 at ef 800 on the Melon-scale codes, see docs/BENCHMARKS.md). The server answers bundle
songs from the table and keeps HNSW for unseen and run-time-added songs.

How: brute force in blocks of queries. Candidates come from a bf16 matrix product (2.4x
the fp32 speed on CPUs with AVX512-BF16) with ``margin`` spare candidates per song, and
are re-ranked with exact fp32 dot products, so the bf16 rounding (~2e-3 on a cosine) only
matters where the true 100th neighbour falls outside the top ``k + margin`` bf16 scores.
``recall_against_fp32`` measures that. Work is saved per block under a work directory (in a
folder named after a digest of the vectors), so an interrupted run resumes where it stopped.

Under torchrun (``torchrun --nproc_per_node=N -m trainer.neighbours ...``, or a distributed
``trainer.train``) the blocks are split by rank, each rank a contiguous range of them
(:func:`sharded_neighbours`), and rank 0 gathers and merges the lists: the table is the
same as one process makes, in about 1/N of the time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from server import bundle as bundle_files
from trainer.distributed import (
    SINGLE,
    Dist,
    block_range,
    collect_rows,
    init_from_env,
    shutdown,
)


def exact_neighbours(unit: np.ndarray, k: int, *, block: int = 1024, margin: int = 60,
                     threads: int = 2, work_dir: Path | None = None,
                     progress: bool = True, rows: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``unit`` (unit vectors), the positions and cosine similarities of its
    ``k`` most similar other rows, best first: ``(n, k)`` int32 and float32 arrays.

    ``rows = (lo, hi)``, ``lo`` a multiple of ``block``: only those query rows (still
    against all of ``unit``), as ``(hi - lo, k)`` arrays."""
    # torch (the 'train' extra) only here: reading and writing bundles needs none of it.
    import torch

    from trainer.model import bf16_is_fast

    torch.set_num_threads(threads)
    n = len(unit)
    k = min(k, n - 1)
    width = min(k + margin, n - 1)
    lo, hi = (0, n) if rows is None else rows
    if lo % block or not 0 <= lo <= hi <= n:
        raise ValueError(f"rows [{lo}, {hi}) of {n}: the start must be a multiple of the "
                         f"block ({block})")
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    base = torch.from_numpy(unit)
    low = base.to(torch.bfloat16) if bf16_is_fast() else base
    out_pos = np.zeros((hi - lo, k), dtype=np.int32)
    out_sim = np.zeros((hi - lo, k), dtype=np.float32)
    if work_dir is not None:
        # Saved blocks belong to these exact vectors: a retrained model never reuses them.
        digest = hashlib.blake2b(memoryview(unit).cast("B"), digest_size=8).hexdigest()
        work_dir = work_dir / f"{digest}-k{k}-margin{margin}"
        work_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=hi - lo, desc="neighbour lists", unit="song",
              disable=not progress or None) as bar:
        for start in range(lo, hi, block):
            stop = min(start + block, n)
            part = None if work_dir is None else work_dir / f"block-{start:09d}-{stop:09d}.npz"
            if part is not None and part.exists():
                with np.load(part, allow_pickle=False) as saved:
                    out_pos[start - lo : stop - lo] = saved["pos"]
                    out_sim[start - lo : stop - lo] = saved["sim"]
                bar.update(stop - start)
                continue
            with torch.no_grad():
                scores = low[start:stop] @ low.T
                scores[torch.arange(stop - start), torch.arange(start, stop)] = -np.inf
                candidates = torch.topk(scores, width, dim=1).indices.numpy()
            del scores
            pos, sim = _rerank(unit, start, candidates, k)
            out_pos[start - lo : stop - lo], out_sim[start - lo : stop - lo] = pos, sim
            if part is not None:
                tmp = part.with_suffix(".tmp.npz")
                np.savez(tmp, pos=pos, sim=sim)
                tmp.replace(part)
            bar.update(stop - start)
    return out_pos, out_sim


def sharded_neighbours(unit: np.ndarray, k: int, dist: Dist = SINGLE, *, block: int = 1024,
                       margin: int = 60, threads: int = 2, work_dir: Path | None = None,
                       progress: bool = True, queries: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`exact_neighbours` split by rank: every rank (all holding all of ``unit``)
    computes its :func:`~trainer.distributed.block_range` of query blocks, and rank 0
    gathers them in row order. Rank 0 gets the ``(n, k)`` arrays, the others None; one
    process is the plain call. ``queries``: only the first rows as queries (benchmarks
    time a subset of the blocks)."""
    n = len(unit) if queries is None else min(queries, len(unit))
    lo, hi = block_range(n, block, dist.rank, dist.world)
    pos, sim = exact_neighbours(unit, k, block=block, margin=margin, threads=threads,
                                work_dir=work_dir, progress=progress and dist.is_main,
                                rows=(lo, hi))
    all_pos = collect_rows(pos, n, block, dist, to_all=False)
    all_sim = collect_rows(sim, n, block, dist, to_all=False)
    if all_pos is None or all_sim is None:
        return None
    return all_pos, all_sim


def _rerank(unit: np.ndarray, start: int, candidates: np.ndarray, k: int,
            chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Exact fp32 similarities of the candidates; keep the best ``k`` of each row."""
    n_rows = len(candidates)
    pos = np.empty((n_rows, k), dtype=np.int32)
    sim = np.empty((n_rows, k), dtype=np.float32)
    for lo in range(0, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        cand = candidates[lo:hi]
        exact = np.einsum("bd,bcd->bc", unit[start + lo : start + hi], unit[cand])
        # Ties broken by position, so the table is deterministic.
        order = np.lexsort((cand, -exact), axis=1)[:, :k]
        pos[lo:hi] = np.take_along_axis(cand, order, axis=1)
        sim[lo:hi] = np.take_along_axis(exact, order, axis=1)
    return pos, sim


def recall_against_fp32(unit: np.ndarray, pos: np.ndarray, n_queries: int = 1000,
                        seed: int = 0) -> float:
    """recall@k of the table against exact fp32 search on random rows (self excluded)."""
    k = pos.shape[1]
    picks = np.random.default_rng(seed).choice(len(unit), min(n_queries, len(unit)),
                                               replace=False)
    hits = 0
    for lo in range(0, len(picks), 64):
        rows = picks[lo : lo + 64]
        sims = unit[rows] @ unit.T
        sims[np.arange(len(rows)), rows] = -np.inf
        truth = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        hits += sum(len(np.intersect1d(t, p)) for t, p in zip(truth, pos[rows], strict=True))
    return hits / (len(picks) * k)


def table_arrays(labels: np.ndarray, pos: np.ndarray, sim: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle's ``neighbours.npz``: ``labels`` (index labels = song rows, in table row
    order) and each row's neighbours as song rows with their cosine similarities (float32)."""
    return {"labels": labels.astype(np.int64), "rows": labels[pos].astype(np.int32),
            "sims": sim.astype(np.float32)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainer.neighbours",
                                description="Add exact neighbour lists to a bundle.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--threads", type=int,
                   help="torch threads per process (default: the cores / processes per node)")
    p.add_argument("--queries", type=int, default=1000,
                   help="random songs for the recall check against fp32 search")
    args = p.parse_args(argv)
    dist = init_from_env()
    try:
        return _run(args, dist, os.cpu_count() or 1)
    finally:
        shutdown(dist)


def _run(args: argparse.Namespace, dist: Dist, cores: int) -> int:
    threads = args.threads or max(1, cores // dist.local_world)
    try:
        manifest = bundle_files.read_manifest(args.bundle)
        index = bundle_files.load_hnsw(args.bundle, manifest.song_index,
                                       bundle_files.SONG_INDEX)
    except bundle_files.BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
    unit = bundle_files.read_codes(index, labels)
    del index
    work = args.bundle.with_name(args.bundle.name + ".work") / "neighbours"
    t0 = time.perf_counter()
    tables = sharded_neighbours(unit, args.k, dist, block=args.block, threads=threads,
                                work_dir=work)
    seconds = time.perf_counter() - t0
    if tables is None:  # not rank 0: its share is with rank 0
        return 0
    pos, sim = tables
    recall = recall_against_fp32(unit, pos, args.queries)
    bundle_files.save_neighbours(args.bundle, table_arrays(labels, pos, sim))
    bundle_files.save_codes(args.bundle, unit)
    fields = manifest.to_json()
    fields["extra"] = {**manifest.extra, "song_neighbours": {
        "k": int(pos.shape[1]), "seconds": round(seconds, 1), "recall_vs_fp32": recall}}
    bundle_files.write_manifest(args.bundle, fields)
    print(f"{len(labels):,} songs x {pos.shape[1]} neighbours in {seconds:.1f} s; "
          f"recall@{pos.shape[1]} against fp32 exact search on {args.queries} songs: "
          f"{recall:.4f}; wrote {args.bundle / bundle_files.NEIGHBOURS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
