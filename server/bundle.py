"""The artifact bundle shared by trainer and server: the only code that touches bundle files.

A bundle is one directory::

    manifest.json      schema version, dims, column groups, hyper-parameters, data
                       fingerprint, creation time, sha256 and size of every other file
    encoder.onnx       sparse song input -> code (dynamic batch axis)
    songs.hnsw         hnswlib cosine index over every song's code (label = song row)
    playlists.hnsw     hnswlib cosine index over training playlists' mean codes
    arrays.npz         id maps and the arrays the strategies need (no pickles)
    columns.json       the input column vocabulary, so unseen songs can be encoded
    neighbours.npz     optional: each indexed song's exact top-k songs (see
                       trainer.neighbours); the server answers bundle songs from it
    codes.npy          optional: the indexed songs' unit codes, float16, in label order
                       (memory-mapped by the server: hnswlib's get_items is slow)
    ranker.onnx        optional, with ranker.npz: the learned second stage
    ranker.npz         (server.ranking, server.rankdata)
    als.hnsw           optional, with the ranker: hnswlib inner-product index over the ALS
                       factors of the songs some training playlist holds (label = song
                       row; manifest ``als_index``): the ALS source's top-n without a scan

This module is torch-free: the server imports it, and so does the trainer when it writes.
Reading checks the manifest's own digest, its schema version and the type and range of
every number it states, then the size (and, verifying, the sha256) of every file; index
files are checked completely (:mod:`server.hnswfile`) before hnswlib reads them. Every
failure is a :class:`BundleError` that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server import hnswfile

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
SONG_INDEX = "songs.hnsw"
PLAYLIST_INDEX = "playlists.hnsw"
ARRAYS = "arrays.npz"
COLUMNS = "columns.json"
NEIGHBOURS = "neighbours.npz"
CODES = "codes.npy"
# The learned second stage (optional, both or neither): the ONNX ranker and its arrays
# (server.rankdata.RankData).
RANKER_ONNX = "ranker.onnx"
RANKER_ARRAYS = "ranker.npz"
# Optional beside the ranker: the inner-product index over its ALS song factors
# (server.alsindex); without it the ALS source scans every song's factors.
ALS_INDEX = "als.hnsw"
REQUIRED_FILES = (ENCODER, SONG_INDEX, PLAYLIST_INDEX, ARRAYS, COLUMNS)
# The manifest's digest of its own content (every other key, canonical JSON): an edit made
# after the trainer wrote it is refused even when the files' checksums are not verified.
DIGEST = "manifest_sha256"

# Ranges of the numbers a manifest states. Each is also checked against the files; the
# ranges keep a number from reaching an allocation or a loop before that.
MAX_DIM = 1 << 16  # code dimension
MAX_INPUT_DIM = 1 << 30  # encoder input columns
MAX_COUNT = (1 << 32) - 2  # hnswlib's element ids are 32-bit
MAX_M = 1 << 14  # hnswlib keeps 2M links in 16 bits
MAX_EF_CONSTRUCTION = 1 << 20
MAX_EF = 100_000  # also the ceiling of --song-ef and --playlist-ef
SPACES = ("cosine",)  # the strategies read similarity as 1 - cosine distance
ALS_SPACES = ("ip",)  # the ALS source ranks by dot product (server.alsindex)


class BundleError(RuntimeError):
    """A bundle is missing, damaged, or of another schema version."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters; ``ef`` is not persisted by hnswlib, so the manifest keeps it."""

    space: str
    dim: int
    m: int
    ef_construction: int
    ef: int
    count: int


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    model_version: str
    created: str
    code_dim: int
    input_dim: int
    column_groups: dict[str, int]  # group name -> number of columns, in column order
    hyper_parameters: dict[str, Any]
    data_fingerprint: str
    song_index: IndexParams
    playlist_index: IndexParams
    files: dict[str, dict[str, Any]]  # name -> {"sha256", "bytes"}
    extra: dict[str, Any]
    als_index: IndexParams | None = None  # als.hnsw's parameters (None: no such file)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["song_index"] = dict(self.song_index.__dict__)
        out["playlist_index"] = dict(self.playlist_index.__dict__)
        if self.als_index is None:
            del out["als_index"]  # the manifests of bundles without one stay as they were
        else:
            out["als_index"] = dict(self.als_index.__dict__)
        return out

    @staticmethod
    def from_json(raw: Mapping[str, Any], where: Path) -> Manifest:
        """Parse and range-check a manifest (every number must be a JSON integer in its
        range); :class:`BundleError` naming the field otherwise."""
        check_schema(raw, where)
        try:
            manifest = Manifest(
                schema_version=SCHEMA_VERSION,
                model_version=str(raw["model_version"]),
                created=str(raw["created"]),
                code_dim=_integer(raw, "code_dim", 1, MAX_DIM),
                input_dim=_integer(raw, "input_dim", 1, MAX_INPUT_DIM),
                column_groups={str(k): _integer(raw["column_groups"], k, 0, MAX_INPUT_DIM,
                                                "column_groups.")
                               for k in _mapping(raw, "column_groups")},
                hyper_parameters=dict(_mapping(raw, "hyper_parameters")),
                data_fingerprint=str(raw["data_fingerprint"]),
                song_index=_index_params(raw, "song_index"),
                playlist_index=_index_params(raw, "playlist_index"),
                files={str(k): _file_entry(raw["files"], k) for k in _mapping(raw, "files")},
                extra=dict(_mapping(raw, "extra", optional=True)),
                als_index=(_index_params(raw, "als_index", ALS_SPACES)
                           if "als_index" in raw else None),
            )
        except KeyError as exc:
            raise BundleError(f"{where}: malformed manifest (no {exc})") from None
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
        groups = sum(manifest.column_groups.values())
        if groups != manifest.input_dim:
            raise BundleError(f"{where}: column_groups add up to {groups} columns, input_dim "
                              f"is {manifest.input_dim}")
        if (manifest.als_index is None) != (ALS_INDEX not in manifest.files):
            raise BundleError(f"{where}: als_index and the file {ALS_INDEX} go together; "
                              f"the manifest has only one of them")
        return manifest


