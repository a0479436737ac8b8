"""State-dict and config adapters between d2v's text encoder and HF ``Data2VecTextModel`` (RoBERTa).

Pure dict work, no transformers import. The only non-rename is attention: HF keeps q, k, v apart,
d2v fuses them. HF's pooler (``add_pooling_layer``) and task heads are fine-tuning parts: dropped.
"""

from __future__ import annotations

import re

import torch

from d2v_train.models.config import EMAConfig, ModelConfig, ObjectiveConfig, TextEncoderConfig, TransformerConfig
from d2v_train.models.hf import join_qkv_and_rename, split_qkv_and_rename

__all__ = ["to_hf_text", "from_hf_text", "hf_text_config", "config_from_hf_text", "text_objective"]

_RENAMES = [
    ("frontend.word_embeddings.", "embeddings.word_embeddings."),
    ("frontend.position_embeddings.", "embeddings.position_embeddings."),
    ("frontend.token_type_embeddings.", "embeddings.token_type_embeddings."),
    ("frontend.layer_norm.", "embeddings.LayerNorm."),
    ("transformer.blocks.{i}.attn.out.", "encoder.layer.{i}.attention.output.dense."),
    ("transformer.blocks.{i}.attn_norm.", "encoder.layer.{i}.attention.output.LayerNorm."),
    ("transformer.blocks.{i}.ffn.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("transformer.blocks.{i}.ffn.fc2.", "encoder.layer.{i}.output.dense."),
    ("transformer.blocks.{i}.ffn_norm.", "encoder.layer.{i}.output.LayerNorm."),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")
_NAMES = ("query", "key", "value")
_HF_TASK_PREFIX = "data2vec_text."  # Data2VecTextFor*: the base model lives under it
_HF_DROPPED = ("pooler.",)


def to_hf_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d2v text ``Encoder`` state dict -> HF ``Data2VecTextModel(add_pooling_layer=False)`` state dict."""
    return split_qkv_and_rename(
        state, _RENAMES, lambda layer, part, param: f"encoder.layer.{layer}.attention.self.{_NAMES[part]}.{param}")


def from_hf_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Data2VecTextModel`` (or ``Data2VecTextFor*``: pooler and heads dropped) state dict ->
    d2v text ``Encoder`` state dict."""
    return join_qkv_and_rename(state, _RENAMES, _HF_QKV, _NAMES, task_prefix=_HF_TASK_PREFIX, dropped=_HF_DROPPED)


def hf_text_config(cfg: ModelConfig) -> dict:
    """Keyword arguments of an HF ``Data2VecTextConfig`` with the same architecture."""
    enc, fe = cfg.encoder, cfg.frontend
    if (enc.pre_ln or enc.final_ln or enc.layer_scale_init is not None or enc.drop_path or enc.layer_drop
            or enc.activation_dropout):
        raise ValueError("encoder: HF Data2VecText is post-LN without final_ln, layer scale, drop path, "
                         "layer drop or activation dropout")
    return dict(
        vocab_size=fe.vocab_size, hidden_size=enc.dim, num_hidden_layers=enc.layers,
        num_attention_heads=enc.heads, intermediate_size=enc.ffn_dim, hidden_act="gelu",
        hidden_dropout_prob=enc.dropout, attention_probs_dropout_prob=enc.attention_dropout,
        max_position_embeddings=fe.max_positions, type_vocab_size=fe.type_vocab_size,
        layer_norm_eps=enc.layer_norm_eps, pad_token_id=fe.pad_id,
    )


def text_objective(enc: TransformerConfig) -> ObjectiveConfig:
    """data2vec text (fairseq base.yaml): FFN outputs of the top 10, layer norm per layer, no final
    norm, SmoothL1(4) summed over channels (loss_scale 1), 2-layer head."""
    return ObjectiveConfig(top_k=min(10, enc.layers), target="ffn", instance_norm_targets=False,
                           layer_norm_targets=True, final_norm="none", loss="smooth_l1", loss_beta=4.0,
                           loss_scale=None, head="mlp")


def config_from_hf_text(hf: dict, **model_fields) -> ModelConfig:
    """A text ``ModelConfig`` from an HF ``Data2VecTextConfig`` (``.to_dict()``); objective and EMA
    come from ``model_fields`` or the data2vec text defaults."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act: only gelu is supported, got {hf['hidden_act']!r}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("is_decoder: only the bidirectional encoder is supported")
    encoder = TransformerConfig(
        dim=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], dropout=hf["hidden_dropout_prob"],
        attention_dropout=hf["attention_probs_dropout_prob"], activation_dropout=0.0, layer_drop=0.0,
        layer_norm_eps=hf["layer_norm_eps"])
    frontend = TextEncoderConfig(vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
                                 type_vocab_size=hf["type_vocab_size"], pad_id=hf["pad_token_id"])
    model_fields.setdefault("objective", text_objective(encoder))
    model_fields.setdefault("ema", EMAConfig(tau0=0.999, tau_e=0.9999, tau_n=300_000))
    return ModelConfig(modality="text", encoder=encoder, frontend=frontend, **model_fields)
