"""hnswlib index files checked in Python before hnswlib reads them: hnswlib trusts every
offset, count and id in the file, so one wrong number is a segmentation fault at a search.

The layout is hnswlib 0.8's ``HierarchicalNSW::saveIndex`` (little-endian, 64-bit)::

    header, 96 bytes   offsetLevel0 u64, max_elements u64, cur_element_count u64,
                       size_data_per_element u64, label_offset u64, offsetData u64,
                       maxlevel i32, enterpoint_node u32, maxM u64, maxM0 u64, M u64,
                       mult f64, ef_construction u64
    level 0            cur_element_count records of size_data_per_element bytes: a u32 link
                       header (count in the low 16 bits, a deletion mark in byte 2),
                       maxM0 u32 neighbour ids, the vector (dim x f32), the label (u64)
    upper levels       per element, in order: u32 size in bytes (its level x
                       (4 + 4 maxM)), then for each level 1..L a u32 link header and maxM
                       u32 neighbour ids

:func:`check_index_file` reads all of it (the level-0 block memory-mapped, in chunks) and
checks everything hnswlib follows: header fields against each other, against the file size
and against what the manifest states; every link count against its maximum; every
neighbour id against the element count and, above level 0, against the neighbour's own
level; the entry point and top level; every label against the labels the bundle expects;
every vector for finite values, of unit length in the cosine space (it stores them
normalised; the inner-product space stores them as they are).
What it cannot know is whether such values, or links within bounds, are the ones the
trainer wrote: that is what the sha256 check is for.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<QQQQQQiIQQQdQ")
FIELDS = ("offsetLevel0", "max_elements", "cur_element_count", "size_data_per_element",
          "label_offset", "offsetData", "maxlevel", "enterpoint_node", "maxM", "maxM0", "M",
          "mult", "ef_construction")  # HEADER's fields, in order
EMPTY = 0xFFFFFFFF  # enterpoint_node of an index without elements
CHUNK = 1 << 16  # level-0 records checked at a time (bounded memory)


class IndexFileError(ValueError):
    """The file is not an hnswlib 0.8 index that fits the manifest."""


@dataclass(frozen=True)
class IndexFile:
    """What an index file really holds (its header, checked)."""

    dim: int
    count: int
    m: int
    ef_construction: int
    max_level: int
    entry_point: int
    sample: np.ndarray = field(repr=False, compare=False)  # a few stored vectors (canary)


def check_index_file(path: Path, *, dim: int, count: int, m: int, ef_construction: int,
                     labels: np.ndarray | None, what: str, unit: bool = True) -> IndexFile:
    """Check ``path`` completely against the manifest's ``dim``, ``count``, ``m`` and
    ``ef_construction`` and, when given, the ``labels`` it must hold (sorted, unique);
    ``what`` names the manifest entry in messages (``song_index``); ``unit``: the vectors
    must be unit vectors (cosine space). Raises :class:`IndexFileError`."""
    size = path.stat().st_size
    if size < HEADER.size:
        raise IndexFileError(f"{size} bytes, shorter than hnswlib's {HEADER.size}-byte header")
    with path.open("rb") as fh:
        head = fh.read(HEADER.size)
    (offset_level0, max_elements, cur, per_element, label_offset, offset_data, max_level,
     entry_point, max_m, max_m0, file_m, mult, file_efc) = HEADER.unpack(head)
    # The header's own arithmetic, as hnswlib's constructor sets it.
    if not 2 <= file_m <= 0x7FFF or max_m != file_m or max_m0 != 2 * file_m:
        raise IndexFileError(f"header M {file_m}, maxM {max_m}, maxM0 {max_m0}: not the "
                             f"M, M, 2M hnswlib writes")
    links0 = 4 + 4 * max_m0
    if offset_level0 != 0 or offset_data != links0:
        raise IndexFileError(f"header offsetLevel0 {offset_level0}, offsetData "
                             f"{offset_data}: expected 0 and {links0} for M {file_m}")
    if label_offset <= offset_data or (label_offset - offset_data) % 4:
        raise IndexFileError(f"header label_offset {label_offset} does not follow "
                             f"offsetData {offset_data} by whole float32 values")
    file_dim = (label_offset - offset_data) // 4
    if per_element != label_offset + 8:
        raise IndexFileError(f"header size_data_per_element {per_element}, expected "
                             f"{label_offset + 8} (label_offset + 8)")
    if not math.isclose(mult, 1.0 / math.log(file_m), rel_tol=1e-9):
        raise IndexFileError(f"header mult {mult!r}, expected 1/ln(M) = "
                             f"{1.0 / math.log(file_m)!r}")
    # Against the manifest.
    for name, held, stated in (("dim", file_dim, dim), ("m", file_m, m),
                               ("count", cur, count),
                               ("ef_construction", file_efc, max(ef_construction, m))):
        if held != stated:
            raise IndexFileError(f"holds {name} {held}, manifest says {what}.{name} "
                                 f"{stated}")
    if max_elements < cur:
        raise IndexFileError(f"header max_elements {max_elements} < its {cur} elements")
    level0_end = HEADER.size + cur * per_element
    if size < level0_end + 4 * cur:
        raise IndexFileError(f"{size} bytes, too short for {cur} elements of "
                             f"{per_element} bytes and their link-list sizes")
    if cur == 0:
        raise IndexFileError("holds no elements")
    if not 0 <= entry_point < cur:
        raise IndexFileError(f"header enterpoint_node {entry_point} is not one of its {cur} "
                             f"elements")
    sample = _check_level0(path, cur, per_element, max_m0, offset_data, label_offset, labels,
                           unit)
    _check_upper_levels(path, level0_end, size, cur, max_m, max_level, entry_point)
    return IndexFile(file_dim, cur, file_m, file_efc, max_level, entry_point, sample)


def _check_level0(path: Path, cur: int, per_element: int, max_m0: int, offset_data: int,
                  label_offset: int, labels: np.ndarray | None, unit: bool) -> np.ndarray:
    """Check the level-0 records; returns the first few vectors."""
    words = per_element // 4
    block = np.memmap(path, dtype="<u4", mode="r", offset=HEADER.size, shape=(cur, words))
    held = np.empty(cur, dtype=np.uint64)
    slots = np.arange(max_m0)
    try:
        for start in range(0, cur, CHUNK):
            part = np.asarray(block[start : start + CHUNK])
            head = part[:, 0]
            counts = head & 0xFFFF
            bad = np.flatnonzero((head >> 16) != 0)
            if len(bad):
                raise IndexFileError(f"element {start + bad[0]}: level-0 link header "
                                     f"{int(head[bad[0]]):#x} (a deletion mark or damage)")
            bad = np.flatnonzero(counts > max_m0)
            if len(bad):
                raise IndexFileError(f"element {start + bad[0]}: {int(counts[bad[0]])} "
                                     f"level-0 links, at most {max_m0}")
            ids = part[:, 1 : 1 + max_m0]
            wrong = (ids >= cur) & (slots < counts[:, None])
            if wrong.any():
                row, slot = np.argwhere(wrong)[0]
                raise IndexFileError(f"element {start + row}: level-0 link to element "
                                     f"{int(ids[row, slot])}, past its {cur} elements")
            vectors = part[:, offset_data // 4 : label_offset // 4].view("<f4")
            if not np.isfinite(vectors).all():
                row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
                raise IndexFileError(f"element {start + row}: vector holds NaN or infinity")
            # The cosine space stores unit vectors (zero stays zero): another length would
            # make similarities outside [-1, 1].
            norms = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
            bad = np.flatnonzero((np.abs(norms - 1.0) > 1e-3) & (norms != 0.0))
            if unit and len(bad):
                raise IndexFileError(f"element {start + bad[0]}: vector of squared length "
                                     f"{norms[bad[0]]:.6g}, not a unit vector")
            lo = part[:, label_offset // 4].astype(np.uint64)
            hi = part[:, label_offset // 4 + 1].astype(np.uint64)
            held[start : start + len(part)] = lo | (hi << np.uint64(32))
            if start == 0:
                sample = np.array(vectors[:8])
    finally:
        del block
    if labels is None:
        if len(np.unique(held)) != cur:
            raise IndexFileError("holds one label on several elements")
        return sample
    expected = np.asarray(labels, dtype=np.uint64)
    found = np.sort(held)
    if len(found) != len(expected) or not np.array_equal(found, expected):
        differ = np.flatnonzero(found != expected)[0] if len(found) == len(expected) else 0
        raise IndexFileError(f"its labels are not the bundle's {len(expected)} expected ones "
                             f"(sorted, position {differ}: {int(found[differ])} where "
                             f"{int(expected[differ]) if len(expected) else None} belongs)")
    return sample


def _check_upper_levels(path: Path, level0_end: int, size: int, cur: int, max_m: int,
                        max_level: int, entry_point: int) -> None:
    tail_bytes = size - level0_end
    if tail_bytes % 4:
        raise IndexFileError(f"{tail_bytes} bytes of link lists: not whole u32 values")
    tail = np.fromfile(path, dtype="<u4", offset=level0_end)
    words = tail.tolist()  # one Python walk: each element's size says where the next starts
    per_level = 1 + max_m  # u32 words of one level's list
    levels = np.zeros(cur, dtype=np.int64)
    starts = np.zeros(cur, dtype=np.int64)
    pos, end = 0, len(words)
    for i in range(cur):
        if pos >= end:
            raise IndexFileError(f"ends inside the link lists, at element {i} of {cur}")
        nbytes = words[pos]
        if nbytes % (4 * per_level):
            raise IndexFileError(f"element {i}: link lists of {nbytes} bytes, not whole "
                                 f"levels of {4 * per_level}")
        levels[i] = nbytes // (4 * per_level)
        starts[i] = pos + 1
        pos += 1 + nbytes // 4
    if pos != end:
        raise IndexFileError(f"{4 * (end - pos):+d} bytes after its last link list "
                             f"(truncated or followed by garbage)")
    top = int(levels.max())
    if max_level != top or levels[entry_point] != top:
        raise IndexFileError(f"header maxlevel {max_level} and enterpoint_node "
                             f"{entry_point} (level {int(levels[entry_point])}); the "
                             f"highest level held is {top}")
    has = np.flatnonzero(levels > 0)
    if not len(has):
        return
    n_lists = levels[has]
    owner = np.repeat(has, n_lists)
    level = np.arange(int(n_lists.sum())) - np.repeat(np.cumsum(n_lists) - n_lists, n_lists)
    rows = tail[(starts[owner] + level * per_level)[:, None] + np.arange(per_level)]
    level += 1  # list j of an element is its level j + 1
    head = rows[:, 0]
    counts = head & 0xFFFF
    bad = np.flatnonzero(((head >> 16) != 0) | (counts > max_m))
    if len(bad):
        raise IndexFileError(f"element {owner[bad[0]]}, level {level[bad[0]]}: link header "
                             f"{int(head[bad[0]]):#x} (at most {max_m} links)")
    ids = rows[:, 1:].astype(np.int64)
    used = np.arange(max_m) < counts[:, None]
    wrong = used & ((ids >= cur) | (levels[np.minimum(ids, cur - 1)] < level[:, None]))
    if wrong.any():
        row, slot = np.argwhere(wrong)[0]
        raise IndexFileError(f"element {owner[row]}, level {level[row]}: link to element "
                             f"{int(ids[row, slot])}, which is not on that level")
