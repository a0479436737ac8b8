"""Profiles on demand (`profile.steps=[first, last]`): a torch profiler trace of those updates on
every rank, written by TensorBoard's trace handler to run_dir/profile/rank{r}.{ms}.pt.trace.json
(Chrome trace JSON: chrome://tracing, ui.perfetto.dev, or `tensorboard --logdir run_dir/profile`
with the torch-tb-profiler plugin); with `profile.memory_snapshot` a CUDA memory snapshot of the
same updates (run_dir/profile/memory-rank{r}-steps{first}-{last}.pickle, for pytorch.org/memory_viz).
"""
from __future__ import annotations

from pathlib import Path

import torch

from d2v_train.config import ProfileConfig


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, run_dir: str, rank: int, device: torch.device, main: bool) -> None:
        self.cfg, self.rank, self.device, self.main = cfg, rank, device, main
        self.folder = Path(run_dir) / "profile"
        self._profiler: torch.profiler.profile | None = None
        self._snapshot = False
        if cfg.memory_snapshot and device.type != "cuda" and main:
            print(f"profile.memory_snapshot: memory snapshots record CUDA allocations; this run is on "
                  f"{device.type}: none is written", flush=True)

    def step(self, step: int):
        """A context for update `step` (1-based): starts the profile at the first asked update,
        marks each profiled update in the trace, ends and writes it after the last."""
        return _Step(self, step)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.folder), worker_name=f"rank{self.rank}"))
        self._profiler.start()
        if self.cfg.memory_snapshot and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._snapshot = True

    def stop(self) -> None:
        """Write what was recorded (also when a run ends inside the window)."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.stop()  # the trace handler writes the file
        if self._snapshot:
            first, last = self.cfg.steps
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory-rank{self.rank}-steps{first}-{last}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            self._snapshot = False
        if self.main:
            print(f"profile: updates {self.cfg.steps[0]}-{self.cfg.steps[1]} written to {self.folder}", flush=True)


class _Step:
    def __init__(self, owner: StepProfiler, step: int) -> None:
        self.owner, self.step = owner, step
        self._mark = None

    def __enter__(self):
        steps = self.owner.cfg.steps
        if steps is not None and self.step == steps[0]:
            self.owner.start()
        if self.owner._profiler is not None:
            self._mark = torch.profiler.record_function(f"step {self.step}")
            self._mark.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mark is not None:
            self._mark.__exit__(*exc)
        steps = self.owner.cfg.steps
        if steps is not None and self.step == steps[1]:
            self.owner.stop()
