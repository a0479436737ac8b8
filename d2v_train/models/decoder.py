"""data2vec 2.0's convolutional decoder: from the student's kept outputs, with small noise in the
masked slots, it predicts the teacher's targets at every position (the loss keeps the masked
ones). 1-D over time (speech, text) or 2-D over the patch grid (images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.models.config import DecoderConfig
from d2v_train.models.conv import conv1d_via_2d

__all__ = ["ConvDecoder"]


class ConvDecoder(nn.Module):
    """``layers`` x (Conv, kernel ``k``, same length -> LayerNorm over channels without affine ->
    GELU), each after the first added to its input; then Linear(decoder dim -> encoder dim)."""

    def __init__(self, cfg: DecoderConfig, dim: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.grid = tuple(grid) if grid is not None else None
        conv = nn.Conv1d if grid is None else nn.Conv2d
        if dim % cfg.groups:
            raise ValueError(f"data2vec2.decoder.groups: {cfg.groups} does not divide encoder.dim {dim}")
        self.convs = nn.ModuleList(
            conv(dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups)
            for i in range(cfg.layers))
        self.proj = nn.Linear(cfg.dim, dim)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, D); for 2-D, T is the grid's H * W in row-major order."""
        N, T, D = x_NTD.shape
        if self.grid is None:
            x = x_NTD.transpose(1, 2)
        else:
            H, W = self.grid
            if H * W != T:
                raise ValueError(f"decoder: {T} positions do not fill the {H}x{W} grid")
            x = x_NTD.transpose(1, 2).reshape(N, D, H, W)
        for i, conv in enumerate(self.convs):
            y = conv(x) if self.grid is not None else conv1d_via_2d(conv, x)
            y = F.gelu(F.layer_norm(y.movedim(1, -1), y.shape[1:2]).movedim(-1, 1))
            x = y if i == 0 else x + y
        return self.proj(x.flatten(2).transpose(1, 2))
