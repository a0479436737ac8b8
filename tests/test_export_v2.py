"""data2vec 2.0 encoders leave d2v: `d2v export-hf` writes a folder with its own modeling file that
transformers loads with trust_remote_code, and it computes what d2v computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from d2v_train.config import CONFIGS
from d2v_train.export import load_model
from d2v_train.imports import write_checkpoint
from d2v_train.models.config import ModelConfig
from d2v_train.models.data2vec import build_encoder
from tests.helpers import run_d2v

transformers = pytest.importorskip("transformers")


def _inputs(cfg: ModelConfig) -> tuple[dict, dict]:
    """The same two-sample batch for d2v's encoder and for the exported model (the second sample padded)."""
    g = torch.Generator().manual_seed(3)
    if cfg.modality == "speech":
        source = torch.randn(2, 8000, generator=g)
        padding = torch.zeros(2, 8000, dtype=torch.bool)
        padding[1, 6000:] = True
        source[1, 6000:] = 0
        return {"source": source, "padding_mask": padding}, {"input_values": source,
                                                             "attention_mask": (~padding).long()}
    if cfg.modality == "vision":
        image = torch.randn(2, 3, cfg.frontend.image_size, cfg.frontend.image_size, generator=g)
        patches = (cfg.frontend.image_size // cfg.frontend.patch_size) ** 2
        return {"image": image, "mask": torch.zeros(2, patches, dtype=torch.bool)}, {"pixel_values": image}
    tokens = torch.randint(5, cfg.frontend.vocab_size, (2, 12), generator=g)
    tokens[:, 0], tokens[:, -1], tokens[1, 8:] = 0, 2, cfg.frontend.pad_id
    padding = tokens == cfg.frontend.pad_id
    zeros = torch.zeros_like(padding)
    return ({"tokens": tokens, "target_tokens": tokens, "padding_mask": padding, "mask": zeros, "target_mask": zeros},
            {"input_ids": tokens, "attention_mask": (~padding).long()})


@pytest.mark.parametrize("preset", ["speech_v2_tiny", "vision_v2_tiny", "text_v2_tiny"])
def test_a_data2vec2_encoder_exports_with_its_own_modeling_file_and_matches_d2v(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # where transformers copies remote code
    cfg = ModelConfig.model_validate(yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text()))
    torch.manual_seed(5)
    weights = build_encoder(cfg).state_dict()
    checkpoint = tmp_path / "ckpt"
    write_checkpoint(cfg, weights, str(checkpoint), source={"kind": "test"})
    if cfg.modality == "text":  # data2vec 2.0's text encoder is RoBERTa's: HF's class holds it; asked for here
        run_d2v("export-hf", str(checkpoint), str(tmp_path / "hf"), "--remote-code")
    else:
        result = run_d2v("export-hf", str(checkpoint), str(tmp_path / "hf"))
        assert "trust_remote_code=True" in result.stdout  # HF has no class for it: said, and written so
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_d2v.D2VEncoder"
    _, model, _ = load_model(str(checkpoint))
    ours, theirs = _inputs(cfg)
    with torch.no_grad():
        x_BTD, padding_BT = model.student.embed(ours)
        reference = model.student(x_BTD, padding_BT, target="block").x_BTD
        loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
        out = loaded(**theirs, output_hidden_states=True)
    assert out.last_hidden_state.shape == reference.shape
    keep = ~padding_BT
    assert torch.allclose(out.last_hidden_state[keep], reference[keep], atol=1e-5)
    assert len(out.hidden_states) == cfg.encoder.layers + 1
    if not cfg.encoder.final_ln:  # post-LN: the last block's output is the final output
        assert torch.allclose(out.hidden_states[-1][keep], reference[keep], atol=1e-5)
    assert np.isfinite(out.last_hidden_state.numpy()).all()
