"""Training metrics: JSON lines in run_dir (rank 0), optional TensorBoard, a compact progress line,
a loss/variance plot at the end, and (opt-in) the sample keys each rank consumed per step."""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tensorboard = None
        self._purge_step = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        """Append one step's record."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        board = self._board()
        if board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, record["step"])

    def _board(self):
        if self._tensorboard is None:  # on first use: a resume sets purge_step before
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"),
                                                  purge_step=self._purge_step)
            except ImportError:  # tensorboard is optional
                self._tensorboard = False
        return self._tensorboard or None

    def truncate_from(self, step: int) -> None:
        """Forget records of steps >= `step` (they are about to be recomputed after a resume),
        in TensorBoard too."""
        if self.enabled:
            truncate_jsonl(self.path, step)
            self._purge_step = step

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()


class KeysLog:
    """Which samples each step consumed on this rank (`train.log_keys`): {"step", "epoch", "keys"}
    lines in run_dir/keys-rank{r}.jsonl, for checking that a trajectory with restarts covers an
    epoch exactly once."""

    def __init__(self, run_dir: str, rank: int) -> None:
        self.path = Path(run_dir) / f"keys-rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")

    @staticmethod
    def truncate_from(run_dir: str, step: int) -> None:
        """Forget steps >= `step` in every rank's file (also of ranks an elastic restart no longer has)."""
        for path in Path(run_dir).glob("keys-rank*.jsonl"):
            truncate_jsonl(path, step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of steps < `step`; a line cut short by a killed process goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] < step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def progress_line(record: dict) -> str:
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
             f"tau {record['tau']:.5f}", f"target_std {record['target_std']:.3f}", f"pred_std {record['pred_std']:.3f}"]
    if "target_rank" in record:
        parts.append(f"target_rank {record['target_rank']:.1f}")
    if "audio_s_per_s" in record:
        parts.append(f"{record['audio_s_per_s']:.0f} audio-s/s")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tokens/s")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    if "time/step" in record:
        parts.append(step_time(record))
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    elif "flops_per_s" in record:
        parts.append(f"{record['flops_per_s'] / 1e9:.2f} GFLOP/s")
    if "loss_scale" in record:
        parts.append(f"loss scale {record['loss_scale']:g} ({record['overflows']} overflows)")
    return " | ".join(parts)


# the step-time phases (steptime.StepClock) in the order a step runs them, as the progress line abbreviates them
TIME_PHASES = {"data": "data", "forward_backward": "fwd/bwd", "optimizer": "opt", "checkpoint": "ckpt",
               "logging": "log", "other": "other"}


def step_time(record: dict) -> str:
    """`step 0.52s: data 2% fwd/bwd 81% opt 9% ckpt 0% log 1% other 7%`."""
    total = max(record["time/step"], 1e-9)
    shares = " ".join(f"{short} {100 * record.get(f'time/{phase}', 0.0) / total:.0f}%"
                      for phase, short in TIME_PHASES.items())
    return f"step {record['time/step']:.2f}s: {shares}"


def plot(run_dir: str) -> Path | None:
    """The run at a glance, as PNG beside the metrics: loss; target/prediction std and the targets'
    effective rank (a collapse shows there first); where each step's time went."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    timed = [r for r in records if "time/step" in r]
    rows = 3 if timed else 2
    figure, axes = plt.subplots(rows, 1, figsize=(7, 3 * rows), sharex=True)
    top, middle = axes[0], axes[1]
    top.plot(steps, [r["loss"] for r in records])
    top.set_ylabel("loss")
    middle.plot(steps, [r["target_std"] for r in records], label="target std")
    middle.plot(steps, [r["pred_std"] for r in records], label="prediction std")
    middle.set_ylabel("std")
    middle.legend(loc="upper left")
    ranks = [(r["step"], r["target_rank"]) for r in records if "target_rank" in r]
    if ranks:
        right = middle.twinx()
        right.plot(*zip(*ranks), color="tab:green", label="target effective rank")
        right.set_ylabel("effective rank")
        right.legend(loc="upper right")
    if timed:
        bottom = axes[2]
        bottom.stackplot([r["step"] for r in timed],
                         *[[r.get(f"time/{phase}", 0.0) for r in timed] for phase in TIME_PHASES],
                         labels=list(TIME_PHASES.values()))
        bottom.set_ylabel("seconds per step")
        bottom.legend(loc="upper left", ncol=len(TIME_PHASES), fontsize="small")
    axes[-1].set_xlabel("step")
    path = Path(run_dir) / "training.png"
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
