"""The song autoencoder (Kuchaiev & Ginsburg 2017, songs as users) and its sparse loss.

Shape: D > h1 > ... > code > ... > h1 > D, default D > 2048 > 1024 > 2048 > D, SELU, dropout
on the code only. The input is a sparse multi-hot row (a few dozen of ~150k columns), so the
first layer is an embedding-bag sum over the row's columns and the last layer is a table of
per-column output vectors: neither is ever multiplied densely.

Loss = masked_weight x masked MSE + plain_weight x plain MSE, where (y is binary)

* masked MSE = sum over observed (i, j) of (y_hat_ij - 1)^2 / number of observed;
* plain MSE  = sum over all (i, j) of (y_hat_ij - y_ij)^2 / (B x D).

The plain term is split exactly into its observed part (computed exactly, from the
positives) and its unobserved part ``sum_{j not observed} y_hat_ij^2``, which is estimated
without bias from S columns drawn uniformly with replacement, shared by the batch:
``(D / S) * sum_{s in sample} y_hat_{i,s}^2 * [s not observed in row i]``. Its expectation
is the exact sum; ``tests/test_model.py`` checks the estimate against the dense loss.

The two D-row tables (input embedding, output vectors) are trained with row-sparse Adam
(:class:`RowSparseAdam`): each step gathers only the rows the batch touches into dense leaf
tensors, so autograd gives coalesced row gradients and the optimizer state of the other
rows is never read (lazy Adam, as TensorFlow's LazyAdam; weight decay applied lazily too).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

log = logging.getLogger(__name__)
# The CSR kernels used here (csr @ dense, sampled_addmm) are stable; silence the blanket
# "beta" notice torch prints on every CSR construction.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

ACTIVATIONS = {"selu": F.selu, "relu": F.relu, "elu": F.elu, "sigmoid": torch.sigmoid,
               "tanh": torch.tanh, "none": lambda x: x}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss; the defaults are the write-up's."""

    input_dim: int
    hidden: tuple[int, ...] = (2048, 1024)  # encoder widths; the last is the code size
    activation: str = "selu"
    output_activation: bool = True  # as DeepRecommender's last_layer_activations
    dropout: float = 0.8
    tied: bool = False  # decoder output table = encoder input table
    masked_weight: float = 15.0
    plain_weight: float = 200.0
    negative_samples: int = 1024  # S, columns sampled per batch for the zero part
    precision: str = "fp32"  # "bf16": dense matmuls in bfloat16 (fp32 accumulate, tables fp32)

    @property
    def code_dim(self) -> int:
        return self.hidden[-1]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        raw["hidden"] = tuple(raw["hidden"])
        return ModelConfig(**raw)


