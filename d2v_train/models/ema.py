"""The EMA teacher: its own module, outside the student's state, stepped explicitly by the trainer.

Parameters are paired by name with the student's and updated as plain (local) tensors with one
``_foreach_lerp_``, so the same code runs on FSDP2 shards when teacher and student are sharded
alike. Master weights stay fp32; the teacher is always in eval mode and never needs grad.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from d2v_train.models.config import EMAConfig

__all__ = ["ema_tau", "ema_update_", "EMATeacher"]


def ema_tau(step: int, cfg: EMAConfig) -> float:
    """tau rises linearly from tau0 to tau_e over the first tau_n updates, then stays at tau_e."""
    if step >= cfg.tau_n:
        return cfg.tau_e
    return cfg.tau0 + (cfg.tau_e - cfg.tau0) * step / cfg.tau_n


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], tau: float) -> None:
    """teacher <- tau * teacher + (1 - tau) * student, in place, one fused kernel per dtype/device."""
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - tau)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 (DTensor) parameter; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _remove(module: nn.Module, dotted: str) -> None:
    *path, leaf = dotted.split(".")
    parent = module.get_submodule(".".join(path)) if path else module
    delattr(parent, leaf)


class EMATeacher(nn.Module):
    """A frozen fp32 copy of ``student`` minus ``skip`` (names of submodules/parameters the
    teacher does not hold); parameters under ``copy`` prefixes are copied, the rest averaged."""

    def __init__(self, student: nn.Module, *, skip: Iterable[str] = (), copy_prefixes: Iterable[str] = ()):
        super().__init__()
        module = copy.deepcopy(student)
        for name in skip:
            _remove(module, name)
        module.float().requires_grad_(False)
        for p in module.parameters():
            p.grad = None
        self.module = module
        self.copy_prefixes = tuple(f"{p}." for p in copy_prefixes)
        self.train()

    def train(self, mode: bool = True) -> EMATeacher:
        """Always eval: no dropout, no layer drop, whatever the trainer asks."""
        return super().train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, tau: float) -> None:
        """One EMA step towards ``student`` (same parameter names, same sharding)."""
        student_params = dict(student.named_parameters())
        avg_t, avg_s, copy_t, copy_s = [], [], [], []
        for name, t in self.module.named_parameters():
            assert name in student_params, f"teacher parameter {name} has no student counterpart"
            t, s = _local(t), _local(student_params[name])
            if s.dtype != t.dtype:
                s = s.to(t.dtype)
            if name.startswith(self.copy_prefixes):
                copy_t.append(t), copy_s.append(s)
            else:
                avg_t.append(t), avg_s.append(s)
        ema_update_(avg_t, avg_s, tau)
        if copy_t:
            torch._foreach_copy_(copy_t, copy_s)
        student_buffers = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            _local(b).copy_(_local(student_buffers[name]))
