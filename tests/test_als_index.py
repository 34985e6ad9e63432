"""The ALS source's inner-product index (``als.hnsw``): written with the ranker, answering
as the exact scan does, and refused with a BundleError naming it when it does not fit."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import alsindex
from server.bundle import (
    ALS_INDEX,
    BundleError,
    read_manifest,
    save_ranker,
    seal,
    write_manifest,
)
from server.engine import Engine
from server.hnswfile import HEADER
from server.ranking import _als_top
from server.strategies import Query


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:
    return Engine.load(tiny_bundle)


def _rewrite(bundle: Path, **changes: Any) -> None:
    """The manifest rewritten over the files as they are now (checksums that match), with
    ``changes`` to its fields (None: drop the field)."""
    fields = json.loads((bundle / "manifest.json").read_text())
    for key in ("files", "schema_version", "manifest_sha256"):
        fields.pop(key, None)
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    fields["files"] = {}
    write_manifest(bundle, fields)


def test_the_trainer_writes_and_lists_the_index(tiny_bundle: Path, engine: Engine) -> None:
    manifest = read_manifest(tiny_bundle)
    assert len(manifest.files[ALS_INDEX]["sha256"]) == 64
    params = manifest.als_index
    ranker = engine.ranker
    assert params is not None and ranker is not None and ranker.data.als is not None
    trained = np.flatnonzero(engine.catalog.popularity > 0)
    assert (params.space, params.dim, params.m, params.ef) == (
        "ip", ranker.data.als.songs.shape[1], alsindex.M, alsindex.EF)
    assert params.count == len(trained)
    index = ranker.data.als_index
    assert index is not None
    # Every trained song, and only those: untrained songs have zero factors.
    assert np.array_equal(np.sort(index.index.get_ids_list()), trained)


def test_index_answers_what_the_scan_answers(engine: Engine) -> None:
    ranker = engine.ranker
    assert ranker is not None and ranker.data.als is not None
    data = ranker.data
    exact = replace(data, als_index=None)
    popular = np.argsort(-engine.catalog.popularity, kind="stable")
    recalls = []
    for picks in ([0, 3, 9], [1], [5, 40, 80, 120], [2, 11], [30, 60]):
        seeds = np.sort(popular[picks]).astype(np.int64)
        user = data.als.fold_in(seeds, np.zeros(0, np.int64), "")
        assert user is not None
        rows, scores, _ = _als_top(engine.catalog, data, user, seeds, 50)
        want, want_scores, _ = _als_top(engine.catalog, exact, user, seeds, 50)
        assert len(rows) == len(want) == 50
        assert not set(rows.tolist()) & set(seeds.tolist())
        assert (engine.catalog.popularity[rows] > 0).all()
        # The scores are exact dot products, best first, whichever way the rows were found.
        np.testing.assert_allclose(scores, data.als.songs[rows] @ user, rtol=1e-5, atol=1e-6)
        assert (np.diff(scores) <= 0).all()
        recalls.append(len(np.intersect1d(rows, want)) / len(want))
    assert np.mean(recalls) >= 0.9, recalls


def test_a_bundle_without_the_index_scans(copy_bundle: Any) -> None:
    """Bundles written before the index: the ALS source scans every song's factors."""
    bundle = copy_bundle()
    (bundle / ALS_INDEX).unlink()
    _rewrite(bundle, als_index=None)
    engine = Engine.load(bundle)
    assert engine.ranker is not None and engine.ranker.data.als_index is None
    seeds = np.argsort(-engine.catalog.popularity, kind="stable")[:3].astype(np.int64)
    answer = engine.continue_playlist("ranked", Query(np.sort(seeds), np.zeros(0, np.int32),
                                                      "", n_songs=20))
    assert len(answer.songs) == 20 and not set(answer.songs.tolist()) & set(seeds.tolist())


def _first_vector_offset(path: Path) -> int:
    head = HEADER.unpack(path.read_bytes()[:HEADER.size])
    return HEADER.size + head[5]  # offsetData: the vector within element 0's record


