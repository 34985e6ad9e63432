"""Compaction: a bundle that holds the songs added at run time, without retraining.

    python -m trainer.compact --bundle bundles/demo --data-dir DATA_DIR --out bundles/demo-c1
    python -m trainer.compact --bundle B --store postgresql://... --out B2

Reads the songs added at run time from the server's song store (``--store URL``, default the
SQLite file in ``--data-dir``; a ``songs.wal`` there not yet imported is read too, without
touching it), while servers may keep adding; encodes them with the bundle's own encoder
exactly as AddSongs does (:meth:`server.live.LiveModel.replay`), then writes a new bundle in
which they are ordinary bundle songs (rows after the old ones): in the song graph, in
``codes.npy``, in the exact neighbour table (recomputed over every song, so old songs' lists
include the new ones) and in the song arrays (ids, names, issue dates; no playlists,
popularity 0, so the strategies treat them as bundle songs no training playlist holds:
placed by value, no longer confined to an answer's last places as added songs are; see
``server.strategies.with_new_songs``); the ranker's per-song arrays keep their artists, so
the artist new-song source (``server.artists``) still finds them.
Encoder, playlists and neighbour CF are unchanged.

``Admin.ReloadModel`` to the new bundle serves the same songs, SimilarSongs of the compacted
ones now being table lookups. The store is not touched: songs added after the compaction
stay in it and are added on reload, and songs the bundle now holds are skipped (never
duplicated). The neighbour table is the slow part (see ``trainer.neighbours``; resumable
through ``OUT.work``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server import bundle as bundle_files
from server.bundle import BundleError
from server.live import LiveModel
from server.rankdata import RankData
from server.store import SQLITE_FILE, StoreConfigError, StoreError, default_url, open_store
from server.validation import NewSong
from server.wal import WalError, read_songs
from trainer.neighbours import exact_neighbours, table_arrays

log = logging.getLogger(__name__)


def _append_strings(blob: np.ndarray, offsets: np.ndarray, items: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    extra_blob, extra_off = bundle_files.pack_strings(items)
    return (np.concatenate([blob, extra_blob]),
            np.concatenate([offsets, offsets[-1] + extra_off[1:]]))


def stored_songs(data_dir: Path | None, url: str | None) -> list[NewSong]:
    """Every song added at run time: the store's (in commit order), then those of a log in
    ``data_dir`` the store lacks. A data directory without a store file has none."""
    songs: list[NewSong] = []
    if url is None and data_dir is not None and (data_dir / SQLITE_FILE).exists():
        url = default_url(data_dir)
    if url is not None:
        store = open_store(url)
        try:
            songs = [s.song for s in store.all()]
        finally:
            store.close()
    if data_dir is not None:
        known = {s.song_id for s in songs}
        songs += [s for s in read_songs(data_dir) if s.song_id not in known]
    return songs


def compact(bundle: Path, data_dir: Path | None, out: Path, *, store: str | None = None,
            threads: int = 2, progress: bool = True) -> dict[str, int]:
    """Write ``out``: ``bundle`` plus the songs added at run time (see
    :func:`stored_songs`). Returns counts."""
    return compact_songs(bundle, stored_songs(data_dir, store), out, threads=threads,
                         progress=progress)


def compact_songs(bundle: Path, songs: Sequence[NewSong], out: Path, *, threads: int = 2,
                  progress: bool = True) -> dict[str, int]:
    """Write ``out``: ``bundle`` plus ``songs``, added as AddSongs adds them (those the
    bundle holds already are skipped). Returns counts."""
    model = LiveModel.load(bundle, verify=True, capacity=max(len(songs), 1), threads=threads)
    added, unplaceable = model.replay(songs)
    engine = model.engine
    manifest = engine.manifest
    n_old = model.n_bundle
    n_new = model.n_added
    rows = np.arange(n_old, n_old + n_new, dtype=np.int64)
    unit_new: np.ndarray = engine.songs.vectors(rows) if n_new else np.zeros((0, manifest.code_dim),
                                                                 dtype=np.float32)
    arrays = bundle_files.load_arrays(bundle)
    served = [s for s in songs if model.row_of(s.song_id) >= n_old]
    served.sort(key=lambda s: model.row_of(s.song_id))
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(bundle, staging, ignore=shutil.ignore_patterns(
        bundle_files.MANIFEST, "*.tmp*"))
    # Songs: ids, popularity 0 (no playlist holds them), issue dates, no tags, names.
    arrays["song_ids"] = np.concatenate([arrays["song_ids"],
                                         [s.song_id for s in served]]).astype(np.int64)
    arrays["popularity"] = np.concatenate([arrays["popularity"],
                                           np.zeros(n_new, arrays["popularity"].dtype)])
    arrays["issue_dates"] = np.concatenate([arrays["issue_dates"], [
        s.meta.issue_date for s in served]]).astype(arrays["issue_dates"].dtype)
    indptr = arrays["song_tags_indptr"]
    arrays["song_tags_indptr"] = np.concatenate([indptr, np.full(n_new, indptr[-1],
                                                                 dtype=indptr.dtype)])
    # Songs with identical metadata have identical codes, and exact duplicates break the
    # graph (see server.search.HnswSearch): one representative each, as the export does.
    first: dict[bytes, int] = {}
    rep_new = np.asarray([first.setdefault(unit_new[i].tobytes(), i) for i in range(n_new)],
                         dtype=np.int64)
    is_rep = rep_new == np.arange(n_new)
    arrays["rep_of"] = np.concatenate([arrays["rep_of"], rows[rep_new]]).astype(np.int64)
    # Norms are only read by the dot-product ablation; the server keeps unit codes.
    arrays["code_norms"] = np.concatenate([arrays["code_norms"],
                                           np.ones(n_new, dtype=np.float32)])
    if "song_name_blob" in arrays:
        arrays["song_name_blob"], arrays["song_name_offsets"] = _append_strings(
            arrays["song_name_blob"], arrays["song_name_offsets"], [s.name for s in served])
        arrays["song_artist_blob"], arrays["song_artist_offsets"] = _append_strings(
            arrays["song_artist_blob"], arrays["song_artist_offsets"],
            [s.artists for s in served])
    bundle_files.save_arrays(staging, arrays)
    if bundle_files.RANKER_ARRAYS in manifest.files:  # the ranker's per-song arrays grow too
        rank_data = RankData.from_arrays(bundle_files.load_ranker_arrays(bundle))
        # The ALS index stays as it is: the added songs are in no training playlist, so
        # the ALS source never proposes them (their factors are zero).
        bundle_files.save_ranker(staging, (bundle / bundle_files.RANKER_ONNX).read_bytes(),
                                 rank_data.with_added_songs(
                                     n_new, [s.meta.artists for s in served]).to_arrays(),
                                 bundle / bundle_files.ALS_INDEX
                                 if manifest.als_index is not None else None)
    # The song graph: the bundle's, plus the new songs.
    index = bundle_files.load_hnsw(bundle, manifest.song_index, bundle_files.SONG_INDEX,
                                   max_elements=manifest.song_index.count + max(n_new, 1))
    index.set_num_threads(threads)
    if n_new:
        index.add_items(unit_new[is_rep], rows[is_rep])
    index.save_index(str(staging / bundle_files.SONG_INDEX))
    labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
    old_codes = bundle_files.load_codes(bundle, manifest)
    if old_codes is None:
        old_codes = bundle_files.read_codes(index, labels[labels < n_old])
    unit = np.concatenate([np.asarray(old_codes, dtype=np.float32), unit_new[is_rep]])
    bundle_files.save_codes(staging, unit)
    extra = dict(manifest.extra)
    k = int(extra.get("song_neighbours", {}).get("k", 100))
    started = time.perf_counter()
    if bundle_files.NEIGHBOURS in manifest.files:
        pos, sim = exact_neighbours(unit, k, threads=threads, progress=progress,
                                    work_dir=out.with_name(out.name + ".work"))
        bundle_files.save_neighbours(staging, table_arrays(labels, pos, sim))
        extra["song_neighbours"] = {**extra.get("song_neighbours", {}), "k": int(pos.shape[1]),
                                    "seconds": round(time.perf_counter() - started, 1)}
    song_index = dict(manifest.song_index.__dict__, count=len(labels))
    extra.update(n_songs=n_old + n_new, n_distinct_songs=len(labels),
                 compacted={"from": manifest.model_version, "songs": n_new,
                            "unplaceable": unplaceable})
    fields = manifest.to_json()
    fields.update(model_version=f"{manifest.model_version}-c{n_old + n_new}",
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  song_index=song_index, extra=extra, files={})
    bundle_files.write_manifest(staging, fields)
    bundle_files.replace_bundle(staging, out)
    return {"logged": len(songs), "compacted": n_new, "added": added,
            "unplaceable": unplaceable, "songs": n_old + n_new}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.compact",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="the bundle served now")
    p.add_argument("--data-dir", type=Path,
                   help="the server's --data-dir (its SQLite song store, or old log)")
    p.add_argument("--store", help="the servers' --store URL (default: sqlite in --data-dir)")
    p.add_argument("--out", type=Path, required=True, help="the new bundle to write")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.resolve() == args.bundle.resolve():
        print("error: --out must differ from --bundle (the server may be reading it)",
              file=sys.stderr)
        return 2
    if args.data_dir is None and args.store is None:
        print("error: name the added songs: --data-dir DIR or --store URL", file=sys.stderr)
        return 2
    try:
        counts = compact(args.bundle, args.data_dir, args.out, store=args.store,
                         threads=args.threads)
    except (BundleError, WalError, StoreError, StoreConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['songs']} songs, {counts['compacted']} of "
          f"{counts['logged']} added songs compacted ({counts['unplaceable']} unplaceable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
