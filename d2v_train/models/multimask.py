"""data2vec 2.0's multi-mask bookkeeping: M clones per sample, their masks, and moving between the
full sequence and the kept positions the student encodes. Pure functions.

Clone m of sample b is row b * M + m (``repeat_interleave``), for inputs and targets alike.
Rows may keep different numbers of positions (padding, masks): the kept sequence is as long as
the longest row's and shorter rows end in padding slots.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from d2v_train.models.config import MultiMaskConfig
from pipelines.masking import (
    compute_inverse_block_masks,
    compute_inverse_block_masks_1d,
)

__all__ = ["Kept", "clone", "draw_clone_masks", "keep_index", "gather_kept", "restore", "pad_front"]


class Kept(NamedTuple):
    index_NK: torch.Tensor  # original position of each kept slot, ascending per row
    padding_NK: torch.Tensor  # True = a padding slot (its row kept fewer positions)


def clone(x: torch.Tensor, clones: int) -> torch.Tensor:
    """Each sample's ``clones`` copies next to each other along dim 0."""
    return x if clones == 1 else x.repeat_interleave(clones, dim=0)


def draw_clone_masks(cfg: MultiMaskConfig, lengths_B, width: int, clones: int, rng: np.random.Generator, *,
                     grid: tuple[int, int] | None = None, skip_ends: bool = False) -> torch.Tensor:
    """bool (B * clones, width), True = masked, independently per clone; positions at or past a
    sample's length are never masked. ``skip_ends``: never the first and last position (<s>, </s>)."""
    lengths_N = np.repeat(np.asarray(lengths_B, dtype=np.int64), clones)
    if cfg.kind == "inverse_block_2d":
        if grid is None or grid[0] * grid[1] != width or np.any(lengths_N != width):
            raise ValueError(f"inverse_block_2d masks need a full {grid} grid of {width} positions")
        mask = compute_inverse_block_masks(lengths_N.size, rng, grid=grid, mask_prob=cfg.mask_prob,
                                           block_size=cfg.block_size, mask_prob_adjust=cfg.mask_prob_adjust)
        return torch.from_numpy(mask)
    start = 1 if skip_ends else 0
    inner_N = np.maximum(lengths_N - 2 * start, 0)
    inner = compute_inverse_block_masks_1d(inner_N, rng, mask_prob=cfg.mask_prob, block_size=cfg.block_size,
                                           mask_prob_adjust=cfg.mask_prob_adjust, inverse=cfg.inverse)
    mask = np.zeros((lengths_N.size, width), dtype=bool)
    mask[:, start:start + inner.shape[1]] = inner[:, : width - start]
    return torch.from_numpy(mask)


def keep_index(drop_NT: torch.Tensor) -> Kept:
    """The positions not in ``drop_NT`` (masked or padded), in order, packed to the left."""
    count_N = (~drop_NT).sum(1)
    width = int(count_N.max()) if drop_NT.shape[0] else 0
    order_NT = torch.argsort(drop_NT.to(torch.uint8), dim=1, stable=True)  # kept (0) first, in order
    index_NK = order_NT[:, :width]
    padding_NK = torch.arange(width, device=drop_NT.device) >= count_N[:, None]
    return Kept(index_NK, padding_NK)


def gather_kept(x_NTD: torch.Tensor, kept: Kept) -> torch.Tensor:
    """(N, K, D) rows of the kept positions (padding slots hold some dropped row: ignore them)."""
    return x_NTD.gather(1, kept.index_NK[..., None].expand(-1, -1, x_NTD.shape[-1]))


def restore(x_NKD: torch.Tensor, kept: Kept, fill_NTD: torch.Tensor) -> torch.Tensor:
    """``fill_NTD`` with the kept slots' rows put back at their original positions."""
    real_NK = ~kept.padding_NK
    rows_R = torch.arange(x_NKD.shape[0], device=x_NKD.device)[:, None].expand_as(real_NK)[real_NK]
    return fill_NTD.index_put((rows_R, kept.index_NK[real_NK]), x_NKD[real_NK])


def pad_front(mask_NS: torch.Tensor, extra: int) -> torch.Tensor:
    """A mask over the content positions -> one over the encoder's, with ``extra`` leading tokens
    (CLS) that are never masked."""
    return F.pad(mask_NS, (extra, 0), value=False) if extra else mask_NS
