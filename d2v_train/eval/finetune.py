"""The fine-tuning loop shared by the tasks: AdamW, a scheduled LR, data-parallel gradients, a curve.

Tasks supply a loss function of (batch, step); whatever they compute without gradients (a frozen
part, or the whole encoder in early updates) simply gets no update.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from d2v_train.config import OptimConfig
from d2v_train.distributed import World
from d2v_train.eval import runtime
from d2v_train.schedules import lr_scale
from schemas.evaluation import CurvePoint


def forever(loader) -> Iterator[dict]:
    """The loader's batches epoch after epoch (each pass is the loader's next epoch)."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the training split yields no batches for this rank (too few samples for the "
                             "batch size and world size?)")


def set_dropout(encoder: nn.Module, *, dropout: float, attention_dropout: float, activation_dropout: float,
                layer_drop: float) -> None:
    """Fine-tuning's regularisation, which differs from pre-training's (fairseq's data2vec audio
    fine-tuning: no dropout or attention dropout, activation dropout 0.1, layer drop 0.05)."""
    from d2v_train.models.transformer import Attention, Block, FeedForward, Transformer

    for module in encoder.modules():
        if isinstance(module, Transformer):
            module.dropout, module.layer_drop = dropout, layer_drop
        elif isinstance(module, Block):
            module.dropout = dropout
        elif isinstance(module, Attention):
            module.dropout = attention_dropout
        elif isinstance(module, FeedForward):
            module.activation_dropout = activation_dropout


def make_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and other 1-D parameters (fairseq, BEiT)."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def fit(module: nn.Module, batches: Iterable[dict], loss_fn: Callable[[dict, int], torch.Tensor], *, steps: int,
        cfg: OptimConfig, world: World, log_every: int = 10, what: str = "fine-tune",
        groups: list[dict] | None = None) -> list[CurvePoint]:
    """`steps` updates of `module` on `batches`; returns the loss curve (rank-averaged losses).
    `groups`: AdamW parameter groups of their own (default: make_optimizer's), each group's LR
    scaled by its "lr_scale" (layer-wise decay)."""
    optimizer = (torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps) if groups
                 else make_optimizer(module, cfg))
    module.train()
    iterator = iter(batches)
    try:
        return _updates(module, iterator, loss_fn, optimizer, steps, cfg, world, log_every, what)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # an endless loader generator: stop its threads now, not at exit
            close()


def _updates(module, iterator, loss_fn, optimizer, steps, cfg, world, log_every, what) -> list[CurvePoint]:
    curve: list[CurvePoint] = []
    started = time.monotonic()
    for step in range(steps):
        lr = cfg.lr * lr_scale(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = loss_fn(next(iterator), step)
        if not torch.isfinite(loss):
            raise ValueError(f"{what}: the loss is {loss.item()} at update {step + 1}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        runtime.average_gradients(module, world)
        if cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], cfg.clip_norm)
        optimizer.step()
        mean_loss = runtime.sum_across([loss.item()], world)[0] / world.size
        curve.append(CurvePoint(step=step + 1, loss=mean_loss, lr=lr))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rate = (step + 1) / max(time.monotonic() - started, 1e-9)
            runtime.log(world, f"{what} {step + 1}/{steps} loss {mean_loss:.4f} lr {lr:.2e} ({rate:.1f} updates/s)")
    if curve and not math.isfinite(curve[-1].loss):
        raise ValueError(f"{what}: the loss diverged")
    return curve
