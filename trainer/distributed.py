"""torch.distributed for the trainer: the torchrun process group and its collectives."""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from trainer.model import RowGrads

log = logging.getLogger(__name__)

# Collectives move at most this many bytes per call: gloo handles multi-GB tensors poorly,
# and chunks keep the receive buffers small next to a full table.
CHUNK_BYTES = 256 << 20
# Rank 0 alone validates and writes files while the others wait in a collective: the wait
# must outlast a Melon-scale validation (minutes), so the default 30 minutes is kept
# unless SONGREC_DIST_TIMEOUT_S says otherwise.
DEFAULT_TIMEOUT_S = 1800


class PeerLost(RuntimeError):
    """A collective failed: another rank died or the launcher stopped this one."""


def _collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one torch.distributed call; its failure (a dead peer closes the gloo sockets, a
    timeout expires) becomes :class:`PeerLost` with the backend's first line."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # torch.distributed.DistError and backend errors
        first = str(exc).strip().splitlines()
        raise PeerLost(first[0] if first else type(exc).__name__) from exc


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the group: ``world == 1`` is the single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def backend_for(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones (the trainer's tensors live on the CPU)."""
    return "nccl" if device_type == "cuda" else "gloo"


def restart_count() -> int:
    """How many times torchrun restarted the worker group (``--max-restarts``); 0 outside."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_from_env(device_type: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...); without it, or with one process, the run is
    single-process and no group is made."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as tdist

    backend = backend_for(device_type)
    timeout = dt.timedelta(seconds=float(os.environ.get("SONGREC_DIST_TIMEOUT_S",
                                                        DEFAULT_TIMEOUT_S)))
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=timeout)
    info = Dist(rank=tdist.get_rank(), world=tdist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), backend=backend)
    log.info("distributed: rank %d of world size %d (local rank %d of %d, backend %s)",
             info.rank, info.world, info.local_rank, info.local_world, backend)
    return info


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


def block_range(n: int, block: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``rank``: whole blocks of ``block`` rows, contiguous, the
    ranks' shares differing by at most one block. Every rank computes every range, so
    merging needs no exchange of sizes."""
    n_blocks = -(-n // block)
    lo = n_blocks * rank // world
    hi = n_blocks * (rank + 1) // world
    return min(lo * block, n), min(hi * block, n)


def _chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


def collect_rows(local: np.ndarray, n: int, block: int, dist: Dist, *,
                 to_all: bool) -> np.ndarray | None:
    """The ranks' :func:`block_range` pieces of an ``n``-row array, put together in row
    order: on every rank (``to_all``, an all-gather) or on rank 0 alone (a gather; the
    others get None). Chunked to :data:`CHUNK_BYTES` per call."""
    if not dist.enabled:
        return local
    import torch
    import torch.distributed as tdist

    ranges = [block_range(n, block, r, dist.world) for r in range(dist.world)]
    lo, hi = ranges[dist.rank]
    if local.shape[0] != hi - lo:
        raise ValueError(f"rank {dist.rank}: {local.shape[0]} rows for range [{lo}, {hi})")
    tail = local.shape[1:]
    local = np.ascontiguousarray(local)
    out = np.empty((n, *tail), dtype=local.dtype) if to_all or dist.is_main else None
    longest = max(b - a for a, b in ranges)
    step = _chunk_rows(local.dtype.itemsize * int(np.prod(tail, dtype=np.int64)))
    for start in range(0, max(longest, 1), step):
        send = np.zeros((step, *tail), dtype=local.dtype)
        piece = local[start : start + step]
        send[: len(piece)] = piece
        sent = torch.from_numpy(send)
        recv = [torch.empty_like(sent) for _ in range(dist.world)]
        if to_all:
            _collective(tdist.all_gather, recv, sent)
        else:
            _collective(tdist.gather, sent, recv if dist.is_main else None, dst=0)
        if out is None:
            continue
        for r, (a, b) in enumerate(ranges):
            count = min(max(b - a - start, 0), step)
            if count:
                out[a + start : a + start + count] = recv[r].numpy()[:count]
    return out


def broadcast_tensor(tensor: torch.Tensor, dist: Dist) -> None:
    """Rank 0's values into ``tensor`` on every rank, in place (chunked)."""
    if not dist.enabled:
        return
    import torch.distributed as tdist

    flat = tensor.detach().view(-1)
    step = _chunk_rows(flat.element_size())
    for start in range(0, flat.numel(), step):
        _collective(tdist.broadcast, flat[start : start + step], src=0)


def broadcast_object(obj: Any, dist: Dist) -> Any:
    """Rank 0's (picklable, small) object on every rank."""
    if not dist.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    _collective(tdist.broadcast_object_list, box, src=0)
    return box[0]


def all_sum(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sum over ranks of a few floats (float64)."""
    if not dist.enabled:
        return values
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64)
    _collective(tdist.all_reduce, t)
    return [float(v) for v in t.tolist()]


def average_row_grads(grads: RowGrads, tables: dict[str, torch.Tensor],
                      dist: Dist) -> RowGrads:
    """The ranks' row-sparse gradients of ``tables`` averaged over the union of their
    rows, the same on every rank (the row-table counterpart of DDP's dense all-reduce).

    Each rank touched different rows (its own songs' columns; the sampled output columns
    are the same on every rank). A row only one rank touched is still divided by the
    world size: that is what averaging the ranks' full D-row gradients, zeros included,
    gives, and what the loss scaling in ``Trainer.run_epoch`` expects. Cost: one
    all-gather of the row ids, then one all-reduce per table of a U x width buffer (U the
    union of the touched rows), never a D-row tensor.
    """
    if not dist.enabled:
        return grads
    import torch
    import torch.distributed as tdist

    from trainer.model import RowGrads

    names = list(tables)
    local: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in names:
        pieces = grads.merged(name)  # disjoint rows
        width = tuple(tables[name].shape[1:])
        if pieces:
            local.append((torch.cat([p[0] for p in pieces]),
                          torch.cat([p[1] for p in pieces]).float()))
        else:
            local.append((torch.empty(0, dtype=torch.int64), torch.empty((0, *width))))
    counts = torch.tensor([len(r) for r, _ in local], dtype=torch.int64)
    all_counts = [torch.empty_like(counts) for _ in range(dist.world)]
    _collective(tdist.all_gather, all_counts, counts)
    longest = max(int(c.sum()) for c in all_counts)
    send = torch.full((max(longest, 1),), -1, dtype=torch.int64)
    mine = torch.cat([r for r, _ in local])
    send[: len(mine)] = mine
    recv = [torch.empty_like(send) for _ in range(dist.world)]
    _collective(tdist.all_gather, recv, send)
    bounds = [np.concatenate([[0], np.cumsum(c.numpy())]) for c in all_counts]
    out = RowGrads()
    for t, name in enumerate(names):
        union = torch.unique(torch.cat([recv[r][bounds[r][t] : bounds[r][t + 1]]
                                        for r in range(dist.world)]))  # sorted
        rows, vals = local[t]
        buf = torch.zeros((len(union), *vals.shape[1:]), dtype=torch.float32)
        buf[torch.searchsorted(union, rows)] = vals
        _collective(tdist.all_reduce, buf)
        buf /= dist.world
        if len(union):
            out.add(name, union, buf)
    return out
