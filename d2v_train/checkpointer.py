"""The trainer's checkpointer: it collects the stateful parts of a run (student, optimizer,
teacher and the progress counters), saves them (in the background with checkpoint.async_save) and
loads the newest checkpoint that can be loaded, after checking it was trained with this run's
model and batch plan."""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from d2v_train import checkpoint
from d2v_train.config import TrainConfig

# What a resumed run must share with its checkpoint: the model, and the settings the epoch plan is
# a function of (the dataset's URL may move, the world size may change: elastic resume).
_PLAN_FIELDS = ("split", "splits", "sources", "max_tokens", "batch_size", "min_sample_size", "max_sample_size", "shuffle_block")


def check_resumable(cfg: TrainConfig, folder: str) -> None:
    """Refuse, naming the settings, to resume `folder` with another model or batch plan (the run
    would fail to load, or silently continue on another plan); checkpoint.allow_changes overrides."""
    from pipelines.storage import Location

    fs, root = Location(folder).filesystem()
    path = f"{root.rstrip('/')}/{checkpoint.CONFIG_FILE}"
    if not fs.exists(path):
        return  # written before configs were stored beside checkpoints: nothing to compare
    saved = TrainConfig.model_validate_json(fs.cat_file(path))
    old, new = _flat(saved.model_dump()), _flat(cfg.model_dump())
    changed = [k for k in new if k.startswith("model.") and old.get(k) != new[k]]
    changed += [f"data.{k}" for k in _PLAN_FIELDS if old.get(f"data.{k}") != new[f"data.{k}"]]
    if changed:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ValueError(f"the checkpoint at {folder} was trained with other settings: {shown}{more}; use the "
                         "checkpoint's, another checkpoint.url, or checkpoint.allow_changes=true to resume anyway")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Checkpointer:
    """Saves and loads `model` (the student, sharded), `optimizer`, `teacher` and the progress
    counters `progress()` returns (the same on every rank: DCP stores them once, and the loader's
    are global, so a run resumes at any world size), and fp16's loss `scaler`."""

    def __init__(self, cfg: TrainConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 teacher: nn.Module, progress: Callable[[], list[int]], main: bool, scaler=None) -> None:
        self.cfg, self.model, self.optimizer, self.teacher = cfg, model, optimizer, teacher
        self.progress, self.main, self.scaler = progress, main, scaler
        self._pending: checkpoint.PendingSave | None = None
        # async saves run DCP's collectives in a thread: on a group of their own (a collective call)
        self._group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save and dist.is_initialized() else None

    @property
    def url(self) -> str:
        return self.cfg.checkpoint_url

    def state(self) -> dict:
        state = {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "teacher": get_model_state_dict(self.teacher),
            "progress": torch.tensor(self.progress(), dtype=torch.int64),
        }
        if self.scaler is not None:
            state["loss_scale"] = self.scaler.state()
        return state

    def save(self, step: int) -> str:
        """Save `step` (after the previous async save completed); with checkpoint.async_save the
        folder is written in the background and counts once `wait` returns."""
        self.wait()
        args = (self.state(), self.url, step, self.cfg.checkpoint.keep)
        if not self.cfg.checkpoint.async_save:
            return checkpoint.save(*args, config_json=self.cfg.model_dump_json())
        self._pending = checkpoint.save_async(*args, config_json=self.cfg.model_dump_json(),
                                              process_group=self._group)
        return self._pending.folder

    def wait(self) -> None:
        """Block until an async save in flight is complete (its .metadata written), then prune."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def last_good(self) -> str | None:
        """The newest complete checkpoint, if any."""
        return checkpoint.resolve(self.url)

    def load_newest(self) -> tuple[str, list[int]] | None:
        """Load the newest checkpoint that loads into the model, optimizer and teacher; returns its
        folder and progress counters, or None when there is none. One whose files were damaged after
        the save (a truncated .distcp) is passed over, with a warning, for the one before it. DCP
        loads collectively, so every rank sees the same failure."""
        url = self.url
        named = checkpoint.resolve(url)
        if named is None:
            return None
        if not self.cfg.checkpoint.allow_changes:
            check_resumable(self.cfg, named)
        steps = checkpoint.complete_steps(url) if named != url else []  # url may name one checkpoint itself
        candidates = [checkpoint.step_folder(url, s) for s in reversed(steps)] or [named]
        for n, folder in enumerate(candidates):
            state = self.state()
            try:
                checkpoint.load(state, folder)
            except checkpoint.UnsafeCheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any damage: try the one before
                # (DCP's CheckpointException is a BaseException; its text ends with the rank's error)
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                reason = lines[-1].strip()[-200:]
                if n + 1 == len(candidates):
                    raise ValueError(f"no checkpoint under {url} can be loaded; the oldest, {folder}: {reason}") from None
                if self.main:
                    print(f"warning: checkpoint {folder} cannot be loaded ({reason}); resuming from "
                          f"{candidates[n + 1]} instead", file=sys.stderr, flush=True)
                continue
            set_model_state_dict(self.model, state["model"])
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
            set_model_state_dict(self.teacher, state["teacher"])
            if self.scaler is not None:
                self.scaler.load(state["loss_scale"])
            return folder, [int(v) for v in state["progress"]]
        return None
