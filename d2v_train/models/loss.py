"""data2vec regression loss and the collapse-guard statistics. Pure functions.

The loss comes back as (sum, count): ranks mask different numbers of positions, so the trainer
divides the local sum by the all-reduced count (DATA2VEC.md section 1.5), not by world size.
The variance statistics are likewise sums that can be all-reduced before ``std_from_stats``.
The per-channel std cannot see a collapse in which the channels become copies of each other
(instance-normed targets keep unit variance per channel whatever their correlation); the
effective rank of the targets does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2v_train.models.config import ObjectiveConfig

__all__ = ["effective_rank", "masked_std", "position_losses", "regression_loss", "std_from_stats", "std_stats"]


def position_losses(pred_ND: torch.Tensor, target_ND: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """(N,) fp32 loss per position: L2 or SmoothL1(beta) summed over channels, times ``loss_scale``
    (default 1/sqrt(D) for L2, 1 for SmoothL1)."""
    pred_ND, target_ND = pred_ND.float(), target_ND.float()
    if cfg.loss == "l2":
        per_ND = F.mse_loss(pred_ND, target_ND, reduction="none")
    else:
        per_ND = F.smooth_l1_loss(pred_ND, target_ND, reduction="none", beta=cfg.loss_beta)
    scale = cfg.loss_scale
    if scale is None:
        scale = 1.0 / math.sqrt(pred_ND.shape[-1]) if cfg.loss == "l2" else 1.0
    return per_ND.sum(-1) * scale


def regression_loss(pred_ND: torch.Tensor, target_ND: torch.Tensor,
                    cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``position_losses`` as (sum over positions, number of positions), fp32."""
    count = torch.tensor(float(pred_ND.shape[0]), device=pred_ND.device)
    return position_losses(pred_ND, target_ND, cfg).sum(), count


def std_stats(y_ND: torch.Tensor) -> torch.Tensor:
    """[count, sum_D..., sum_sq_D...]: all-reduce it (SUM), then ``std_from_stats``. fp64, so
    that the sum-of-squares form does not cancel badly over millions of positions."""
    y_ND = y_ND.detach().double()
    count = torch.tensor([float(y_ND.shape[0])], dtype=torch.float64, device=y_ND.device)
    return torch.cat([count, y_ND.sum(0), y_ND.square().sum(0)])


def std_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the (unbiased) std across positions, sqrt(var + 1e-6) as the reference."""
    n, rest = stats[0], stats[1:]
    s_D, ss_D = rest.chunk(2)
    var_D = (ss_D - s_D.square() / n) / (n - 1).clamp_min(1.0)
    return torch.sqrt(var_D.clamp_min(0.0) + 1e-6).mean().float()


def masked_std(y_ND: torch.Tensor) -> torch.Tensor:
    """Local (single-process) value of the collapse-guard statistic."""
    return std_from_stats(std_stats(y_ND))


def effective_rank(y_ND: torch.Tensor, max_rows: int = 2048) -> torch.Tensor:
    """exp(entropy of the normalised eigenvalues of the rows' covariance): ~D for rows spread over
    all D directions, ~1 when they vary along one. Up to ``max_rows`` evenly spaced rows, fp32.
    NaN when it is undefined (fewer than two rows, non-finite values): a diagnostic never fails a step."""
    nan = torch.tensor(float("nan"), device=y_ND.device)
    y_ND = y_ND.detach()
    if y_ND.shape[0] > max_rows:
        y_ND = y_ND[:: -(-y_ND.shape[0] // max_rows)]
    if y_ND.shape[0] < 2 or not bool(torch.isfinite(y_ND).all()):
        return nan
    y_ND = y_ND.float() - y_ND.float().mean(0)
    y_ND = y_ND / y_ND.abs().max().clamp_min(1e-30)  # scale-free: no overflow in the covariance
    try:
        eig_D = torch.linalg.eigvalsh(y_ND.T @ y_ND).clamp_min(0.0)
    except torch.linalg.LinAlgError:
        return nan
    p_D = eig_D / eig_D.sum().clamp_min(1e-12)
    return torch.exp(-(p_D * p_D.clamp_min(1e-12).log()).sum())
