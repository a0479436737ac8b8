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
    return " | ".join(parts)


def plot(run_dir: str) -> Path | None:
    """loss, target/prediction std and the targets' effective rank over steps, as PNG beside the metrics."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["loss"] for r in records])
    top.set_ylabel("loss")
    bottom.plot(steps, [r["target_std"] for r in records], label="target std")
    bottom.plot(steps, [r["pred_std"] for r in records], label="prediction std")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper left")
    ranks = [(r["step"], r["target_rank"]) for r in records if "target_rank" in r]
    if ranks:
        right = bottom.twinx()
        right.plot(*zip(*ranks), color="tab:green", label="target effective rank")
        right.set_ylabel("effective rank")
        right.legend(loc="upper right")
    path = Path(run_dir) / "training.png"
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
