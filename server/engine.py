"""A loaded bundle ready to answer: catalog, indexes, ONNX encoder. Torch-free.

The server holds one :class:`Engine` at a time (and swaps it on reload); the offline
evaluation uses the same class through ``trainer.recommenders.ae``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server import bundle as bundle_files
from server import voting
from server.bundle import Manifest
from server.columns import ColumnSpace, pad_batch
from server.ranking import RANKER_ARRAYS, RANKER_ONNX, Ranker, load_ranker
from server.strategies import (
    DEFAULT_STRATEGY,
    RANKED,
    STRATEGIES,
    Answer,
    Catalog,
    HnswSearch,
    Query,
    VectorSearch,
    run_strategy,
    unpack_strings,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SongMeta:
    """A song not in the bundle, described by its metadata (``song_meta.json`` fields)."""

    genres: tuple[str, ...] = ()
    detail_genres: tuple[str, ...] = ()
    artists: tuple[int, ...] = ()
    issue_date: int = 0
    playlists: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()


class Encoder:
    """ONNX Runtime session of the bundle's encoder, with deliberate thread counts."""

    def __init__(self, path: Path, columns: ColumnSpace, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No memory arena: an arena keeps its peak for the session's life, so one big batch
        # (replaying the log after a reload) pinned ~10 MB more RSS for good; freeing each
        # call's buffers costs nothing measurable at the server's batch sizes.
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.columns = columns

    def encode_columns(self, rows: list[np.ndarray]) -> np.ndarray:
        cols, weights = pad_batch(rows, self.columns.dim)
        (codes,) = self.session.run(["code"], {"columns": cols, "weights": weights})
        return np.asarray(codes, dtype=np.float32)

    def encode(self, songs: list[SongMeta]) -> tuple[np.ndarray, list[int]]:
        """Codes of songs described by metadata, and how many known columns each had."""
        rows = [self.columns.song_columns(genres=s.genres, detail_genres=s.detail_genres,
                                          artists=s.artists, issue_date=s.issue_date,
                                          playlists=s.playlists, tags=s.tags) for s in songs]
        return self.encode_columns(rows), [len(r) for r in rows]


class Engine:
    """Everything one bundle serves. Song rows are index labels; rows at or past
    ``catalog.n_songs`` are songs added at run time."""

    def __init__(self, root: Path, manifest: Manifest, catalog: Catalog, songs: HnswSearch,
                 playlists: HnswSearch, encoder: Encoder, arrays: dict[str, np.ndarray],
                 ranker: Ranker | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.catalog = catalog
        self.songs = songs
        self.playlists = playlists
        self.encoder = encoder
        self.ranker = ranker
        self._names = (arrays.get("song_name_blob"), arrays.get("song_name_offsets"))
        self._artists = (arrays.get("song_artist_blob"), arrays.get("song_artist_offsets"))

    @staticmethod
    def load(root: str | Path, *, verify: bool = True, capacity: int = 100_000,
             threads: int | None = None, song_ef: int | None = None,
             playlist_ef: int | None = None) -> Engine:
        """Load and verify a bundle; ``capacity`` is room for songs added at run time."""
        root = Path(root)
        manifest = bundle_files.read_manifest(root, verify=verify)
        arrays = bundle_files.load_arrays(root)
        try:
            catalog = Catalog.from_arrays(arrays)
            columns = ColumnSpace.from_json(bundle_files.load_columns(root))
        except (KeyError, ValueError) as exc:
            raise bundle_files.BundleError(f"{root}: inconsistent arrays ({exc!r})") from None
        if columns.dim != manifest.input_dim:
            raise bundle_files.BundleError(f"{root}: columns.json has {columns.dim} columns, "
                                           f"manifest input_dim is {manifest.input_dim}")
        rep_of = arrays.get("rep_of")
        if rep_of is None or len(rep_of) != catalog.n_songs:
            raise bundle_files.BundleError(f"{root}: arrays.npz lacks rep_of for its "
                                           f"{catalog.n_songs} songs")
        n_reps = int((rep_of == np.arange(len(rep_of))).sum())
        if n_reps != manifest.song_index.count:
            raise bundle_files.BundleError(f"{root}: {n_reps} distinct songs in arrays, "
                                           f"{manifest.song_index.count} in the index")
        if manifest.song_index.dim != manifest.code_dim:
            raise bundle_files.BundleError(f"{root}: index dim {manifest.song_index.dim} "
                                           f"!= code dim {manifest.code_dim}")
        threads = threads or int(os.environ.get("SONGREC_THREADS", "1"))
        songs = bundle_files.load_hnsw(root, manifest.song_index, bundle_files.SONG_INDEX,
                                       max_elements=manifest.song_index.count + capacity)
        songs.set_num_threads(threads)
        if song_ef:
            songs.set_ef(song_ef)
            log.info("song index ef %d (bundle: %d)", song_ef, manifest.song_index.ef)
        table = bundle_files.load_neighbours(root, manifest)
        codes = bundle_files.load_codes(root, manifest)
        playlists = bundle_files.load_hnsw(root, manifest.playlist_index,
                                           bundle_files.PLAYLIST_INDEX)
        playlists.set_num_threads(threads)
        if playlist_ef:
            playlists.set_ef(playlist_ef)
            log.info("playlist index ef %d (bundle: %d)", playlist_ef,
                     manifest.playlist_index.ef)
        try:
            encoder = Encoder(root / bundle_files.ENCODER, columns, threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise bundle_files.BundleError(f"{root / bundle_files.ENCODER}: cannot load "
                                           f"({exc})") from None
        ranker = _ranker(root, manifest, catalog, threads)
        # Kernels compiled (or loaded from numba's cache) before the first call.
        voting.warm_up(catalog.playlist_songs.indices.dtype)
        log.info("loaded bundle %s (model %s, %d songs, %d playlists)", root,
                 manifest.model_version, catalog.n_songs, len(catalog.playlist_ids))
        return Engine(root, manifest, catalog, song_search(root, songs, rep_of, table, codes),
                      HnswSearch(playlists), encoder, arrays, ranker)

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def strategies(self) -> tuple[str, ...]:
        """Strategies this bundle can run (ae-hybrid needs the neighbour-CF arrays, ranked
        a ranker)."""
        return tuple(s for s in STRATEGIES if (s != "ae-hybrid" or self.catalog.cf is not None)
                     and (s != RANKED or self.ranker is not None))

    @property
    def default_strategy(self) -> str:
        """``ranked`` when the bundle has a ranker, else :data:`DEFAULT_STRATEGY`."""
        return RANKED if self.ranker is not None else self.resolve_strategy(DEFAULT_STRATEGY)

    def resolve_strategy(self, name: str) -> str:
        """The strategy that will answer ``name`` (empty: the bundle's default): bundles
        without a ranker answer ranked with ae-hybrid, and those written before the
        neighbour-CF arrays existed answer ae-hybrid with ae-neighbours (the response says
        which)."""
        if not name:
            return self.default_strategy
        if name == RANKED and self.ranker is None:
            name = DEFAULT_STRATEGY
        if name == "ae-hybrid" and self.catalog.cf is None:
            return "ae-neighbours"
        return name

    def continue_playlist(self, strategy: str, query: Query) -> Answer:
        return run_strategy(self.resolve_strategy(strategy), self.catalog, self.songs,
                            self.playlists, query, self.ranker)

    def similar(self, rows: np.ndarray, k: int, exclude: set[int] | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each song row, its k nearest other songs (rows, cosine similarities)."""
        exclude = exclude or set()
        found = self.songs.neighbours(rows, k + 1 + len(exclude))
        out = []
        for row, (labels, sims) in zip(rows.tolist(), found, strict=True):
            keep = (labels != row) & ~np.isin(labels, list(exclude))
            out.append((labels[keep][:k], sims[keep][:k]))
        return out

    def nearest_to(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.songs.search(codes, k)

    def song_name(self, row: int) -> tuple[str, str]:
        """(song name, artists) of a bundle song; empty strings when unknown."""
        if 0 <= row < self.catalog.n_songs and self._names[0] is not None:
            return (_one_string(*self._names, row), _one_string(*self._artists, row))
        return "", ""

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"model_version": m.model_version, "songs": self.songs.count(),
                "bundle_songs": self.catalog.n_songs,
                "playlists": len(self.catalog.playlist_ids), "tags": len(self.catalog.tags),
                "code_dim": m.code_dim, "input_dim": m.input_dim,
                "column_groups": m.column_groups, "song_index": m.song_index.__dict__}


def _ranker(root: Path, manifest: Manifest, catalog: Catalog, threads: int) -> Ranker | None:
    """The bundle's ranker when its manifest lists both ranker files; both or neither."""
    listed = [name for name in (RANKER_ONNX, RANKER_ARRAYS) if name in manifest.files]
    if not listed:
        return None
    if len(listed) == 1:
        missing = RANKER_ARRAYS if listed[0] == RANKER_ONNX else RANKER_ONNX
        raise bundle_files.BundleError(f"{root}: the manifest lists {listed[0]} but not "
                                       f"{missing} (the ranker needs both)")
    try:
        return load_ranker(root, catalog, threads)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise bundle_files.BundleError(f"{root}: ranker does not fit the bundle ({exc})"
                                       ) from None
    except Exception as exc:  # onnxruntime raises its own exception types
        raise bundle_files.BundleError(f"{root / RANKER_ONNX}: cannot load ({exc})") from None


def song_search(root: Path, index: Any, rep_of: np.ndarray, table: dict[str, np.ndarray] | None,
                codes: np.ndarray | None) -> HnswSearch:
    try:
        return HnswSearch(index, rep_of, table, codes)
    except ValueError as exc:
        raise bundle_files.BundleError(f"{root}: {exc}") from None


def _one_string(blob: Any, offsets: Any, i: int) -> str:
    if blob is None or offsets is None or i + 1 >= len(offsets):
        return ""
    return bytes(blob[offsets[i] : offsets[i + 1]]).decode("utf-8")


__all__ = ["Engine", "Encoder", "SongMeta", "VectorSearch", "unpack_strings"]
