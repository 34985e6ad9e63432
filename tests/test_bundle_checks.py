"""No bundle, verified or not, can crash the server: the manifest's own digest and every number
it states, hnswlib index files checked whole before hnswlib reads them, the arrays, the
neighbour table and the encoder checked against the manifest; refusals name the file and
the mismatch, at start-up and on ``ReloadModel`` (under load, with no failed call).

Index files are checked in this process (the checker never calls hnswlib); anything that
loads a mutated bundle into hnswlib runs in a server process, so that a regression shows
as a dead server, not a dead test run."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clients.benchtools import ServerProcess
from protos.songrec.v1 import songrec_pb2 as pb2
from protos.songrec.v1 import songrec_pb2_grpc as pb2_grpc
from server import bundle as bundle_files
from server.bundle import DIGEST, BundleError, Manifest, read_manifest, seal
from server.hnswfile import FIELDS, HEADER, IndexFileError, check_index_file

ADMIN = "bundle-checks-admin"
AUTH = [("authorization", f"Bearer {ADMIN}")]
ENV = {"SONGREC_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1"}
Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def field_offset(name: str) -> tuple[int, str]:
    """Byte offset and struct code of a header field."""
    i = FIELDS.index(name)
    codes = HEADER.format[1:]
    return struct.calcsize("<" + codes[:i]), "<" + codes[i]


def header(path: Path) -> dict[str, Any]:
    return dict(zip(FIELDS, HEADER.unpack(path.read_bytes()[: HEADER.size]), strict=True))


def set_field(path: Path, name: str, value: Any) -> None:
    data = bytearray(path.read_bytes())
    offset, code = field_offset(name)
    struct.pack_into(code, data, offset, value)
    path.write_bytes(bytes(data))


def upper_lists(path: Path) -> list[tuple[int, int, int]]:
    """(element, level, byte offset of its list) for every list above level 0."""
    h = header(path)
    data = path.read_bytes()
    pos = HEADER.size + h["cur_element_count"] * h["size_data_per_element"]
    size = 4 + 4 * h["maxM"]
    out = []
    for element in range(h["cur_element_count"]):
        (nbytes,) = struct.unpack_from("<I", data, pos)
        for level in range(nbytes // size):
            out.append((element, level + 1, pos + 4 + level * size))
        pos += 4 + nbytes
    return out


def manifest_of(bundle: Path) -> Manifest:
    """The manifest as stated, without checking the files (these tests damage them)."""
    return Manifest.from_json(json.loads((bundle / "manifest.json").read_text()), bundle)


def labels_of(bundle: Path, name: str) -> np.ndarray:
    if name == bundle_files.PLAYLIST_INDEX:
        return np.arange(manifest_of(bundle).playlist_index.count)
    rep_of = bundle_files.load_arrays(bundle)["rep_of"]
    return np.flatnonzero(rep_of == np.arange(len(rep_of)))


def check(bundle: Path, name: str = bundle_files.SONG_INDEX) -> None:
    manifest = manifest_of(bundle)
    params = manifest.song_index if name == bundle_files.SONG_INDEX else \
        manifest.playlist_index
    check_index_file(bundle / name, dim=params.dim, count=params.count, m=params.m,
                     ef_construction=params.ef_construction, labels=labels_of(bundle, name),
                     what=name)


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None],
                  sealed: bool = True) -> None:
    """Change the manifest; ``sealed``: with its digest recomputed, as a trainer that
    wrote those numbers would have (so that the checks behind the digest are reached)."""
    raw = json.loads((bundle / "manifest.json").read_text())
    change(raw)
    (bundle / "manifest.json").write_text(json.dumps(seal(raw) if sealed else raw))


# ---------------------------------------------------------------- index files


def test_the_trainers_index_files_pass(tiny_bundle: Path) -> None:
    check(tiny_bundle, bundle_files.SONG_INDEX)
    check(tiny_bundle, bundle_files.PLAYLIST_INDEX)


HEADER_DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "offsetLevel0": (lambda h: 8, "offsetLevel0"),
    "max_elements": (lambda h: h["cur_element_count"] - 1, "max_elements"),
    "cur_element_count": (lambda h: h["cur_element_count"] + 1, "count"),
    "size_data_per_element": (lambda h: h["size_data_per_element"] + 4,
                              "size_data_per_element"),
    "label_offset": (lambda h: h["label_offset"] + 4, "size_data_per_element"),
    "offsetData": (lambda h: h["offsetData"] + 4, "offsetData"),
    "maxlevel": (lambda h: h["maxlevel"] + 1, "maxlevel"),
    "enterpoint_node": (lambda h: h["enterpoint_node"] ^ 1, "enterpoint_node"),
    "maxM": (lambda h: h["maxM"] + 1, "maxM"),
    "maxM0": (lambda h: h["maxM0"] + 2, "maxM0"),
    "M": (lambda h: h["M"] * 2, "maxM"),
    "mult": (lambda h: h["mult"] * 2, "mult"),
    "ef_construction": (lambda h: h["ef_construction"] + 1, "ef_construction"),
}


@pytest.mark.parametrize("name", FIELDS)
def test_each_header_field_is_checked(copy_bundle: Any, name: str) -> None:
    bundle = copy_bundle()
    path = bundle / bundle_files.SONG_INDEX
    value, message = HEADER_DAMAGE[name]
    set_field(path, name, value(header(path)))
    with pytest.raises(IndexFileError, match=message):
        check(bundle)


def test_dims_are_what_the_file_holds(tiny_bundle: Path) -> None:
    """The dim the manifest states must be the file's (hnswlib reads dim x 4 bytes of each
    vector from the dim it is given: 1e9 crashed, 128 read past each vector)."""
    manifest = read_manifest(tiny_bundle, verify=False)
    for dim in (manifest.code_dim * 4, 1_000_000_000):
        with pytest.raises(IndexFileError, match=rf"holds dim {manifest.code_dim}, manifest "
                                                 rf"says song_index.dim {dim}"):
            check_index_file(tiny_bundle / bundle_files.SONG_INDEX, dim=dim,
                             count=manifest.song_index.count, m=manifest.song_index.m,
                             ef_construction=manifest.song_index.ef_construction,
                             labels=None, what="song_index")


def level0_at(path: Path, element: int) -> int:
    return HEADER.size + element * header(path)["size_data_per_element"]


def patch(path: Path, offset: int, code: str, value: Any) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(code, data, offset, value)
    path.write_bytes(bytes(data))


BODY_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "too many level-0 links": (lambda p: patch(p, level0_at(p, 7), "<H", 65), "level-0 links"),
    "level-0 link past the elements": (
        lambda p: patch(p, level0_at(p, 7) + 4, "<I", header(p)["cur_element_count"]),
        "past its"),
    "deletion mark": (lambda p: patch(p, level0_at(p, 3) + 2, "<B", 1), "deletion mark"),
    "NaN vector": (lambda p: patch(p, level0_at(p, 5) + header(p)["offsetData"], "<f",
                                   float("nan")), "NaN"),
    "a label twice": (lambda p: patch(p, level0_at(p, 1) + header(p)["label_offset"], "<Q",
                                      struct.unpack_from("<Q", p.read_bytes(), level0_at(
                                          p, 0) + header(p)["label_offset"])[0]),
                      "labels are not"),
    "link list size not whole levels": (
        lambda p: patch(p, HEADER.size + header(p)["cur_element_count"]
                        * header(p)["size_data_per_element"], "<I", 12), "not whole levels"),
    "upper link to a lower element": (
        lambda p: patch_values(p, upper_lists(p)[0][2], "<II", 1, next(
            e for e in range(header(p)["cur_element_count"])
            if e not in {x[0] for x in upper_lists(p)})), "not on that level"),
    "too many upper links": (lambda p: patch(p, upper_lists(p)[0][2], "<I", 17),
                             "at most 16 links"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-4]),
                  "ends inside|bytes after its last"),
    "garbage after the end": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
                              "bytes after its last"),
}


def patch_values(path: Path, offset: int, code: str, *values: Any) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(code, data, offset, *values)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(BODY_DAMAGE))
def test_links_labels_and_vectors_are_checked(copy_bundle: Any, damage: str) -> None:
    bundle = copy_bundle()
    apply, message = BODY_DAMAGE[damage]
    apply(bundle / bundle_files.SONG_INDEX)
    with pytest.raises(IndexFileError, match=message):
        check(bundle)


# ---------------------------------------------------------------- the manifest


def test_the_trainer_seals_its_manifest(tiny_bundle: Path) -> None:
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    assert raw[DIGEST] == bundle_files.manifest_digest(raw)


def test_an_edited_manifest_is_refused_even_without_verify(copy_bundle: Any) -> None:
    bundle = copy_bundle()
    edit_manifest(bundle, lambda m: m.__setitem__("model_version", "edited"), sealed=False)
    for verify in (True, False):
        with pytest.raises(BundleError, match="manifest.json: manifest_sha256 does not match"):
            read_manifest(bundle, verify=verify)


def test_a_manifest_without_digest_loads_with_a_warning(
        copy_bundle: Any, caplog: pytest.LogCaptureFixture) -> None:
    bundle = copy_bundle()
    edit_manifest(bundle, lambda m: m.pop(DIGEST), sealed=False)
    with caplog.at_level(logging.WARNING, logger="server.bundle"):
        assert read_manifest(bundle).model_version
    assert any("no manifest_sha256" in r.getMessage() for r in caplog.records)


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("|")
    for key in parents:
        raw = raw[key]
    raw[last] = value


@pytest.mark.parametrize(("path", "value", "message"), [
    ("code_dim", 1_000_000_000, "code_dim: 1000000000 is out of range"),
    ("code_dim", 32.0, "code_dim: 32.0 is not an integer"),
    ("input_dim", "1759", "input_dim: '1759' is not an integer"),
    ("song_index|dim", True, "song_index.dim: True is not an integer"),
    ("song_index|ef", -1, "song_index.ef: -1 is out of range"),
    ("song_index|ef", 10**9, "song_index.ef: 1000000000 is out of range"),
    ("playlist_index|count", 0, "playlist_index.count: 0 is out of range"),
    ("playlist_index|m", 1, "playlist_index.m: 1 is out of range"),
    ("song_index|space", "ip", "song_index.space: 'ip', this build serves cosine"),
    ("song_index|extra", 1, "song_index: unknown fields"),
    ("column_groups|tags", 0, "column_groups add up to"),
    ("files|arrays.npz|bytes", -5, "files.arrays.npz.bytes: -5 is out of range"),
    ("files|../../etc/passwd", {"sha256": "0" * 64, "bytes": 1}, "is not a file name"),
    ("files|songs.hnsw|sha256", "x", "is not a sha256"),
    ("schema_version", 2, "schema_version 2"),
])
def test_manifest_numbers_are_typed_and_ranged(copy_bundle: Any, path: str, value: Any,
                                               message: str) -> None:
    bundle = copy_bundle()
    edit_manifest(bundle, lambda m: set_path(m, path, value))
    with pytest.raises(BundleError, match=message.replace(".", r"\.").replace("(", r"\(")):
        read_manifest(bundle, verify=False)


def test_compressed_arrays_are_refused(copy_bundle: Any) -> None:
    """np.savez writes members stored; a compressed member could expand to any size."""
    bundle = copy_bundle()
    arrays = bundle_files.load_arrays(bundle)
    np.savez_compressed(bundle / "arrays.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="arrays.npz: member .* is compressed"):
        bundle_files.load_arrays(bundle)


# ---------------------------------------------------------------- the whole bundle, served


def reload(admin: Any, path: Path, skip_verify: bool) -> tuple[Code, str]:
    try:
        admin.ReloadModel(pb2.ReloadModelRequest(bundle_path=str(path),
                                                 skip_verify=skip_verify),
                          metadata=AUTH, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[attr-defined]
    return Code.OK, ""


def drop_tables(m: dict[str, Any]) -> None:
    for name in ("codes.npy", "neighbours.npz"):
        m["files"].pop(name)


# (what, how the bundle is changed, skip_verify, the file and mismatch the refusal names)
REFUSED: list[tuple[str, Callable[[Path], None], bool, str]] = [
    # The crashes: each segfaulted the server at its first call.
    ("playlist dim 1e9", lambda b: edit_manifest(b, lambda m: set_path(
        m, "playlist_index|dim", 10**9)), False, "playlist_index.dim: 1000000000 is out"),
    ("playlist dim 128", lambda b: edit_manifest(b, lambda m: set_path(
        m, "playlist_index|dim", 128)), False, "manifest.json: playlist_index.dim 128 != "
                                              "code_dim"),
    ("every dim 1e9, no tables", lambda b: edit_manifest(b, lambda m: (
        set_path(m, "code_dim", 10**9), set_path(m, "song_index|dim", 10**9),
        set_path(m, "playlist_index|dim", 10**9), drop_tables(m))), False,
     "code_dim: 1000000000 is out of range"),
    ("every dim 64, no tables", lambda b: edit_manifest(b, lambda m: (
        set_path(m, "code_dim", 64), set_path(m, "song_index|dim", 64),
        set_path(m, "playlist_index|dim", 64), drop_tables(m))), False,
     "songs.hnsw: holds dim 32, manifest says song_index.dim 64"),
    ("entry point flipped, skip_verify", lambda b: set_field(
        b / bundle_files.SONG_INDEX, "enterpoint_node",
        header(b / bundle_files.SONG_INDEX)["enterpoint_node"] ^ 1), True,
     "songs.hnsw: header maxlevel"),
    # Numbers behind the digest, each against the files.
    ("song count", lambda b: edit_manifest(b, lambda m: set_path(
        m, "song_index|count", m["song_index"]["count"] + 1)), True,
     "rep_of, manifest says song_index.count"),
    ("playlist count", lambda b: edit_manifest(b, lambda m: set_path(
        m, "playlist_index|count", m["playlist_index"]["count"] - 1)), True,
     "playlist_ids, manifest says playlist_index.count"),
    ("m", lambda b: edit_manifest(b, lambda m: set_path(m, "playlist_index|m", 8)), True,
     "playlists.hnsw: holds m 16, manifest says playlist_index.m 8"),
    ("ef_construction", lambda b: edit_manifest(b, lambda m: set_path(
        m, "song_index|ef_construction", 400)), True,
     "songs.hnsw: holds ef_construction 100, manifest says song_index.ef_construction 400"),
    ("input_dim", lambda b: edit_manifest(b, lambda m: (
        set_path(m, "input_dim", m["input_dim"] + 1),
        set_path(m, "column_groups|tags", m["column_groups"]["tags"] + 1))), True,
     "columns.json: groups"),
    ("an edit without a digest", lambda b: edit_manifest(b, lambda m: set_path(
        m, "song_index|ef", 50), sealed=False), True, "manifest_sha256 does not match"),
]


def test_refused_at_start_up_with_one_line(copy_bundle: Any) -> None:
    for what, change, skip_verify, message in REFUSED[:5]:
        bundle = copy_bundle(what.replace(" ", "-"))
        change(bundle)
        command = [sys.executable, "-m", "server", "--bundle", str(bundle), "--port", "0"]
        done = subprocess.run(command + (["--no-verify"] if skip_verify else []), cwd=ROOT,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, **ENV})
        assert done.returncode == 2, (what, done.returncode, done.stderr[-2000:])
        assert message in done.stderr and "Traceback" not in done.stderr, (what, done.stderr)


class Load:
    """Inference calls from two threads until stopped; counts every status code."""

    def __init__(self, target: str) -> None:
        self.codes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target, i), daemon=True)
                         for i in range(2)]
        for thread in self._threads:
            thread.start()

    def _run(self, target: str, seed: int) -> None:
        calls = [("SimilarSongs", pb2.SimilarSongsRequest(song_id=3, k=10)),
                 ("ContinuePlaylist", pb2.ContinuePlaylistRequest(seed_song_ids=[1, 2, 3])),
                 ("EncodeSong", pb2.EncodeSongRequest(song=pb2.SongMetadata(
                     genres=["GN0100"], detail_genres=["GN0101"]), k=10))]
        with grpc.insecure_channel(target) as channel:
            stub = pb2_grpc.RecommenderStub(channel)
            i = seed
            while not self._stop.is_set():
                method, request = calls[i % len(calls)]
                i += 1
                try:
                    getattr(stub, method)(request, timeout=30)
                    self.codes["OK"] += 1
                except grpc.RpcError as exc:
                    self.codes[exc.code().name] += 1  # type: ignore[attr-defined]
                    self.errors.append(f"{method}: {exc.details()}")  # type: ignore[attr-defined]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.fixture
def server_process(tiny_bundle: Path) -> Iterator[ServerProcess]:
    with ServerProcess(["--bundle", str(tiny_bundle), "--workers", "2"], env=ENV) as server:
        yield server


def test_refused_reloads_under_load_fail_no_call(server_process: ServerProcess,
                                                 copy_bundle: Any) -> None:
    with grpc.insecure_channel(server_process.target) as channel:
        admin = pb2_grpc.AdminStub(channel)
        load = Load(server_process.target)
        try:
            for what, change, skip_verify, message in REFUSED:
                bundle = copy_bundle(what.replace(" ", "-"))
                change(bundle)
                code, details = reload(admin, bundle, skip_verify)
                assert code is Code.FAILED_PRECONDITION, (what, code, details)
                assert "still serving" in details and message in details, (what, details)
                assert server_process.process.poll() is None, what
        finally:
            load.stop()
        assert load.codes["OK"] > 0 and set(load.codes) == {"OK"}, load.errors[:5]
    assert not any("Traceback" in line for line in server_process.log_lines())


def test_harmless_edits_behind_a_digest_serve(server_process: ServerProcess,
                                              copy_bundle: Any) -> None:
    """Numbers nothing reads (hyper-parameters, training facts) and a different search ef
    are accepted, and the server answers with them."""
    bundle = copy_bundle()
    edit_manifest(bundle, lambda m: (set_path(m, "hyper_parameters|lr", 1e9),
                                     set_path(m, "extra|n_songs", -3),
                                     set_path(m, "song_index|ef", 20)))
    with grpc.insecure_channel(server_process.target) as channel:
        code, details = reload(pb2_grpc.AdminStub(channel), bundle, True)
        assert code is Code.OK, details
        info = pb2_grpc.RecommenderStub(channel).GetModelInfo(pb2.GetModelInfoRequest())
        assert info.song_index.ef == 20
        answer = pb2_grpc.RecommenderStub(channel).EncodeSong(pb2.EncodeSongRequest(
            song=pb2.SongMetadata(genres=["GN0100"]), k=10), timeout=30)
        assert len(answer.neighbours) == 10
