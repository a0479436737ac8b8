"""The data2vec trainer: FSDP2 student and EMA teacher, streamed batches, checkpoints, metrics.

One step = `grad_accum` micro-batches per rank, i.e. world size x grad_accum consecutive global
batches of the loader's plan: 1 rank with grad_accum 2 and 2 ranks with grad_accum 1 train on the
same batches. The loss is the sum over every rank's masked positions divided by their all-reduced
count (FSDP reduces plain sums), so both compute the same update. Random draws (dropout, layer
drop) are seeded from (seed, step) on every rank: a resumed run repeats them without saved RNG state.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from d2v_train import checkpoint, guards
from d2v_train.config import TrainConfig
from d2v_train.data.loader import StreamingLoader
from d2v_train.data.transforms import ImageTransform
from d2v_train.distributed import World, all_reduce_sum, init_world, prepare_blocks, shard
from d2v_train.metrics import KeysLog, MetricsLog, plot, progress_line
from d2v_train.models.ema import ema_tau
from d2v_train.models.loss import std_from_stats
from d2v_train.models.objectives import build_model
from d2v_train.schedules import lr_scale
from pipelines.storage import check_output

SIGTERM_EXIT = 143


@dataclass
class StepSummary:
    """One optimizer step, summed over ranks: its metrics record and what the loop needs besides."""

    record: dict  # what metrics.jsonl and the progress line get
    samples: float  # samples trained on in this step (all ranks)
    units: float  # their audio seconds (speech) or tokens (text); 0 for images
    stop: bool  # some rank received SIGTERM: save and leave
# what a step adds up over its micro-batches and then over the ranks (one all-reduce): the loss sum
# and its masked positions, samples, audio seconds (speech) or tokens (text), a SIGTERM flag, the
# targets' effective ranks and how many, and the samples lost to skipped bad shards
STEP_TOTALS = ("loss_sum", "masked", "samples", "units", "stop", "rank_sum", "ranks", "lost_samples")


# What a resumed run must share with its checkpoint: the model, and the settings the epoch plan is
# a function of (the dataset's URL may move, the world size may change: elastic resume).
_PLAN_FIELDS = ("split", "max_tokens", "batch_size", "min_sample_size", "max_sample_size", "shuffle_block")


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


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, collapse): the message says why."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms and the mask embedding;
    frozen parameters are left out (they would have no optimizer state to save and resume)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "mask_emb" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World | None = None) -> None:
        self.cfg = cfg
        self.world = world or init_world()
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model).to(self.world.device)
        self.teacher = self.model.make_teacher().to(self.world.device)
        # the teacher never runs backward: nothing to recompute
        # the models say what is sharded, compiled and recomputed unit by unit
        prepare_blocks(self.model.parallel_units(), compile=cfg.train.compile,
                       checkpointing=cfg.train.activation_checkpointing)
        prepare_blocks(self.teacher.module.parallel_units(), compile=cfg.train.compile)
        shard(self.model, self.model.parallel_units(), dtype=cfg.train.dtype, sum_gradients=True)
        shard(self.teacher, self.teacher.module.parallel_units(), dtype=cfg.train.dtype,
              reshard_after_forward=True)  # a no_grad-only root must reshard, or EMA never reaches it
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, eps=cfg.optim.eps)
        data = cfg.data
        self._check_dataset_fits_the_model()
        policy = data.policy()
        self.loader = StreamingLoader(data.url, data.split, policy, rank=self.world.rank,
                                      world_size=self.world.size, seed=cfg.train.seed, workers=data.workers,
                                      io_threads=data.io_threads, cache_dir=data.cache_dir,
                                      skip_bad_shards=data.skip_bad_shards,
                                      image_size=getattr(cfg.model.frontend, "image_size", 224),
                                      image_transform=ImageTransform(crop_scale=data.crop_scale, hflip=data.hflip),
                                      keep_empty_batches=True)
        self._check_epoch_fills_a_step()
        self.metrics = MetricsLog(cfg.run_dir, enabled=self.world.main)
        self.keys_log = KeysLog(cfg.run_dir, self.world.rank) if cfg.train.log_keys else None
        self.step = 0
        self.resumed_from: str | None = None
        self._epoch_batches = None  # the loader's iterator over the current epoch
        self._last_batch: dict | None = None  # stands in for a batch lost to skipped bad shards
        self._stop_signal = False
        self._pending_save: checkpoint.PendingSave | None = None
        # async saves run DCP's collectives in a thread: on a group of their own (a collective call)
        self._save_group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save and dist.is_initialized() \
            else None

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self) -> dict:
        # the progress tensor is the same on every rank (DCP stores it once): the loader's state is
        # global, so it resumes at any world size
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "teacher": get_model_state_dict(self.teacher),
            "progress": torch.tensor([self.step, self.loader.epoch, self.loader.global_batches_done,
                                      self.cfg.train.seed], dtype=torch.int64),
        }

    def save(self) -> str:
        """Save this step (after the previous async save completed); with checkpoint.async_save the
        folder is written in the background and counts once `wait_for_save` returns."""
        self.wait_for_save()
        args = (self._state(), self.cfg.checkpoint_url, self.step, self.cfg.checkpoint.keep)
        if not self.cfg.checkpoint.async_save:
            return checkpoint.save(*args, config_json=self.cfg.model_dump_json())
        self._pending_save = checkpoint.save_async(*args, config_json=self.cfg.model_dump_json(),
                                                   process_group=self._save_group)
        return self._pending_save.folder

    def wait_for_save(self) -> None:
        """Block until an async save in flight is complete (its .metadata written), then prune."""
        if self._pending_save is not None:
            pending, self._pending_save = self._pending_save, None
            pending.wait()

    def _check_dataset_fits_the_model(self) -> None:
        """The dataset's modality and stored masks against the model, before the first batch."""
        from pipelines.inspection import read_dataset
        from pipelines.storage import Location

        dataset, _, _ = read_dataset(Location(self.cfg.data.url))
        model = self.cfg.model
        if dataset.modality != model.modality:
            raise ValueError(f"data.url: {self.cfg.data.url} holds {dataset.modality} shards; the model is {model.modality}")
        frontend = model.frontend
        if model.modality == "vision" and (dataset.image_size, dataset.patch_size) != (
                frontend.image_size, frontend.patch_size):
            raise ValueError(f"model.frontend: image_size {frontend.image_size} / patch_size {frontend.patch_size}, "
                             f"but the dataset's masks were drawn for {dataset.image_size} / {dataset.patch_size} "
                             f"(rebuild with --image-size / --patch-size, or choose a matching preset)")

    def resume(self) -> str | None:
        """Load the newest complete checkpoint, if there is one, and forget what was logged after
        it; returns its folder. Call once, before training."""
        url = self.cfg.checkpoint_url
        if self.world.main:  # before any update: the first save is checkpoint.every_steps away
            check_output(url, "checkpoint.url", folder=True)
        folder = self._load_newest_readable(url)
        if folder is not None:
            state = self._loaded_state
            del self._loaded_state
            set_model_state_dict(self.model, state["model"])
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
            set_model_state_dict(self.teacher, state["teacher"])
            step, epoch, done, seed = (int(v) for v in state["progress"])
            if seed != self.cfg.train.seed:
                raise ValueError(f"train.seed: the checkpoint at {folder} was trained with seed {seed}, "
                                 f"not {self.cfg.train.seed}")
            self.step = step
            self.loader.seek(epoch, done)
        if self.world.main:
            checkpoint.remove_incomplete(url)
            self.metrics.truncate_from(self.step + 1)
            KeysLog.truncate_from(self.cfg.run_dir, self.step + 1)
        if dist.is_initialized():
            dist.barrier()  # no rank logs keys before rank 0 has truncated the files
        self.resumed_from = folder
        return folder

    def _load_newest_readable(self, url: str) -> str | None:
        """The newest complete checkpoint that loads (its state kept in `_loaded_state`): one whose
        files were damaged after the save (a truncated .distcp) is passed over, with a warning, for
        the one before it. DCP loads collectively, so every rank sees the same failure."""
        named = checkpoint.resolve(url)
        if named is None:
            return None
        if not self.cfg.checkpoint.allow_changes:
            check_resumable(self.cfg, named)
        steps = checkpoint.complete_steps(url) if named != url else []  # url may name one checkpoint itself
        candidates = [checkpoint.step_folder(url, s) for s in reversed(steps)] or [named]
        for n, folder in enumerate(candidates):
            state = self._state()
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
                if self.world.main:
                    print(f"warning: checkpoint {folder} cannot be loaded ({reason}); resuming from "
                          f"{candidates[n + 1]} instead", file=sys.stderr, flush=True)
                continue
            self._loaded_state = state
            return folder
        return None

    # -- training -----------------------------------------------------------------------------
    def train(self) -> int:
        """Train to train.max_steps; returns the exit code (0, or 143 after a SIGTERM save)."""
        cfg = self.cfg
        if self.world.main:
            where = f"resumed from {self.resumed_from}" if self.resumed_from else "starting"
            print(f"{where} at step {self.step} on {self.world.size} rank(s) ({self.world.device.type}), "
                  f"{self.world.size * cfg.train.grad_accum} global batches per step", flush=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        started, samples, audio = time.monotonic(), 0.0, 0.0
        try:
            while self.step < cfg.train.max_steps:
                summary = self._train_step()
                record, stop = summary.record, summary.stop
                samples += summary.samples
                audio += summary.units
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    record["samples_per_s"] = samples / elapsed
                    if audio:  # audio seconds for speech, tokens for text
                        record[self.loader.modality.rate_name] = audio / elapsed
                    self.metrics.write(record)
                    if self.world.main:
                        print(progress_line(record), flush=True)
                if stop or self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps:
                    folder = self.save()
                if stop:
                    self.wait_for_save()
                    if self.world.main:
                        print(f"SIGTERM: saved {folder} at step {self.step}; exiting", flush=True)
                    return SIGTERM_EXIT
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.wait_for_save()  # a checkpoint counts only once complete: never exit mid-write
            self._close_epoch()
            self.loader.close()
            self.metrics.close()
        if self.world.main:
            plot(cfg.run_dir)
        self._export_encoder()
        return 0

    def _next_batches(self) -> list[dict]:
        """This rank's `grad_accum` batches of the next step. A step never straddles epochs: when
        fewer are left in the epoch (the same count on every rank), they are left out."""
        accum = self.cfg.train.grad_accum
        if len(self.loader) < accum:
            self._close_epoch()
            self.loader.next_epoch()
            self._check_epoch_fills_a_step()
        if self._epoch_batches is None:
            self._epoch_batches = iter(self.loader)
        batches = [next(self._epoch_batches) for _ in range(accum)]
        return [{k: (v.to(self.world.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                for batch in batches]

    def _check_epoch_fills_a_step(self) -> None:
        if len(self.loader) < self.cfg.train.grad_accum:
            raise ValueError(f"data: epoch {self.loader.epoch} of {self.cfg.data.url} has {len(self.loader)} "
                             f"batches per rank at {self.world.size} rank(s), fewer than "
                             f"train.grad_accum={self.cfg.train.grad_accum}")

    def _close_epoch(self) -> None:
        if self._epoch_batches is not None:
            self._epoch_batches.close()  # stops the loader's threads; its position stays where it was
            self._epoch_batches = None

    def _train_step(self) -> StepSummary:
        cfg, world = self.cfg, self.world
        batches = self._next_batches()
        epoch = self.loader.epoch
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.step)  # same draws on every rank, and on resume
        self.model.train()
        totals = dict.fromkeys(STEP_TOTALS, 0.0)
        target_stats = pred_stats = torch.zeros(1 + 2 * cfg.model.encoder.dim, dtype=torch.float64)  # std_stats
        keys = []
        real = [batch for batch in batches if batch["keys"]]
        self._last_batch = real[-1] if real else self._last_batch
        for batch in batches:
            totals["lost_samples"] += batch.get("skipped", 0)
            if not batch["keys"]:
                self._stand_in_for_empty(batch, real)
                continue
            out = self.model(batch, self.teacher)
            out.loss_sum.backward()
            totals["loss_sum"] += float(out.loss_sum.detach())
            totals["masked"] += float(out.count)
            target_stats = out.target_stats.detach().cpu() + target_stats
            pred_stats = out.pred_stats.detach().cpu() + pred_stats
            if math.isfinite(rank := float(out.target_rank)):
                totals["rank_sum"] += rank
                totals["ranks"] += 1
            keys += batch["keys"]
            totals["units"] += self.loader.modality.trained_units(batch, self.loader)
        totals["samples"], totals["stop"] = len(keys), float(self._stop_signal)
        reduced = all_reduce_sum(torch.cat([torch.tensor(list(totals.values()), dtype=torch.float64),
                                            target_stats, pred_stats]))
        totals = dict(zip(STEP_TOTALS, reduced[:len(STEP_TOTALS)].tolist()))
        target_stats, pred_stats = reduced[len(STEP_TOTALS):].chunk(2)
        count = totals["masked"]
        target_rank = totals["rank_sum"] / totals["ranks"] if totals["ranks"] else float("nan")
        loss = totals["loss_sum"] / max(count, 1.0)
        params = [p for p in self.model.parameters() if p.grad is not None]
        for param in params:
            param.grad.div_(max(count, 1.0))  # the global mean over masked positions
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = cfg.optim.lr * lr_scale(self.step, cfg.train.max_steps, cfg.optim)
        tau = ema_tau(self.step, cfg.model.ema)
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        skipped = nonfinite or count == 0  # count 0: every batch of the step was lost to skipped bad shards
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if nonfinite and cfg.guard.nonfinite == "stop":
                raise TrainingStopped(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step "
                                      f"{self.step + 1}; the last good checkpoint is "
                                      f"{checkpoint.resolve(cfg.checkpoint_url) or 'none (none was saved)'}")
        else:
            if cfg.optim.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_norm, norm)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.teacher.update(self.model.student, tau)
        self.step += 1
        if self.keys_log is not None:
            self.keys_log.write(self.step, epoch, keys)
        target_std, pred_std = float(std_from_stats(target_stats)), float(std_from_stats(pred_stats))
        why = guards.collapse(self.step, target_std, pred_std, target_rank, cfg.guard, cfg.model.encoder.dim)
        if why:
            raise TrainingStopped(f"{why}; the last good checkpoint is {checkpoint.resolve(cfg.checkpoint_url) or 'none'}")
        record = {"step": self.step, "loss": loss, "lr": lr, "tau": tau, "target_std": target_std,
                  "pred_std": pred_std, "target_rank": target_rank, "grad_norm": grad_norm, "masked": int(count),
                  "skipped": skipped, "skipped_samples": int(totals["lost_samples"]), "epoch": epoch,
                  "memory_mb": _memory_mb(world.device)}
        return StepSummary(record, samples=totals["samples"], units=totals["units"], stop=totals["stop"] > 0)

    def _stand_in_for_empty(self, batch: dict, real: list[dict]) -> None:
        """A batch whose samples all came from skipped bad shards: this rank still runs a forward and
        backward, of a real batch (of this step, else the last one) weighted 0, because FSDP's
        collectives must match across ranks; it adds nothing to the loss or the gradients."""
        stand_in = real[0] if real else self._last_batch
        if stand_in is None:
            raise TrainingStopped(f"rank {self.world.rank}: every sample of global batch {batch['batch']} (epoch "
                                  f"{batch['epoch']}) came from skipped bad shards, and this process has no earlier "
                                  "batch to keep step with the other ranks")
        out = self.model(stand_in, self.teacher)
        (out.loss_sum * 0.0).backward()

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = True  # acted on after the step: every rank sees it in the step's all-reduce

    def _export_encoder(self) -> None:
        """The final student encoder as one safetensors file (rank 0), for downstream use."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.world.main:
            from safetensors.torch import save_file

            encoder = {k[len("student."):]: v.contiguous() for k, v in state.items() if k.startswith("student.")}
            Path(self.cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_file(encoder, str(Path(self.cfg.run_dir) / "encoder.safetensors"))
        if dist.is_initialized():
            dist.barrier()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