class SongAutoEncoder(nn.Module):
    """Sparse-input, sparse-output deep autoencoder."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation {config.activation!r}: choose from {list(ACTIVATIONS)}")
        self.config = config
        d, widths = config.input_dim, config.hidden
        self.act = ACTIVATIONS[config.activation]
        # Row tables: plain Parameters, updated by RowSparseAdam through gathered rows.
        self.in_table = nn.Parameter(torch.empty(d, widths[0]))
        self.in_bias = nn.Parameter(torch.zeros(widths[0]))
        pairs = zip(widths, widths[1:], strict=False)
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        rev = widths[::-1]
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(rev, rev[1:], strict=False))
        self.out_table = None if config.tied else nn.Parameter(torch.empty(d, widths[0]))
        self.out_bias = nn.Parameter(torch.zeros(d))
        # Xavier-uniform as the reference implementation.
        bound = math.sqrt(6.0 / (d + widths[0]))
        nn.init.uniform_(self.in_table, -bound, bound)
        if self.out_table is not None:
            nn.init.uniform_(self.out_table, -bound, bound)
        for layer in [*self.encoder, *self.decoder]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def output_table(self) -> nn.Parameter:
        return self.in_table if self.out_table is None else self.out_table

    def row_tables(self) -> list[nn.Parameter]:
        tables = [self.in_table, self.out_bias]
        if self.out_table is not None:
            tables.append(self.out_table)
        return tables

    def dense_parameters(self) -> list[nn.Parameter]:
        row_ids = {id(p) for p in self.row_tables()}
        return [p for p in self.parameters() if id(p) not in row_ids]

    # -- encoder -------------------------------------------------------------------------

    def encode_dense(self, first: torch.Tensor) -> torch.Tensor:
        """Code from the first hidden layer's activations."""
        x = first
        for layer in self.encoder:
            x = self.act(layer(x))
        return x

    def encode(self, cols: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Code of a batch from global column ids in CSR form (inference path)."""
        x = F.embedding_bag(cols, self.in_table, offsets, mode="sum") + self.in_bias
        return self.encode_dense(self.act(x))

    def decode_hidden(self, code: torch.Tensor) -> torch.Tensor:
        x = code
        for layer in self.decoder:
            x = self.act(layer(x))
        return x

    def out(self, logits: torch.Tensor) -> torch.Tensor:
        return self.act(logits) if self.config.output_activation else logits


@dataclass
class Batch:
    """One training batch of songs: its positives as CSR over global columns."""

    cols: np.ndarray  # int64 global column of each positive, row-major
    offsets: np.ndarray  # int64, start of each row in cols
    row_of: np.ndarray  # int64 row (0..B-1) of each positive

    @property
    def size(self) -> int:
        return len(self.offsets)


def make_batch(indptr: np.ndarray, indices: np.ndarray) -> Batch:
    lengths = np.diff(indptr)
    return Batch(indices.astype(np.int64), indptr[:-1].astype(np.int64),
                 np.repeat(np.arange(len(lengths), dtype=np.int64), lengths))


class Pattern:
    """The batch's positives as CSR twice: B x D over global columns (forward kernels read
    table rows in place, no gather) and U x B over the batch's U unique columns (the
    transpose, for the row gradients)."""

    def __init__(self, batch: Batch, n_cols: int) -> None:
        b = batch.size
        self.shape = (b, n_cols)
        self.crow = torch.from_numpy(_crow(batch.row_of, b))
        self.col = torch.from_numpy(batch.cols)
        uniq, local = np.unique(batch.cols, return_inverse=True)
        self.rows = torch.from_numpy(uniq)  # the U touched columns, sorted
        order = np.argsort(local, kind="stable")
        self.perm = torch.from_numpy(order)
        self.crow_t = torch.from_numpy(_crow(local[order], len(uniq)))
        self.col_t = torch.from_numpy(batch.row_of[order])

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape,
                                       check_invariants=False)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """U x B: the transpose restricted to the touched columns."""
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm],
                                       (len(self.rows), self.shape[0]),
                                       check_invariants=False)


def _crow(sorted_rows: np.ndarray, n_rows: int) -> np.ndarray:
    crow = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_rows, minlength=n_rows), out=crow[1:])
    return crow


class RowGrads:
    """Gradients of the D-row tables, row-sparse: per table, (sorted rows, grad) pieces.

    The sparse kernels write here instead of into ``param.grad``, which would be D x width;
    small gathered leaves (sampled output rows, output biases) are read after backward.
    """

    def __init__(self) -> None:
        self.pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.leaves: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.pieces.setdefault(name, []).append((rows, grad))

    def add_leaf(self, name: str, rows: torch.Tensor, leaf: torch.Tensor) -> None:
        self.leaves.append((name, rows, leaf))

    def merged(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pieces with disjoint rows: the others are added into the largest one where they
        overlap it, and what remains is coalesced into one more piece."""
        pieces = list(self.pieces.get(name, []))
        pieces += [(rows, leaf.grad) for n, rows, leaf in self.leaves
                   if n == name and leaf.grad is not None]
        if len(pieces) <= 1:
            return pieces
        pieces.sort(key=lambda p: -len(p[0]))
        base_rows, base_grad = pieces[0]
        rest_rows, rest_grads = [], []
        for rows, grad in pieces[1:]:
            pos = torch.searchsorted(base_rows, rows).clamp_(max=len(base_rows) - 1)
            hit = base_rows[pos] == rows
            base_grad.index_add_(0, pos[hit], grad[hit])
            rest_rows.append(rows[~hit])
            rest_grads.append(grad[~hit])
        rows = torch.cat(rest_rows)
        if len(rows) == 0:
            return [(base_rows, base_grad)]
        grads = torch.cat(rest_grads)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        coalesced = torch.zeros((len(uniq), *grads.shape[1:]), dtype=grads.dtype)
        coalesced.index_add_(0, inverse, grads)
        return [(base_rows, base_grad), (uniq, coalesced)]


class _TableInput(torch.autograd.Function):
    """x = S @ table, S the batch's 0/1 rows: reads only the touched table rows, and its
    backward sends S^T @ g (U x width) to a :class:`RowGrads` instead of a D-row grad."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, pattern: Pattern,  # type: ignore[override]
                sink: RowGrads, name: str) -> torch.Tensor:
        ctx.pattern, ctx.sink, ctx.name = pattern, sink, name
        return pattern.matrix(torch.ones(len(pattern.col))) @ table

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        pattern: Pattern = ctx.pattern
        ones = torch.ones(len(pattern.col))
        ctx.sink.add(ctx.name, pattern.rows, pattern.matrix_t(ones) @ grad.contiguous())
        return None, None, None, None


class _TableDot(torch.autograd.Function):
    """values[n] = hidden[row n] . table[col n] over the positives (an SDDMM); the table's
    gradient goes, row-sparse, to a :class:`RowGrads`."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, table: torch.Tensor,  # type: ignore[override]
                pattern: Pattern, sink: RowGrads, name: str) -> torch.Tensor:
        ctx.save_for_backward(hidden, table)
        ctx.pattern, ctx.sink, ctx.name = pattern, sink, name
        mask = pattern.matrix(torch.zeros(len(pattern.col), dtype=hidden.dtype))
        return torch.sparse.sampled_addmm(mask, hidden, table.T, beta=0.0).values()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, table = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad = grad.contiguous()
        ctx.sink.add(ctx.name, pattern.rows, pattern.matrix_t(grad) @ hidden)
        return pattern.matrix(grad) @ table, None, None, None, None


