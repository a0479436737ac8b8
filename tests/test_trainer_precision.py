"""Mixed precision where torch supports it (CPU included): bf16 with fp32 master weights and close
losses; fp16 with dynamic loss scaling (overflows skipped and counted, the scale in checkpoints,
a SIGKILLed run resumes bit-identically). The fp32 run also checks the step-time breakdown and
an on-demand profile."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import REPO


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    spec = synthetic.make_librispeech(str(root / "corpus"), {"train-clean-100": 10}, seed=7, seconds=(2.0, 3.0))
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100",)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("5"), 2, 0), workers=0, echo=lambda *_: None)
    return root / "data"


def _command(dataset, run_dir, dtype: str, *overrides: str) -> list[str]:
    return [sys.executable, "d2v_train/main.py", "--config", "configs/train_speech_tiny.yaml", f"data.url={dataset}",
            f"run_dir={run_dir}", f"train.dtype={dtype}", "train.max_steps=3", "checkpoint.every_steps=3",
            "model.encoder.dropout=0", "model.encoder.attention_dropout=0", *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(dataset, run_dir, dtype: str, *overrides: str) -> list[dict]:
    result = subprocess.run(_command(dataset, run_dir, dtype, *overrides), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (run_dir / "stdout.txt").write_text(result.stdout)
    return _metrics(run_dir)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_trains_close_to_fp32_with_fp32_master_weights_and_the_step_time_is_broken_down(dataset, tmp_path):
    fp32 = _run(dataset, tmp_path / "fp32", "fp32", "profile.steps=[2,3]", "profile.memory_snapshot=true",
                "train.max_steps=4", "checkpoint.every_steps=2")
    out = (tmp_path / "fp32" / "stdout.txt").read_text()
    assert "profile.memory_snapshot: memory snapshots record CUDA allocations; this run is on cpu" in out
    assert re.search(r"step \d+\.\d\ds: data \d+% fwd/bwd \d+% opt", out) and "GFLOP/s" in out  # progress line
    # where the time went: the measured phases cover the step, and the steps add up to the run
    for record in fp32:
        phases = sum(record[f"time/{p}"] for p in ("data", "forward_backward", "optimizer", "checkpoint", "logging"))
        assert phases == pytest.approx(record["time/step"], rel=0.1), record
        assert record["time/forward_backward"] > 0 and record["flops_per_s"] > 0 and "mfu" not in record  # CPU
    assert fp32[2]["time/checkpoint"] > 0 and fp32[1]["time/checkpoint"] == 0  # the save after step 2
    # no time falls between the steps' windows: they add up to the run's own clock
    assert sum(r["time/step"] for r in fp32) == pytest.approx(fp32[-1]["elapsed_s"], rel=0.1)
    traces = list((tmp_path / "fp32" / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1 and not list((tmp_path / "fp32" / "profile").glob("memory-*")), traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    marks = {e["name"] for e in events if e.get("name", "").startswith("step ")}
    assert marks == {"step 2", "step 3"}, marks  # the asked updates, and no other
    assert any("aten::" in e.get("name", "") for e in events)
    bf16 = _run(dataset, tmp_path / "bf16", "bf16", "train.max_steps=4", "checkpoint.every_steps=2")
    for a, b in zip(fp32, bf16):
        assert a["loss"] != b["loss"], "bf16 compute must actually differ from fp32"
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    reader = FsspecReader(str(tmp_path / "bf16" / "checkpoints" / "step-00000004"))
    metadata = reader.read_metadata()
    dtypes = {m.properties.dtype for m in metadata.state_dict_metadata.values() if hasattr(m, "properties")}
    assert {d for d in dtypes if d.is_floating_point} == {torch.float32}, dtypes  # the rest: step counters


FP16 = ["train.max_steps=10", "checkpoint.every_steps=2", "train.deterministic=true",
        "train.loss_scale.init=4096", "train.loss_scale.window=2"]  # 4096 overflows this model's gradients


def test_fp16_skips_and_counts_overflows_and_a_killed_run_resumes_bit_identically(dataset, tmp_path):
    whole = _run(dataset, tmp_path / "whole", "fp16", *FP16)
    scales = [r["loss_scale"] for r in whole]
    overflowed = [r["step"] for r in whole if r["skipped"]]
    assert overflowed and len(overflowed) < len(whole), scales  # it overflows, then trains
    assert [r["overflows"] for r in whole][-1] == len(overflowed)
    for before, after in zip(whole, whole[1:]):  # halved after an overflow, doubled after 2 clean updates
        if before["skipped"]:
            assert after["loss_scale"] == before["loss_scale"] / 2
    assert any(b["loss_scale"] == 2 * a["loss_scale"] for a, b in zip(whole, whole[1:])), scales
    assert all(r["grad_norm"] == r["grad_norm"] for r in whole if not r["skipped"])  # finite where applied
    assert re.search(r"loss scale \d+ \(\d+ overflows\)", (tmp_path / "whole" / "stdout.txt").read_text())

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(_command(dataset, run_dir, "fp16", *FP16), cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= 7:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait(timeout=60) == -signal.SIGKILL
    from d2v_train.checkpoint import complete_steps

    assert max(complete_steps(str(run_dir / "checkpoints")), default=0) >= 6  # what the rerun resumes from
    resumed = _run(dataset, run_dir, "fp16", *FP16)
    computed = ("loss", "grad_norm", "loss_scale", "overflows", "skipped", "target_std", "pred_std")
    assert [{k: r[k] for k in computed} for r in resumed] == [{k: r[k] for k in computed} for r in whole]
