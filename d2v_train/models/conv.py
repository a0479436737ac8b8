"""Grouped 1-D convolutions on CPU: the same conv as a Conv2d over a (B, C, 1, T) view.

Same weights and arithmetic as ``nn.Conv1d``; forward + backward about 1.6x faster on CPU, where
the grouped Conv1d's backward is the slow part (speech's positional conv, data2vec 2.0's decoder,
both run once per clone). Results differ from Conv1d's in the last bits (summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv1d_via_2d"]


def conv1d_via_2d(conv: nn.Conv1d, x_BCT: torch.Tensor) -> torch.Tensor:
    """``conv(x_BCT)`` for a stride-1 ``nn.Conv1d`` with numeric padding, computed as a Conv2d."""
    (padding,), (dilation,) = conv.padding, conv.dilation
    y_BC1T = F.conv2d(x_BCT[:, :, None], conv.weight[:, :, None], conv.bias, stride=(1, conv.stride[0]),
                      padding=(0, padding), dilation=(1, dilation), groups=conv.groups)
    return y_BC1T[:, :, 0]
