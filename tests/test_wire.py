"""Hand-encoded SimilarSongs responses parse back to the messages the protobuf runtime builds."""

from __future__ import annotations

import numpy as np
import pytest

from protos.songrec.v1 import songrec_pb2 as pb2
from server.wire import WireMessage, similar_responses, varint

EDGE_IDS = [0, 1, 127, 128, 16383, 16384, 2**31 - 1, 2**35, 2**62, 2**63 - 1, -1, -(2**63)]


@pytest.mark.parametrize("value", EDGE_IDS)
def test_varint_matches_protobuf(value: int) -> None:
    # Neighbour(song_id=v) serializes as tag 0x08 followed by v's varint (proto3 leaves
    # a zero out).
    want = pb2.Neighbour(song_id=value).SerializeToString()[1:] if value else b"\x00"
    assert varint(value) == want


def _reference(song_id: int, ids: list[int], sims: list[float], version: str
               ) -> pb2.SimilarSongsResponse:
    response = pb2.SimilarSongsResponse(song_id=song_id, model_version=version)
    for i, s in zip(ids, sims, strict=True):
        response.neighbours.add(song_id=i, similarity=s)
    return response


def test_batch_of_responses_round_trips() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        n_answers = int(rng.integers(1, 12))
        counts = rng.integers(0, 40, n_answers)
        ids = rng.integers(-(2**63), 2**63 - 1, int(counts.sum()), dtype=np.int64)
        ids[rng.random(len(ids)) < 0.5] %= 10**7  # mostly catalogue-sized ids
        ids[rng.random(len(ids)) < 0.05] = 0
        sims = rng.uniform(-1, 1, len(ids)).astype(np.float32)
        sims[rng.random(len(sims)) < 0.05] = 0.0
        bounds = [0, *np.cumsum(counts).tolist()]
        song_ids = [int(x) for x in rng.choice(EDGE_IDS + [5, 42, 700_000], n_answers)]
        version = "" if rng.random() < 0.2 else "20261128-" + "x" * int(rng.integers(0, 200))
        got = similar_responses(song_ids, version, ids, sims, bounds)
        assert len(got) == n_answers
        for i, message in enumerate(got):
            assert isinstance(message, WireMessage)
            part = slice(bounds[i], bounds[i + 1])
            want = _reference(song_ids[i], ids[part].tolist(), sims[part].tolist(), version)
            parsed = pb2.SimilarSongsResponse.FromString(message.SerializeToString())
            assert parsed == want
            assert message.ByteSize() == len(message.SerializeToString())


def test_empty_batch_and_empty_lists() -> None:
    assert similar_responses([], "v", np.zeros(0, np.int64), np.zeros(0, np.float32), [0]) == []
    (only,) = similar_responses([9], "v", np.zeros(0, np.int64), np.zeros(0, np.float32), [0, 0])
    assert pb2.SimilarSongsResponse.FromString(only.SerializeToString()) == \
        pb2.SimilarSongsResponse(song_id=9, model_version="v")
