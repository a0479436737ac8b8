"""Training metrics: JSON lines in run_dir (rank 0), optional TensorBoard, a compact progress line,
and a loss/variance plot at the end."""
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
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tensorboard = None

    def write(self, record: dict) -> None:
        """Append one step's record; a resumed run drops records at or after its first step."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def truncate_from(self, step: int) -> None:
        """Forget records of steps >= `step` (they are about to be recomputed after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def progress_line(record: dict) -> str:
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
             f"tau {record['tau']:.5f}", f"target_std {record['target_std']:.3f}", f"pred_std {record['pred_std']:.3f}"]
    if "audio_s_per_s" in record:
        parts.append(f"{record['audio_s_per_s']:.0f} audio-s/s")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return " | ".join(parts)


def plot(run_dir: str) -> Path | None:
    """loss and target/prediction std over steps, as PNG beside the metrics."""
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
    bottom.legend()
    path = Path(run_dir) / "training.png"
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
