"""Neighbour lists written straight into protobuf wire format, a whole batch in one pass.

Building a ``SimilarSongsResponse`` through the protobuf runtime costs ~0.4 us per
neighbour (one ``Neighbour`` message each): 36 us of a k=100 answer, about as much as the
lookup itself. Here the neighbours of every answer in a batch are encoded by one compiled
loop (numba) over all of them, and each answer is sliced out of the result.

The bytes are ordinary protobuf: each ``Neighbour`` record carries its ``similarity``
field before its ``song_id`` (parsers accept fields in any order, which keeps every
variable-length part at the end of its record), and zero values are written rather than
omitted. ``tests/test_wire.py`` parses them back and compares with the runtime's messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited, 5 fixed32).
_SONG_ID = 0x08  # SimilarSongsResponse.song_id and Neighbour.song_id: field 1, varint
_NEIGHBOURS = 0x12  # SimilarSongsResponse.neighbours: field 2, length-delimited
_SIMILARITY = 0x15  # Neighbour.similarity: field 2, fixed32
_MODEL_VERSION = 0x1A  # SimilarSongsResponse.model_version: field 3, length-delimited


class WireMessage:
    """A response already serialized; the gate and gRPC's serializer treat it like a
    message (``SerializeToString``, ``ByteSize``)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf method's name)
        return self.data

    def ByteSize(self) -> int:  # noqa: N802
        return len(self.data)


def varint(value: int) -> bytes:
    """One int64 as a protobuf varint (negative values take ten bytes, as in protobuf)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + varint(len(payload)) + payload if payload else b""


def neighbour_records(song_ids: np.ndarray, similarities: np.ndarray
                      ) -> tuple[bytes, np.ndarray]:
    """Every ``neighbours`` entry (tag, length, Neighbour message) back to back, and the
    byte offset where each starts (one more offset at the end)."""
    ids = np.ascontiguousarray(song_ids, dtype=np.int64).view(np.uint64)
    floats = np.ascontiguousarray(similarities, dtype="<f4").view(np.uint8).reshape(-1, 4)
    data, offsets = _records(ids, floats)
    return data.tobytes(), offsets


_SEVEN = np.uint64(7)
_LOW_BITS = np.uint64(0x7F)
_HIGH_BIT = np.uint64(0x80)


@njit(nogil=True, cache=True)
def _records(ids: np.ndarray, floats: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    # uint64 constants throughout: numba turns uint64-with-int64 arithmetic into floats.
    n = ids.shape[0]
    out = np.empty(n * 18, dtype=np.uint8)  # at most 2 + 5 + 1 + 10 bytes a record
    offsets = np.zeros(n + 1, dtype=np.int64)
    pos = 0
    for i in range(n):
        value = ids[i]
        length = 1
        rest = value >> _SEVEN
        while rest:
            length += 1
            rest >>= _SEVEN
        out[pos] = _NEIGHBOURS
        out[pos + 1] = length + 6  # the Neighbour message: 1 + 4 + 1 + varint bytes
        out[pos + 2] = _SIMILARITY
        for j in range(4):
            out[pos + 3 + j] = floats[i, j]
        out[pos + 7] = _SONG_ID
        pos += 8
        while value >= _HIGH_BIT:
            out[pos] = (value & _LOW_BITS) | _HIGH_BIT
            value >>= _SEVEN
            pos += 1
        out[pos] = value
        pos += 1
        offsets[i + 1] = pos
    return out[:pos], offsets


def similar_responses(song_ids: Sequence[int], model_version: str, neighbour_ids: np.ndarray,
                      similarities: np.ndarray, bounds: Sequence[int]) -> list[WireMessage]:
    """``SimilarSongsResponse`` bytes (without names) for answers whose neighbours are
    ``neighbour_ids[bounds[i]:bounds[i + 1]]``, with their similarities."""
    records, offsets = neighbour_records(neighbour_ids, similarities)
    starts = offsets.tolist()
    tail = _length_delimited(_MODEL_VERSION, model_version.encode("utf-8"))
    return [WireMessage((bytes([_SONG_ID]) + varint(song_id) if song_id else b"")
                        + records[starts[a] : starts[b]] + tail)
            for song_id, a, b in zip(song_ids, bounds, bounds[1:], strict=False)]


def warm_up() -> None:
    """Compile (or load from numba's cache) the encoder, so no call pays for it."""
    neighbour_records(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32))
