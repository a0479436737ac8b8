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


def _train(run_dir, *overrides) -> None:
    result = subprocess.run([sys.executable, "d2v_train/main.py", *overrides, f"run_dir={run_dir}",
                             "train.max_steps=2", "checkpoint.every_steps=1"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_vision_and_text_exports_load_in_hf_and_match_d2v_encode(tmp_path):
    from d2v_train.data.decode import decode_image
    from pipelines.tokenizer import load_tokenizer, special_ids

    images = synthetic.make_imagenet(str(tmp_path / "images"), layout="imagefolder", classes=3, train_per_class=6,
                                     val_per_class=1, seed=1)
    run_d2v("data", "build", "imagenet", images.source, str(tmp_path / "vdata"), "--image-size", "64",
            "--patch-size", "8", "--shard-size", "8", "--workers", "0")
    _train(tmp_path / "vrun", "model=vision_tiny", f"data.url={tmp_path / 'vdata'}", "data.batch_size=4")
    run_d2v("export-hf", str(tmp_path / "vrun" / "checkpoints"), str(tmp_path / "vhf"))
    image = sorted(p for p in images.files if "/val/" in p)[0]
    run_d2v("encode", str(tmp_path / "vrun" / "checkpoints"), image, "--out", str(tmp_path / "v.npy"))
    mask = io.BytesIO()
    np.save(mask, np.zeros((1, 64), dtype=bool))
    pixels, _ = decode_image(open(image, "rb").read(), mask.getvalue(), variant=0, train=False,
                             rng=np.random.default_rng(0), size=64, eval_resize=round(64 * 256 / 224))
    hf = transformers.Data2VecVisionModel.from_pretrained(tmp_path / "vhf").eval()
    with torch.no_grad():
        reference = hf(torch.from_numpy(np.ascontiguousarray(pixels))[None]).last_hidden_state[0].numpy()
    assert np.abs(np.load(tmp_path / "v.npy") - reference).max() <= 1e-5

    text = synthetic.make_text_corpus(str(tmp_path / "text"), files=2, docs_per_file=8, seed=1)
    run_d2v("data", "build", "text", *text.files, str(tmp_path / "tdata"), "--vocab-size", "600",
            "--shard-size", "20", "--valid-fraction", "0.1", "--workers", "0")
    _train(tmp_path / "trun", "model=text_tiny", f"data.url={tmp_path / 'tdata'}", "data.batch_size=4")
    import json

    last = json.loads((tmp_path / "trun" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tokens_per_s"] > 0 and "audio_s_per_s" not in last
    run_d2v("export-hf", str(tmp_path / "trun" / "checkpoints"), str(tmp_path / "thf"))
    (tmp_path / "in.txt").write_text("HELLO WORLD. Some text here, café.\n")
    run_d2v("encode", str(tmp_path / "trun" / "checkpoints"), str(tmp_path / "in.txt"), "--out", str(tmp_path / "t.npy"))
    tokenizer = load_tokenizer(str(tmp_path / "tdata" / "tokenizer"))
    ids = special_ids(tokenizer)
    tokens = [ids["bos_id"], *tokenizer.encode((tmp_path / "in.txt").read_text(), add_special_tokens=False).ids,
              ids["eos_id"]]
    hf = transformers.Data2VecTextModel.from_pretrained(tmp_path / "thf", add_pooling_layer=False).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([tokens])).last_hidden_state[0].numpy()
    assert np.abs(np.load(tmp_path / "t.npy") - reference).max() <= 1e-5
