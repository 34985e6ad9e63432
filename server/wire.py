"""Neighbour lists written straight into protobuf wire format, a whole batch in one pass.

Building a ``SimilarSongsResponse`` through the protobuf runtime costs ~0.4 us per
neighbour (one ``Neighbour`` message each): 36 us of a k=100 answer, about as much as the
lookup itself. Here the neighbours of every answer in a batch are encoded by a few numpy
operations over all of them, and each answer is sliced out of the result.

The bytes are ordinary protobuf: each ``Neighbour`` record carries its ``similarity``
field before its ``song_id`` (parsers accept fields in any order, which keeps every
variable-length part at the end of its record), and zero values are written rather than
omitted. ``tests/test_wire.py`` parses them back and compares with the runtime's messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited, 5 fixed32).
_SONG_ID = 0x08  # SimilarSongsResponse.song_id and Neighbour.song_id: field 1, varint
_NEIGHBOURS = 0x12  # SimilarSongsResponse.neighbours: field 2, length-delimited
_SIMILARITY = 0x15  # Neighbour.similarity: field 2, fixed32
_MODEL_VERSION = 0x1A  # SimilarSongsResponse.model_version: field 3, length-delimited
# _FIRST[m] marks the first m of 18 columns (a lookup: comparing against an arange per
# call cost more than the whole encoding).
_FIRST = np.arange(19)[:, None] > np.arange(18)[None, :]



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
    values = np.ascontiguousarray(song_ids, dtype=np.int64)
    n = len(values)
    if n and int(values.min()) < 0:  # two's complement: ten varint bytes, as protobuf
        values = values.view(np.uint64)
        width = 10
    else:  # only as many 7-bit groups as the largest id needs (ids are mostly < 2**28)
        width = len(varint(int(values.max()))) if n else 1
    groups = np.empty((n, width), dtype=np.uint8)
    lengths = np.ones(n, dtype=np.int64)
    for j in range(width):
        groups[:, j] = (values >> np.uint8(7 * j)) & np.uint8(0x7F) if j else values & 0x7F
        if j:
            lengths += values >= values.dtype.type(1 << (7 * j))
    groups[_FIRST[lengths - 1, :width]] |= 0x80  # continuation bits
    records = np.empty((n, 8 + width), dtype=np.uint8)
    records[:, 0] = _NEIGHBOURS
    records[:, 1] = lengths + 6  # the Neighbour message: 1 + 4 + 1 + varint bytes
    records[:, 2] = _SIMILARITY
    records[:, 3:7] = np.ascontiguousarray(similarities, dtype="<f4").view(np.uint8) \
        .reshape(n, 4)
    records[:, 7] = _SONG_ID
    records[:, 8:] = groups
    sizes = lengths + 8
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return records[_FIRST[sizes, : 8 + width]].tobytes(), offsets


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
