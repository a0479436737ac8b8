"""Distributed checkpoints (torch.distributed.checkpoint) at any fsspec URL.

Each checkpoint is a folder `step-NNNNNNNN/`; DCP writes its `.metadata` last, so a folder
counts only when that file exists. Resume picks the newest complete one; after a save, rank 0
keeps the newest `keep` and removes the rest.
"""
from __future__ import annotations

import re

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from pipelines.storage import Location

_STEP = re.compile(r"step-(\d{8})$")


def step_folder(url: str, step: int) -> str:
    return f"{url.rstrip('/')}/step-{step:08d}"


def complete_steps(url: str) -> list[int]:
    """Steps of the complete checkpoints under `url`, oldest first."""
    fs, root = Location(url).filesystem()
    if not fs.exists(root):
        return []
    fs.invalidate_cache(root)
    steps = []
    for path in fs.ls(root, detail=False):
        match = _STEP.search(path.rstrip("/"))
        if match and fs.exists(f"{path.rstrip('/')}/.metadata"):
            steps.append(int(match.group(1)))
    return sorted(steps)


def resolve(url: str) -> str | None:
    """A checkpoint folder itself, or the newest complete checkpoint under a run's folder."""
    fs, root = Location(url).filesystem()
    if fs.exists(f"{root.rstrip('/')}/.metadata"):
        return url
    steps = complete_steps(url)
    return step_folder(url, steps[-1]) if steps else None


def save(state: dict, url: str, step: int, keep: int) -> str:
    folder = step_folder(url, step)
    dcp.save(state, storage_writer=FsspecWriter(folder))
    if not dist.is_initialized() or dist.get_rank() == 0:
        _prune(url, keep)
    if dist.is_initialized():
        dist.barrier()
    return folder


def load(state: dict, folder: str) -> None:
    """Fills `state` in place (tensors and DTensors reshard to this world size)."""
    dcp.load(state, storage_reader=FsspecReader(folder))


def _prune(url: str, keep: int) -> None:
    fs, root = Location(url).filesystem()
    for step in complete_steps(url)[:-keep]:
        fs.rm(step_folder(root, step), recursive=True)
