"""State-dict and config adapters between d2v's vision encoder and HF ``Data2VecVisionModel``
(BEiT with ``use_shared_relative_position_bias`` and a mask token).

Pure dict work, no transformers import. Non-renames: HF keeps q, k, v apart and its key has no
bias, d2v fuses them (``qkv.weight``, ``qkv.q_bias``, ``qkv.v_bias``). d2v's final LayerNorm is
HF's ``layernorm``, present when ``use_mean_pooling`` is False. The CLS and mask tokens are
(D,) vectors here, (1, 1, D) in HF.
"""

from __future__ import annotations

import re

import torch

from d2v_train.models.config import EMAConfig, ModelConfig, ObjectiveConfig, TransformerConfig, VisionEncoderConfig
from d2v_train.models.hf import _rename

__all__ = ["to_hf_vision", "from_hf_vision", "hf_vision_config", "config_from_hf_vision", "vision_objective"]

_RENAMES = [
    ("frontend.patch_embed.", "embeddings.patch_embeddings.projection."),
    ("frontend.cls_token", "embeddings.cls_token"),
    ("frontend.mask_emb", "embeddings.mask_token"),
    ("frontend.rel_pos_bias.table", "encoder.relative_position_bias.relative_position_bias_table"),
    ("transformer.blocks.{i}.attn.out.", "encoder.layer.{i}.attention.output.dense."),
    ("transformer.blocks.{i}.attn_norm.", "encoder.layer.{i}.layernorm_before."),
    ("transformer.blocks.{i}.ffn_norm.", "encoder.layer.{i}.layernorm_after."),
    ("transformer.blocks.{i}.ffn.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("transformer.blocks.{i}.ffn.fc2.", "encoder.layer.{i}.output.dense."),
    ("transformer.blocks.{i}.attn_scale", "encoder.layer.{i}.lambda_1"),
    ("transformer.blocks.{i}.ffn_scale", "encoder.layer.{i}.lambda_2"),
    ("transformer.final_norm.", "layernorm."),
]
_QKV = re.compile(r"transformer\.blocks\.(\d+)\.attn\.qkv\.(weight|q_bias|v_bias)$")
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_HF_ATTN = "encoder.layer.{}.attention.attention."
_HF_TASK_PREFIX = "data2vec_vision."  # Data2VecVisionFor*: the base model lives under it
_HF_DROPPED = ("pooler.",)  # fine-tuning pooler (its LayerNorm is not the pre-training one)
_TOKENS = ("frontend.cls_token", "frontend.mask_emb")


def to_hf_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d2v vision ``Encoder`` state dict -> HF ``Data2VecVisionModel`` state dict."""
    out = {}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            prefix = _HF_ATTN.format(m.group(1))
            if m.group(2) == "weight":
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{prefix}{name}.weight"] = part.clone()
            else:
                out[f"{prefix}{'query' if m.group(2) == 'q_bias' else 'value'}.bias"] = value
            continue
        new = _rename(key, _RENAMES)
        if new is None:
            raise ValueError(f"state dict: no HF name for d2v key {key!r}")
        out[new] = value.view(1, 1, -1) if key in _TOKENS else value
    return out


def from_hf_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Data2VecVisionModel`` (or ``Data2VecVisionFor*``: heads and pooler dropped) state
    dict -> d2v vision ``Encoder`` state dict."""
    if any(k.startswith(_HF_TASK_PREFIX) for k in state):
        state = {k[len(_HF_TASK_PREFIX):]: v for k, v in state.items() if k.startswith(_HF_TASK_PREFIX)}
    out, weights = {}, {}
    for key, value in state.items():
        if key.startswith(_HF_DROPPED) or key.endswith("relative_position_index"):
            continue
        m = _HF_QKV.match(key)
        if m:
            layer, name, kind = m.groups()
            if kind == "weight":
                weights.setdefault(layer, {})[name] = value
            elif name == "key":
                raise ValueError(f"state dict: {key!r}: the BEiT key projection has no bias")
            else:
                out[f"transformer.blocks.{layer}.attn.qkv.{name[0]}_bias"] = value
            continue
        new = _rename(key, _RENAMES, reverse=True)
        if new is None:
            raise ValueError(f"state dict: no d2v name for HF key {key!r}")
        out[new] = value.reshape(-1) if new in _TOKENS else value
    for layer, parts in weights.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"state dict: layer {layer} has only {sorted(parts)} of query, key, value")
        out[f"transformer.blocks.{layer}.attn.qkv.weight"] = torch.cat([parts[c] for c in ("query", "key", "value")])
    return out


