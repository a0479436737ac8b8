"""`d2v export-hf` and `d2v encode` on a checkpoint the trainer wrote: HF loads it and agrees."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import REPO, run_d2v

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    spec = synthetic.make_librispeech(str(root / "corpus"), {"train-clean-100": 12}, seed=4, seconds=(1.5, 3.0))
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100",)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("6"), 2, 0), workers=0, echo=lambda *_: None)
    run_dir = root / "run"
    result = subprocess.run(
        [sys.executable, "d2v_train/main.py", "--config", "configs/train_speech_tiny.yaml", f"data.url={root / 'data'}",
         f"run_dir={run_dir}", "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep=2"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    flacs = sorted(p for p in spec.files if p.endswith(".flac"))[:2]
    return run_dir / "checkpoints", flacs


def _normalised(path: str) -> torch.Tensor:
    audio, _ = soundfile.read(path, dtype="float32")
    return torch.from_numpy(((audio - audio.mean()) / np.sqrt(audio.var() + 1e-5)).astype(np.float32))[None]


def test_exported_folder_loads_in_hf_and_matches_d2v_encode(trained, tmp_path):
    checkpoints, flacs = trained
    run_d2v("export-hf", str(checkpoints), str(tmp_path / "hf"))
    hf = transformers.Data2VecAudioModel.from_pretrained(tmp_path / "hf").eval()
    run_d2v("encode", str(checkpoints), flacs[0], "--out", str(tmp_path / "last.npy"))
    run_d2v("encode", str(checkpoints / "step-00000001"), flacs[0], "--out", str(tmp_path / "older.npy"))
    run_d2v("encode", str(checkpoints), flacs[0], "--out", str(tmp_path / "first.npy"), "--layer", "1")
    with torch.no_grad():
        reference = hf(_normalised(flacs[0]), output_hidden_states=True)
    last = np.load(tmp_path / "last.npy", allow_pickle=False)
    assert last.shape == tuple(reference.last_hidden_state.shape[1:])
    assert np.abs(last - reference.last_hidden_state[0].numpy()).max() <= 1e-5
    first = np.load(tmp_path / "first.npy", allow_pickle=False)
    assert np.abs(first - reference.hidden_states[1][0].numpy()).max() <= 1e-5
    older = np.load(tmp_path / "older.npy", allow_pickle=False)
    assert older.shape == last.shape and not np.allclose(older, last), "step 1 and step 2 weights differ"


def test_several_inputs_stack_with_lengths_and_errors_are_clear(trained, tmp_path):
    checkpoints, flacs = trained
    run_d2v("encode", str(checkpoints), *flacs, "--out", str(tmp_path / "both.npy"))
    both = np.load(tmp_path / "both.npy", allow_pickle=False)
    lengths = np.load(tmp_path / "both.lengths.npy", allow_pickle=False)
    assert both.shape[0] == 2 and both.shape[1] == lengths.max()
    single = np.load(io.BytesIO((tmp_path / "both.npy").read_bytes()))[0, : lengths[0]]
    run_d2v("encode", str(checkpoints), flacs[0], "--out", str(tmp_path / "one.npy"))
    assert np.abs(single - np.load(tmp_path / "one.npy")).max() <= 1e-5
    result = run_d2v("encode", str(tmp_path / "nowhere"), flacs[0], "--out", str(tmp_path / "x.npy"), check=False)
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
    result = run_d2v("encode", str(checkpoints), flacs[0], "--out", str(tmp_path / "x.npy"), "--layer", "9",
                     check=False)
    assert result.returncode == 2 and "--layer 9" in result.stderr
