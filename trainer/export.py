"""Exports a trained autoencoder as a serving bundle (see :mod:`server.bundle`).

The encoder goes to ONNX with named inputs ``columns`` (int64, batch x width; padded with
the input dimension, whose embedding row is zero) and ``weights`` (float32, batch x width;
0 on padding) and output ``code``, batch and width dynamic. Every song of ``song_meta.json``
is encoded (songs in no training playlist from their metadata alone) into an hnswlib
cosine index; training playlists get the mean of their songs' codes in a second index.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hnswlib
import numpy as np
from tqdm import tqdm

from server import bundle as bundle_files
from server.bundle import IndexParams, Manifest, pack_strings
from server.catalog import Catalog, playlist_codes
from server.columns import ColumnSpace
from server.search import representatives
from trainer.dataset import Songs
from trainer.distributed import Dist
from trainer.neighbours import sharded_neighbours, table_arrays

if TYPE_CHECKING:  # torch is imported only to export (the serving side reads the result)
    from trainer.model import SongAutoEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexSettings:
    """How the bundle's indexes are built."""

    m: int
    ef_construction: int
    ef: int
    threads: int
    neighbours_k: int  # exact neighbour lists per song (0: none)


@dataclass(frozen=True)
class BundleInputs:
    """Everything a bundle is made of: the trained model, what it was trained on, and how
    to index it (``trainer.train.Trainer.bundle_inputs`` gathers them)."""

    model: SongAutoEncoder
    codes: np.ndarray  # float32, every song row's code
    input_rows: Any  # scipy CSR, song row -> input columns (duplicates share a code)
    catalog: Catalog
    columns: ColumnSpace
    songs: Songs  # names and artists, for people reading answers
    index: IndexSettings
    hyper_parameters: dict[str, Any]
    data_dir: Path  # fingerprinted into the manifest
    work_dir: Path  # the training log and curves are copied from here
    epochs_trained: int
    best_val_score: float
    dist: Dist  # under torchrun: this rank's place (the neighbour tables are sharded)


