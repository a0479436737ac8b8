"""Speech encoder: configs, exact parity with HF Data2VecAudioModel, state-dict adapters."""

from pathlib import Path

import pydantic
import pytest
import torch

from d2v_train.models import ModelConfig, TransformerConfig, build_encoder, load_config, save_config
from d2v_train.models.hf import config_from_hf_audio, fairseq_to_hf, from_fairseq, from_hf, hf_audio_config, to_hf
from d2v_train.models.speech import frame_padding_mask
from d2v_train.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = load_config(CONFIGS / "speech_tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(cfg=TINY, seed=0, **hf_overrides):
    """Random-weight HF model and a d2v encoder holding its weights (through the adapter)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Data2VecAudioConfig(**{**hf_audio_config(cfg), **hf_overrides})
    hf = transformers.Data2VecAudioModel(hf_cfg)
    enc = build_encoder(config_from_hf_audio(hf_cfg.to_dict()))
    enc.load_state_dict(from_hf(hf.state_dict()), strict=True)
    return hf, enc


def _inputs(B=3, L=16000, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 12_345:] = True
    pad[2, 7_000:] = True
    return x.masked_fill(pad, 0.0), pad


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["speech_tiny", "speech_base", "speech_large"])
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_config_errors_name_the_field():
    with pytest.raises(pydantic.ValidationError, match=r"encoder\.dimm"):
        ModelConfig.model_validate({"encoder": {"dimm": 64}})
    with pytest.raises(pydantic.ValidationError, match="heads"):
        TransformerConfig(dim=64, heads=5)
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        load_config(CONFIGS / "speech_tiny.yaml", {"objective": {"top_k": 3}})
    with pytest.raises(pydantic.ValidationError, match="loss_beta"):
        load_config(CONFIGS / "speech_tiny.yaml", {"objective": {"loss": "smooth_l1"}})
    with pytest.raises(pydantic.ValidationError, match="conv_layers"):
        load_config(CONFIGS / "speech_tiny.yaml", {"frontend": {"conv_layers": [[32, 0, 2]]}})


def test_tiny_preset_is_cpu_sized_and_keeps_the_frame_grid():
    assert TINY.encoder.dim <= 64 and TINY.encoder.layers <= 2
    assert max(c for c, _, _ in TINY.frontend.conv_layers) <= 32
    assert TINY.frontend.hop == 320


def test_parameter_counts_match_hf():
    with torch.device("meta"):
        base = build_encoder(load_config(CONFIGS / "speech_base.yaml"))
        large_cfg = load_config(CONFIGS / "speech_large.yaml")
        large = build_encoder(large_cfg)
        hf_large = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**hf_audio_config(large_cfg)))
    assert sum(p.numel() for p in base.parameters()) == 93_164_288
    assert sum(p.numel() for p in large.parameters()) == sum(p.numel() for p in hf_large.parameters())
    assert large_cfg.encoder.dim == 1024 and large_cfg.encoder.layers == 24 and large_cfg.encoder.heads == 16


# -- HF parity ----------------------------------------------------------------------------------

def test_hidden_states_match_hf_with_and_without_padding():
    hf, enc = _pair()
    hf.eval(), enc.eval()
    ffn_hf = []
    for layer in hf.encoder.layers:
        layer.feed_forward.register_forward_hook(lambda m, i, o: ffn_hf.append(o))
    x, pad = _inputs()
    for padding in (None, pad):
        ffn_hf.clear()
        with torch.no_grad():
            ref = hf(x, attention_mask=None if padding is None else (~padding).long(), output_hidden_states=True)
            x_BTD, pad_BT = enc.embed({"source": x, "padding_mask": padding})
            blocks = enc(x_BTD, pad_BT, return_from=0, target="block")
            ffn = enc(x_BTD, pad_BT, return_from=0, target="ffn")
        assert (ref.last_hidden_state - blocks.x_BTD).abs().max() <= 1e-5
        for a, b in zip(ref.hidden_states[1:], blocks.layers, strict=True):
            assert (a - b).abs().max() <= 1e-5
        for a, b in zip(ffn_hf, ffn.layers, strict=True):
            assert (a - b).abs().max() <= 1e-5
    # the frame-level padding the encoder used is HF's
    hf_keep = hf._get_feature_vector_attention_mask(x_BTD.shape[1], (~pad).long())
    assert torch.equal(pad_BT, ~hf_keep)
    assert pad_BT[2].sum() > 0 and not pad_BT[0].any()


def test_masked_training_gradients_match_hf():
    """Train mode without dropout: the mask embedding, the padding path and every gradient (fp64:
    fp32 gradient sums over thousands of frames differ in their last bits between conv kernels)."""
    hf, enc = _pair(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    hf.double().train(), enc.double().train()
    x, pad = _inputs()
    x = x.double()
    x_BTD, pad_BT = enc.embed({"source": x, "padding_mask": pad})
    mask = torch.zeros_like(pad_BT)
    mask[:, 5:15] = True
    w = torch.randn(x_BTD.shape[0], x_BTD.shape[1], TINY.encoder.dim, dtype=torch.float64)
    (enc(x_BTD, pad_BT, mask & ~pad_BT).x_BTD * w).sum().backward()
    (hf(x, attention_mask=(~pad).long(), mask_time_indices=mask & ~pad_BT).last_hidden_state * w).sum().backward()
    ours = to_hf({k: p.grad for k, p in enc.named_parameters()})
    for name, p in hf.named_parameters():
        assert torch.allclose(p.grad, ours[name], rtol=1e-9, atol=1e-9), name


def test_training_and_eval_feature_encoders_agree():
    """Training runs the CNN as unfold + matmul, eval as Conv1d (bit-equal to HF): same function."""
    enc = build_encoder(TINY)
    x, _ = _inputs()
    fe = enc.frontend.feature_extractor
    with torch.no_grad():
        fast, exact = fe.train()(x), fe.eval()(x)
    assert fast.shape == exact.shape and fast.is_contiguous()
    assert (fast - exact).abs().max() <= 1e-5


def test_state_dict_round_trip_is_strict_and_exact():
    hf, enc = _pair()
    back = transformers.Data2VecAudioModel(hf.config)
    back.load_state_dict(to_hf(enc.state_dict()), strict=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # a CTC model's base model imports with its head dropped
    ctc = transformers.Data2VecAudioForCTC(hf.config)
    enc.load_state_dict(from_hf(ctc.state_dict()), strict=True)
    with pytest.raises(ValueError, match="no d2v name"):
        from_hf({"encoder.mystery.weight": torch.zeros(1)})


def test_export_loads_with_hf_from_pretrained(tmp_path):
    """A d2v encoder written as an HF model folder (config.json + model.safetensors) loads with
    ``from_pretrained`` (local folder, nothing downloaded) and computes the same features."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    enc = build_encoder(TINY).eval()
    transformers.Data2VecAudioConfig(**hf_audio_config(TINY)).save_pretrained(tmp_path)
    save_file(to_hf(enc.state_dict()), tmp_path / "model.safetensors")
    hf = transformers.Data2VecAudioModel.from_pretrained(tmp_path).eval()
    x, _ = _inputs()
    with torch.no_grad():
        ours = enc(*enc.embed({"source": x})).x_BTD
        assert (hf(x).last_hidden_state - ours).abs().max() <= 1e-5


def test_fairseq_names_import():
    hf, enc = _pair()
    hf_sd = hf.state_dict()
    # fairseq data2vec_audio names (DATA2VEC.md section 7), written out independently of hf.py
    fs = {}
    for k, v in hf_sd.items():
        k2 = (k.replace("feature_extractor.conv_layers.", "FE.").replace(".conv.", ".0.")
              .replace(".layer_norm.", ".2.1.") if k.startswith("feature_extractor.") else k)
        k2 = k2.replace("FE.", "feature_extractor.conv_layers.")
        k2 = k2.replace("feature_projection.layer_norm.", "layer_norm.")
        k2 = k2.replace("feature_projection.projection.", "post_extract_proj.")
        k2 = k2.replace("masked_spec_embed", "mask_emb")
        if k2.startswith("encoder.pos_conv_embed.layers."):
            k2 = k2.replace("encoder.pos_conv_embed.layers.", "encoder.pos_conv.").replace(".conv.", ".0.")
        k2 = (k2.replace(".attention.", ".self_attn.").replace(".layer_norm.", ".self_attn_layer_norm.")
              if k2.startswith("encoder.layers.") else k2)
        k2 = k2.replace("feed_forward.intermediate_dense", "fc1").replace("feed_forward.output_dense", "fc2")
        fs[k2] = v
    assert "feature_extractor.conv_layers.3.2.1.weight" in fs and "encoder.pos_conv.4.0.bias" in fs
    fs["final_proj.weight"] = torch.zeros(3, 3)
    fs["_ema"] = torch.zeros(1)
    assert fairseq_to_hf(fs).keys() == hf_sd.keys()
    ours = from_fairseq(fs)
    for k, v in from_hf(hf_sd).items():
        assert torch.equal(ours[k], v), k


def test_frame_padding_mask_matches_hf_for_many_lengths():
    hf, _ = _pair()
    lengths = torch.tensor([400, 401, 719, 720, 16000, 15999, 3200, 12_345])
    L = 16000
    pad = torch.arange(L) >= lengths[:, None]
    T = hf._get_feat_extract_output_lengths(torch.tensor(L)).item()
    ours = frame_padding_mask(pad, T, TINY.frontend.conv_layers)
    assert torch.equal(~ours, hf._get_feature_vector_attention_mask(T, (~pad).long()))


# -- the shared Transformer beyond speech -------------------------------------------------------

def test_padding_never_leaks_into_valid_frames():
    enc = build_encoder(TINY).eval()
    x, pad = _inputs()
    with torch.no_grad():
        a, pad_BT = enc.embed({"source": x, "padding_mask": pad})
        b = a.clone()
        b[pad_BT] = 1e3  # garbage in padded frames
        ya, yb = enc(a, pad_BT).x_BTD, enc(b, pad_BT).x_BTD
    assert torch.allclose(ya[~pad_BT], yb[~pad_BT], atol=1e-5)


def test_pre_ln_block_with_layer_scale_follows_the_formula():
    cfg = TransformerConfig(dim=32, layers=2, heads=4, ffn_dim=64, dropout=0.0, attention_dropout=0.0,
                            layer_drop=0.0, pre_ln=True, final_ln=True, layer_scale_init=0.1)
    tr = Transformer(cfg).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = tr(x, return_from=0, target="ffn")
        ref = x
        for blk in tr.blocks:
            ref = ref + blk.attn_scale * blk.attn(blk.attn_norm(ref), None)
            f = blk.ffn(blk.ffn_norm(ref))
            ref = ref + blk.ffn_scale * f
        assert torch.allclose(out.layers[-1], f, atol=1e-6)
        assert torch.allclose(out.x_BTD, tr.final_norm(ref), atol=1e-6)
