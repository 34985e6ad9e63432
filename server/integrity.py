"""A loaded bundle's parts checked against each other and its manifest before it serves: every
stored index within the bounds of what it indexes, so that no bundle can send a compiled
kernel or a search out of bounds, and every count and width the manifest states."""

from __future__ import annotations

import numpy as np

from server.bundle import Manifest
from server.catalog import Catalog, NeighbourCF, RowLists


class IntegrityError(ValueError):
    """Two parts of a bundle disagree; the message names the arrays and the numbers."""


def check_catalog(catalog: Catalog, manifest: Manifest) -> None:
    """Check ``arrays.npz`` as loaded into ``catalog``: lengths agree, CSR lists are well
    formed and every index in them is below the size of what it indexes."""
    n_songs, n_tags = catalog.n_songs, len(catalog.tags)
    n_playlists, n_words = len(catalog.playlist_ids), len(catalog.words)
    if n_playlists != manifest.playlist_index.count:
        raise IntegrityError(f"{n_playlists} playlist_ids, manifest says "
                             f"playlist_index.count {manifest.playlist_index.count}")
    for name, values, length in (("popularity", catalog.popularity, n_songs),
                                 ("issue_dates", catalog.issue_dates, n_songs),
                                 ("tag_popularity", catalog.tag_popularity, n_tags)):
        if values.shape != (length,):
            raise IntegrityError(f"{name} has shape {values.shape}, expected ({length},)")
    for name, lists, rows, bound, of in (
            ("song_tags", catalog.song_tags, n_songs, n_tags, "tags"),
            ("tag_songs", catalog.tag_songs, n_tags, n_songs, "songs"),
            ("playlist_songs", catalog.playlist_songs, n_playlists, n_songs, "songs"),
            ("playlist_tags", catalog.playlist_tags, n_playlists, n_tags, "tags"),
            ("word_songs", catalog.word_songs, n_words, n_songs, "songs"),
            ("word_tags", catalog.word_tags, n_words, n_tags, "tags")):
        check_lists(name, lists, rows, bound, of)
    if catalog.cf is not None:
        check_cf(catalog.cf, n_songs, n_tags, n_playlists)


