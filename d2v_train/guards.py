"""What stops pre-training on purpose: a collapsed representation (DATA2VEC.md's guard) after
`guard.collapse_after` updates. Pure: the trainer passes a step's reduced statistics and raises
TrainingStopped with the returned sentence."""
from __future__ import annotations

from d2v_train.config import GuardConfig


def collapse(step: int, target_std: float, pred_std: float, target_rank: float, guard: GuardConfig,
             dim: int) -> str | None:
    """Why the representation counts as collapsed at `step` (the update just made), or None."""
    if step <= guard.collapse_after:
        return None
    if target_std < guard.min_target_std or pred_std < guard.min_pred_std:
        return (f"representation collapse at step {step}: target std {target_std:.4f} "
                f"(min {guard.min_target_std}), prediction std {pred_std:.4f} (min {guard.min_pred_std})")
    if guard.min_target_rank is not None and target_rank < guard.min_target_rank:
        return (f"representation collapse at step {step}: the targets' effective rank is {target_rank:.2f} "
                f"(min {guard.min_target_rank}): they vary along that many of their {dim} directions")
    return None
