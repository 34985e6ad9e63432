"""A loaded bundle ready to answer: catalog, indexes, ONNX encoder. Torch-free.

The server holds one :class:`Engine` at a time (and swaps it on reload); the offline
evaluation uses the same class through ``trainer.recommenders.ae``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server import bundle as bundle_files
from server import integrity, voting
from server.artists import ArtistIndex
from server.bundle import RANKER_ARRAYS, RANKER_ONNX, BundleError, Manifest
from server.catalog import Catalog
from server.columns import ColumnSpace, SongMeta, pad_batch
from server.ranking import Ranker, load_ranker
from server.runtime import cpu_session
from server.search import HnswSearch, VectorSearch
from server.strategies import (
    DEFAULT_STRATEGY,
    RANKED,
    STRATEGIES,
    Answer,
    Query,
    run_strategy,
)

log = logging.getLogger(__name__)

# Padded (song x column) cells per encoder run: 16,384 x hidden 2,048 x 4 bytes, held twice,
# is 268 MB at Melon scale.
ENCODE_CELLS = 16_384


class Encoder:
    """ONNX Runtime session of the bundle's encoder, with deliberate thread counts."""

    def __init__(self, path: Path, columns: ColumnSpace, threads: int = 1) -> None:
        self.session = cpu_session(path, threads)
        self.columns = columns

    def check(self, input_dim: int, code_dim: int, where: Path) -> None:
        """A canary: the session takes ``columns`` (int64) and ``weights`` (float) and
        answers ``code``, ``code_dim`` wide, for a batch naming the first and last of
        ``input_dim`` columns and the padding column, and refuses the column after that (so
        its vocabulary is the bundle's width). Raises :class:`BundleError`."""

        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if (inputs != {"columns": "tensor(int64)", "weights": "tensor(float)"}
                or "code" not in outputs):
            raise BundleError(f"{where}: inputs {inputs}, outputs {outputs}; expected "
                              f"columns (int64) and weights (float) in, code out")
        columns = np.asarray([[0, input_dim - 1, input_dim], [input_dim] * 3], dtype=np.int64)
        weights = np.asarray([[1.0, 1.0, 0.0], [0.0] * 3], dtype=np.float32)
        try:
            (codes,) = self.session.run(["code"], {"columns": columns, "weights": weights})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{where}: fails on columns 0..{input_dim} (manifest "
                              f"input_dim {input_dim}, plus padding): {exc}") from None
        shape = getattr(codes, "shape", None)
        if shape != (2, code_dim) or not np.isfinite(codes).all():
            raise BundleError(f"{where}: answers codes of shape {shape} for 2 songs, "
                              f"manifest code_dim is {code_dim} (or they are not finite)")
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the refusal below is expected: do not log it
        try:
            self.session.run(["code"], {"columns": np.asarray([[input_dim + 1]]),
                                        "weights": np.zeros((1, 1), dtype=np.float32)}, quiet)
        except Exception:
            return
        raise BundleError(f"{where}: takes column {input_dim + 1}, past manifest input_dim "
                          f"{input_dim} and the padding column: its vocabulary is wider")

    def encode_columns(self, rows: list[np.ndarray]) -> np.ndarray:
        """Codes of songs given as column lists, in runs of at most ENCODE_CELLS padded
        cells (one run for a longer row): the encoder's first layer holds a (batch x width
        x hidden) float32 tensor twice, so a batch of popular songs (thousands of playlist
        columns each) needed tens of GB in one run. Rows go in order of length, so that
        short rows are not padded to a long one's width."""
        order = np.argsort([len(r) for r in rows], kind="stable")
        runs = []
        start = 0
        while start < len(order):
            stop = start + 1
            while (stop < len(order)
                   and (stop + 1 - start) * max(1, len(rows[order[stop]])) <= ENCODE_CELLS):
                stop += 1
            runs.append(order[start:stop])
            start = stop
        out = np.empty((len(rows), 0), dtype=np.float32)
        for run in runs or [order]:  # no rows: one empty run tells the code width
            cols, weights = pad_batch([rows[i] for i in run], self.columns.dim)
            (codes,) = self.session.run(["code"], {"columns": cols, "weights": weights})
            if out.shape[1] != np.shape(codes)[1]:
                out = np.empty((len(rows), np.shape(codes)[1]), dtype=np.float32)
            out[run] = codes
        return out

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
        # The new songs of each artist (server.artists): the bundle's songs' artists come
        # from the ranker's data; songs added at run time are added by the LiveModel.
        data = ranker.data if ranker is not None else None
        self.artists = ArtistIndex(catalog.n_songs,
                                   data.song_artists if data is not None else None,
                                   data.artist_ids if data is not None else None,
                                   catalog.popularity)
        self._names = (arrays.get("song_name_blob"), arrays.get("song_name_offsets"))
        self._artists = (arrays.get("song_artist_blob"), arrays.get("song_artist_offsets"))

    @staticmethod
    def load(root: str | Path, *, verify: bool = True, capacity: int = 100_000,
             threads: int | None = None, song_ef: int | None = None,
             playlist_ef: int | None = None) -> Engine:
        """Load a bundle, checked whole before anything of it serves: the manifest
        (digest, numbers, sizes; with ``verify`` every sha256), the arrays against each
        other and the manifest (:mod:`server.integrity`), the index files before hnswlib
        reads them (:mod:`server.hnswfile`), and canary calls of the indexes and the
        encoder. ``capacity`` is room for songs added at run time. Raises
        :class:`~server.bundle.BundleError` naming the file and the mismatch."""
        root = Path(root)
        manifest = bundle_files.read_manifest(root, verify=verify)
        arrays = bundle_files.load_arrays(root)
        try:
            catalog = Catalog.from_arrays(arrays)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise BundleError(f"{root / bundle_files.ARRAYS}: inconsistent arrays "
                              f"({exc!r})") from None
        try:
            columns = ColumnSpace.from_json(bundle_files.load_columns(root))
        except ValueError as exc:
            raise BundleError(f"{root / bundle_files.COLUMNS}: {exc}") from None
        if columns.dim != manifest.input_dim or columns.sizes() != manifest.column_groups:
            raise BundleError(f"{root / bundle_files.COLUMNS}: groups {columns.sizes()} "
                              f"({columns.dim} columns), manifest says column_groups "
                              f"{manifest.column_groups} (input_dim {manifest.input_dim})")
        try:
            integrity.check_catalog(catalog, manifest)
            reps = integrity.check_rep_of(np.asarray(arrays.get("rep_of", np.zeros(0))),
                                          catalog.n_songs, manifest.song_index.count)
            for name in ("song_name", "song_artist"):
                integrity.check_strings(name, arrays.get(f"{name}_blob"),
                                        arrays.get(f"{name}_offsets"), catalog.n_songs)
        except integrity.IntegrityError as exc:
            raise BundleError(f"{root / bundle_files.ARRAYS}: {exc}") from None
        for name, params in (("song_index", manifest.song_index),
                             ("playlist_index", manifest.playlist_index)):
            if params.dim != manifest.code_dim:
                raise BundleError(f"{root / bundle_files.MANIFEST}: {name}.dim {params.dim} "
                                  f"!= code_dim {manifest.code_dim}")
        threads = threads or int(os.environ.get("SONGREC_THREADS", "1"))
        # Added songs go into a graph of their own (server.added.AddedSongs) with room
        # for ``capacity``: the bundle's graph is loaded full-size and never grows.
        songs = bundle_files.load_hnsw(root, manifest.song_index, bundle_files.SONG_INDEX,
                                       labels=reps)
        songs.set_num_threads(threads)
        if song_ef:
            songs.set_ef(song_ef)
            log.info("song index ef %d (bundle: %d)", song_ef, manifest.song_index.ef)
        table = bundle_files.load_neighbours(root, manifest)
        codes = bundle_files.load_codes(root, manifest)
        try:
            if table is not None:
                integrity.check_table(table, reps, catalog.n_songs)
        except integrity.IntegrityError as exc:
            raise BundleError(f"{root / bundle_files.NEIGHBOURS}: {exc}") from None
        try:
            if codes is not None:
                integrity.check_codes(codes)
        except integrity.IntegrityError as exc:
            raise BundleError(f"{root / bundle_files.CODES}: {exc}") from None
        playlists = bundle_files.load_hnsw(root, manifest.playlist_index,
                                           bundle_files.PLAYLIST_INDEX,
                                           labels=np.arange(manifest.playlist_index.count))
        playlists.set_num_threads(threads)
        if playlist_ef:
            playlists.set_ef(playlist_ef)
            log.info("playlist index ef %d (bundle: %d)", playlist_ef,
                     manifest.playlist_index.ef)
        try:
            encoder = Encoder(root / bundle_files.ENCODER, columns, threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{root / bundle_files.ENCODER}: cannot load ({exc})") from None
        encoder.check(manifest.input_dim, manifest.code_dim, root / bundle_files.ENCODER)
        ranker = _ranker(root, manifest, catalog, threads)
        # Kernels compiled (or loaded from numba's cache) before the first call.
        voting.warm_up(catalog.playlist_songs.indices.dtype)
        log.info("loaded bundle %s (model %s, %d songs, %d playlists)", root,
                 manifest.model_version, catalog.n_songs, len(catalog.playlist_ids))
        return Engine(root, manifest, catalog,
                      song_search(root, songs, np.asarray(arrays["rep_of"]), table, codes,
                                  capacity),
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

    def continue_playlist(self, strategy: str, query: Query,
                          songs: VectorSearch | None = None) -> Answer:
        """``strategy`` (as :meth:`resolve_strategy` resolves it) on ``query``; the answer
        names the strategy that ran. ``songs``: the song search to use (default: the
        index), e.g. one holding neighbour lists computed beforehand (``PrefetchedLists``).
        The seeds' artists' new songs come from :attr:`artists`."""
        return run_strategy(self.resolve_strategy(strategy), self.catalog,
                            self.songs if songs is None else songs, self.playlists, query,
                            self.ranker, self.artists)

    def nearest_to(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.songs.search(codes, k)

    def song_name(self, row: int) -> tuple[str, str]:
        """(song name, artists) of a bundle song; empty strings when unknown."""
        if 0 <= row < self.catalog.n_songs and self._names[0] is not None:
            return (_one_string(*self._names, row), _one_string(*self._artists, row))
        return "", ""


def _ranker(root: Path, manifest: Manifest, catalog: Catalog, threads: int) -> Ranker | None:
    """The bundle's ranker when its manifest lists both ranker files; both or neither."""
    listed = [name for name in (RANKER_ONNX, RANKER_ARRAYS) if name in manifest.files]
    if not listed:
        if manifest.als_index is not None:
            raise bundle_files.BundleError(f"{root}: the manifest lists "
                                           f"{bundle_files.ALS_INDEX} but no ranker")
        return None
    if len(listed) == 1:
        missing = RANKER_ARRAYS if listed[0] == RANKER_ONNX else RANKER_ONNX
        raise bundle_files.BundleError(f"{root}: the manifest lists {listed[0]} but not "
                                       f"{missing} (the ranker needs both)")
    try:
        return load_ranker(root, manifest, catalog, threads)
    except BundleError:
        raise  # names its file already (als.hnsw)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise bundle_files.BundleError(f"{root}: ranker does not fit the bundle ({exc})"
                                       ) from None
    except Exception as exc:  # onnxruntime raises its own exception types
        raise bundle_files.BundleError(f"{root / RANKER_ONNX}: cannot load ({exc})") from None


def song_search(root: Path, index: Any, rep_of: np.ndarray, table: dict[str, np.ndarray] | None,
                codes: np.ndarray | None, capacity: int = 0) -> HnswSearch:
    try:
        return HnswSearch(index, rep_of, table, codes, capacity=capacity)
    except ValueError as exc:
        raise BundleError(f"{root}: {exc}") from None


def _one_string(blob: Any, offsets: Any, i: int) -> str:
    if blob is None or offsets is None or i + 1 >= len(offsets):
        return ""
    return bytes(blob[offsets[i] : offsets[i + 1]]).decode("utf-8")


__all__ = ["Engine", "Encoder", "VectorSearch"]
