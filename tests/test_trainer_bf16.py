"""bf16 mixed precision where torch supports it (CPU included): fp32 master weights, close losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


def _run(dataset, run_dir, dtype: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "d2v_train/main.py", "--config", "configs/train_speech_tiny.yaml", f"data.url={dataset}",
         f"run_dir={run_dir}", f"train.dtype={dtype}", "train.max_steps=3", "checkpoint.every_steps=3",
         "model.encoder.dropout=0", "model.encoder.attention_dropout=0"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_trains_close_to_fp32_with_fp32_master_weights(dataset, tmp_path):
    fp32 = _run(dataset, tmp_path / "fp32", "fp32")
    bf16 = _run(dataset, tmp_path / "bf16", "bf16")
    for a, b in zip(fp32, bf16):
        assert a["loss"] != b["loss"], "bf16 compute must actually differ from fp32"
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    reader = FsspecReader(str(tmp_path / "bf16" / "checkpoints" / "step-00000003"))
    metadata = reader.read_metadata()
    dtypes = {m.properties.dtype for m in metadata.state_dict_metadata.values() if hasattr(m, "properties")}
    assert {d for d in dtypes if d.is_floating_point} == {torch.float32}, dtypes  # the rest: step counters
