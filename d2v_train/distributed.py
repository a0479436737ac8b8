"""Process group set-up and FSDP2 wrapping: the same code for one CPU process and many GPUs."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from d2v_train.launch import is_loopback


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun job (or start a one-process group): gloo on CPU, nccl on GPU."""
    alone = "RANK" not in os.environ  # plain `python d2v_train/main.py`: a group of one
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        # nothing to rendezvous with: an in-memory store instead of a TCP one on every interface, and
        # gloo's own socket on the loopback interface (no listener reachable from another machine)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    elif is_loopback(os.environ.get("MASTER_ADDR")):
        # a one-machine job (`python -m d2v_train.launch --standalone`): gloo's peers are all here
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    _die_with_launcher()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if alone:
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def _loopback_interface() -> str:
    """The name of the interface that carries 127.0.0.1 ('lo' on Linux, 'lo0' on macOS)."""
    try:
        import psutil

        for name, addresses in psutil.net_if_addrs().items():
            if any(a.address == "127.0.0.1" for a in addresses):
                return name
    except ImportError:
        pass
    return "lo0" if sys.platform == "darwin" else "lo"


def _die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own: when torchrun itself is killed (SIGKILL,
    the OOM killer), its workers would otherwise train on as orphans, racing a restarted job for the
    same checkpoints. On Linux, have the kernel kill this worker when its launcher dies."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(module: nn.Module, blocks: list[nn.Module], *, dtype: str, reshard_after_forward: bool = True,
          sum_gradients: bool = False) -> None:
    """fully_shard each Transformer block, then the root (FSDP2's recommended grouping).

    `sum_gradients`: reduce-scatter plain sums (no division by the world size) in every FSDP unit,
    for a loss that the caller normalises by a global count itself.
    """
    # A Transformer Block returns its FFN output for the teacher's targets; nn.Linear on (B, T, D)
    # makes it a view, which FSDP2 warns about since an in-place op on it would skip the pre-backward
    # hook. Nothing writes to it in place (the teacher reads it under no_grad, the student drops it).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor",
                            category=UserWarning)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if sum_gradients:
        # The divide factor is per FSDP unit (setting it on the root leaves the blocks averaging);
        # factor 1.0 alone becomes ReduceOp.PREMUL_SUM, which gloo lacks: force a plain SUM.
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)


def prepare_blocks(blocks: list[nn.Module], *, checkpointing: bool = False, compile: bool = False) -> None:
    """Activation checkpointing, then per-block compile, in place; call before `shard` (torchtitan's
    order AC -> compile -> FSDP: compile then traces the recompute, FSDP's hooks stay outside the graph).

    The composable `checkpoint` hooks the module itself instead of wrapping it, so parameter names
    (which the EMA teacher pairs by, and checkpoints are keyed by) do not change.
    """
    from torch.distributed._composable import checkpoint

    for block in blocks:
        if checkpointing:
            checkpoint(block)
        if compile:
            block.compile()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
