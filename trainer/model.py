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

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

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
    """A B x U sparsity pattern (row-major positives) and its transpose, as CSR index
    tensors, so that both S @ dense and S^T @ dense run as sparse kernels."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> None:
        self.shape = (n_rows, n_cols)
        self.crow = torch.from_numpy(_crow(rows, n_rows))
        self.col = torch.from_numpy(cols.astype(np.int64))
        order = np.argsort(cols, kind="stable")
        self.perm = torch.from_numpy(order)
        self.crow_t = torch.from_numpy(_crow(cols[order], n_cols))
        self.col_t = torch.from_numpy(rows[order].astype(np.int64))

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape,
                                       check_invariants=False)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm],
                                       self.shape[::-1], check_invariants=False)


def _crow(sorted_rows: np.ndarray, n_rows: int) -> np.ndarray:
    crow = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_rows, minlength=n_rows), out=crow[1:])
    return crow


class _SparseTimesDense(torch.autograd.Function):
    """(S @ dense) for a constant 0/1 pattern S; the gradient S^T @ g is a sparse kernel
    too, so no nnz x width tensor is ever materialised."""

    @staticmethod
    def forward(ctx: Any, dense: torch.Tensor, pattern: Pattern,  # type: ignore[override]
                ones: torch.Tensor) -> torch.Tensor:
        ctx.pattern, ctx.ones = pattern, ones
        return pattern.matrix(ones) @ dense

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return ctx.pattern.matrix_t(ctx.ones) @ grad.contiguous(), None, None


class _SampledDot(torch.autograd.Function):
    """values[n] = a[row n] . b[col n] over a pattern (SDDMM), with sparse-kernel grads."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                pattern: Pattern) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.pattern = pattern
        mask = pattern.matrix(torch.zeros(len(pattern.col), dtype=a.dtype))
        return torch.sparse.sampled_addmm(mask, a, b.T, beta=0.0).values()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad = grad.contiguous()
        grad_a = pattern.matrix(grad) @ b if ctx.needs_input_grad[0] else None
        grad_b = pattern.matrix_t(grad) @ a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


@dataclass
class LossParts:
    loss: torch.Tensor
    masked_mse: float
    plain_mse: float


def batch_loss(model: SongAutoEncoder, batch: Batch, sample: np.ndarray,
               gathered: dict[str, torch.Tensor] | None = None) -> LossParts:
    """The write-up's loss on one batch, with the sampled estimate of the zero part.

    ``gathered`` receives the touched rows of the row tables as dense leaf tensors (for
    :class:`RowSparseAdam`); when None the full tables take part in autograd directly.
    """
    cfg = model.config
    d = cfg.input_dim
    b = batch.size
    n_pos = len(batch.cols)
    # Local column spaces: the input layer sees the positives' columns, the output layer
    # the positives' and the sampled columns. The tied model uses one space for both.
    out_cols, out_local = np.unique(np.concatenate([batch.cols, sample]), return_inverse=True)
    if model.out_table is None:
        in_cols, in_local = out_cols, out_local[:n_pos]
    else:
        in_cols, in_local = np.unique(batch.cols, return_inverse=True)
    pos_local, samp_local = out_local[:n_pos], torch.from_numpy(out_local[n_pos:])
    in_idx, out_idx = torch.from_numpy(in_cols), torch.from_numpy(out_cols)

    def rows_of(table: torch.Tensor, idx: torch.Tensor, name: str) -> torch.Tensor:
        if gathered is None:
            return table[idx]
        leaf = table.detach()[idx].requires_grad_()
        gathered[name], gathered[name + ".rows"] = leaf, idx
        return leaf

    in_rows = rows_of(model.in_table, in_idx, "in_table")
    if model.out_table is None:
        out_rows = in_rows
    else:
        out_rows = rows_of(model.out_table, out_idx, "out_table")
    out_bias = rows_of(model.out_bias, out_idx, "out_bias")

    in_pattern = Pattern(batch.row_of, in_local, b, len(in_cols))
    ones = torch.ones(n_pos)
    x = _SparseTimesDense.apply(in_rows, in_pattern, ones) + model.in_bias
    code = model.encode_dense(model.act(x))
    if model.training and cfg.dropout > 0:
        code = F.dropout(code, cfg.dropout)
    hidden = model.decode_hidden(code)

    out_pattern = Pattern(batch.row_of, pos_local, b, len(out_cols))
    pos_logit = _SampledDot.apply(hidden, out_rows, out_pattern) + out_bias[
        torch.from_numpy(pos_local)]
    pos_err = (model.out(pos_logit) - 1.0).square().sum()

    s = len(sample)
    neg_pred = model.out(hidden @ out_rows[samp_local].T + out_bias[samp_local])  # B x S
    # Sampled columns observed in a row belong to the exact part: mask them out.
    observed = _observed_mask(batch, sample, b)
    neg_sq = neg_pred.square().masked_fill(observed, 0.0).sum() * (d / s)

    masked_mse = pos_err / max(n_pos, 1)
    plain_mse = (pos_err + neg_sq) / (b * d)
    loss = cfg.masked_weight * masked_mse + cfg.plain_weight * plain_mse
    return LossParts(loss, float(masked_mse.detach()), float(plain_mse.detach()))


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


class RowSparseAdam:
    """Adam for the D-row tables that reads and writes only the rows a step touched.

    The caller gathers the touched rows into dense leaf tensors (``batch_loss`` with
    ``gathered``), runs backward, then calls :meth:`step` with that dict. Bias correction
    uses the global step; L2 weight decay is added to the gradient of touched rows only.
    """

    def __init__(self, tables: dict[str, nn.Parameter], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.tables = tables
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = {k: torch.zeros_like(p) for k, p in tables.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in tables.items()}
        self.steps = 0

    @torch.no_grad()
    def step(self, gathered: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        b1, b2 = self.betas
        c1 = 1 - b1 ** self.steps
        c2 = 1 - b2 ** self.steps
        for name, param in self.tables.items():
            leaf = gathered.get(name)
            if leaf is None or leaf.grad is None:
                continue
            rows = gathered[name + ".rows"]
            grad = leaf.grad
            values = leaf.detach()
            if self.wd:
                grad = grad.add(values, alpha=self.wd)
            m = self.exp_avg[name].index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)
            v = self.exp_avg_sq[name].index_select(0, rows).mul_(b2).addcmul_(
                grad, grad, value=1 - b2)
            self.exp_avg[name].index_copy_(0, rows, m)
            self.exp_avg_sq[name].index_copy_(0, rows, v)
            denom = v.div_(c2).sqrt_().add_(self.eps)
            param.index_copy_(0, rows, values.addcdiv(m, denom, value=-self.lr / c1))

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg = state["exp_avg"]
        self.exp_avg_sq = state["exp_avg_sq"]
        self.steps = int(state["steps"])
