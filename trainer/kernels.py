"""Numba kernels for the memory-bound parts of training.

Adam over the touched rows of a D x width table is one pass over four arrays; written as a
parallel loop it runs at memory speed (measured here: 0.03 s for 23k rows x 2048 against
0.19 s for the torch.compile'd update and 0.61 s for eager torch ops, 2 cores).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def adam_rows(param: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
              rows: np.ndarray, grad: np.ndarray, lr: float, beta1: float, beta2: float,
              c1: float, c2: float, weight_decay: float, eps: float) -> None:  # pragma: no cover
    """In-place Adam (L2 weight decay, bias correction c1/c2) on ``rows`` (unique) of 2-D
    ``param``; ``grad[r]`` is the gradient of row ``rows[r]``."""
    width = param.shape[1]
    step = lr / c1
    inv_c2 = 1.0 / c2
    for r in prange(rows.shape[0]):
        row = rows[r]
        for j in range(width):
            g = grad[r, j] + weight_decay * param[row, j]
            m = beta1 * exp_avg[row, j] + (1.0 - beta1) * g
            v = beta2 * exp_avg_sq[row, j] + (1.0 - beta2) * g * g
            exp_avg[row, j] = m
            exp_avg_sq[row, j] = v
            param[row, j] -= step * m / (np.sqrt(v * inv_c2) + eps)
