"""The sparse autoencoder loss and optimizer against their dense definitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from trainer.model import (
    ModelConfig,
    RowSparseAdam,
    SongAutoEncoder,
    batch_loss,
    dense_loss,
    make_batch,
)


def _random_rows(rng: np.random.Generator, b: int, d: int, per_row: int) -> sp.csr_matrix:
    rows = [np.unique(rng.integers(0, d, rng.integers(1, per_row))) for _ in range(b)]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    data = np.ones(indptr[-1], dtype=np.float32)
    return sp.csr_matrix((data, np.concatenate(rows), indptr), shape=(b, d))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("activation", ["selu", "relu"])
def test_sampled_loss_is_unbiased_estimate_of_dense_loss(tied: bool, activation: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d, b = 60, 8
    cfg = ModelConfig(input_dim=d, hidden=(16, 8), activation=activation, tied=tied,
                      dropout=0.0, negative_samples=20)
    model = SongAutoEncoder(cfg).eval()
    x = _random_rows(rng, b, d, 10)
    batch = make_batch(x.indptr, x.indices)
    exact = float(dense_loss(model, torch.from_numpy(x.toarray())).detach())
    estimates = [float(batch_loss(model, batch, rng.integers(0, d, 20)).loss)
                 for _ in range(600)]
    mean, sem = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * sem + 1e-6, (mean, exact, sem)
    # Sampling every column once gives the exact value (no estimate left).
    full = float(batch_loss(model, batch, np.arange(d)).loss)
    assert full == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_row_gradients_match_dense_autograd(tied: bool) -> None:
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    d, b = 40, 6
    cfg = ModelConfig(input_dim=d, hidden=(12, 6), tied=tied, dropout=0.0,
                      negative_samples=d)
    model = SongAutoEncoder(cfg).eval()
    x = _random_rows(rng, b, d, 8)
    # With every column sampled once the sparse loss equals the dense one exactly, so the
    # gradients must agree too.
    parts = batch_loss(model, make_batch(x.indptr, x.indices), np.arange(d))
    parts.loss.backward()
    sparse_grads = {name: torch.zeros_like(p) for name, p in
                    [("in_table", model.in_table), ("out_bias", model.out_bias)]
                    + ([] if tied else [("out_table", model.out_table)])}
    for name, grad in sparse_grads.items():
        for rows, piece in parts.row_grads.merged(name):
            assert len(torch.unique(rows)) == len(rows)
            grad[rows] += piece
    dense_layer_grads = [p.grad.clone() for p in model.dense_parameters()]
    model.zero_grad()
    dense_loss(model, torch.from_numpy(x.toarray())).backward()
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(grad, getattr(model, name).grad, rtol=1e-4, atol=1e-6)
    for got, p in zip(dense_layer_grads, model.dense_parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_row_sparse_adam_equals_dense_adam_on_touched_rows(fast: bool) -> None:
    torch.manual_seed(2)
    table = torch.nn.Parameter(torch.randn(30, 5))
    reference = torch.nn.Parameter(table.detach().clone())
    opt = RowSparseAdam({"t": table}, lr=0.01, weight_decay=0.001, fast=fast)
    ref_opt = torch.optim.Adam([reference], lr=0.01, weight_decay=0.001)
    rows = torch.arange(30)  # every row touched: lazy Adam equals dense Adam
    from trainer.model import RowGrads

    for _ in range(4):
        grad = torch.randn(30, 5)
        sink = RowGrads()
        sink.add("t", rows, grad.clone())
        opt.step(sink)
        reference.grad = grad
        ref_opt.step()
    torch.testing.assert_close(table.detach(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_untouched_rows_and_state_do_not_move() -> None:
    table = torch.nn.Parameter(torch.randn(10, 4))
    before = table.detach().clone()
    opt = RowSparseAdam({"t": table}, lr=0.1, weight_decay=0.1)
    from trainer.model import RowGrads

    sink = RowGrads()
    sink.add("t", torch.tensor([2, 5]), torch.ones(2, 4))
    opt.step(sink)
    moved = (table.detach() != before).any(dim=1)
    assert moved.tolist() == [i in (2, 5) for i in range(10)]
    assert not opt.exp_avg["t"][[0, 1, 3]].any()


def test_training_lowers_loss_and_is_deterministic(tiny_split, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from trainer.train import PRESETS, TrainConfig, Trainer

    def run(work: str) -> list[float]:
        (tmp_path / work).mkdir()
        cfg = TrainConfig(**{**PRESETS["tiny"], "epochs": 3, "val_every": 10})
        trainer = Trainer(tiny_split, tmp_path / work, cfg)
        trainer.validation = None
        trainer.fit()
        return [h["loss"] for h in trainer.history]

    first, second = run("a"), run("b")
    assert first == second
    assert first[-1] < first[0]