def export_onnx(model: SongAutoEncoder, path: Path) -> None:
    """Write the encoder (sparse input -> code) to ONNX."""
    # torch only here: everything else in this module works on numpy arrays.
    import torch
    from torch import nn

    class PaddedEncoder(nn.Module):
        def __init__(self, source: SongAutoEncoder) -> None:
            super().__init__()
            table = source.in_table.detach()
            self.table = nn.Parameter(torch.cat([table, torch.zeros(1, table.shape[1])]))
            self.bias = nn.Parameter(source.in_bias.detach().clone())
            self.source = source

        def forward(self, columns: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            x = (self.table[columns] * weights.unsqueeze(-1)).sum(1) + self.bias
            return self.source.encode_dense(self.source.act(x))

    # The exporter narrates every optimisation pass at INFO: keep the training log readable.
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model.eval()
    wrapper = PaddedEncoder(model).eval()
    columns = torch.tensor([[0, 1, model.config.input_dim], [2, 3, 4]], dtype=torch.int64)
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    batch, width = torch.export.Dim("batch"), torch.export.Dim("width")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from the exporter internals
        torch.onnx.export(wrapper, (columns, weights), str(path),
                          input_names=["columns", "weights"], output_names=["code"],
                          dynamic_shapes={"columns": {0: batch, 1: width},
                                          "weights": {0: batch, 1: width}},
                          dynamo=True, verbose=False)


def build_index(vectors: np.ndarray, m: int, ef_construction: int, ef: int,
                threads: int, labels: np.ndarray | None = None) -> tuple[Any, IndexParams]:
    """An hnswlib cosine index over ``vectors`` labelled ``labels`` (default: row numbers)."""
    labels = np.arange(len(vectors)) if labels is None else labels
    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(max_elements=max(len(vectors), 1), ef_construction=ef_construction, M=m)
    index.set_num_threads(threads)
    step = 20_000
    with tqdm(total=len(vectors), desc="hnsw index", unit="vec", disable=None) as bar:
        for start in range(0, len(vectors), step):
            chunk = vectors[start : start + step]
            index.add_items(chunk, labels[start : start + len(chunk)])
            bar.update(len(chunk))
    index.set_ef(ef)
    return index, IndexParams("cosine", vectors.shape[1], m, ef_construction, ef, len(vectors))


def data_fingerprint(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("song_meta.json", "train.json"):
        digest.update(name.encode())
        digest.update(bundle_files.sha256_of(data_dir / name).encode())
    return digest.hexdigest()[:32]


def song_metadata_arrays(songs: Songs) -> dict[str, np.ndarray]:
    """Song names and artists for people reading answers (clients show them)."""
    name_blob, name_off = pack_strings(songs.names)
    artists = [", ".join(songs.artist_names.get(int(a), str(a))
                         for a in songs.artists.row(r).tolist()) for r in range(len(songs))]
    artist_blob, artist_off = pack_strings(artists)
    return {"song_name_blob": name_blob, "song_name_offsets": name_off,
            "song_artist_blob": artist_blob, "song_artist_offsets": artist_off}


def export_bundle(inputs: BundleInputs, out: Path,
                  song_index: tuple[Any, IndexParams] | None = None) -> Manifest | None:
    """Write the bundle of ``inputs`` into ``out`` (atomically).

    ``song_index`` (built over the representatives, as here) may be passed when the caller
    already built it. Under torchrun every rank calls this: the exact neighbour tables are
    split by rank (:func:`trainer.neighbours.sharded_neighbours`; the codes were encoded
    split by rank too, ``Trainer.song_codes``), then rank 0 writes the bundle and returns
    its manifest; the other ranks return None."""
    settings = inputs.index
    codes = inputs.codes
    t0 = time.perf_counter()
    # Identical input rows (e.g. songs in no playlist with the same genres) give identical
    # codes: index one representative of each (see server.search.HnswSearch).
    rep_of = representatives(inputs.input_rows.indptr, inputs.input_rows.indices)
    reps = np.nonzero(rep_of == np.arange(len(rep_of)))[0]
    unit = codes[reps] / np.maximum(np.linalg.norm(codes[reps], axis=1, keepdims=True), 1e-12)
    extra: dict[str, Any] = {}
    tables = None
    if settings.neighbours_k > 0 and len(reps) > 1:
        started = time.perf_counter()
        tables = sharded_neighbours(unit, settings.neighbours_k, inputs.dist,
                                    threads=settings.threads,
                                    work_dir=inputs.work_dir / "neighbours")
        if tables is not None:
            extra["song_neighbours"] = {"k": int(tables[0].shape[1]),
                                        "seconds": round(time.perf_counter() - started, 1)}
    if not inputs.dist.is_main:
        return None
    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    export_onnx(inputs.model, staging / bundle_files.ENCODER)
    if song_index is None:
        song_index = build_index(codes[reps], settings.m, settings.ef_construction,
                                 settings.ef, settings.threads, labels=reps)
    index, song_params = song_index
    index.save_index(str(staging / bundle_files.SONG_INDEX))
    bundle_files.save_codes(staging, unit)
    if tables is not None:
        bundle_files.save_neighbours(staging, table_arrays(reps, *tables))
    pl_codes = playlist_codes(codes, inputs.catalog)
    pl_index, pl_params = build_index(pl_codes, settings.m, settings.ef_construction,
                                      settings.ef, settings.threads)
    pl_index.save_index(str(staging / bundle_files.PLAYLIST_INDEX))
    arrays = inputs.catalog.to_arrays()
    arrays["rep_of"] = rep_of
    # The index stores unit vectors; the norms let evaluations compare dot product.
    arrays["code_norms"] = np.linalg.norm(codes, axis=1).astype(np.float32)
    arrays.update(song_metadata_arrays(inputs.songs))
    bundle_files.save_arrays(staging, arrays)
    bundle_files.save_columns(staging, inputs.columns.to_json())
    for name in ("train_log.jsonl", "training.png"):
        if (inputs.work_dir / name).exists():
            shutil.copy2(inputs.work_dir / name, staging / name)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fingerprint = data_fingerprint(inputs.data_dir)
    epochs = inputs.epochs_trained
    manifest = bundle_files.write_manifest(staging, {
        "model_version": f"{created[:10].replace('-', '')}-{fingerprint[:8]}-e{epochs}",
        "created": created,
        "code_dim": int(codes.shape[1]),
        "input_dim": inputs.columns.dim,
        "column_groups": inputs.columns.sizes(),
        "hyper_parameters": inputs.hyper_parameters,
        "data_fingerprint": fingerprint,
        "song_index": song_params,
        "playlist_index": pl_params,
        "files": {},
        "extra": {"epochs_trained": epochs, "best_val_score": inputs.best_val_score,
                  "n_songs": int(len(codes)), "n_distinct_songs": int(len(reps)),
                  "n_playlists": int(len(pl_codes)),
                  "n_tags": len(inputs.catalog.tags), **extra},
    })
    bundle_files.replace_bundle(staging, out)
    log.info("bundle %s written in %.1fs", out, time.perf_counter() - t0)
    return manifest
