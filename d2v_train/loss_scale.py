"""fp16's dynamic loss scale. The loss is multiplied by `scale` before backward, so that small
gradients stay above fp16's smallest normal number; the gradients are divided by it again before
the update. An update whose gradients overflowed (a non-finite norm, the same on every rank: it is
all-reduced) is skipped and the scale halved; `window` clean updates in a row double it. The state
is saved in checkpoints, so a resumed run scales exactly as the uninterrupted one."""
from __future__ import annotations

import torch

from d2v_train.config import LossScaleConfig
from d2v_train.guards import TrainingStopped


class LossScaler:
    def __init__(self, cfg: LossScaleConfig) -> None:
        self.cfg = cfg
        self.scale = cfg.init
        self.clean_in_a_row = 0
        self.overflows = 0  # since the run began (saved with the checkpoint)

    def update(self, overflow: bool, step: int) -> None:
        """After update `step`: halve on an overflow, double after `window` clean updates."""
        if overflow:
            self.overflows += 1
            self.clean_in_a_row = 0
            self.scale /= 2
            if self.scale < self.cfg.min:
                raise TrainingStopped(
                    f"fp16 loss scale fell below train.loss_scale.min={self.cfg.min} at step {step} (gradients "
                    f"overflow fp16 even at scale {self.scale * 2:g}); train with train.dtype=bf16 or fp32, or "
                    "lower the learning rate")
            return
        self.clean_in_a_row += 1
        if self.clean_in_a_row % self.cfg.window == 0:
            self.scale *= 2

    def state(self) -> torch.Tensor:
        return torch.tensor([self.scale, self.clean_in_a_row, self.overflows], dtype=torch.float64)

    def load(self, state: torch.Tensor) -> None:
        scale, clean, overflows = state.tolist()
        self.scale, self.clean_in_a_row, self.overflows = scale, int(clean), int(overflows)