def check_lists(name: str, lists: RowLists, rows: int, bound: int, of: str) -> None:
    """A CSR list of ``rows`` rows whose indices lie in ``0..bound-1`` (``of``: what they
    index, for the message)."""
    indptr, indices = lists.indptr, lists.indices
    if indptr.ndim != 1 or len(indptr) != rows + 1:
        raise IntegrityError(f"{name}_indptr has shape {indptr.shape}, expected "
                             f"({rows + 1},) for {rows} rows")
    if indptr[0] != 0 or indptr[-1] != len(indices) or bool((np.diff(indptr) < 0).any()):
        raise IntegrityError(f"{name}_indptr is not a non-decreasing run from 0 to the "
                             f"{len(indices)} indices")
    if lists.weights.shape != indices.shape:
        raise IntegrityError(f"{name}_weights has shape {lists.weights.shape}, "
                             f"{name}_indices {indices.shape}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= bound):
        raise IntegrityError(f"{name}_indices holds {int(indices.min())}..."
                             f"{int(indices.max())}, outside the {bound} {of}")
    if not np.isfinite(lists.weights).all():
        raise IntegrityError(f"{name}_weights holds NaN or infinity")


def check_cf(cf: NeighbourCF, n_songs: int, n_tags: int, n_playlists: int) -> None:
    """Neighbour CF: its feature blocks (songs | tags | words | artists) hold every column
    a question can name, and its features point at the training playlists."""
    n_features = len(cf.feature_weights)
    if cf.n_playlists != n_playlists:
        raise IntegrityError(f"cf_params names {cf.n_playlists} playlists, the catalog has "
                             f"{n_playlists}")
    check_lists("cf_features", cf.features, n_features, n_playlists, "playlists")
    offsets = cf.offsets
    if offsets.shape != (4,) or offsets[0] != 0 or bool((np.diff(offsets) < 0).any()):
        raise IntegrityError(f"cf_offsets {offsets.tolist()}: expected 4 non-decreasing "
                             f"block starts from 0")
    blocks = np.diff(np.append(offsets, n_features))
    for block, need, what in ((blocks[0], cf.song_artists.n_rows, "songs"),
                              (blocks[1], n_tags, "tags"), (blocks[2], len(cf.words), "words")):
        if block < need:
            raise IntegrityError(f"cf_offsets leave {int(block)} feature columns for "
                                 f"{need} {what}")
    if cf.song_artists.n_rows > n_songs:
        raise IntegrityError(f"cf_song_artists has {cf.song_artists.n_rows} rows for "
                             f"{n_songs} songs")
    check_lists("cf_song_artists", cf.song_artists, cf.song_artists.n_rows, int(blocks[3]),
                "artist feature columns")
    if not np.isfinite(cf.feature_weights).all() or not np.isfinite(cf.alpha) or cf.k < 1:
        raise IntegrityError(f"cf_feature_weights or cf_params (k {cf.k}, alpha {cf.alpha}) "
                             f"out of range")


def check_rep_of(rep_of: np.ndarray, n_songs: int, count: int) -> np.ndarray:
    """``rep_of``: each song's representative (itself or an earlier song that is its own).
    Returns the representatives, ascending: the labels the song index must hold."""
    if rep_of.shape != (n_songs,) or rep_of.dtype.kind not in "iu":
        raise IntegrityError(f"rep_of has shape {rep_of.shape} ({rep_of.dtype}), expected "
                             f"({n_songs},) integers")
    rows = np.arange(n_songs)
    if len(rep_of) and (int(rep_of.min()) < 0 or bool((rep_of > rows).any())
                        or bool((rep_of[rep_of] != rep_of).any())):
        raise IntegrityError("rep_of names a representative that is not an earlier song "
                             "representing itself")
    reps = np.flatnonzero(rep_of == rows)
    if len(reps) != count:
        raise IntegrityError(f"{len(reps)} distinct songs in rep_of, manifest says "
                             f"song_index.count {count}")
    return reps


def check_table(table: dict[str, np.ndarray], reps: np.ndarray, n_songs: int) -> None:
    """``neighbours.npz``: each representative's list names representatives only."""
    rows, sims = table["rows"], table["sims"]
    if table["labels"].dtype.kind not in "iu" or not np.array_equal(table["labels"], reps):
        raise IntegrityError("labels are not the song index's songs")
    is_rep = np.zeros(n_songs, dtype=bool)
    is_rep[reps] = True
    if rows.dtype.kind not in "iu" or (rows.size and (
            int(rows.min()) < 0 or int(rows.max()) >= n_songs or not is_rep[rows].all())):
        raise IntegrityError("rows name songs that are not in the song index")
    if sims.dtype.kind != "f" or sims.size and not (
            np.isfinite(sims).all() and -1.001 <= sims.min() and sims.max() <= 1.001):
        raise IntegrityError("sims are not cosine similarities (floats in -1..1)")


def check_codes(codes: np.ndarray, chunk: int = 1 << 16) -> None:
    """``codes.npy``: unit vectors (zero stays zero), within float16's precision; checked
    in chunks, as it is memory-mapped."""
    if codes.dtype.kind != "f":
        raise IntegrityError(f"dtype {codes.dtype}, expected floats")
    for start in range(0, len(codes), chunk):
        part = np.asarray(codes[start : start + chunk], dtype=np.float64)
        norms = np.einsum("ij,ij->i", part, part)
        bad = np.flatnonzero(~np.isfinite(norms) | ((np.abs(norms - 1.0) > 1e-2)
                                                    & (norms != 0.0)))
        if len(bad):
            raise IntegrityError(f"row {start + bad[0]}: not a unit code (squared length "
                                 f"{norms[bad[0]]:.6g})")


def check_strings(name: str, blob: np.ndarray | None, offsets: np.ndarray | None,
                  n: int) -> None:
    """A packed string list (``pack_strings``) of ``n`` UTF-8 strings, or none at all."""
    if blob is None and offsets is None:
        return
    if blob is None or offsets is None or offsets.shape != (n + 1,) or blob.ndim != 1:
        raise IntegrityError(f"{name}: blob and offsets do not hold {n} strings")
    if offsets[0] != 0 or offsets[-1] != len(blob) or bool((np.diff(offsets) < 0).any()):
        raise IntegrityError(f"{name}_offsets do not run from 0 to the blob's "
                             f"{len(blob)} bytes")
    raw = blob.astype(np.uint8).tobytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{name}_blob is not UTF-8 ({exc.reason} at byte "
                             f"{exc.start})") from None
    # Each string must start on a character, not inside one (a UTF-8 continuation byte).
    starts = offsets[:-1][np.diff(offsets) > 0]
    if bool(((blob[starts].astype(np.uint8) & 0xC0) == 0x80).any()):
        raise IntegrityError(f"{name}_offsets cut a character in two")
