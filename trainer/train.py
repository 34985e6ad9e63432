"""Trains the song autoencoder and writes the serving bundle.

    python -m trainer.train --data DIR --out BUNDLE [--preset tiny|small|melon]
                            [--epochs N] [--resume]

Under torchrun (``torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] -m
trainer.train ...``) the same command trains data-parallel (DistributedDataParallel, gloo
on the CPU): each step's batch is split between the ranks, rank 0 validates and writes
the checkpoints, the log and the bundle, and encoding the songs and the neighbour tables
are split by rank. ``--resume`` (or a torchrun restart) continues from rank 0's last
checkpoint, broadcast to the others.

DIR is a dataset directory; when it is a split made by ``trainer.split`` (it has
``val_questions.json`` and ``val_answers.json``) the official metric on those questions is
the validation score, computed every ``--val-every`` epochs and used for early stopping.
Work files (checkpoints, the JSONL log, the PNG of the curves) live in ``BUNDLE.work/``
next to the bundle; ``--resume`` continues from its last checkpoint. The log and the
curves are copied into the bundle when it is written. Then the learned second stage is
trained and added (``trainer.rank``: strategy ``ranked``, the bundle's default);
``--no-ranker`` skips it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from server.bundle import BundleError
from server.catalog import playlist_codes
from server.search import ExactSearch
from trainer.catalog import build_catalog
from trainer.dataset import DataError, load_dataset, read_json
from trainer.distributed import (
    SINGLE,
    Dist,
    PeerLost,
    all_sum,
    average_row_grads,
    block_range,
    broadcast_object,
    broadcast_tensor,
    collect_rows,
    exit_worker,
    init_from_env,
    restart_count,
    shutdown,
)
from trainer.evaluate import score
from trainer.export import BundleInputs, IndexSettings, export_bundle
from trainer.features import FeatureConfig, build_song_matrix
from trainer.model import (
    LossStep,
    ModelConfig,
    RowSparseAdam,
    SongAutoEncoder,
    bf16_is_fast,
    make_batch,
)
from trainer.plots import plot_training
from trainer.rank import RankConfig, train_ranker
from trainer.recommenders.ae import EmbeddingStrategy
from trainer.recommenders.base import Popularity, complete, questions_from

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: seconds.
    "tiny": {"hidden": (64, 32), "batch_size": 256, "epochs": 6, "negative_samples": 256,
             "val_every": 2, "patience": 2, "index_m": 16, "ef_construction": 100, "ef": 100},
    # The demo: a few minutes on 2 cores.
    "small": {"hidden": (512, 256), "batch_size": 1024, "epochs": 12,
              "negative_samples": 1024, "val_every": 2, "patience": 2, "index_m": 16,
              "ef_construction": 150, "ef": 150},
    # The write-up's network at Melon scale.
    # On 575k x 1024 one-epoch codes, recall@100 at ef 400 was 0.825 with M=16 and 0.880
    # with M=32 (docs/BENCHMARKS.md): high-dimensional codes need a denser graph. With the
    # one-hop re-scoring over the exact neighbour lists, ef 800 reaches recall 0.954.
    "melon": {"hidden": (2048, 1024), "batch_size": 2048, "epochs": 50,
              "negative_samples": 1024, "val_every": 5, "patience": 2, "index_m": 32,
              "ef_construction": 200, "ef": 800},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved in the checkpoint and manifest)."""

    hidden: tuple[int, ...] = (2048, 1024)
    activation: str = "selu"
    output_activation: bool = True
    dropout: float = 0.8
    tied: bool = False
    masked_weight: float = 15.0
    plain_weight: float = 200.0
    negative_samples: int = 1024
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 2048
    epochs: int = 50
    aug_step: int = 0  # dense re-feeding steps; the write-up uses none
    seed: int = 0
    val_every: int = 5
    val_questions: int = 2000
    patience: int = 2
    # Artists by default (docs/BENCHMARKS.md, the learned second stage): on the Spotify
    # sample they lift ranked from 0.319 to 0.363 and ae-quota from 0.113 to 0.293; on the
    # demo ae-neighbours' validation score is 0.205 with them against 0.202 without.
    groups: tuple[str, ...] = ("playlists", "tags", "genres", "detail_genres", "artists")
    min_count: dict[str, int] = field(default_factory=lambda: {
        "playlists": 2, "tags": 2, "genres": 1, "detail_genres": 1, "artists": 2, "years": 1})
    index_m: int = 16
    ef_construction: int = 150
    ef: int = 200
    neighbours_k: int = 100  # exact neighbour lists per song in the bundle (0: none)
    threads: int = 2
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 where the CPU has native bf16)
    max_steps_per_epoch: int = 0  # benchmarks: stop an epoch early (0 = whole epoch)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        out["groups"] = list(self.groups)
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        raw["hidden"] = tuple(raw["hidden"])
        raw["groups"] = tuple(raw["groups"])
        return TrainConfig(**raw)