def _other_index(engine: Engine, bundle: Path, factors: np.ndarray,
                 popularity: np.ndarray | None = None) -> dict[str, Any]:
    """Write an index of ``factors`` as the bundle's als.hnsw; its manifest entry."""
    built = alsindex.build(factors, engine.catalog.popularity if popularity is None
                           else popularity)
    assert built is not None
    built[0].save_index(str(bundle / ALS_INDEX))
    return dict(built[1].__dict__)


def _refused(bundle: Path, match: str) -> None:
    with pytest.raises(BundleError, match=match) as info:
        Engine.load(bundle)
    assert ALS_INDEX in str(info.value) or "als_index" in str(info.value)


def test_a_damaged_or_mismatched_index_is_refused_naming_it(copy_bundle: Any,
                                                            engine: Engine) -> None:
    assert engine.ranker is not None and engine.ranker.data.als is not None
    factors = engine.ranker.data.als.songs
    # A NaN written into a stored vector (checksums rewritten to match).
    bundle = copy_bundle("nan")
    path = bundle / ALS_INDEX
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, _first_vector_offset(path), float("nan"))
    path.write_bytes(bytes(raw))
    _rewrite(bundle)
    _refused(bundle, "NaN")
    # A link past the last element.
    bundle = copy_bundle("link")
    path = bundle / ALS_INDEX
    raw = bytearray(path.read_bytes())
    struct.pack_into("<II", raw, HEADER.size, 1, 10**6)
    path.write_bytes(bytes(raw))
    _rewrite(bundle)
    _refused(bundle, "past its")
    # Truncated.
    bundle = copy_bundle("short")
    path = bundle / ALS_INDEX
    path.write_bytes(path.read_bytes()[:-100])
    _rewrite(bundle)
    _refused(bundle, "als.hnsw")
    # Another model's factors over the same songs.
    bundle = copy_bundle("other")
    params = _other_index(engine, bundle, factors * 1.5)
    _rewrite(bundle, als_index=params)
    _refused(bundle, "not the ALS factors")
    # An untrained song indexed (it would be proposed).
    bundle = copy_bundle("untrained")
    popularity = engine.catalog.popularity.copy()
    untrained = np.flatnonzero(popularity == 0)
    assert len(untrained)
    popularity[untrained[0]] = 1
    params = _other_index(engine, bundle, factors, popularity)
    _rewrite(bundle, als_index=params)
    _refused(bundle, "labels")
    # The manifest's numbers against the file, and the file without its entry.
    bundle = copy_bundle("dims")
    manifest = read_manifest(bundle)
    assert manifest.als_index is not None
    stated = dict(manifest.als_index.__dict__)
    _rewrite(bundle, als_index={**stated, "dim": stated["dim"] + 1})
    _refused(bundle, "als_index.dim")
    _rewrite(bundle, als_index={**stated, "count": stated["count"] - 1})
    _refused(bundle, "count")
    # Edits the trainer would not write (write_manifest checks them too): sealed by hand.
    raw = json.loads((bundle / "manifest.json").read_text())
    for edit, match in (({"als_index": {**stated, "space": "cosine"}}, "als_index.space"),
                        ({"als_index": {**stated, "m": -1}}, "als_index.m"),
                        ({"als_index": None}, "als_index and the file als.hnsw go together")):
        changed = {k: v for k, v in {**raw, **edit}.items() if v is not None}
        (bundle / "manifest.json").write_text(json.dumps(seal(changed)))
        _refused(bundle, match)


def test_retraining_without_als_removes_the_index(copy_bundle: Any, engine: Engine) -> None:
    """save_ranker without an index leaves no stale als.hnsw for the manifest to list."""
    bundle = copy_bundle()
    save_ranker(bundle, (bundle / "ranker.onnx").read_bytes(),
                dict(np.load(bundle / "ranker.npz")))
    assert not (bundle / ALS_INDEX).exists()
    _rewrite(bundle, als_index=None)
    assert read_manifest(bundle).als_index is None
