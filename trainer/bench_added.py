"""The added songs' own graphs at a model's code size: how many songs hnswlib's graph loses
and what the orphan graphs (server/added.py, MAX_GRAPHS) win back and cost.

    python -m trainer.bench_added --data data/melon-split --checkpoint bundles/melon.work/best.pt \\
        [--preset melon] [--songs 100000] [--name melon] [--out docs/BENCHMARKS.md]
    python -m trainer.bench_added --data data/demo-split --bundle bundles/demo [--songs 100000]

The split's ``song_meta.json`` records, in file order and cycled, are encoded from their
metadata alone by the server's own encoder (a bundle's ``encoder.onnx``, or the ONNX export
of a training checkpoint: a Melon-scale bundle's exact neighbour tables take hours on a
CPU without fast bf16, the checkpoint minutes) and added to one
:class:`server.added.AddedSongs` as ``AddSongs`` adds them, at the bundle's ``ef``. Then,
with the first graph alone (the design before orphan graphs) and with all graphs:

- the share of a sample of the distinct songs that a search for their own code finds;
- recall@10 of metadata-record queries (EncodeSong's) against exact search over the added
  songs (a song as near as the exact 10th counts);
- the search's p50 and p90 time, one query at a time.

The bundle's own graph is not involved: ``clients.bench_growth`` measures whole calls.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clients.bench_growth import meta_of_record
from clients.benchtools import machine, replace_marked, shown_command, shown_path
from server.added import ORPHAN_EF, AddedSongs
from server.columns import ColumnSpace
from server.engine import Encoder

K = 10
QUERIES = 400
SELF_SAMPLE = 3000
PIECE = 100  # songs per insert, as AddSongs' pieces


def markers(name: str) -> tuple[str, str]:
    suffix = f"-{name}" if name else ""
    return f"<!-- bench-added{suffix}:start -->", f"<!-- bench-added{suffix}:end -->"


def encoder_of(args: argparse.Namespace, work: Path) -> tuple[Encoder, int, str]:
    """The server's encoder, the graph's ef and a line naming the model."""
    if args.bundle is not None:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        columns = ColumnSpace.from_json(json.loads((args.bundle / "columns.json").read_text()))
        return (Encoder(args.bundle / "encoder.onnx", columns, threads=args.threads),
                int(manifest["song_index"]["ef"]),
                f"bundle {shown_path(args.bundle)} (model {manifest['model_version']})")
    from trainer.export import export_onnx
    from trainer.train import PRESETS, TrainConfig, Trainer

    config = replace(TrainConfig(), **PRESETS[args.preset])
    trainer = Trainer(args.data, work / "train", config)
    trainer.load_checkpoint(args.checkpoint, weights_only=True)
    export_onnx(trainer.model, work / "encoder.onnx")
    columns = trainer.space  # the server's ColumnSpace already
    del trainer
    return (Encoder(work / "encoder.onnx", columns, threads=args.threads),
            int(config.ef), f"checkpoint {shown_path(args.checkpoint)} ({args.preset} preset)")


def encode(encoder: Encoder, records: Sequence[dict[str, Any]], picks: Sequence[int]
           ) -> np.ndarray:
    metas = [meta_of_record(records[i % len(records)]) for i in picks]
    parts = [encoder.encode(metas[i : i + 2000])[0] for i in range(0, len(metas), 2000)]
    return np.concatenate(parts).astype(np.float32)


def measure(added: AddedSongs, codes: np.ndarray, queries: np.ndarray, rng: np.random.Generator
            ) -> list[dict[str, Any]]:
    """The three measures with the first graph alone and with all graphs."""
    unit = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
    q_unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    exact = q_unit @ unit.T
    kth = -np.partition(-exact, K - 1, axis=1)[:, K - 1]
    distinct = added.distinct()
    sample = rng.choice(distinct, min(SELF_SAMPLE, len(distinct)), replace=False)
    rows = []
    for name, scope in (("first graph only", added.first_graph_only), ("all graphs", None)):
        with scope() if scope is not None else contextlib.nullcontext():
            labels, sims = added.search(codes[sample - added.first], 1)
            found = (labels[:, 0] == sample) | (sims[:, 0] >= 1 - 1e-6)
            recall, seconds = [], []
            for i in range(len(queries)):
                started = time.perf_counter()
                got, _ = added.search(queries[i : i + 1], K)
                seconds.append(time.perf_counter() - started)
                near = exact[i, got[0] - added.first] >= kth[i] - 1e-6
                recall.append(min(1.0, float(near.sum()) / K))
        rows.append({"graphs": name, "found": float(found.mean()),
                     "recall": float(np.mean(recall)),
                     "recall_p5": float(np.percentile(recall, 5)),
                     "p50_ms": 1e3 * float(np.median(seconds)),
                     "p90_ms": 1e3 * float(np.percentile(seconds, 90))})
    return rows


def render(rows: Sequence[dict[str, Any]], notes: Sequence[str], command: str) -> str:
    lines = ["| graphs searched | own code found | recall@10 mean | recall@10 5th percentile "
             "| search p50 ms | search p90 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['graphs']} | {r['found']:.4f} | {r['recall']:.4f} | {r['recall_p5']:.2f} "
              f"| {r['p50_ms']:.3f} | {r['p90_ms']:.3f} |" for r in rows]
    header = f"`{command}` on a {machine()}, {dt.date.today().isoformat()}."
    return "\n".join(["## The added songs' graphs", "", header, "", *lines, "",
                      *[f"- {n}" for n in notes]])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainer.bench_added",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True,
                   help="split whose song_meta.json records are the songs to add")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="encode with this bundle's encoder")
    source.add_argument("--checkpoint", type=Path, help="encode with this training "
                        "checkpoint's encoder (exported to ONNX first; needs --preset)")
    p.add_argument("--preset", default="melon", help="the checkpoint's preset")
    p.add_argument("--songs", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2, help="encoder threads")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file, or - to print")
    p.add_argument("--name", default="", help="section suffix (melon: bench-added-melon)")
    args = p.parse_args(argv)
    records = json.loads((args.data / "song_meta.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        encoder, ef, model_note = encoder_of(args, Path(tmp))
        codes = encode(encoder, records, range(args.songs))
        queries = encode(encoder, records, rng.integers(0, len(records), QUERIES).tolist())
    added = AddedSongs(codes.shape[1], first=0, capacity=args.songs, ef=ef)
    started = time.perf_counter()
    for start in tqdm(range(0, args.songs, PIECE), desc="adding", unit="piece",
                      mininterval=10):
        stop = min(start + PIECE, args.songs)
        added.add(codes[start:stop], np.arange(start, stop))
    add_s = time.perf_counter() - started
    rows = measure(added, codes, queries, rng)
    sizes = ", ".join(f"{n:,}" for n in added.graph_sizes)
    notes = [f"{model_note}; code dim {codes.shape[1]}; the first graph searched at ef "
             f"{added.ef} (the bundle's {ef}, at most MAX_EF), orphan graphs at "
             f"{ORPHAN_EF}; {QUERIES} queries, {SELF_SAMPLE:,} own-code searches.",
             f"{args.songs:,} songs added in {add_s:.0f} s (graphs and checks only: no "
             f"bundle links); {added.in_graph:,} distinct codes; graph sizes {sizes}."]
    body = render(rows, notes, shown_command("python -m trainer.bench_added", argv))
    if args.out != "-":
        replace_marked(Path(args.out), body, *markers(args.name))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
