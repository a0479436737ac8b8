"""Position information without learned tables over the sequence: ALiBi attention biases (audio)
and fixed 2-D sin-cos embeddings (images), as data2vec 2.0 uses them. Pure functions.

Both are defined by each position's original index, so they stay right when masked positions
are dropped from the sequence: pass the kept positions' indices.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["alibi_slopes", "alibi_bias", "sincos_2d"]


def alibi_slopes(heads: int) -> torch.Tensor:
    """(heads,) geometric slopes 2^(-8 i / n), i = 1..n, for n a power of two; otherwise those of
    the next lower power of two, then every other slope of the next higher one (ALiBi's rule)."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(lower)
    if lower < heads:
        slopes += power_of_two(2 * lower)[0::2][: heads - lower]
    return torch.tensor(slopes)


def alibi_bias(positions_NT: torch.Tensor, scale_H: torch.Tensor) -> torch.Tensor:
    """(N, H, T, T) additive bias -scale_h * slope_h * |p_i - p_j| between the positions'
    original indices ``positions_NT`` (symmetric: an encoder looks both ways)."""
    slopes_H = alibi_slopes(scale_H.shape[0]).to(scale_H.device, scale_H.dtype) * scale_H
    distance_NTT = (positions_NT[:, :, None] - positions_NT[:, None, :]).abs().to(scale_H.dtype)
    return -slopes_H[None, :, None, None] * distance_NTT[:, None]


@lru_cache(maxsize=8)  # fixed per (grid, dim): built once, never written to
def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(H*W, dim) fixed embedding, row-major over the grid: half the channels encode the row, half
    the column, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4)) (MAE's)."""
    if dim % 4:
        raise ValueError(f"encoder.dim: the 2-D sin-cos embedding needs a multiple of 4, got {dim}")
    H, W = grid
    quarter = dim // 4
    omega_K = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows_P, cols_P = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                    indexing="ij")

    def encode(p_P: torch.Tensor) -> torch.Tensor:
        angle_PK = p_P.flatten()[:, None] * omega_K[None, :]
        return torch.cat([angle_PK.sin(), angle_PK.cos()], dim=1)

    return torch.cat([encode(rows_P), encode(cols_P)], dim=1).float()
