"""One process or a torchrun job, alike: sums across ranks, averaged gradients, the result on rank 0.

Fine-tuning is data parallel with full replicas (evaluation models are small next to their
pre-training); every rank builds the same initial weights from the same seed.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from d2v_train.distributed import World, close_world, init_world
from pipelines.storage import Location, write_atomic
from schemas.evaluation import EvalResult


def start() -> World:
    """The torchrun job's world when launched by torchrun, else a group-less single process."""
    if "RANK" in os.environ:
        return init_world()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return World(0, 1, device)


def stop() -> None:
    close_world()


def sum_across(values: list[float], world: World) -> list[float]:
    """Element-wise sums over ranks (float64: exact for counts far beyond any dataset)."""
    if world.size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value, world: World) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def average_gradients(module: nn.Module, world: World) -> None:
    """All-reduce the gradients of trainable parameters as one flat buffer, then divide by ranks.
    Every rank freezes the same parameters at the same step, so the buffers line up."""
    if world.size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def emit(result: EvalResult, out: str | None, world: World, *, as_json: bool = False) -> None:
    """Rank 0 prints a one-line summary (or, with `as_json`, the whole result as one JSON line)
    and publishes the whole result at `out` (any fsspec URL)."""
    if not world.main:
        return
    if as_json:
        print(result.model_dump_json(), flush=True)
    else:
        from d2v_train.eval.report import one_line

        print(one_line(result) + (f" -> {Location(out).public_url()}" if out else ""), flush=True)
    if out:
        publish(result, out)


def publish(result: EvalResult, out: str) -> None:
    """The whole result, indented, at `out` (any fsspec URL), written atomically."""
    if out:
        location = Location(out)
        fs, path = location.filesystem()
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        write_atomic(fs, path, (result.model_dump_json(indent=2) + "\n").encode())


def log(world: World, message: str) -> None:
    """Progress on stderr, rank 0 only (stdout carries the JSON result)."""
    if world.main:
        print(message, file=sys.stderr, flush=True)
