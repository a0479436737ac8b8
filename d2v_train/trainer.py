"""The data2vec trainer: FSDP2 student and EMA teacher, streamed batches, checkpoints, metrics.

One step = `grad_accum` micro-batches per rank. The loss is the sum over every rank's masked
positions divided by their all-reduced count (FSDP's own division by the world size is off),
so 1 rank and N ranks with the same global batch compute the same update. Random draws
(dropout, layer drop) are seeded from (seed, step) on every rank: a resumed run repeats them.
"""
from __future__ import annotations

import math
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from d2v_train import checkpoint
from d2v_train.config import TrainConfig
from d2v_train.data.loader import StreamingLoader
from d2v_train.data.plan import BatchPolicy
from d2v_train.distributed import World, all_reduce_sum, init_world, shard
from d2v_train.metrics import MetricsLog, plot, progress_line
from d2v_train.models.data2vec import Data2Vec
from d2v_train.models.ema import ema_tau
from d2v_train.schedules import lr_scale

SIGTERM_EXIT = 143


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, collapse): the message says why."""


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World | None = None) -> None:
        self.cfg = cfg
        self.world = world or init_world()
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = Data2Vec(cfg.model).to(self.world.device)
        self.teacher = self.model.make_teacher().to(self.world.device)
        shard(self.model, list(self.model.student.transformer.blocks), dtype=cfg.train.dtype)
        shard(self.teacher, list(self.teacher.module.transformer.blocks), dtype=cfg.train.dtype,
              reshard_after_forward=True)  # a no_grad-only root must reshard, or EMA never reaches it
        self.model.set_gradient_divide_factor(1.0)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           eps=cfg.optim.eps)
        data = cfg.data
        policy = BatchPolicy(batch_size=data.batch_size, max_tokens=data.max_tokens,
                             min_sample_size=data.min_sample_size, max_sample_size=data.max_sample_size,
                             shuffle_block=data.shuffle_block)
        self.loader = StreamingLoader(data.url, data.split, policy, rank=self.world.rank,
                                      world_size=self.world.size, seed=cfg.train.seed, workers=data.workers,
                                      io_threads=data.io_threads, cache_dir=data.cache_dir,
                                      skip_bad_shards=data.skip_bad_shards)
        self.metrics = MetricsLog(cfg.run_dir, enabled=self.world.main)
        self.step = 0
        self._stop_signal = False

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (decay if param.ndim >= 2 and "mask_emb" not in name else no_decay).append(param)
        return [{"params": decay, "weight_decay": self.cfg.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "teacher": get_model_state_dict(self.teacher),
            "progress": torch.tensor([self.step, self.loader.epoch, self.loader.global_batches_done,
                                      self.cfg.train.seed], dtype=torch.int64),
        }

    def save(self) -> str:
        return checkpoint.save(self._state(), self.cfg.checkpoint_url, self.step, self.cfg.checkpoint.keep)

    def resume(self) -> str | None:
        """Load the newest complete checkpoint, if there is one; returns its folder."""
        folder = checkpoint.resolve(self.cfg.checkpoint_url)
        if folder is None:
            return None
        state = self._state()
        checkpoint.load(state, folder)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        set_model_state_dict(self.teacher, state["teacher"])
        step, epoch, done, seed = (int(v) for v in state["progress"])
        if seed != self.cfg.train.seed:
            raise ValueError(f"train.seed: the checkpoint at {folder} was trained with seed {seed}")
        self.step = step
        self.loader.load_state_dict({"version": 1, "split": self.loader.split, "seed": seed, "epoch": epoch,
                                     "global_batches_done": done, "world_size": self.world.size})
        self.metrics.truncate_from(step + 1)
        return folder

    # -- training -----------------------------------------------------------------------------
    def _batches(self):
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield {k: (v.to(self.world.device, non_blocking=True) if torch.is_tensor(v) else v)
                       for k, v in batch.items()}
            if not yielded and self.loader.epoch > 1_000_000:
                raise RuntimeError("the dataset yields no batches")

    def train(self) -> int:
        cfg = self.cfg
        resumed = self.resume()
        if self.world.main:
            print(f"{'resumed from ' + resumed if resumed else 'starting'} at step {self.step} "
                  f"on {self.world.size} rank(s) ({self.world.device.type})", flush=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        batches = self._batches()
        started, samples, audio = time.monotonic(), 0, 0.0
        try:
            while self.step < cfg.train.max_steps:
                record = self._train_step(batches)
                samples += record.pop("_samples")
                audio += record.pop("_audio_s")
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    record.update(samples_per_s=samples / elapsed, epoch=self.loader.epoch)
                    if audio:
                        record["audio_s_per_s"] = audio / elapsed
                    self.metrics.write(record)
                    if self.world.main:
                        print(progress_line(record), flush=True)
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps:
                    self.save()
                if self._stopping():
                    self.save()
                    if self.world.main:
                        print(f"SIGTERM: saved a checkpoint at step {self.step}; exiting", flush=True)
                    return SIGTERM_EXIT
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.loader.close()
            self.metrics.close()
        if self.world.main:
            plot(cfg.run_dir)
        self._export_encoder()
        return 0

    def _train_step(self, batches) -> dict:
        cfg, world = self.cfg, self.world
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.step)  # same draws on every rank, and on resume
        self.model.train()
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, masked positions
        target_stats = pred_stats = None
        samples, audio = 0, 0.0
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            out = self.model(batch, self.teacher)
            out.loss_sum.backward()
            totals += torch.stack([out.loss_sum.detach().double().cpu(), out.count.detach().double().cpu()])
            target_stats = out.target_stats.detach().cpu() if target_stats is None else target_stats + out.target_stats.detach().cpu()
            pred_stats = out.pred_stats.detach().cpu() if pred_stats is None else pred_stats + out.pred_stats.detach().cpu()
            samples += len(batch["keys"])
            if "source" in batch:
                audio += batch["source"].shape[0] * batch["source"].shape[1] / 16000
        all_reduce_sum(totals)
        all_reduce_sum(target_stats)
        all_reduce_sum(pred_stats)
        loss_sum, count = totals.tolist()
        loss = loss_sum / max(count, 1.0)
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.div_(max(count, 1.0))  # the global mean over masked positions
        from d2v_train.models.loss import std_from_stats

        target_std, pred_std = float(std_from_stats(target_stats)), float(std_from_stats(pred_stats))
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.guard.nonfinite == "stop":
                last = checkpoint.resolve(cfg.checkpoint_url)
                raise TrainingStopped(f"non-finite loss ({loss}) at step {self.step + 1}; "
                                      f"the last good checkpoint is {last or 'none'}")
        clip = cfg.optim.clip_norm if cfg.optim.clip_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = cfg.optim.lr * lr_scale(self.step, cfg.train.max_steps, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if math.isfinite(loss):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tau = ema_tau(self.step, cfg.model.ema)
        self.teacher.update(self.model.student, tau)
        self.step += 1
        if self.step > cfg.guard.collapse_after and (target_std < cfg.guard.min_target_std or
                                                     pred_std < cfg.guard.min_pred_std):
            raise TrainingStopped(f"representation collapse at step {self.step}: target std {target_std:.4f} "
                                  f"(min {cfg.guard.min_target_std}), prediction std {pred_std:.4f} "
                                  f"(min {cfg.guard.min_pred_std})")
        samples_all = all_reduce_sum(torch.tensor([samples, audio], dtype=torch.float64)).tolist()
        return {"step": self.step, "loss": loss, "lr": lr, "tau": tau, "target_std": target_std,
                "pred_std": pred_std, "grad_norm": grad_norm, "masked": int(count),
                "memory_mb": _memory_mb(world.device), "_samples": samples_all[0], "_audio_s": samples_all[1]}

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = True

    def _stopping(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0])
        return bool(all_reduce_sum(flag).item() > 0)

    def _export_encoder(self) -> None:
        """The final student encoder as one safetensors file (rank 0), for downstream use."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.world.main:
            from safetensors.torch import save_file

            encoder = {k[len("student."):]: v.contiguous() for k, v in state.items() if k.startswith("student.")}
            from pathlib import Path

            Path(self.cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_file(encoder, str(Path(self.cfg.run_dir) / "encoder.safetensors"))
        if dist.is_initialized():
            dist.barrier()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