def check_schema(raw: Mapping[str, Any], where: Path) -> None:
    """A manifest of the schema this build reads (checked first: other schemas may
    differ in everything else, the digest included)."""
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise BundleError(f"{where}: schema_version {version!r:.40}, this build reads "
                          f"{SCHEMA_VERSION}; rebuild the bundle with this trainer")


def _mapping(raw: Mapping[str, Any], key: str, optional: bool = False) -> Mapping[str, Any]:
    value = raw.get(key, {}) if optional else raw[key]
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected a JSON object, not {value!r:.40}")
    return value


def _integer(raw: Mapping[str, Any], key: str, low: int, high: int, prefix: str = "") -> int:
    """``raw[key]`` as an int in ``low..high``: JSON integers only (not 1e9, "3" or true)."""
    value = raw[key]
    if type(value) is not int:
        raise ValueError(f"{prefix}{key}: {value!r:.40} is not an integer")
    if not low <= value <= high:
        raise ValueError(f"{prefix}{key}: {value} is out of range {low}..{high}")
    return value


def _index_params(raw: Mapping[str, Any], key: str,
                  spaces: tuple[str, ...] = SPACES) -> IndexParams:
    entry = _mapping(raw, key)
    unknown = set(entry) - set(IndexParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{key}: unknown fields {sorted(unknown)}")
    space = entry["space"]
    if space not in spaces:
        raise ValueError(f"{key}.space: {space!r:.40}, this build serves {', '.join(spaces)}")
    prefix = key + "."
    return IndexParams(space=str(space), dim=_integer(entry, "dim", 1, MAX_DIM, prefix),
                       m=_integer(entry, "m", 2, MAX_M, prefix),
                       ef_construction=_integer(entry, "ef_construction", 1,
                                                MAX_EF_CONSTRUCTION, prefix),
                       ef=_integer(entry, "ef", 1, MAX_EF, prefix),
                       count=_integer(entry, "count", 1, MAX_COUNT, prefix))


def _file_entry(files: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A ``files`` entry: a plain file name of the bundle directory, its size and sha256."""
    if (not isinstance(name, str) or name != Path(name).name or name.startswith(".")
            or name == MANIFEST or "\\" in name):
        raise ValueError(f"files: {name!r:.60} is not a file name inside the bundle")
    meta = files[name]
    if not isinstance(meta, Mapping):
        raise ValueError(f"files.{name}: expected a JSON object")
    digest = meta.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError(f"files.{name}.sha256: {digest!r:.80} is not a sha256 hex digest")
    return {"sha256": digest, "bytes": _integer(meta, "bytes", 0, 1 << 50, f"files.{name}.")}


def manifest_digest(raw: Mapping[str, Any]) -> str:
    """sha256 of a manifest's content without its digest, as canonical JSON."""
    body = {key: value for key, value in raw.items() if key != DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its digest set (what :func:`write_manifest` writes)."""
    return {**raw, DIGEST: manifest_digest(raw)}


def write_manifest(root: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Checksum every file in ``root`` and write ``manifest.json`` last (atomically), so a
    bundle whose writer died part-way has no manifest and is refused."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(root.iterdir()):
        if path.name == MANIFEST or path.name.startswith("."):
            continue
        if path.is_file():
            files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise BundleError(f"{root}: cannot write manifest, missing {', '.join(missing)}")
    fields = dict(manifest_fields)
    fields.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    fields["schema_version"] = SCHEMA_VERSION
    fields["files"] = files
    manifest = Manifest.from_json(_jsonable(fields), root / MANIFEST)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(seal(manifest.to_json()), indent=2, ensure_ascii=False))
    os.replace(tmp, root / MANIFEST)
    return manifest


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.__dict__ if hasattr(o, "__dict__")
                                 else (o.item() if hasattr(o, "item") else str(o))))


def read_manifest(root: str | Path, *, verify: bool = True) -> Manifest:
    """Read and check ``manifest.json`` (its digest, numbers and the size of every file it
    lists); with ``verify`` also every file's sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if not path.is_file():
        raise BundleError(f"{path}: no manifest (not a bundle, or its build did not finish)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: manifest is not a JSON object")
    check_schema(raw, path)
    stated = raw.get(DIGEST)
    if stated is None:
        # Bundles written before manifests carried a digest: every number is still
        # checked against the files, so they load, with a warning.
        log.warning("%s: no %s (written by an older trainer); its numbers are checked "
                    "against the files, but other edits would go unnoticed; re-export the "
                    "bundle to add one", path, DIGEST)
    elif stated != manifest_digest(raw):
        raise BundleError(f"{path}: {DIGEST} does not match its content: the manifest was "
                          f"changed after the trainer wrote it")
    manifest = Manifest.from_json(raw, path)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{path}: lists no {name}")
    for name, meta in manifest.files.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (listed in the manifest)")
        if file.stat().st_size != meta.get("bytes"):
            raise BundleError(f"{file}: size {file.stat().st_size} bytes, manifest says "
                              f"{meta.get('bytes')} (truncated or replaced)")
        if verify and sha256_of(file) != meta.get("sha256"):
            raise BundleError(f"{file}: sha256 mismatch (file is damaged or was changed)")
    return manifest


def read_npz(path: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Members of an ``.npz`` (all, or ``keys``), loaded without pickle. Members must be
    stored uncompressed, as ``np.savez`` writes them: a compressed one could expand to any
    size in memory (a decompression bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [i.filename for i in archive.infolist()
                      if i.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise BundleError(f"{path}: member {packed[0]} is compressed; bundles store "
                              f"them uncompressed (np.savez)")
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in (npz.files if keys is None else keys)}
    except (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile) as exc:
        # BadZipFile: a damaged member (bad CRC) when the checksums were not verified;
        # MemoryError: a member whose header declares a shape larger than memory.
        raise BundleError(f"{path}: unreadable ({exc!r})") from None


def load_arrays(root: str | Path, keys: Sequence[str] | None = None
                ) -> dict[str, np.ndarray]:
    """``arrays.npz`` as a dict (only ``keys`` when given), loaded without pickle."""
    return read_npz(Path(root) / ARRAYS, keys)


def pack_strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (utf-8 blob as uint8, int64 offsets): the pickle-free, compact layout of
    every list of strings in ``arrays.npz`` (tags, title words, song names)."""
    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The strings :func:`pack_strings` packed."""
    raw = blob.tobytes()
    bounds = offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:], strict=False)]


def save_arrays(root: Path, arrays: Mapping[str, np.ndarray]) -> None:
    for key, value in arrays.items():
        if value.dtype == object:
            raise BundleError(f"array {key!r} has dtype object: it would need pickle")
    np.savez(root / ARRAYS, **arrays)  # type: ignore[arg-type]


def save_neighbours(root: Path, table: Mapping[str, np.ndarray]) -> None:
    """Write ``neighbours.npz`` (``labels``, ``rows``, ``sims``); see :func:`load_neighbours`."""
    tmp = Path(root) / (NEIGHBOURS + ".tmp.npz")
    np.savez(tmp, **table)  # type: ignore[arg-type]
    os.replace(tmp, Path(root) / NEIGHBOURS)


def load_neighbours(root: str | Path, manifest: Manifest) -> dict[str, np.ndarray] | None:
    """The neighbour table when the manifest lists one, checked for shape: ``labels`` (n,)
    index labels, ``rows`` (n, k) int32 song rows best first, ``sims`` (n, k)."""
    if NEIGHBOURS not in manifest.files:
        return None
    path = Path(root) / NEIGHBOURS
    table = read_npz(path, ("labels", "rows", "sims"))
    labels, rows, sims = table["labels"], table["rows"], table["sims"]
    if (labels.ndim != 1 or rows.ndim != 2 or rows.shape != sims.shape
            or len(labels) != len(rows) or len(labels) != manifest.song_index.count):
        raise BundleError(f"{path}: shapes labels {labels.shape}, rows {rows.shape}, sims "
                          f"{sims.shape} do not fit the {manifest.song_index.count} indexed "
                          f"songs")
    return table


def save_ranker(root: Path, onnx_bytes: bytes, arrays: Mapping[str, np.ndarray],
                als_index: Any | None = None) -> None:
    """Write ``ranker.onnx``, ``ranker.npz`` and, given an hnswlib index (or the path of an
    index file to copy), ``als.hnsw``, each atomically; without one a stale ``als.hnsw``
    is removed. The manifest that lists them is written afterwards
    (:func:`write_manifest`, with ``als_index`` set to the index's parameters or left out)."""
    for key, value in arrays.items():
        if value.dtype == object:
            raise BundleError(f"ranker array {key!r} has dtype object: it would need pickle")
    tmp = Path(root) / (RANKER_ONNX + ".tmp")
    tmp.write_bytes(onnx_bytes)
    os.replace(tmp, Path(root) / RANKER_ONNX)
    tmp = Path(root) / (RANKER_ARRAYS + ".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, Path(root) / RANKER_ARRAYS)
    path, tmp = Path(root) / ALS_INDEX, Path(root) / (ALS_INDEX + ".tmp")
    if als_index is None:
        path.unlink(missing_ok=True)
        return
    if isinstance(als_index, (str, Path)):
        shutil.copyfile(als_index, tmp)
    else:
        als_index.save_index(str(tmp))
    os.replace(tmp, path)


def load_ranker_arrays(root: str | Path) -> dict[str, np.ndarray]:
    """``ranker.npz`` as a dict, loaded as every bundle array is (:func:`read_npz`)."""
    return read_npz(Path(root) / RANKER_ARRAYS)


def save_codes(root: Path, unit_codes: np.ndarray) -> None:
    """Write ``codes.npy``: one float16 unit code per indexed song, ascending label order."""
    tmp = Path(root) / (CODES + ".tmp.npy")
    np.save(tmp, unit_codes.astype(np.float16))
    os.replace(tmp, Path(root) / CODES)


def load_codes(root: str | Path, manifest: Manifest) -> np.ndarray | None:
    """``codes.npy`` memory-mapped read-only when the manifest lists it."""
    if CODES not in manifest.files:
        return None
    path = Path(root) / CODES
    try:
        codes: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if codes.ndim != 2 or codes.shape != (manifest.song_index.count, manifest.code_dim):
        raise BundleError(f"{path}: shape {codes.shape}, expected "
                          f"({manifest.song_index.count}, {manifest.code_dim})")
    return codes


def load_columns(root: str | Path) -> dict[str, Any]:
    path = Path(root) / COLUMNS
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return raw


def save_columns(root: Path, columns: Mapping[str, Any]) -> None:
    (root / COLUMNS).write_text(json.dumps(columns, ensure_ascii=False))


def load_hnsw(root: str | Path, params: IndexParams, name: str, *,
              max_elements: int | None = None, labels: np.ndarray | None = None) -> Any:
    """Load an hnswlib index and set its ``ef`` from the manifest (hnswlib forgets it).

    The file is checked first (:func:`server.hnswfile.check_index_file`) against
    ``params`` and, when given, the sorted ``labels`` it must hold; after the load, a few
    of its own vectors are searched for (a canary: hnswlib's errors surface here, not in
    a client's call)."""
    # Imported here: the load test reads a bundle's arrays through this module and must
    # not need the index library.
    import hnswlib

    path = Path(root) / name
    what = {SONG_INDEX: "song_index", PLAYLIST_INDEX: "playlist_index",
            ALS_INDEX: "als_index"}.get(name, name)
    try:
        held = hnswfile.check_index_file(path, dim=params.dim, count=params.count,
                                         m=params.m, ef_construction=params.ef_construction,
                                         labels=labels, what=what,
                                         unit=params.space == "cosine")
    except hnswfile.IndexFileError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc.strerror or exc})") from None
    index = hnswlib.Index(space=params.space, dim=params.dim)
    try:
        index.load_index(str(path), max_elements=max_elements or params.count)
    except (RuntimeError, OSError, MemoryError) as exc:
        raise BundleError(f"{path}: cannot load index ({exc})") from None
    if index.get_current_count() != params.count:
        raise BundleError(f"{path}: {index.get_current_count()} items, manifest says "
                          f"{params.count}")
    index.set_ef(params.ef)
    try:
        found, distances = index.knn_query(held.sample, k=1)
    except RuntimeError as exc:
        raise BundleError(f"{path}: a search for its own vectors failed ({exc})") from None
    if not np.isfinite(distances).all() or (
            labels is not None and not np.isin(found, labels).all()):
        raise BundleError(f"{path}: a search for its own vectors answered labels or "
                          f"distances it does not hold")
    return index


def read_codes(index: Any, labels: np.ndarray, chunk: int = 20_000) -> np.ndarray:
    """The vectors an hnswlib index stores for ``labels`` (float32), read in chunks: one
    ``get_items`` call over 575k x 1024 builds several full copies (out of memory)."""
    return np.concatenate([np.asarray(index.get_items(labels[i : i + chunk]),
                                      dtype=np.float32)
                           for i in range(0, len(labels), chunk)])


def replace_bundle(staging: Path, final: Path) -> None:
    """Move a finished staging directory into place, keeping the old one as ``.previous``."""
    final = Path(final)
    previous = final.with_name(final.name + ".previous")
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
    os.replace(staging, final)
