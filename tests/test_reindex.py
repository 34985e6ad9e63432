"""Rebuilding a bundle's song index keeps it loadable and records the new parameters."""

from __future__ import annotations

import numpy as np

from server.bundle import read_manifest
from server.engine import Engine
from trainer.reindex import main


def test_reindex_rewrites_index_and_manifest(copy_bundle, capsys) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    before = Engine.load(root)
    row = int(before.catalog.popularity.argmax())
    want = set(before.songs.neighbours(np.asarray([row]), 11)[0][0].tolist()) - {row}
    assert main(["--bundle", str(root), "--m", "8", "--ef-construction", "60",
                 "--efs", "50,200", "--queries", "40"]) == 0
    assert "recall@100" in capsys.readouterr().out
    manifest = read_manifest(root)  # checksums verified: the manifest was rewritten
    assert (manifest.song_index.m, manifest.song_index.ef_construction) == (8, 60)
    assert manifest.hyper_parameters["index_m"] == 8
    after = Engine.load(root)
    got = set(after.songs.neighbours(np.asarray([row]), 11)[0][0].tolist()) - {row}
    assert len(want & got) >= 7  # same codes, another graph: nearly the same neighbours


def test_reindex_refuses_a_damaged_bundle(copy_bundle, capsys) -> None:  # type: ignore[no-untyped-def]
    root = copy_bundle()
    (root / "songs.hnsw").write_bytes(b"broken")
    assert main(["--bundle", str(root), "--m", "8", "--ef-construction", "60"]) == 2
    assert "songs.hnsw" in capsys.readouterr().err
