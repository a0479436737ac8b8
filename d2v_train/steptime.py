"""Where a step's time goes, measured on rank 0 (the slowest rank sets the pace, and the step's
all-reduce makes every rank wait for it, so any rank's wall time is the step's).

A step's window runs from the moment the previous step's record was written to this step's: it
holds the wait for the loader's batches (`data`), the forward and backward passes with the step's
all-reduce (`forward_backward`), clipping, AdamW and the EMA update (`optimizer`), and after the
previous step's record was made, writing it (`logging`: metrics.jsonl, TensorBoard, the progress
line) and the previous step's checkpoint save (`checkpoint`: a save comes after its step's record,
so that the record is in metrics.jsonl before the checkpoint that resumes after it). `other` is
what no phase measured (guards, the keys log): small where the breakdown is complete.
On CUDA each boundary synchronises, so that queued GPU work is counted in the phase that queued it.
"""
from __future__ import annotations

import time

import torch

PHASES = ("data", "forward_backward", "optimizer", "checkpoint", "logging")


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._began = self._last = time.perf_counter()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the previous lap (or the step's start) went to `phase`."""
        now = self._now()
        self.seconds[phase] += now - self._last
        self._last = now

    def record(self) -> dict[str, float]:
        """This step's breakdown, `time/step` its whole window; starts the next step's window."""
        now = self._now()
        out = {f"time/{phase}": seconds for phase, seconds in self.seconds.items()}
        out["time/step"] = now - self._began
        out["time/other"] = max(out["time/step"] - sum(self.seconds.values()), 0.0)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._began = self._last = now
        return out