@dataclass
class LossParts:
    loss: torch.Tensor
    masked_mse: float
    plain_mse: float
    row_grads: RowGrads  # complete once loss.backward() has run


def dense_precision(precision: str) -> Any:
    """Autocast context for the dense layers: bfloat16 runs faster on CPUs with
    AVX512-BF16/AMX (accumulation stays fp32); the row tables always stay fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: choose fp32 or bf16")
    return contextlib.nullcontext()


def bf16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 dot products (else bf16 is emulated, slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def batch_loss(model: SongAutoEncoder, batch: Batch, sample: np.ndarray,
               totals: tuple[int, int] | None = None) -> LossParts:
    """The write-up's loss on one batch, with the sampled estimate of the zero part.

    After ``loss.backward()``, the dense layers have ordinary ``.grad``; the row tables'
    gradients are in ``parts.row_grads`` (for :class:`RowSparseAdam`).

    ``totals`` = (positives, rows) of the whole batch when ``batch`` is one rank's share
    of it: the MSEs are then divided by the whole batch's counts, so the ranks' losses add
    up to the single-process loss of the whole batch (with the same ``sample``).
    """
    cfg = model.config
    d = cfg.input_dim
    b = batch.size
    n_pos = len(batch.cols)
    pos_total, rows_total = (n_pos, b) if totals is None else totals
    sink = RowGrads()
    pattern = Pattern(batch, d)
    out_name = "in_table" if model.out_table is None else "out_table"

    x = _TableInput.apply(model.in_table, pattern, sink, "in_table") + model.in_bias
    with dense_precision(cfg.precision):
        code = model.encode_dense(model.act(x))
        if model.training and cfg.dropout > 0:
            code = F.dropout(code, cfg.dropout)
        hidden = model.decode_hidden(code)
    hidden = hidden.float()

    # Output biases of the positives and the sampled columns: one small gathered leaf.
    bias_rows, bias_local = np.unique(np.concatenate([batch.cols, sample]),
                                      return_inverse=True)
    bias_idx = torch.from_numpy(bias_rows)
    bias = model.out_bias.detach()[bias_idx].requires_grad_()
    sink.add_leaf("out_bias", bias_idx, bias)
    pos_bias = bias[torch.from_numpy(bias_local[:n_pos])]
    samp_bias = bias[torch.from_numpy(bias_local[n_pos:])]

    pos_logit = _TableDot.apply(hidden, model.output_table, pattern, sink, out_name)
    pos_err = (model.out(pos_logit + pos_bias) - 1.0).square().sum()

    s = len(sample)
    samp_rows, samp_local = np.unique(sample, return_inverse=True)
    samp_idx = torch.from_numpy(samp_rows)
    samp_table = model.output_table.detach()[samp_idx].requires_grad_()
    sink.add_leaf(out_name, samp_idx, samp_table)
    with dense_precision(cfg.precision):
        neg_logit = hidden @ samp_table[torch.from_numpy(samp_local)].T
    neg_pred = model.out(neg_logit.float() + samp_bias)  # B x S
    # Sampled columns observed in a row belong to the exact part: mask them out.
    observed = _observed_mask(batch, sample, b)
    neg_sq = neg_pred.square().masked_fill(observed, 0.0).sum() * (d / s)

    masked_mse = pos_err / max(pos_total, 1)
    plain_mse = (pos_err + neg_sq) / (rows_total * d)
    loss = cfg.masked_weight * masked_mse + cfg.plain_weight * plain_mse
    return LossParts(loss, float(masked_mse.detach()), float(plain_mse.detach()), sink)


class LossStep(nn.Module):
    """:func:`batch_loss` as a module holding only the dense parameters, the module
    DistributedDataParallel wraps: DDP all-reduces exactly these gradients. The row
    tables stay outside it (their rows go through RowGrads and
    ``trainer.distributed.average_row_grads``): registered here, DDP would all-reduce
    D-row gradients that are never produced (D x 2048 zeros per step, or a hang)."""

    model: SongAutoEncoder

    def __init__(self, model: SongAutoEncoder) -> None:
        super().__init__()
        self.dense = nn.ParameterList(model.dense_parameters())
        object.__setattr__(self, "model", model)  # not a submodule: its tables stay out

    def forward(self, batch: Batch, sample: np.ndarray,  # type: ignore[override]
                totals: tuple[int, int] | None = None) -> LossParts:
        return batch_loss(self.model, batch, sample, totals)


def _observed_mask(batch: Batch, sample: np.ndarray, b: int) -> torch.Tensor:
    """B x S boolean: is sampled column s observed in row i (every draw of a column)."""
    order = np.argsort(sample, kind="stable")
    sorted_sample = sample[order]
    lo = np.searchsorted(sorted_sample, batch.cols, side="left")
    hi = np.searchsorted(sorted_sample, batch.cols, side="right")
    counts = hi - lo
    hits = counts > 0
    mask = np.zeros((b, len(sample)), dtype=bool)
    if hits.any():
        counts = counts[hits]
        rows = np.repeat(batch.row_of[hits], counts)
        first = np.repeat(lo[hits], counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        mask[rows, order[first + within]] = True
    return torch.from_numpy(mask)


def dense_loss(model: SongAutoEncoder, dense_x: torch.Tensor) -> torch.Tensor:
    """The exact loss with a dense B x D output (reference for tests, tiny data only)."""
    cfg = model.config
    rows, cols = dense_x.nonzero(as_tuple=True)
    offsets = torch.searchsorted(rows, torch.arange(dense_x.shape[0]))
    code = model.encode(cols, offsets)
    hidden = model.decode_hidden(code)
    pred = model.out(hidden @ model.output_table.T + model.out_bias)
    mask = dense_x != 0
    masked = ((pred - dense_x).square() * mask).sum() / mask.sum().clamp(min=1)
    plain = (pred - dense_x).square().mean()
    return cfg.masked_weight * masked + cfg.plain_weight * plain


def _adam_rows(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               rows: torch.Tensor, grad: torch.Tensor, lr: float, beta1: float, beta2: float,
               c1: float, c2: float, wd: float, eps: float) -> None:
    """Adam on the given (unique) rows only: one gather and one scatter per tensor."""
    values = param[rows]
    grad = grad + wd * values
    m = exp_avg[rows] * beta1 + (1 - beta1) * grad
    v = exp_avg_sq[rows] * beta2 + (1 - beta2) * grad * grad
    exp_avg[rows] = m
    exp_avg_sq[rows] = v
    param[rows] = values - (lr / c1) * m / ((v / c2).sqrt() + eps)


class RowSparseAdam:
    """Adam for the D-row tables that reads and writes only the rows a step touched.

    ``batch_loss`` collects the row gradients in a :class:`RowGrads`; after backward,
    :meth:`step` updates those rows only. Bias correction
    uses the global step; L2 weight decay is added to the gradient of touched rows only.
    2-D tables use the numba kernel :func:`trainer.kernels.adam_rows` (one pass at memory
    speed); 1-D tables (biases) and ``fast=False`` use the eager torch version.
    """

    def __init__(self, tables: dict[str, nn.Parameter], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 fast: bool = True) -> None:
        self.tables = tables
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = {k: torch.zeros_like(p) for k, p in tables.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in tables.items()}
        self.steps = 0
        self._kernel: Any = None
        if fast:
            try:  # numba compiles the kernel; without it the eager version serves
                from trainer.kernels import adam_rows

                self._kernel = adam_rows
            except ImportError as exc:
                log.warning("numba unavailable (%s): eager row-sparse Adam (slower)", exc)

    @torch.no_grad()
    def step(self, grads: RowGrads) -> None:
        self.steps += 1
        b1, b2 = self.betas
        c1 = 1 - b1 ** self.steps
        c2 = 1 - b2 ** self.steps
        for name, param in self.tables.items():
            for rows, grad in grads.merged(name):
                self._apply(param.data, name, rows, grad, b1, b2, c1, c2)

    def _apply(self, param: torch.Tensor, name: str, rows: torch.Tensor, grad: torch.Tensor,
               b1: float, b2: float, c1: float, c2: float) -> None:
        m, v = self.exp_avg[name], self.exp_avg_sq[name]
        if self._kernel is not None and param.dim() == 2:
            self._kernel(param.numpy(), m.numpy(), v.numpy(), rows.numpy(),
                         grad.contiguous().numpy(), self.lr, b1, b2, c1, c2, self.wd, self.eps)
        else:
            _adam_rows(param, m, v, rows, grad, self.lr, b1, b2, c1, c2, self.wd, self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg = state["exp_avg"]
        self.exp_avg_sq = state["exp_avg_sq"]
        self.steps = int(state["steps"])
