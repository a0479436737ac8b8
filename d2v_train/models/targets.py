"""data2vec targets: normalise each of the teacher's top-K layer outputs without learned
parameters, average them, optionally normalise again, keep the masked positions. Pure functions.

Everything runs in fp32 whatever the teacher's compute dtype (as the reference does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from d2v_train.models.config import ObjectiveConfig

__all__ = ["instance_norm", "layer_norm", "build_targets", "select_masked"]

EPS = 1e-5  # the reference's F.instance_norm / F.layer_norm default


def instance_norm(y_BTD: torch.Tensor, padding_BT: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """Normalise each channel over time, per sample; padded frames neither count nor keep a
    value (they become 0), so a row's targets do not depend on how much padding it got."""
    if padding_BT is None:
        return F.instance_norm(y_BTD.transpose(1, 2), eps=eps).transpose(1, 2)
    keep_BT1 = (~padding_BT)[..., None].to(y_BTD.dtype)
    n_B11 = keep_BT1.sum(1, keepdim=True).clamp_min(1.0)
    mean_B1D = (y_BTD * keep_BT1).sum(1, keepdim=True) / n_B11
    centred_BTD = (y_BTD - mean_B1D) * keep_BT1
    var_B1D = centred_BTD.square().sum(1, keepdim=True) / n_B11
    return centred_BTD * torch.rsqrt(var_B1D + eps)


def layer_norm(y_BTD: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return F.layer_norm(y_BTD, y_BTD.shape[-1:], eps=eps)


def build_targets(layers: Sequence[torch.Tensor], padding_BT: torch.Tensor | None,
                  cfg: ObjectiveConfig) -> torch.Tensor:
    """Top-K teacher outputs (each (B, T, D)) -> the (B, T, D) fp32 regression target."""
    assert layers, "no teacher layers to build targets from"
    total_BTD = None
    for y_BTD in layers:
        y_BTD = y_BTD.float()
        if cfg.instance_norm_targets:
            y_BTD = instance_norm(y_BTD, padding_BT)
        if cfg.layer_norm_targets:
            y_BTD = layer_norm(y_BTD)
        total_BTD = y_BTD if total_BTD is None else total_BTD + y_BTD
    y_BTD = total_BTD / len(layers)
    if cfg.final_norm == "layer":
        y_BTD = layer_norm(y_BTD)
    elif cfg.final_norm == "instance":
        y_BTD = instance_norm(y_BTD, padding_BT)
    return y_BTD


def select_masked(y_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(N, D) rows at the masked positions, in (batch, time) order."""
    return y_BTD[mask_BT]
