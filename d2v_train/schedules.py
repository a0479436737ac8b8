"""Learning-rate schedules of DATA2VEC.md as pure functions of the step (multipliers of the peak)."""
from __future__ import annotations

import math

from d2v_train.config import OptimConfig


def lr_scale(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """tri_stage: linear warm-up, hold, exponential decay to final_lr_scale (fairseq's tri-stage);
    cosine: linear warm-up then cosine to final_lr_scale; constant: warm-up then 1."""
    warmup = int(cfg.warmup * max_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return cfg.final_lr_scale + (1 - cfg.final_lr_scale) * 0.5 * (1 + math.cos(math.pi * progress))
    hold = int(cfg.hold * max_steps)
    decay = max(1, max_steps - warmup - hold)
    if step < warmup + hold:
        return 1.0
    progress = min(1.0, (step - warmup - hold) / decay)
    return math.exp(math.log(max(cfg.final_lr_scale, 1e-12)) * progress)
