"""Trains the learned second stage (strategy ``ranked``) and adds it to a bundle.

    python -m trainer.rank --data SPLIT --bundle BUNDLE [--questions 3000] [--without ae,als,cf]
        [--undated-share 0.25]

Questions are cut the official way (:func:`trainer.split.split_playlists`) from a held-out
part of the *training* playlists of ``SPLIT/train.json``; the validation answers are never
read. Every candidate source is rebuilt from the other training playlists only (catalog,
neighbour CF, ALS, the playlists' codes), so a question cannot find its own playlist; the
song codes are the bundle's (the autoencoder saw every training playlist: the held-out
playlists' columns tie their songs together, see docs/BENCHMARKS.md). Candidates and
features come from :mod:`server.ranking`, the code the server runs. Small data is cut
again with other seeds (up to ``max_cuts``) until ``--questions`` are held out. A LightGBM
lambdarank model is fitted with early stopping on the questions of a fifth of the asked
playlists (every cut's questions of a playlist on the same side), converted
to ONNX (onnxmltools) and checked against LightGBM; ``ranker.onnx`` and ``ranker.npz`` (the
ALS item factors fitted on every training playlist, the per-song arrays) and ``als.hnsw``
(the inner-product index over those factors, :mod:`server.alsindex`) go into the bundle
and its manifest is rewritten with their checksums.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from server import alsindex
from server import bundle as bundle_files
from server.added import AddedSongs
from server.bundle import BundleError
from server.catalog import Catalog, RowLists
from server.engine import Engine
from server.melon import question_updt_date
from server.rankdata import (
    DEFAULT_SIZES,
    FEATURES,
    GROUPS,
    SOURCES,
    AlsFactors,
    RankData,
    year_of,
)
from server.ranking import candidate_features
from server.search import ExactSearch, VectorSearch
from server.strategies import Query
from trainer.catalog import build_catalog
from trainer.dataset import DataError, Dataset, load_dataset, parse_playlists, read_json
from trainer.recommenders.als import ALSRecommender
from trainer.split import split_playlists

log = logging.getLogger(__name__)

# learning_rate 0.15: early stopping ends after ~40 trees instead of ~100-144 at 0.05, and
# ranked's CPU per question on the demo falls by ~0.5 ms (every served candidate walks
# every tree) for a demo score of 0.2665 against 0.2669 (one retraining each; 0.10 scored
# 0.2660; docs/BENCHMARKS.md, bench-rank).
LGB_PARAMS: dict[str, Any] = {
    "objective": "lambdarank", "metric": "ndcg", "eval_at": [100],
    "lambdarank_truncation_level": 100, "learning_rate": 0.15, "num_leaves": 31,
    "min_data_in_leaf": 50, "feature_fraction": 0.8, "bagging_fraction": 0.8,
    "bagging_freq": 1, "verbose": -1, "seed": 0, "deterministic": True,
}


# The song graph's search depth for the training questions' seed neighbours (the bundle's
# ef is for SimilarSongs: 800 at Melon scale made each seed's search ~15 ms). Searches ask
# at least twice the list depth anyway (UnleakedSongs.search), and HnswSearch re-scores a
# hop over the exact neighbour table.
SONG_EF = 100
# Every song's code in float32 up to this size is searched exactly by the training questions
# (UnleakedSongs); past it (Melon scale: 2.9 GB) through the bundle's graph.
EXACT_BYTES = 1 << 30
# ef_construction of the graph of the re-encoded songs (UnleakedSongs).
REPLACED_EF_CONSTRUCTION = 40


@dataclass
class RankConfig:
    questions: int = 3000  # held-out questions to learn from (and to stop early on)
    max_cuts: int = 5  # most official cuts (seeds) made to reach ``questions`` on small data
    rounds: int = 300  # most boosting rounds; early stopping usually ends sooner
    early_stop: int = 30
    valid_share: float = 0.2
    seed: int = 7
    # The share of training questions asked without their updt_date: clients may send none
    # (the field is optional), and a ranker that never saw a question without one answered
    # the demo's undated questions at 0.205 against 0.265 dated, below ae-hybrid.
    undated_share: float = 0.25
    threads: int = 2
    without: tuple[str, ...] = ()  # ablation groups (GROUPS): their sources and features

    def sizes(self) -> dict[str, int]:
        dropped = {s for g in self.without for s in GROUPS[g][0]}
        return {s: (0 if s in dropped else DEFAULT_SIZES[s]) for s in SOURCES}

    def features(self) -> tuple[str, ...]:
        dropped = {f for g in self.without for f in GROUPS[g][1]}
        dropped |= {f"{s}_{kind}" for g in self.without for s in GROUPS[g][0]
                    for kind in ("score", "rank")}
        return tuple(f for f in FEATURES if f not in dropped)


# ------------------------------------------------------------------ per-song arrays


def build_rank_data(data: Any, catalog: Catalog, als: Any | None, config: RankConfig
                    ) -> RankData:
    """The arrays of ``ranker.npz`` for a dataset (and its fitted ALS, if any)."""
    songs = data.songs
    n = len(songs)
    artist_ids, artist_idx = np.unique(songs.artists.values, return_inverse=True)
    song_artists = RowLists(songs.artists.indptr.astype(np.int64),
                            artist_idx.astype(np.int32).reshape(-1),
                            np.ones(len(artist_idx), np.float32))
    owner = np.repeat(np.arange(n), np.diff(songs.artists.indptr))
    pop = catalog.popularity[owner]
    order = np.lexsort((owner, -pop, artist_idx.reshape(-1)))
    by_artist = artist_idx.reshape(-1)[order]
    rank_in = np.arange(len(order)) - np.searchsorted(by_artist, by_artist)
    # Each artist's 50 most popular songs, songs in no training playlist included: where
    # few songs recur (the Spotify sample), most hidden songs are such songs.
    keep = order[rank_in < 50]
    kept_artists = artist_idx.reshape(-1)[keep]
    indptr = np.zeros(len(artist_ids) + 1, np.int64)
    np.cumsum(np.bincount(kept_artists, minlength=len(artist_ids)), out=indptr[1:])
    artist_songs = RowLists(indptr, owner[keep].astype(np.int32),
                            catalog.popularity[owner[keep]].astype(np.float32))
    genre_lists = [np.concatenate([songs.genres.row(r), songs.detail_genres.row(r)])
                   for r in range(n)]
    g_indptr = np.zeros(n + 1, np.int64)
    np.cumsum([len(g) for g in genre_lists], out=g_indptr[1:])
    g_values = (np.concatenate(genre_lists) if genre_lists else np.zeros(0)).astype(np.int32)
    song_genres = RowLists(g_indptr, g_values, np.ones(len(g_values), np.float32))
    train = data.train
    years = year_of(train.updt_dates)
    pl_owner = np.repeat(np.arange(len(train)), np.diff(train.songs.indptr))
    dated = years[pl_owner] > 0
    total = np.bincount(train.songs.values[dated], weights=years[pl_owner][dated], minlength=n)
    count = np.bincount(train.songs.values[dated], minlength=n)
    playlist_years = np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
    return RankData(song_artists, artist_songs, song_genres, playlist_years,
                    als_factors(als, catalog) if als is not None else None,
                    config.features(), config.sizes(), artist_ids.astype(np.int64))


def als_factors(als: Any, catalog: Catalog) -> AlsFactors:
    """A fitted :class:`trainer.recommenders.als.ALSRecommender` as bundle arrays."""
    items = np.asarray(als._model.item_factors, dtype=np.float32)
    yty = items.astype(np.float64).T @ items.astype(np.float64)
    n_songs, n_tags = als._tag_offset, als._word_offset - als._tag_offset
    song_f = items[:n_songs].copy()
    song_f[catalog.popularity[:n_songs] == 0] = 0.0  # untrained: never let them score
    words = sorted(als._word_index, key=als._word_index.__getitem__)
    return AlsFactors(song_f, items[n_songs:n_songs + n_tags].copy(),
                      items[als._word_offset:].copy(), words, yty, float(als.regularization),
                      float(als.confidence), float(als.tag_weight), float(als.title_weight))


def fit_als(data: Any, threads: int) -> Any | None:
    try:
        return ALSRecommender(num_threads=threads).fit(data)
    except ValueError as exc:  # implicit missing
        log.warning("no ALS source: %s", exc)
        return None


# ------------------------------------------------------------------ training questions


def held_out(data: Any, config: RankConfig, cut: int = 0
             ) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """(the dataset without the asked playlists, questions, answers): at most
    ``config.questions`` questions cut the official way (seed ``config.seed + cut``) from the
    training playlists."""

    path = data.root / "train.json"
    records = read_json(path)
    _, questions, answers = split_playlists(records, seed=config.seed + cut)
    questions, answers = questions[: config.questions], answers[: config.questions]
    # Only the asked playlists leave the training data: at Melon scale the cut holds out
    # 18k playlists for 3,000 questions, and every song of a held-out playlist must be
    # re-encoded and searched exactly.
    questions = without_dates(questions, config.undated_share, config.seed + cut)
    asked = {int(q["id"]) for q in questions}
    rest = [r for r in records if int(r["id"]) not in asked]
    train = parse_playlists(rest, path, data.songs, data.tags, extend_tags=False)
    masked = Dataset(data.root, data.songs, data.genres, data.tags, {"train": train})
    return masked, questions, answers


def without_dates(questions: list[dict[str, Any]], share: float, seed: int
                  ) -> list[dict[str, Any]]:
    """``questions`` with ``share`` of them (drawn with ``seed``) stripped of ``updt_date``,
    as a client that sends no date asks them (:data:`RankConfig.undated_share`)."""
    drop = np.random.default_rng(seed).random(len(questions)) < share
    return [{k: v for k, v in q.items() if k != "updt_date"} if d else q
            for q, d in zip(questions, drop, strict=True)]


class UnleakedSongs:
    """The bundle's song search (a :class:`VectorSearch`) with some songs' codes replaced:
    the songs of held-out playlists, re-encoded without those playlists.

    At Melon scale searches go to the bundle's graph with the replaced songs left out, and
    to a graph of the replaced songs' new codes (:class:`AddedSongs`, as songs added at run
    time are searched), merged by similarity: an exact search over every song held every
    code twice in float32 (2 x 2.9 GB), and an exact search over a Melon cut's 90k replaced
    songs answered 1.7 questions a second. With ``exact`` (smaller catalogues, see
    :func:`unleaked_songs`) ``base`` is an :class:`ExactSearch` and the replaced songs are
    searched exactly too."""

    def __init__(self, base: VectorSearch, rows: np.ndarray, codes: np.ndarray,
                 threads: int = 1, exact: bool = False) -> None:
        order = np.argsort(rows, kind="stable")
        self._base = base
        self._rows = np.asarray(rows, np.int64)[order]
        self._n_replaced = len(order)
        self._replaced: ExactSearch | AddedSongs
        if exact:
            self._replaced = ExactSearch(codes[order])
        else:
            # A graph for one cut's questions, searched at ef >= 100: built at a lower
            # ef_construction than the server's (~4 of ~15 minutes at Melon scale).
            self._replaced = AddedSongs(codes.shape[1], 0, len(order), threads=threads,
                                        ef_construction=REPLACED_EF_CONSTRUCTION)
            self._replaced.add(codes[order], np.arange(len(order), dtype=np.int64))

    def count(self) -> int:
        return self._base.count()

    def _replaced_at(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of ``labels`` that are replaced, their positions among the replaced)."""
        at = np.minimum(np.searchsorted(self._rows, labels), max(len(self._rows) - 1, 0))
        hit = (self._rows[at] == labels) if len(self._rows) else np.zeros(len(labels), bool)
        return hit, at[hit]

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        out = np.array(self._base.vectors(labels), dtype=np.float32)
        hit, at = self._replaced_at(labels)
        out[hit] = self._replaced.vectors(at)
        return out

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(vectors).astype(np.float32)
        k = min(k, self.count())
        # Twice as deep in the bundle's graph: some of its hits are replaced songs, dropped.
        labels, sims = self._base.search(queries, 2 * k)
        hit, _ = self._replaced_at(labels.ravel())
        cand = [labels]
        cand_sims = [np.where(hit.reshape(labels.shape), -np.inf, sims).astype(np.float32)]
        if self._n_replaced:
            at, rep_sims = self._replaced.search(queries, k)
            cand.append(self._rows[at])
            cand_sims.append(rep_sims)
        labels, sims = np.concatenate(cand, axis=1), np.concatenate(cand_sims, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(labels, order, axis=1), np.take_along_axis(sims, order, axis=1)

    def neighbours(self, rows: np.ndarray, k: int, *, allow_short: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        depth = getattr(self._base, "table_depth", 0)
        if allow_short and depth:
            # As the server answers a bundle seed: its table, no deeper (HnswSearch).
            k = min(k, depth + 1)
        labels, sims = self.search(self.vectors(rows), k)
        return [(row[np.isfinite(s)], s[np.isfinite(s)])
                for row, s in zip(labels, sims, strict=True)]


def unleaked_songs(engine: Any, data: Any, masked: Any, chunk: int = 1000,
                   threads: int = 1) -> UnleakedSongs:
    """Every song's code as if the held-out playlists had never been seen: the songs of
    held-out playlists re-encoded (the bundle's ONNX encoder) from input rows without those
    playlists' columns and tags. The autoencoder was trained on every training playlist, so
    the stored codes tie a held-out playlist's songs together through its column: on the
    Spotify sample, seed-neighbour recall was 0.235 on held-out training questions against
    0.045 on the validation questions, and a ranker learned to trust the leak."""
    import scipy.sparse as sp

    songs, space = data.songs, engine.encoder.columns
    n = len(songs)
    held = ~np.isin(data.train.ids, masked.train.ids)
    touched = np.unique(np.concatenate([data.train.songs.row(int(i))
                                        for i in np.flatnonzero(held)] or [np.zeros(0)])
                        ).astype(np.int64)
    train = masked.train
    pl_of = np.repeat(np.arange(len(train)), np.diff(train.songs.indptr))
    song_pl = sp.csr_matrix((np.ones(len(pl_of), np.float32), (train.songs.values, pl_of)),
                            shape=(n, len(train))).tocsr()
    tag_lists = [train.tags.row(p) for p in range(len(train))]
    codes = data.genres.codes.items
    new_codes = np.zeros((len(touched), int(engine.manifest.code_dim)), np.float32)
    for start in tqdm(range(0, len(touched), chunk), desc="re-encoding held-out songs",
                      unit="chunk", disable=None):
        rows = []
        for r in touched[start:start + chunk].tolist():
            pls = song_pl.indices[song_pl.indptr[r]:song_pl.indptr[r + 1]]
            tags = {data.tags.items[t] for p in pls.tolist() for t in tag_lists[p].tolist()}
            rows.append(space.song_columns(
                genres=[codes[g] for g in songs.genres.row(r).tolist()],
                detail_genres=[codes[g] for g in songs.detail_genres.row(r).tolist()],
                artists=songs.artists.row(r).tolist(), issue_date=int(songs.issue_dates[r]),
                playlists=train.ids[pls].tolist(), tags=sorted(tags)))
        # Unit length is the searches' business (ExactSearch, AddedSongs normalise).
        new_codes[start:start + len(rows)] = engine.encoder.encode_columns(rows)
    log.info("re-encoded %d songs of held-out playlists", len(touched))
    if n * new_codes.shape[1] * 4 > EXACT_BYTES:
        return UnleakedSongs(engine.songs, touched, new_codes, threads)
    # Exact, as the server's neighbour tables are: on the Spotify sample the graphs' seed
    # lists cost ranked 0.371 -> 0.343 (one retraining each; session 5's exact code scored
    # 0.363-0.367 over three).
    every = ExactSearch(engine.songs.vectors(np.arange(n, dtype=np.int64)))
    return UnleakedSongs(every, touched, new_codes, threads, exact=True)


def playlist_search(songs: VectorSearch, catalog: Catalog, chunk: int = 4096) -> ExactSearch:
    """Exact search over the mean unit codes of ``catalog``'s playlists (chunked: the codes
    of every song at once would not fit at Melon scale)."""
    ps = catalog.playlist_songs
    dim = songs.vectors(np.zeros(1, np.int64)).shape[1]
    out = np.zeros((ps.n_rows, dim), np.float32)
    for start in range(0, ps.n_rows, chunk):
        stop = min(start + chunk, ps.n_rows)
        lo, hi = ps.indptr[start], ps.indptr[stop]
        if hi == lo:
            continue
        vecs = songs.vectors(ps.indices[lo:hi].astype(np.int64))
        lengths = np.diff(ps.indptr[start:stop + 1])
        nonempty = np.flatnonzero(lengths)
        bounds = (ps.indptr[start:stop][nonempty] - lo).astype(np.int64)
        out[start + nonempty] = np.add.reduceat(vecs, bounds, axis=0) / lengths[nonempty, None]
    return ExactSearch(out)


@dataclass
class Rows:
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray  # candidates per question
    recall: dict[str, float]
    n_questions: int
    ids: np.ndarray  # int64 playlist id of each group (question)

    @staticmethod
    def join(parts: list[Rows]) -> Rows:
        total = sum(p.n_questions for p in parts)
        recall = {k: sum(p.recall[k] * p.n_questions for p in parts) / max(total, 1)
                  for k in parts[0].recall}
        return Rows(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                    np.concatenate([p.groups for p in parts]), recall, total,
                    np.concatenate([p.ids for p in parts]))


def question_rows(catalog: Catalog, songs: VectorSearch, playlists: VectorSearch,
                  rank_data: RankData, data: Any, questions: list[dict[str, Any]],
                  answers: list[dict[str, Any]], progress: bool = True) -> Rows:
    """Features and labels of every question's candidates, and the candidates' recall."""
    xs, ys, groups, ids = [], [], [], []
    hits = np.zeros(len(SOURCES) + 1)
    counted = 0
    for q, a in tqdm(list(zip(questions, answers, strict=True)), desc="ranker questions",
                     unit="q", disable=not progress):
        seeds = data.songs.rows(q["songs"])
        tags = [catalog.tag_index.get(t, -1) for t in q["tags"]]
        query = Query(np.unique(seeds[seeds >= 0]).astype(np.int64),
                      np.asarray([t for t in tags if t >= 0], np.int32),
                      q.get("plylst_title", ""), question_updt_date(q))
        cand, x = candidate_features(catalog, songs, playlists, rank_data, query)
        truth = data.songs.rows(a["songs"])
        label = np.isin(cand.rows, truth).astype(np.float32)
        if len(truth):
            counted += 1
            found = cand.ranks < 1000
            hits[:-1] += (found & label[:, None].astype(bool)).sum(axis=0) / len(truth)
            hits[-1] += label.sum() / len(truth)
        if len(x):
            xs.append(x)
            ys.append(label)
            groups.append(len(x))
            ids.append(int(q["id"]))
    recall = {s: float(hits[j] / max(counted, 1)) for j, s in enumerate(SOURCES)}
    recall["union"] = float(hits[-1] / max(counted, 1))
    width = len(rank_data.features)
    return Rows(np.concatenate(xs) if xs else np.zeros((0, width), np.float32),
                np.concatenate(ys) if ys else np.zeros(0, np.float32),
                np.asarray(groups, np.int64), recall, len(questions),
                np.asarray(ids, np.int64))


# ------------------------------------------------------------------ fit and export


def fit_ranker(rows: Rows, config: RankConfig, features: tuple[str, ...]
               ) -> tuple[Any, dict]:
    """LightGBM lambdarank with early stopping on the questions of ``valid_share`` of the
    playlists (drawn with ``config.seed``; every cut's questions of a playlist go to the same
    side, so none is learnt from in another cut's form). Questions without a single hidden
    song among their candidates teach nothing. (Stopping on a fifth of the first cut alone
    left 15 questions on the Spotify sample: retrainings stopped anywhere from 3 to 103
    trees and scored 0.335-0.362.)"""
    import lightgbm as lgb

    bounds = np.concatenate([[0], np.cumsum(rows.groups)])
    positive = np.asarray([rows.y[a:b].any() for a, b in zip(bounds, bounds[1:],
                                                              strict=False)])
    useful = np.flatnonzero(positive)
    playlists = np.unique(rows.ids[useful])
    rng = np.random.default_rng(config.seed)
    n_valid = min(max(1, int(round(len(playlists) * config.valid_share))),
                  max(1, len(playlists) - 1))
    held = rng.choice(playlists, size=n_valid, replace=False)
    in_valid = np.isin(rows.ids[useful], held)
    valid, train = useful[in_valid], useful[~in_valid]
    parts = (train, valid)

    def subset(which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in which])
        return rows.x[idx], rows.y[idx], rows.groups[which]

    (xt, yt, gt), (xv, yv, gv) = subset(parts[0]), subset(parts[1])
    params = dict(LGB_PARAMS, num_threads=config.threads)
    train_set = lgb.Dataset(xt, yt, group=gt, feature_name=list(features),
                            free_raw_data=False)
    valid_set = lgb.Dataset(xv, yv, group=gv, reference=train_set, free_raw_data=False)
    bar = tqdm(total=config.rounds, desc="lambdarank", unit="round", disable=None)

    def tick(env: Any) -> None:
        bar.update(1)
        if env.evaluation_result_list:
            bar.set_postfix(valid_ndcg=f"{env.evaluation_result_list[0][2]:.4f}")

    record: dict[str, Any] = {}
    booster = lgb.train(params, train_set, num_boost_round=config.rounds,
                        valid_sets=[valid_set], valid_names=["valid"],
                        callbacks=[lgb.early_stopping(config.early_stop, verbose=False),
                                   lgb.record_evaluation(record), tick])
    bar.close()
    best = int(booster.best_iteration or booster.current_iteration())
    # Only the trees up to the best round: the ONNX export converts every tree it is given.
    booster = float32_thresholds(lgb.Booster(model_str=booster.model_to_string(
        num_iteration=best)))
    gain = booster.feature_importance(importance_type="gain")
    importance = {f: round(float(g), 2) for f, g in sorted(zip(features, gain, strict=True),
                                                          key=lambda p: -p[1])}
    curve = record.get("valid", {}).get("ndcg@100", [])
    info = {"best_iteration": best,
            "valid_ndcg@100": round(float(curve[best - 1]), 5) if curve else None,
            "train_questions": int(len(parts[0])), "valid_questions": int(len(parts[1])),
            "train_rows": int(len(xt)), "importance_gain": importance}
    return booster, info


def float32_thresholds(booster: Any) -> Any:
    """The booster with every split threshold ``t`` replaced by the largest float32 at or
    below it: for float32 features ``x <= t`` is then unchanged, and the ONNX export, which
    stores thresholds as float32, compares exactly as LightGBM does. (Rounded to nearest, a
    threshold a hair below a training value became that value, and rows holding it took
    the other branch: 0.04 apart on 1 row in 10,000 of the demo.)"""
    import lightgbm as lgb

    # Without ``tree_sizes`` (byte counts the new text no longer matches) LightGBM parses
    # the trees one after another.
    lines = [line for line in booster.model_to_string().splitlines()
             if not line.startswith("tree_sizes=")]
    for i, line in enumerate(lines):
        if not line.startswith("threshold="):
            continue
        t = np.asarray([float(v) for v in line[len("threshold="):].split()], np.float64)
        f = t.astype(np.float32)
        f = np.where(f.astype(np.float64) > t, np.nextafter(f, np.float32(-np.inf)), f)
        lines[i] = "threshold=" + " ".join(repr(float(v)) for v in f.astype(np.float64))
    return lgb.Booster(model_str="\n".join(lines) + "\n")


def to_onnx(booster: Any, n_features: int) -> bytes:
    """The booster as an ONNX model with input ``features`` (float32, batch x n)."""
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    for noisy in ("onnxmltools", "skl2onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model = onnxmltools.convert_lightgbm(
        booster, initial_types=[("features", FloatTensorType([None, n_features]))],
        target_opset=15)
    data: bytes = model.SerializeToString()
    return data


def onnx_gap(booster: Any, onnx_bytes: bytes, x: np.ndarray) -> float:
    """Largest |LightGBM - ONNX Runtime| score over the rows ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    want = booster.predict(x)
    (got,) = session.run(None, {"features": x.astype(np.float32)})[:1]
    return float(np.max(np.abs(want - np.asarray(got).reshape(-1)))) if len(x) else 0.0


def write_ranker(bundle: Path, onnx_bytes: bytes, rank_data: RankData,
                 info: dict[str, Any], popularity: np.ndarray, threads: int = 1) -> None:
    """Put the ranker files into ``bundle`` (with the inner-product index over the ALS
    factors of the songs of ``popularity`` > 0, when it has ALS) and rewrite its manifest
    (with checksums)."""
    manifest = bundle_files.read_manifest(bundle, verify=False)
    built = None
    if rank_data.als is not None:
        started = time.perf_counter()
        built = alsindex.build(rank_data.als.songs, popularity, threads)
        info["als_index_seconds"] = round(time.perf_counter() - started, 1)
    bundle_files.save_ranker(bundle, onnx_bytes, rank_data.to_arrays(),
                             built[0] if built is not None else None)
    fields = manifest.to_json()
    fields.pop("files", None)
    fields.pop("schema_version", None)
    fields.pop("als_index", None)
    if built is not None:
        fields["als_index"] = dict(built[1].__dict__)
    fields["extra"] = dict(fields.get("extra", {}), ranker=info)
    fields["files"] = {}
    bundle_files.write_manifest(bundle, fields)


def train_ranker(data_dir: Path, bundle: Path, config: RankConfig,
                 progress: bool = True) -> dict[str, Any]:
    """The whole of ``python -m trainer.rank``; returns what goes into the manifest."""
    started = time.perf_counter()
    # Every playlist file, as trainer.train reads them: the bundle's tag vocabulary.
    data = load_dataset(data_dir)
    engine = Engine.load(bundle, verify=False, threads=config.threads, song_ef=SONG_EF)
    if engine.catalog.n_songs != len(data.songs) or not np.array_equal(
            engine.catalog.song_ids, data.songs.ids):
        raise ValueError(f"{bundle} was not trained on {data_dir}: its songs differ")
    if list(engine.catalog.tags) != list(data.tags.items):
        raise ValueError(f"{bundle} was not trained on {data_dir}: its tags differ")
    use_als = "als" not in config.without
    parts: list[Rows] = []
    cut = 0
    # Small data gives few questions per cut: cut again (another seed) until there are
    # enough, as many times as max_cuts allows.
    while cut < config.max_cuts and sum(p.n_questions for p in parts) < config.questions:
        wanted = config.questions - sum(p.n_questions for p in parts)
        masked, questions, answers = held_out(data, replace(config, questions=wanted), cut)
        log.info("ranker cut %d: %d held-out questions, %d other training playlists", cut,
                 len(questions), len(masked.train))
        catalog = build_catalog(masked)
        songs = unleaked_songs(engine, data, masked, threads=config.threads)
        playlists = playlist_search(songs, catalog)
        rank_data = build_rank_data(masked, catalog, fit_als(masked, config.threads)
                                    if use_als else None, config)
        parts.append(question_rows(catalog, songs, playlists, rank_data, masked,
                                   questions, answers, progress))
        cut += 1
    rows = Rows.join(parts)
    log.info("candidate recall on held-out questions: %s",
             ", ".join(f"{k} {v:.3f}" for k, v in rows.recall.items()))
    booster, info = fit_ranker(rows, config, rank_data.features)
    onnx_bytes = to_onnx(booster, len(rank_data.features))
    check = rows.x[np.random.default_rng(0).permutation(len(rows.x))[:10_000]]
    gap = onnx_gap(booster, onnx_bytes, check)
    if gap > 1e-4:
        raise ValueError(f"the ONNX ranker differs from LightGBM by {gap:.2e}")
    # Served arrays: every training playlist (the bundle's catalog, ALS refitted on all).
    serving = build_rank_data(data, engine.catalog, fit_als(data, config.threads)
                              if use_als else None, config)
    info.update(features=list(rank_data.features), sizes=config.sizes(),
                without=list(config.without), questions=rows.n_questions, cuts=cut,
                candidates_per_question=round(float(rows.groups.mean()), 1)
                if len(rows.groups) else 0.0,
                recall={k: round(v, 4) for k, v in rows.recall.items()},
                onnx_max_abs_diff=gap, seconds=round(time.perf_counter() - started, 1))
    write_ranker(bundle, onnx_bytes, serving, info, engine.catalog.popularity, config.threads)
    log.info("ranker written into %s (%d rounds, valid nDCG@100 %s, %.0f s)", bundle,
             info["best_iteration"], info["valid_ndcg@100"], info["seconds"])
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="the split the bundle was "
                   "trained on (its train.json)")
    p.add_argument("--bundle", required=True, type=Path, help="bundle to add the ranker to")
    p.add_argument("--questions", type=int, default=RankConfig.questions,
                   help="held-out training questions to learn from")
    p.add_argument("--rounds", type=int, default=RankConfig.rounds)
    p.add_argument("--threads", type=int, default=RankConfig.threads)
    p.add_argument("--seed", type=int, default=RankConfig.seed)
    p.add_argument("--undated-share", type=float, default=RankConfig.undated_share,
                   help="share of the training questions asked without their updt_date")
    p.add_argument("--without", default="", help=f"ablation: leave out the sources and "
                   f"features of {', '.join(GROUPS)} (comma-separated)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    without = tuple(w.strip() for w in args.without.split(",") if w.strip())
    unknown = [w for w in without if w not in GROUPS]
    if unknown:
        print(f"error: --without {','.join(unknown)}: choose from {', '.join(GROUPS)}",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.undated_share <= 1.0:
        print(f"error: --undated-share {args.undated_share}: expected 0 to 1", file=sys.stderr)
        return 2
    config = RankConfig(questions=args.questions, rounds=args.rounds, threads=args.threads,
                        seed=args.seed, undated_share=args.undated_share, without=without)
    try:
        info = train_ranker(args.data, args.bundle, config)
    except (DataError, BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ranker added to {args.bundle}: {info['best_iteration']} rounds, held-out "
          f"nDCG@100 {info['valid_ndcg@100']}, candidate recall {info['recall']['union']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
