"""The data2vec trainer: FSDP2 student and EMA teacher, streamed batches, checkpoints, metrics.

One step = `grad_accum` micro-batches per rank, i.e. world size x grad_accum consecutive global
batches of the loader's plan: 1 rank with grad_accum 2 and 2 ranks with grad_accum 1 train on the
same batches. The loss is the sum over every rank's masked positions divided by their all-reduced
count (FSDP reduces plain sums), so both compute the same update. Random draws (dropout, layer
drop) are seeded from (seed, step) on every rank: a resumed run repeats them without saved RNG state.

The trainer wires components together, in torchtitan's shape: `step.ForwardBackward` (micro-batches
-> gradients and reduced totals), `guards.StepGuard` (non-finite and collapse), `step.OptimizerStep`
(mean gradients, clipping, schedule, AdamW, EMA) and `checkpointer.Checkpointer` (the stateful parts);
the model names its own units of sharding (`parallel_units`), the loader offers `seek`/`next_epoch`.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from d2v_train import checkpoint
from d2v_train.checkpointer import Checkpointer
from d2v_train.config import TrainConfig
from d2v_train.data.batches import Batch
from d2v_train.data.loader import StreamingLoader
from d2v_train.data.transforms import ImageTransform
from d2v_train.distributed import World, all_reduce_sum, init_world, prepare_blocks, shard
from d2v_train.flops import peak_flops, step_flops
from d2v_train.guards import StepGuard, TrainingStopped  # noqa: F401 - TrainingStopped: what train() may raise
from d2v_train.loss_scale import LossScaler
from d2v_train.metrics import KeysLog, MetricsLog, plot, progress_line
from d2v_train.models.objectives import build_model
from d2v_train.profiling import StepProfiler
from d2v_train.step import ForwardBackward, OptimizerStep, StepSummary
from d2v_train.steptime import StepClock
from pipelines.storage import check_output

SIGTERM_EXIT = 143


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
        if cfg.init.from_:  # before the teacher is copied from the student; a resume overrides it
            initialise_from(self.model, cfg.init.from_, cfg.model)
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
        self.loader = StreamingLoader(data.url, data.split, policy, mix=data.mix(), rank=self.world.rank,
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
        self._stop_signal = False
        # the components of a step, and the checkpointer of everything a resume needs
        self.forward_backward = ForwardBackward(self.model, self.teacher, self.world.rank, cfg.model.encoder.dim,
                                                units=lambda batch: self.loader.modality.trained_units(batch, self.loader),
                                                flops=lambda batch: step_flops(cfg.model, batch).train)
        self.optimizer_step = OptimizerStep(self.model, self.teacher, self.optimizer, cfg)
        self.scaler = LossScaler(cfg.train.loss_scale) if cfg.train.dtype == "fp16" else None
        self.checkpointer = Checkpointer(cfg, model=self.model, optimizer=self.optimizer, teacher=self.teacher,
                                         progress=self._progress, main=self.world.main, scaler=self.scaler)
        self.guard = StepGuard(cfg.guard, cfg.model.encoder.dim, last_good=self.checkpointer.last_good)
        self.clock = StepClock(self.world.device)
        self.profiler = StepProfiler(cfg.profile, cfg.run_dir, self.world.rank, self.world.device, self.world.main)
        device_name = torch.cuda.get_device_name(self.world.device) if self.world.device.type == "cuda" else None
        self.peak_flops = peak_flops(device_name)  # per device; None where unknown (CPUs)

    # -- checkpoints --------------------------------------------------------------------------
    def _progress(self) -> list[int]:
        return [self.step, self.loader.epoch, self.loader.global_batches_done, self.cfg.train.seed]

    def _check_dataset_fits_the_model(self) -> None:
        """The dataset's modality and stored masks against the model, before the first batch."""
        from pipelines.inspection import read_dataset
        from pipelines.storage import Location

        model = self.cfg.model
        field = "data.sources" if self.cfg.data.sources is not None else "data.url"
        for url in self.cfg.data.urls:
            dataset, _, _ = read_dataset(Location(url))
            if dataset.modality != model.modality:
                raise ValueError(f"{field}: {url} holds {dataset.modality} shards; the model is {model.modality}")
            why = model.frontend.dataset_mismatch(dataset)
            if why:
                raise ValueError(why)

    def resume(self) -> str | None:
        """Load the newest complete checkpoint, if there is one, and forget what was logged after
        it; returns its folder. Call once, before training."""
        url = self.cfg.checkpoint_url
        if self.world.main:  # before any update: the first save is checkpoint.every_steps away
            check_output(url, "checkpoint.url", folder=True)
        loaded = self.checkpointer.load_newest()
        folder = None
        if loaded is not None:
            folder, (step, epoch, done, seed) = loaded
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
        self.clock = StepClock(self.world.device)
        try:
            while self.step < cfg.train.max_steps:
                with self.profiler.step(self.step + 1):
                    summary = self._train_step()
                record, stop = summary.record, summary.stop
                samples += summary.samples
                audio += summary.units
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    record["elapsed_s"] = elapsed  # since this process began training
                    record["samples_per_s"] = samples / elapsed
                    if audio:  # audio seconds for speech, tokens for text
                        record[self.loader.modality.rate_name] = audio / elapsed
                    record.update(self._samples_by_source())
                    self.metrics.write(record)
                    if self.world.main:
                        print(progress_line(record), flush=True)
                self.clock.lap("logging")  # in the next step's record, as the save
                if stop or self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps:
                    folder = self.checkpointer.save(self.step)
                    self.clock.lap("checkpoint")  # in the next step's record (this one is written)
                if stop:
                    self.checkpointer.wait()
                    if self.world.main:
                        print(f"SIGTERM: saved {folder} at step {self.step}; exiting", flush=True)
                    return SIGTERM_EXIT
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.profiler.stop()
            self.checkpointer.wait()  # a checkpoint counts only once complete: never exit mid-write
            self._close_epoch()
            self.loader.close()
            self.metrics.close()
        if self.world.main:
            plot(cfg.run_dir)
        self._export_encoder()
        return 0

    def _next_batches(self) -> list[Batch]:
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
            raise ValueError(f"data: epoch {self.loader.epoch} of {self.cfg.data.describe} has {len(self.loader)} "
                             f"batches per rank at {self.world.size} rank(s), fewer than "
                             f"train.grad_accum={self.cfg.train.grad_accum}")

    def _close_epoch(self) -> None:
        if self._epoch_batches is not None:
            self._epoch_batches.close()  # stops the loader's threads; its position stays where it was
            self._epoch_batches = None

    def _train_step(self) -> StepSummary:
        """Forward and backward over the step's batches, the guards, the update; its summary."""
        cfg, clock = self.cfg, self.clock
        batches = self._next_batches()
        clock.lap("data")
        epoch = self.loader.epoch
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.step)  # same draws on every rank, and on resume
        scale = self.scaler.scale if self.scaler else 1.0
        totals = self.forward_backward(batches, stop=self._stop_signal, loss_scale=scale)
        clock.lap("forward_backward")
        loss = totals.loss
        params, norm, grad_norm = self.optimizer_step.mean_gradients(totals.masked, loss_scale=scale)
        lr, tau = self.optimizer_step.schedule(self.step)
        # fp16: scaled gradients that overflow (a finite loss, a non-finite norm) skip the update and
        # halve the scale; the guards see the other cases
        overflow = self.scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm)
        skipped = overflow or self.guard.skips(self.step + 1, loss, grad_norm, totals.masked)
        if skipped:
            self.optimizer_step.discard()
        else:
            self.optimizer_step.apply(params, norm, lr, tau)
        if self.scaler is not None and (overflow or not skipped):
            self.scaler.update(overflow, self.step + 1)
        clock.lap("optimizer")
        self.step += 1
        if self.keys_log is not None:
            self.keys_log.write(self.step, epoch, totals.keys)
        self.guard.check_collapse(self.step, totals.target_std, totals.pred_std, totals.target_rank)
        record = {"step": self.step, "loss": loss, "lr": lr, "tau": tau, "target_std": totals.target_std,
                  "pred_std": totals.pred_std, "target_rank": totals.target_rank, "grad_norm": grad_norm,
                  "masked": int(totals.masked), "skipped": skipped, "skipped_samples": int(totals.lost_samples),
                  "epoch": epoch, "memory_mb": _memory_mb(self.world.device)}
        if self.scaler is not None:
            record.update(loss_scale=scale, overflows=self.scaler.overflows)
        record.update(clock.record())
        record["flops_per_s"] = totals.flops / max(record["time/step"], 1e-9)  # model FLOPs, all ranks
        if self.peak_flops:
            record["mfu"] = record["flops_per_s"] / (self.peak_flops * self.world.size)
        return StepSummary(record, samples=totals.samples, units=totals.units, stop=totals.stop)

    def _samples_by_source(self) -> dict[str, int]:
        """A mix: samples each part has delivered to all ranks since this process started
        ("samples/NAME"); nothing for one split. A collective: every rank calls it at each log step."""
        names = getattr(self.loader.index, "names", None)
        if names is None:
            return {}
        counts = torch.tensor([self.loader.throughput.by_source.get(n, 0) for n in range(len(names))],
                              dtype=torch.int64, device=self.world.device)
        counts = all_reduce_sum(counts).cpu()
        return {f"samples/{name}": int(c) for name, c in zip(names, counts.tolist())}

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


def initialise_from(model, url: str, architecture) -> None:
    """The student encoder of checkpoint `url` into `model` (init.from): every tensor must have its
    shape here (dropout rates and the objective may differ; the regression head stays fresh)."""
    from d2v_train.export import load_model

    saved, imported, folder = load_model(url)
    if saved.model.modality != architecture.modality:
        raise ValueError(f"init.from: {folder} holds a {saved.model.modality} model, this run trains {architecture.modality}")
    ours = {k: tuple(v.shape) for k, v in model.student.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in imported.student.state_dict().items()}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in differ[:3])
        raise ValueError(f"init.from: {folder} holds another architecture ({len(differ)} tensors differ: {shown}); "
                         f"use its model settings (its train_config.json), or another checkpoint")
    model.student.load_state_dict(imported.student.state_dict())
