"""Released weights in: an HF data2vec audio folder and a fairseq-style `.pt` become d2v checkpoints
that `d2v encode` reads exactly as HF computes them, and `init.from` starts pre-training from them."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile
import torch
import yaml

from d2v_train.config import CONFIGS
from d2v_train.models.config import ModelConfig
from d2v_train.models.hf import _FAIRSEQ, _rename, hf_audio_config
from tests.helpers import run_d2v

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random HF Data2VecAudioModel with the tiny preset's architecture, saved as HF saves it,
    and a clip to encode."""
    root = tmp_path_factory.mktemp("released")
    cfg = ModelConfig.model_validate(yaml.safe_load((CONFIGS / "speech_tiny.yaml").read_text()))
    torch.manual_seed(11)
    hf = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**hf_audio_config(cfg))).eval()
    hf.save_pretrained(root / "hf")
    rng = np.random.default_rng(0)
    clip = (np.sin(np.arange(24000) / 9.0) * 0.3 + rng.standard_normal(24000) * 0.05).astype(np.float32)
    soundfile.write(root / "clip.flac", clip, 16000, subtype="PCM_16")
    audio, _ = soundfile.read(root / "clip.flac", dtype="float32")
    normalised = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-5)).float()[None]
    with torch.no_grad():
        reference = hf(normalised).last_hidden_state[0].numpy()
    return root, hf, reference


def _encoded(checkpoint, clip, out_dir) -> np.ndarray:
    run_d2v("encode", str(checkpoint), str(clip), "--out", str(out_dir / "out.npy"))
    return np.load(out_dir / "out.npy")


def test_an_hf_folder_imports_and_encodes_as_hf_does(released, tmp_path):
    root, _, reference = released
    out = tmp_path / "imported"
    result = run_d2v("import", "hf", str(root / "hf"), str(out))
    assert "step-00000000" in result.stdout and json.loads((out / "import.json").read_text())["kind"] == "hf"
    encoded = _encoded(out, root / "clip.flac", tmp_path)
    assert encoded.shape == reference.shape and np.abs(encoded - reference).max() <= 1e-5


def _as_fairseq(hf_state: dict) -> dict:
    """HF Data2VecAudioModel names -> fairseq data2vec_audio names (what a fairseq .pt holds)."""
    out = {}
    for key, value in hf_state.items():
        new = _rename(key, _FAIRSEQ, reverse=True)
        assert new is not None, key
        out[new] = value.clone()
    return out


def test_a_fairseq_checkpoint_imports_weights_only_and_encodes_the_same(released, tmp_path):
    root, hf, reference = released
    state = _as_fairseq(hf.state_dict())
    state["final_proj.weight"] = torch.zeros(3, 3)  # the pre-training head and EMA bookkeeping are left out
    state["_ema"] = torch.zeros(1)
    heads = hf.config.num_attention_heads
    torch.save({"model": state, "cfg": {"model": {"encoder_attention_heads": heads}}}, tmp_path / "d2v.pt")
    out = tmp_path / "from-fairseq"
    run_d2v("import", "fairseq", str(tmp_path / "d2v.pt"), str(out))
    encoded = _encoded(out, root / "clip.flac", tmp_path)
    assert np.abs(encoded - reference).max() <= 1e-5
    # a file that pickles objects is refused, not unpickled
    torch.save({"model": state, "args": re.compile("x")}, tmp_path / "objects.pt")
    result = run_d2v("import", "fairseq", str(tmp_path / "objects.pt"), str(tmp_path / "x"), check=False)
    assert result.returncode != 0 and "does not unpickle" in result.stderr


@pytest.mark.torchrun
@pytest.mark.slow
def test_init_from_starts_pre_training_from_the_imported_weights_and_resumes_exactly(released, speech_dataset,
                                                                                      tmp_path):
    from tests.test_trainer import CONFIG, _copy_run, metrics, train

    root, hf, _ = released
    imported = tmp_path / "imported"
    run_d2v("import", "hf", str(root / "hf"), str(imported))
    run_dir, dump = tmp_path / "run", tmp_path / "step0.pt"
    common = [f"init.from={imported}", "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=4"]
    train(run_dir, speech_dataset, *common, ranks=1, entry=["-m", "tests.test_trainer", str(dump), "--config", CONFIG])
    loaded = torch.load(dump, weights_only=False)
    assert loaded["step"] == 0  # step 0, and a fresh optimizer (its moments zero)
    assert all(not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in loaded["optimizer"]["state"].values())
    from d2v_train.models.hf import from_hf

    expected = from_hf(hf.state_dict())
    for key, value in expected.items():
        assert torch.equal(loaded["model"][f"student.{key}"], value), key
        teacher = loaded["teacher"].get(f"module.{key}")
        assert teacher is None or torch.equal(teacher, value), key  # the teacher starts as the student
    # the run resumes like any other: from its step-2 checkpoint, the same steps 3 and 4
    resumed = tmp_path / "resumed"
    _copy_run(run_dir, resumed, 2)
    train(resumed, speech_dataset, *common, ranks=1)
    assert [(r["step"], r["loss"]) for r in metrics(resumed)] == [(r["step"], r["loss"]) for r in metrics(run_dir)]
    # another architecture is refused, naming the tensors
    from d2v_train.models.objectives import build_model
    from d2v_train.trainer import initialise_from

    other = ModelConfig.model_validate(yaml.safe_load((CONFIGS / "speech_tiny.yaml").read_text()))
    other = other.model_copy(update={"encoder": other.encoder.model_copy(update={"ffn_dim": 96})})
    with pytest.raises(ValueError, match=r"init.from: .* holds another architecture \(\d+ tensors differ: "
                                         r"transformer.blocks.0.ffn"):
        initialise_from(build_model(other), str(imported), other)