def set_threads(n: int) -> None:
    """Pin torch's intra-op pool; warn when OMP_NUM_THREADS would oversubscribe."""
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp is None or int(omp) > (os.cpu_count() or n):
        log.warning("OMP_NUM_THREADS=%s: set it to at most the core count (%s) so BLAS and "
                    "torch do not oversubscribe the CPU", omp, os.cpu_count())


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 dense matmuls on CPUs with native bf16 (about 1.5x faster steps
    here), else fp32."""
    if precision != "auto":
        return precision

    return "bf16" if bf16_is_fast() else "fp32"


class Trainer:
    """One training run: features, model, optimisers, validation, checkpoints."""

    def __init__(self, data_dir: Path, work_dir: Path, config: TrainConfig,
                 dist: Dist = SINGLE, *, strict: bool = False) -> None:
        self.config = config
        self.dist = dist
        self.work_dir = work_dir
        self.data_dir = data_dir
        self.data = load_dataset(data_dir, strict=strict)
        features = build_song_matrix(self.data, FeatureConfig(config.groups, config.min_count))
        self.matrix = features.matrix
        self.space = features.space
        self.train_rows = features.trainable_rows
        self.catalog = build_catalog(self.data)
        self.model_config = ModelConfig(
            input_dim=self.space.dim, hidden=config.hidden, activation=config.activation,
            output_activation=config.output_activation, dropout=config.dropout,
            tied=config.tied, masked_weight=config.masked_weight,
            plain_weight=config.plain_weight, negative_samples=config.negative_samples,
            precision=resolve_precision(config.precision))
        torch.manual_seed(config.seed)
        self.model = SongAutoEncoder(self.model_config)
        tables = {"in_table": self.model.in_table, "out_bias": self.model.out_bias}
        if self.model.out_table is not None:
            tables["out_table"] = self.model.out_table
        self.row_tables = tables
        self.row_opt = RowSparseAdam(tables, config.lr, config.weight_decay)
        self.dense_opt = torch.optim.Adam(self.model.dense_parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        # The loss as a module of the dense parameters only: what DDP wraps and
        # all-reduces; the row tables' gradients are averaged by average_row_grads.
        self.step_module: torch.nn.Module = LossStep(self.model)
        if dist.enabled:
            self.step_module = DistributedDataParallel(self.step_module)
        self.epoch = 0
        self.best_score = -1.0
        self.bad_rounds = 0
        self.history: list[dict[str, Any]] = []
        self.validation = self._validation_set()
        log.info("songs %d (training rows %d), columns %d %s", self.matrix.shape[0],
                 len(self.train_rows), self.space.dim, self.space.sizes())

    # -- validation -------------------------------------------------------------------

    def _validation_set(self) -> tuple[list[Any], list[dict[str, Any]]] | None:
        q_path = self.data_dir / "val_questions.json"
        a_path = self.data_dir / "val_answers.json"
        if not (q_path.exists() and a_path.exists()):
            log.warning("%s has no val_questions.json/val_answers.json: no validation score,"
                        " no early stopping", self.data_dir)
            return None
        questions = questions_from(self.data.load_playlists(q_path), self.data)
        answers = read_json(a_path)
        rng = np.random.default_rng(12345)
        pick = np.sort(rng.permutation(len(questions))[: self.config.val_questions])
        return [questions[i] for i in pick], [answers[i] for i in pick]

    def song_codes(self, batch_size: int = 4096) -> np.ndarray:
        """Codes of every song row (eval mode, no dropout). Under torchrun every rank
        must call it: each encodes its block range and every rank gets all codes."""
        n = self.matrix.shape[0]
        lo, hi = block_range(n, batch_size, self.dist.rank, self.dist.world)
        self.model.eval()
        out = np.empty((hi - lo, self.model_config.code_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(lo, hi, batch_size):
                sub = self.matrix[start : min(start + batch_size, hi)]
                cols = torch.from_numpy(sub.indices.astype(np.int64))
                offsets = torch.from_numpy(sub.indptr[:-1].astype(np.int64))
                out[start - lo : start - lo + len(offsets)] = \
                    self.model.encode(cols, offsets).numpy()
        self.model.train()
        codes = collect_rows(out, n, batch_size, self.dist, to_all=True)
        assert codes is not None
        return codes

    def bundle_inputs(self, codes: np.ndarray | None = None) -> BundleInputs:
        """What :func:`trainer.export.export_bundle` writes for the current model (``codes``:
        every song's code, when the caller already computed them). Under torchrun every
        rank calls it (the songs are encoded split by rank)."""
        cfg = self.config
        return BundleInputs(
            model=self.model, codes=self.song_codes() if codes is None else codes,
            input_rows=self.matrix, catalog=self.catalog, columns=self.space,
            songs=self.data.songs,
            index=IndexSettings(cfg.index_m, cfg.ef_construction, cfg.ef, cfg.threads,
                                cfg.neighbours_k),
            hyper_parameters=cfg.to_json(), data_dir=self.data_dir, work_dir=self.work_dir,
            epochs_trained=self.epoch, best_val_score=self.best_score, dist=self.dist)

    def validate(self, codes: np.ndarray | None = None) -> float | None:
        if self.validation is None:
            return None

        codes = self.song_codes() if codes is None else codes
        strategy = EmbeddingStrategy(
            "ae-neighbours", self.catalog, ExactSearch(codes),
            ExactSearch(playlist_codes(codes, self.catalog)))
        popular = Popularity.of(self.data)
        questions, answers = self.validation
        results = []
        for q in questions:
            rec = complete(strategy.recommend(q), q, popular)
            results.append({"id": q.id, "songs": rec.songs.tolist(), "tags": rec.tags})
        return score(answers, results).score

    # -- training ---------------------------------------------------------------------

    def run_epoch(self) -> dict[str, float]:
        """One pass over the training rows.

        Under torchrun each step's batch (the same ``batch_size`` rows as a single
        process, from the same permutation) is split between the ranks, so the run takes
        the same steps on the same batches as one process would. How the two sparse parts
        stay right under DDP:

        - the sampled output columns come from ``rng``, seeded by (seed, epoch) alone, so
          every rank draws the same columns at every step, and the ranks' shares of the
          sampled zero-part estimate add up to exactly the single-process estimate over
          the whole batch (columns drawn per rank would give another estimator, each rank
          scaling its own draw by D / S, that no longer reproduces the single-process run);
        - each rank's loss is its share of the whole batch's loss (``whole``, given to
          ``batch_loss`` as ``totals``: the MSEs divided by the whole batch's positives and
          rows), and backward runs on share x
          world size: DDP's average of the dense gradients, and ``average_row_grads``'
          average of the row-sparse table gradients over the union of the ranks' rows,
          are then exactly the whole batch's gradient;
        - every rank applies the same averaged gradients with the same optimiser state, so
          the replicas stay identical without sending weights.
        """
        cfg = self.config
        dist = self.dist
        rng = np.random.default_rng([cfg.seed, self.epoch])
        # Dropout masks: each rank its own stream (rank 0 keeps the single-process one).
        torch.manual_seed(cfg.seed * 100_003 + self.epoch + 7_919 * dist.rank)
        order = rng.permutation(self.train_rows)
        lengths = np.diff(self.matrix.indptr)
        n_batches = -(-len(order) // cfg.batch_size)
        if cfg.max_steps_per_epoch:
            n_batches = min(n_batches, cfg.max_steps_per_epoch)
        totals = {"loss": 0.0, "masked_mse": 0.0, "plain_mse": 0.0}
        started = time.perf_counter()
        songs_done = 0
        steps = 0
        exchange_s = 0.0  # waiting for and averaging the other ranks' row gradients
        self.model.train()
        bar = tqdm(range(n_batches), desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   unit="batch", file=sys.stderr, disable=None if dist.is_main else True)
        for step in bar:
            rows = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            whole: tuple[int, int] | None = None
            if dist.enabled:
                if len(rows) < dist.world:  # a last batch too small to give every rank a row
                    rng.integers(0, self.space.dim, size=cfg.negative_samples)
                    continue
                whole = (int(lengths[rows].sum()), len(rows))
                rows = np.array_split(rows, dist.world)[dist.rank]
            sub = self.matrix[rows]
            batch = make_batch(sub.indptr, sub.indices)
            sample = rng.integers(0, self.space.dim, size=cfg.negative_samples)
            parts = self.step_module(batch, sample, whole)
            self.dense_opt.zero_grad(set_to_none=True)
            (parts.loss * dist.world).backward()
            t0 = time.perf_counter()
            row_grads = average_row_grads(parts.row_grads, self.row_tables, dist)
            exchange_s += time.perf_counter() - t0
            self.row_opt.step(row_grads)
            self.dense_opt.step()
            totals["loss"] += float(parts.loss.detach())
            totals["masked_mse"] += parts.masked_mse
            totals["plain_mse"] += parts.plain_mse
            songs_done += len(rows)
            steps += 1
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{totals['loss'] / steps:.4f}",
                            songs_s=f"{songs_done * dist.world / max(elapsed, 1e-9):.0f}")
        bar.close()
        # The ranks' shares add up to the whole batches' losses.
        summed = all_sum([totals["loss"], totals["masked_mse"], totals["plain_mse"],
                          float(songs_done)], dist)
        totals = dict(zip(("loss", "masked_mse", "plain_mse"), summed[:3], strict=True))
        seconds = time.perf_counter() - started
        stats = {k: v / max(steps, 1) for k, v in totals.items()}
        stats.update(seconds=seconds, songs_per_s=summed[3] / max(seconds, 1e-9),
                     steps=steps)
        if dist.enabled:
            stats["row_exchange_seconds"] = exchange_s
        return stats

    def fit(self) -> None:
        cfg = self.config
        while self.epoch < cfg.epochs:
            stats = self.run_epoch()
            self.epoch += 1
            record: dict[str, Any] = {"epoch": self.epoch, **stats}
            if self.dist.enabled:
                record["world_size"] = self.dist.world
            if self.validation is not None and (self.epoch % cfg.val_every == 0
                                                or self.epoch == cfg.epochs):
                t0 = time.perf_counter()
                codes = self.song_codes()  # every rank encodes its share
                # Rank 0 scores; every rank takes its score, so all stop together.
                val = broadcast_object(self.validate(codes) if self.dist.is_main else None,
                                       self.dist)
                record["val_score"] = val
                record["val_seconds"] = time.perf_counter() - t0
                assert val is not None
                if val > self.best_score:
                    self.best_score, self.bad_rounds = val, 0
                    self.save_checkpoint("best.pt")
                else:
                    self.bad_rounds += 1
            self.history.append(record)
            log.info("epoch %d: %s", self.epoch,
                     " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.items() if k != "epoch"))
            self._append_log(record)
            self.save_checkpoint("last.pt")
            self.plot()
            if self.validation is not None and self.bad_rounds >= cfg.patience:
                log.info("early stop: no validation gain in %d rounds (best %.4f)",
                         self.bad_rounds, self.best_score)
                break
        best = self.work_dir / "best.pt"
        if broadcast_object(best.exists(), self.dist):
            if self.dist.is_main:
                self.load_checkpoint(best, weights_only=True)
            self.sync_from_main(optimizer=False)

    # -- checkpoints, log, plot --------------------------------------------------------

    def sync_from_main(self, optimizer: bool) -> None:
        """Rank 0's weights (and with ``optimizer``, its optimiser state and counters, as
        after a resume) on every rank: only rank 0 reads checkpoints, so nodes need no
        shared disk. Nothing to do in a single process."""
        dist = self.dist
        if not dist.enabled:
            return
        for tensor in self.model.state_dict().values():
            broadcast_tensor(tensor, dist)
        if not optimizer:
            return
        for table in (*self.row_opt.exp_avg.values(), *self.row_opt.exp_avg_sq.values()):
            broadcast_tensor(table, dist)
        meta = broadcast_object({
            "epoch": self.epoch, "best_score": self.best_score, "bad_rounds": self.bad_rounds,
            "history": self.history, "row_steps": self.row_opt.steps,
            "dense_opt": self.dense_opt.state_dict()} if dist.is_main else None, dist)
        if not dist.is_main:
            self.dense_opt.load_state_dict(meta["dense_opt"])
            self.row_opt.steps = int(meta["row_steps"])
            self.epoch, self.best_score = int(meta["epoch"]), float(meta["best_score"])
            self.bad_rounds, self.history = int(meta["bad_rounds"]), list(meta["history"])

    def save_checkpoint(self, name: str) -> None:
        if not self.dist.is_main:  # the replicas are identical: rank 0 writes
            return
        state = {"config": self.config.to_json(), "epoch": self.epoch,
                 "best_score": self.best_score, "bad_rounds": self.bad_rounds,
                 "history": self.history, "model": self.model.state_dict(),
                 "dense_opt": self.dense_opt.state_dict(),
                 "row_opt": self.row_opt.state_dict()}
        tmp = self.work_dir / (name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.work_dir / name)

    def load_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        # Memory-mapped: only what is read comes into memory. A Melon-scale checkpoint is
        # ~9 GB, two thirds optimiser moments, and reading best.pt's weights after training
        # (the moments still live) otherwise held both copies at once: 23 GB, killed.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        self.model.load_state_dict(state["model"])
        if weights_only:
            return
        if TrainConfig.from_json(state["config"]) != self.config:
            log.warning("resuming with a different configuration than the checkpoint's")
        self.dense_opt.load_state_dict(state["dense_opt"])
        self.row_opt.load_state_dict(state["row_opt"])
        self.epoch = int(state["epoch"])
        self.best_score = float(state["best_score"])
        self.bad_rounds = int(state["bad_rounds"])
        self.history = list(state["history"])

    def rewrite_log(self) -> None:
        """The JSONL log as the checkpoint's history: a run stopped between appending an
        epoch's record and saving its checkpoint would otherwise log that epoch twice."""
        if not self.dist.is_main:
            return
        tmp = self.work_dir / "train_log.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.work_dir / "train_log.jsonl")

    def _append_log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with (self.work_dir / "train_log.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if not self.dist.is_main:
            return
        plot_training(self.history, self.work_dir / "training.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="dataset or split directory")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="melon")
    p.add_argument("--epochs", type=int)
    p.add_argument("--resume", action="store_true", help="continue from BUNDLE.work/last.pt")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden", help="encoder widths, e.g. 2048,1024 (last = code size)")
    p.add_argument("--activation", choices=["selu", "relu", "elu", "tanh", "sigmoid"])
    p.add_argument("--dropout", type=float)
    p.add_argument("--loss-weights", help="masked,plain weights, e.g. 15,200 (0 disables)")
    p.add_argument("--negatives", type=int, help="columns sampled per batch for plain MSE")
    p.add_argument("--groups", help="column groups, e.g. playlists,tags,genres,detail_genres"
                   " (also: artists, years)")
    p.add_argument("--tied", action="store_true", help="tie decoder output to the encoder")
    p.add_argument("--aug-step", type=int, help="dense re-feeding steps (not implemented "
                   "beyond 0: see docs)")
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-questions", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--neighbours-k", type=int, help="exact neighbour lists per song in the "
                   "bundle (default 100, 0: none; Melon scale takes ~40 min on 2 cores)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-export", action="store_true", help="train only, write no bundle")
    p.add_argument("--no-ranker", action="store_true", help="write the bundle without the "
                   "learned second stage (trainer.rank; strategy ranked)")
    p.add_argument("--ranker-questions", type=int, help="held-out training questions the "
                   "ranker learns from (default: trainer.rank's)")
    p.add_argument("--strict", action="store_true",
                   help="refuse dirty values in the data instead of reading them leniently")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    preset = dict(PRESETS[args.preset])
    config = replace(TrainConfig(), **preset)
    overrides: dict[str, Any] = {}
    for name in ("epochs", "seed", "batch_size", "lr", "activation", "dropout", "val_every",
                 "val_questions", "patience", "threads", "max_steps_per_epoch", "aug_step",
                 "precision", "neighbours_k"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.negatives is not None:
        overrides["negative_samples"] = args.negatives
    if args.hidden:
        overrides["hidden"] = tuple(int(x) for x in args.hidden.split(","))
    if args.loss_weights:
        masked, plain = (float(x) for x in args.loss_weights.split(","))
        overrides.update(masked_weight=masked, plain_weight=plain)
    if args.groups:
        overrides["groups"] = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    if args.tied:
        overrides["tied"] = True
    config = replace(config, **overrides)
    if config.aug_step:
        raise ValueError("--aug-step > 0 (dense re-feeding) needs a dense B x D output, which "
                         "the sparse trainer avoids by design; the write-up trains without it")
    if config.batch_size <= 0 or config.epochs <= 0 or config.negative_samples <= 0:
        raise ValueError("--batch-size, --epochs and --negatives must be positive")
    return config


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise PeerLost("stopped by SIGTERM (torchrun stops every worker once one has failed)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dist = init_from_env()
    if dist.enabled:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        if not dist.is_main:  # one voice in the log: rank 0's (warnings still from all)
            logging.getLogger().setLevel(logging.WARNING)
    trainer: Trainer | None = None
    work = args.out.with_name(args.out.name + ".work")
    try:
        config = config_from_args(args)
        if dist.local_world > 1 and args.threads is None:
            # Ranks sharing a machine share its cores.
            config = replace(config, threads=max(1, (os.cpu_count() or 1) // dist.local_world))
        set_threads(config.threads)
        if dist.is_main:
            work.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(args.data, work, config, dist, strict=args.strict)
        # torchrun restarts failed groups with the same arguments: resume then too.
        resume = args.resume or restart_count() > 0
        last = work / "last.pt"
        resumed = False
        if dist.is_main:
            if resume and last.exists():
                trainer.load_checkpoint(last)
                trainer.rewrite_log()
                resumed = True
                log.info("resumed from %s at epoch %d", last, trainer.epoch)
            elif not resume:
                (work / "train_log.jsonl").unlink(missing_ok=True)
                (work / "best.pt").unlink(missing_ok=True)
        trainer.sync_from_main(optimizer=broadcast_object(resumed, dist))
        trainer.fit()
        if not args.no_export:
            manifest = export_bundle(trainer.bundle_inputs(), args.out)
            if manifest is not None:  # rank 0 writes the bundle and trains the ranker
                print(f"bundle written: {args.out} (model {manifest.model_version}, "
                      f"{manifest.extra['n_songs']} songs, code dim {manifest.code_dim})")
                if not args.no_ranker:
                    # The ranker reads the bundle, not the training state: free the model
                    # and its optimiser moments first (~9 GB at Melon scale, where the
                    # ranker beside them was killed for memory on a 24 GB machine).
                    trainer = None
                    gc.collect()
                    rank_config = RankConfig(threads=config.threads)
                    if args.ranker_questions:
                        rank_config = replace(rank_config, questions=args.ranker_questions)
                    info = train_ranker(args.data, args.out, rank_config)
                    print(f"ranker added: {info['best_iteration']} rounds, candidate recall "
                          f"{info['recall']['union']:.3f} (strategy ranked is the default)")
    except (DataError, BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PeerLost as exc:
        done = trainer.epoch if trainer is not None else 0
        saved = (f"the last checkpoint is {work / 'last.pt'} (epoch {done})" if done
                 else "no epoch was completed, so there is no checkpoint yet")
        print(f"error: rank {dist.rank} of {dist.world}: the training group lost a worker "
              f"after {done} completed epoch(s) ({exc}); training stops, {saved}. Run the "
              "same torchrun command with --resume to continue from the last checkpoint, "
              "or launch with torchrun --max-restarts=N to restart and resume "
              "automatically.", file=sys.stderr)
        return 1
    finally:
        shutdown(dist)
    return 0


if __name__ == "__main__":
    exit_worker(main())
