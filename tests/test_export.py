"""The bundle: ONNX encoder against torch, manifest and checksums, refusal of bad bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from server import bundle as bundle_files
from server.bundle import BundleError, read_manifest
from server.columns import ColumnSpace, SongMeta, pad_batch
from server.engine import Engine


def test_onnx_encoder_matches_torch(tiny_split: Path, tmp_path: Path) -> None:
    from trainer.export import export_onnx
    from trainer.model import ModelConfig, SongAutoEncoder

    torch.manual_seed(0)
    model = SongAutoEncoder(ModelConfig(input_dim=300, hidden=(24, 8))).eval()
    export_onnx(model, tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"))
    assert [i.name for i in session.get_inputs()] == ["columns", "weights"]
    assert [o.name for o in session.get_outputs()] == ["code"]
    rng = np.random.default_rng(0)
    for batch in (1, 7, 33):  # the batch axis and the width axis are dynamic
        rows = [np.unique(rng.integers(0, 300, rng.integers(1, 40))) for _ in range(batch)]
        cols, weights = pad_batch(rows, 300)
        (got,) = session.run(["code"], {"columns": cols, "weights": weights})
        flat = torch.from_numpy(np.concatenate(rows))
        offsets = torch.from_numpy(np.r_[0, np.cumsum([len(r) for r in rows])[:-1]])
        with torch.no_grad():
            want = model.encode(flat, offsets).numpy()
        assert np.abs(got - want).max() < 1e-4


def test_bundle_manifest_lists_every_file_with_checksums(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    on_disk = {p.name for p in tiny_bundle.iterdir() if p.name != "manifest.json"}
    assert set(manifest.files) == on_disk
    for name, meta in manifest.files.items():
        assert meta["sha256"] == bundle_files.sha256_of(tiny_bundle / name)
    assert manifest.code_dim == 32 and manifest.song_index.dim == 32
    assert sum(manifest.column_groups.values()) == manifest.input_dim
    assert manifest.song_index.ef >= 1 and manifest.song_index.m >= 2
    assert manifest.hyper_parameters["activation"] == "selu"
    assert len(manifest.data_fingerprint) == 32
    assert {"train_log.jsonl", "training.png"} <= set(manifest.files)


def test_arrays_load_without_pickle(tiny_bundle: Path) -> None:
    arrays = bundle_files.load_arrays(tiny_bundle)
    assert all(a.dtype != object for a in arrays.values())
    assert len(arrays["song_ids"]) == len(arrays["rep_of"])


def test_damaged_file_is_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    path = root / "songs.hnsw"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="songs.hnsw: sha256 mismatch"):
        Engine.load(root)


def test_truncated_file_is_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    path = root / "arrays.npz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="arrays.npz: size"):
        read_manifest(root)


def test_other_schema_version_is_refused(copy_bundle) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99"):
        read_manifest(root)


def test_missing_manifest_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest"):
        read_manifest(tmp_path)


def test_engine_encodes_unseen_song_near_its_twin(tiny_bundle: Path, tiny_split: Path) -> None:
    """A bundle song re-described by its own metadata and playlists lands on itself."""
    from trainer.dataset import load_dataset

    engine = Engine.load(tiny_bundle)
    data = load_dataset(tiny_split, files=["train.json"])
    space = ColumnSpace.from_json(bundle_files.load_columns(tiny_bundle))
    assert space.dim == engine.manifest.input_dim
    row = int(np.argmax(engine.catalog.popularity))
    song = data.songs
    genres = [data.genres.codes.items[g] for g in song.genres.row(row)]
    details = [data.genres.codes.items[g] for g in song.detail_genres.row(row)]
    in_playlists = [int(data.train.ids[p]) for p in range(len(data.train))
                    if row in set(data.train.songs.row(p).tolist())]
    tags = sorted({data.tags.items[t] for p in range(len(data.train))
                   if row in set(data.train.songs.row(p).tolist())
                   for t in data.train.tags.row(p)})
    # Its artists too: the default column groups include them.
    artists = tuple(int(a) for a in song.artists.row(row))
    codes, known = engine.encoder.encode([SongMeta(tuple(genres), tuple(details), artists, 0,
                                                   tuple(in_playlists), tuple(tags))])
    assert known[0] > 0
    labels, sims = engine.nearest_to(codes, 5)
    twins = {row, int(engine.songs.rep_of[row])}  # type: ignore[attr-defined]
    assert twins & set(labels[0].tolist())
    assert sims[0][0] > 0.999


def test_long_rows_are_encoded_in_bounded_runs_in_input_order(tiny_bundle: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from server import engine as engine_module

    engine = Engine.load(tiny_bundle)
    dim = engine.encoder.columns.dim
    rng = np.random.default_rng(5)
    rows = [np.unique(rng.integers(0, dim, size=int(n))) for n in (3, 400, 1, 60, 400, 7, 0)]
    one_by_one = np.concatenate([engine.encoder.encode_columns([r]) for r in rows])
    runs: list[tuple[int, int]] = []
    session = engine.encoder.session

    class Counting:
        def run(self, names, feeds):  # type: ignore[no-untyped-def]
            runs.append(feeds["columns"].shape)
            return session.run(names, feeds)

    monkeypatch.setattr(engine.encoder, "session", Counting())
    monkeypatch.setattr(engine_module, "ENCODE_CELLS", 450)
    together = engine.encoder.encode_columns(rows)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert len(runs) > 1
    # Each run fits the budget, except a single row wider than it.
    assert all(b * w <= 450 or b == 1 for b, w in runs)
    assert sum(b for b, _ in runs) == len(rows)
