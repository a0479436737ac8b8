"""What stops or skips a pre-training step on purpose: a non-finite loss or gradient norm
(`guard.nonfinite`: stop, or skip the update) and a collapsed representation (DATA2VEC.md's guard)
after `guard.collapse_after` updates. The rules are pure functions; `StepGuard` is the trainer's
component that applies them and raises TrainingStopped with the sentence they return."""
from __future__ import annotations

import math
from collections.abc import Callable

from d2v_train.config import GuardConfig


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, collapse): the message says why."""


def nonfinite(loss: float, grad_norm: float) -> bool:
    """A step whose update would poison the weights."""
    return not (math.isfinite(loss) and math.isfinite(grad_norm))


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


class StepGuard:
    """The guards of one run. `last_good` names the newest complete checkpoint (or None), asked
    only when a run stops, so that the message says where to resume from."""

    def __init__(self, guard: GuardConfig, dim: int, last_good: Callable[[], str | None]) -> None:
        self.guard, self.dim, self.last_good = guard, dim, last_good
        self.skipped_in_a_row = 0  # counted since this process started (a resume starts again at 0)

    def skips(self, step: int, loss: float, grad_norm: float, masked: float) -> bool:
        """Whether update `step` is left out: a non-finite one (unless guard.nonfinite stops the run),
        or one with no masked position (every batch of the step lost to skipped bad shards). More
        than guard.max_skipped_steps in a row stop the run: it is no longer training."""
        bad = nonfinite(loss, grad_norm)
        if bad and self.guard.nonfinite == "stop":
            raise TrainingStopped(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; the "
                                  f"last good checkpoint is {self.last_good() or 'none (none was saved)'}")
        skipped = bad or masked == 0
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        cap = self.guard.max_skipped_steps
        if cap is not None and self.skipped_in_a_row > cap:
            why = "non-finite losses or gradients" if bad else "no masked position (batches lost to bad shards)"
            raise TrainingStopped(f"{self.skipped_in_a_row} steps in a row skipped up to step {step} ({why}), more "
                                  f"than guard.max_skipped_steps={cap}; the last good checkpoint is "
                                  f"{self.last_good() or 'none (none was saved)'}")
        return skipped

    def check_collapse(self, step: int, target_std: float, pred_std: float, target_rank: float) -> None:
        why = collapse(step, target_std, pred_std, target_rank, self.guard, self.dim)
        if why:
            raise TrainingStopped(f"{why}; the last good checkpoint is {self.last_good() or 'none'}")