def hf_vision_config(cfg: ModelConfig) -> dict:
    """Keyword arguments of an HF ``Data2VecVisionConfig`` with the same architecture."""
    enc, fe = cfg.encoder, cfg.frontend
    if not enc.pre_ln or enc.layer_drop or enc.activation_dropout:
        raise ValueError("encoder: HF Data2VecVision is pre-LN without layer drop or activation dropout")
    if fe.positions != "relative":
        raise ValueError("frontend.positions: HF Data2VecVision has no fixed sin-cos positions (data2vec 2.0 images)")
    return dict(
        hidden_size=enc.dim, num_hidden_layers=enc.layers, num_attention_heads=enc.heads,
        intermediate_size=enc.ffn_dim, hidden_act="gelu", hidden_dropout_prob=enc.dropout,
        attention_probs_dropout_prob=enc.attention_dropout, layer_norm_eps=enc.layer_norm_eps,
        image_size=fe.image_size, patch_size=fe.patch_size, num_channels=fe.channels, use_mask_token=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=False,
        use_shared_relative_position_bias=True, layer_scale_init_value=enc.layer_scale_init or 0.0,
        drop_path_rate=enc.drop_path, use_mean_pooling=not enc.final_ln,
    )


def vision_objective(enc: TransformerConfig) -> ObjectiveConfig:
    """data2vec v1 vision: block outputs of the top 6, layer norm per layer and after averaging,
    SmoothL1(2) averaged over channels (the reference's elementwise mean: 1/D per position)."""
    return ObjectiveConfig(top_k=min(6, enc.layers), target="block", instance_norm_targets=False,
                           layer_norm_targets=True, final_norm="layer", loss="smooth_l1", loss_beta=2.0,
                           loss_scale=1.0 / enc.dim, head="linear")


def config_from_hf_vision(hf: dict, **model_fields) -> ModelConfig:
    """A vision ``ModelConfig`` from an HF ``Data2VecVisionConfig`` (``.to_dict()``); objective and
    EMA come from ``model_fields`` or the data2vec vision defaults."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act: only gelu is supported, got {hf['hidden_act']!r}")
    if (not hf["use_shared_relative_position_bias"] or hf["use_relative_position_bias"]
            or hf["use_absolute_position_embeddings"]):
        raise ValueError("position: only BEiT's shared relative position bias is supported")
    encoder = TransformerConfig(
        dim=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], dropout=hf["hidden_dropout_prob"],
        attention_dropout=hf["attention_probs_dropout_prob"], activation_dropout=0.0, layer_drop=0.0,
        drop_path=hf["drop_path_rate"], pre_ln=True, final_ln=not hf["use_mean_pooling"],
        layer_norm_eps=hf["layer_norm_eps"], layer_scale_init=hf["layer_scale_init_value"] or None)
    image, patch = hf["image_size"], hf["patch_size"]
    if not isinstance(image, int) or not isinstance(patch, int):
        raise ValueError("image_size, patch_size: only square images and patches are supported")
    frontend = VisionEncoderConfig(image_size=image, patch_size=patch, channels=hf["num_channels"])
    model_fields.setdefault("objective", vision_objective(encoder))
    model_fields.setdefault("ema", EMAConfig(tau0=0.9998, tau_e=0.9998, tau_n=0))
    return ModelConfig(modality="vision", encoder=encoder, frontend=frontend, **model_fields)
