"""One optimizer step of pre-training, in two components the trainer calls in turn:

- `ForwardBackward`: the step's micro-batches through student and teacher, gradients summed,
  and what they add up to reduced over the ranks in one all-reduce (`StepTotals`).
- `OptimizerStep`: the gradients turned into the global mean over masked positions, their norm,
  clipping, the LR schedule, AdamW and the EMA teacher update.

The loss is the sum over every rank's masked positions divided by their all-reduced count (FSDP
reduces plain sums), so 1 rank with grad_accum 2 and 2 ranks with grad_accum 1 make the same update.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from d2v_train.data.batches import Batch
from d2v_train.distributed import all_reduce_sum
from d2v_train.guards import TrainingStopped
from d2v_train.models.ema import ema_tau
from d2v_train.models.loss import std_from_stats
from d2v_train.schedules import lr_scale

# what a step adds up over its micro-batches and then over the ranks (one all-reduce): the loss sum
# and its masked positions, samples, audio seconds (speech) or tokens (text), a SIGTERM flag, the
# targets' effective ranks and how many, the samples lost to skipped bad shards, and the model
# FLOPs of the batches (flops.step_flops)
STEP_TOTALS = ("loss_sum", "masked", "samples", "units", "stop", "rank_sum", "ranks", "lost_samples", "flops")


@dataclass
class StepTotals:
    """A step's forward and backward passes, summed over micro-batches and ranks."""

    loss_sum: float
    masked: float  # masked positions the loss is averaged over
    samples: float
    units: float  # audio seconds (speech) or tokens (text); 0 for images
    stop: bool  # some rank received SIGTERM
    target_rank: float  # mean effective rank of the targets (nan: none measured)
    lost_samples: float  # samples lost to skipped bad shards
    target_std: float
    pred_std: float
    keys: list[str] = field(default_factory=list)  # this rank's samples
    flops: float = 0.0  # model FLOPs of the step's batches, all ranks

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.masked, 1.0)


@dataclass
class StepSummary:
    """One optimizer step, summed over ranks: its metrics record and what the loop needs besides."""

    record: dict  # what metrics.jsonl and the progress line get
    samples: float  # samples trained on in this step (all ranks)
    units: float  # their audio seconds (speech) or tokens (text); 0 for images
    stop: bool  # some rank received SIGTERM: save and leave


class ForwardBackward:
    """Forward and backward of a step's micro-batches on this rank; `units(batch)` measures a batch
    for the throughput rate (the data modality's trained units), `flops(batch)` its model FLOPs."""

    def __init__(self, model: nn.Module, teacher: nn.Module, rank: int, dim: int,
                 units: Callable[[Batch], float], flops: Callable[[Batch], float] = lambda batch: 0.0) -> None:
        self.model, self.teacher, self.rank, self.dim, self.units = model, teacher, rank, dim, units
        self.flops = flops
        self._last_batch: Batch | None = None  # stands in for a batch lost to skipped bad shards

    def __call__(self, batches: list[Batch], stop: bool, loss_scale: float = 1.0) -> StepTotals:
        """`loss_scale`: fp16's; the gradients come out multiplied by it, the totals do not."""
        self.model.train()
        totals = dict.fromkeys(STEP_TOTALS, 0.0)
        target_stats = pred_stats = torch.zeros(1 + 2 * self.dim, dtype=torch.float64)  # std_stats
        keys = []
        real = [batch for batch in batches if batch["keys"]]
        self._last_batch = real[-1] if real else self._last_batch
        for batch in batches:
            totals["lost_samples"] += batch.get("skipped", 0)
            if not batch["keys"]:
                self._stand_in_for_empty(batch, real)
                continue
            out = self.model(batch, self.teacher)
            (out.loss_sum * loss_scale if loss_scale != 1.0 else out.loss_sum).backward()
            totals["loss_sum"] += float(out.loss_sum.detach())
            totals["flops"] += self.flops(batch)
            totals["masked"] += float(out.count)
            target_stats = out.target_stats.detach().cpu() + target_stats
            pred_stats = out.pred_stats.detach().cpu() + pred_stats
            if math.isfinite(rank := float(out.target_rank)):
                totals["rank_sum"] += rank
                totals["ranks"] += 1
            keys += batch["keys"]
            totals["units"] += self.units(batch)
        totals["samples"], totals["stop"] = len(keys), float(stop)
        reduced = all_reduce_sum(torch.cat([torch.tensor(list(totals.values()), dtype=torch.float64),
                                            target_stats, pred_stats]))
        totals = dict(zip(STEP_TOTALS, reduced[:len(STEP_TOTALS)].tolist()))
        target_stats, pred_stats = reduced[len(STEP_TOTALS):].chunk(2)
        return StepTotals(
            loss_sum=totals["loss_sum"], masked=totals["masked"], samples=totals["samples"], units=totals["units"],
            stop=totals["stop"] > 0, target_rank=totals["rank_sum"] / totals["ranks"] if totals["ranks"] else float("nan"),
            lost_samples=totals["lost_samples"], target_std=float(std_from_stats(target_stats)),
            pred_std=float(std_from_stats(pred_stats)), keys=keys, flops=totals["flops"])

    def _stand_in_for_empty(self, batch: Batch, real: list[Batch]) -> None:
        """A batch whose samples all came from skipped bad shards: this rank still runs a forward and
        backward, of a real batch (of this step, else the last one) weighted 0, because FSDP's
        collectives must match across ranks; it adds nothing to the loss or the gradients."""
        stand_in = real[0] if real else self._last_batch
        if stand_in is None:
            raise TrainingStopped(f"rank {self.rank}: every sample of global batch {batch['batch']} (epoch "
                                  f"{batch['epoch']}) came from skipped bad shards, and this process has no earlier "
                                  "batch to keep step with the other ranks")
        out = self.model(stand_in, self.teacher)
        (out.loss_sum * 0.0).backward()


class OptimizerStep:
    """The update after a step's backward passes. `model.student` is what the EMA teacher follows."""

    def __init__(self, model: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, cfg) -> None:
        self.model, self.teacher, self.optimizer, self.cfg = model, teacher, optimizer, cfg  # cfg: TrainConfig

    def schedule(self, step: int) -> tuple[float, float]:
        """(learning rate, EMA decay) of update `step` (0-based)."""
        cfg = self.cfg
        return cfg.optim.lr * lr_scale(step, cfg.train.max_steps, cfg.optim), ema_tau(step, cfg.model.ema)

    def mean_gradients(self, masked: float, loss_scale: float = 1.0) -> tuple[list[nn.Parameter], torch.Tensor, float]:
        """Turn the summed gradients (of a loss times `loss_scale`) into the global mean over `masked`
        positions; returns the parameters with gradients, their total norm (a tensor, for
        clipping) and its value (non-finite where a scaled gradient overflowed)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        for param in params:
            param.grad.div_(max(masked, 1.0) * loss_scale)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return params, norm, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def apply(self, params: list[nn.Parameter], norm: torch.Tensor, lr: float, tau: float) -> None:
        """Clip, step AdamW at `lr`, clear the gradients, move the teacher towards the student."""
        if self.cfg.optim.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.clip_norm, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update(self.model.student, tau)

    def discard(self) -> None:
        """Leave this step's gradients out (a skipped update)."""
        self.optimizer.zero_grad(set_to_none=True)
