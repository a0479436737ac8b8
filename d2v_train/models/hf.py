"""State-dict and config adapters between d2v's speech encoder and HF ``Data2VecAudioModel``;
fairseq data2vec audio checkpoints are imported through the HF names (DATA2VEC.md section 7).

Pure dict work: no transformers import, so it also converts checkpoints on machines without it.
The only non-rename is attention: HF keeps q, k, v projections apart, d2v fuses them (qkv).
"""

from __future__ import annotations

import re

import torch

from d2v_train.models.config import ModelConfig, ObjectiveConfig, SpeechEncoderConfig, TransformerConfig

__all__ = ["to_hf", "from_hf", "from_fairseq", "fairseq_to_hf", "hf_audio_config", "config_from_hf_audio"]

# (d2v encoder key prefix, HF Data2VecAudioModel key prefix); {i} is a layer index. qkv is apart.
_RENAMES = [
    ("frontend.feature_extractor.conv_layers.{i}.conv.", "feature_extractor.conv_layers.{i}.conv."),
    ("frontend.feature_extractor.conv_layers.{i}.layer_norm.", "feature_extractor.conv_layers.{i}.layer_norm."),
    ("frontend.feature_projection.", "feature_projection."),
    ("frontend.mask_emb", "masked_spec_embed"),
    ("frontend.pos_conv.layers.{i}.conv.", "encoder.pos_conv_embed.layers.{i}.conv."),
    ("frontend.layer_norm.", "encoder.layer_norm."),
    ("transformer.blocks.{i}.attn.out.", "encoder.layers.{i}.attention.out_proj."),
    ("transformer.blocks.{i}.attn_norm.", "encoder.layers.{i}.layer_norm."),
    ("transformer.blocks.{i}.ffn.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("transformer.blocks.{i}.ffn.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
    ("transformer.blocks.{i}.ffn_norm.", "encoder.layers.{i}.final_layer_norm."),
]
_QKV = re.compile(r"transformer\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")

# (fairseq data2vec_audio key prefix, HF key prefix)
_FAIRSEQ = [
    ("feature_extractor.conv_layers.{i}.0.", "feature_extractor.conv_layers.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.2.1.", "feature_extractor.conv_layers.{i}.layer_norm."),
    ("layer_norm.", "feature_projection.layer_norm."),
    ("post_extract_proj.", "feature_projection.projection."),
    ("mask_emb", "masked_spec_embed"),
    ("encoder.pos_conv.{i}.0.", "encoder.pos_conv_embed.layers.{i}.conv."),
    ("encoder.layer_norm.", "encoder.layer_norm."),
    ("encoder.layers.{i}.self_attn_layer_norm.", "encoder.layers.{i}.layer_norm."),
    ("encoder.layers.{i}.self_attn.", "encoder.layers.{i}.attention."),
    ("encoder.layers.{i}.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("encoder.layers.{i}.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
    ("encoder.layers.{i}.final_layer_norm.", "encoder.layers.{i}.final_layer_norm."),
]
_FAIRSEQ_DROPPED = ("final_proj.", "_ema")  # pre-training head, EMA bookkeeping
_HF_TASK_PREFIX = "data2vec_audio."  # Data2VecAudioFor{CTC,...}: the base model lives under it


def _rename(key: str, table, reverse: bool = False) -> str | None:
    for src, dst in table:
        if reverse:
            src, dst = dst, src
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            head = dst.replace("{i}", m.group(1)) if m.groups() else dst
            return head + key[m.end():]
    return None


def split_qkv_and_rename(state: dict[str, torch.Tensor], renames, qkv_name) -> dict[str, torch.Tensor]:
    """d2v -> HF names: the fused q/k/v projection of block i becomes three tensors named
    ``qkv_name(i, part, "weight"|"bias")`` (part 0, 1, 2 = q, k, v); the rest by ``renames``."""
    out = {}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            for part, chunk in enumerate(value.chunk(3, dim=0)):
                out[qkv_name(m.group(1), part, m.group(2))] = chunk.clone()
            continue
        new = _rename(key, renames)
        if new is None:
            raise ValueError(f"state dict: no HF name for d2v key {key!r}")
        out[new] = value
    return out


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d2v speech ``Encoder`` state dict -> HF ``Data2VecAudioModel`` state dict."""
    return split_qkv_and_rename(
        state, _RENAMES, lambda layer, part, param: f"encoder.layers.{layer}.attention.{'qkv'[part]}_proj.{param}")


def join_qkv_and_rename(state: dict[str, torch.Tensor], renames, hf_qkv: re.Pattern, parts: tuple[str, ...], *,
                        task_prefix: str, dropped: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """HF -> d2v names: a task model's base is taken from under ``task_prefix``, keys starting
    with ``dropped`` are left out, the q/k/v projections matched by ``hf_qkv`` (groups: layer,
    part, weight|bias) are fused in the order of ``parts``; the rest by ``renames``."""
    if any(k.startswith(task_prefix) for k in state):
        state = {k[len(task_prefix):]: v for k, v in state.items() if k.startswith(task_prefix)}
    out, qkv = {}, {}
    for key, value in state.items():
        if dropped and key.startswith(dropped):
            continue
        m = hf_qkv.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = _rename(key, renames, reverse=True)
        if new is None:
            raise ValueError(f"state dict: no d2v name for HF key {key!r}")
        out[new] = value
    for (layer, kind), found in qkv.items():
        if set(found) != set(parts):
            raise ValueError(f"state dict: layer {layer} {kind} has only {sorted(found)} of {', '.join(parts)}")
        out[f"transformer.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([found[c] for c in parts])
    return out


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Data2VecAudioModel`` (or ``Data2VecAudioFor*``: its task head is dropped) state dict ->
    d2v speech ``Encoder`` state dict."""
    return join_qkv_and_rename(state, _RENAMES, _HF_QKV, ("q", "k", "v"), task_prefix=_HF_TASK_PREFIX)


def fairseq_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fairseq ``data2vec_audio`` pre-training state dict (checkpoint["model"]) -> HF names."""
    out = {}
    for key, value in state.items():
        if key.startswith(_FAIRSEQ_DROPPED):
            continue
        new = _rename(key, _FAIRSEQ)
        if new is None:
            raise ValueError(f"state dict: unknown fairseq key {key!r}")
        out[new] = value
    return out


def from_fairseq(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return from_hf(fairseq_to_hf(state))


def hf_audio_config(cfg: ModelConfig) -> dict:
    """Keyword arguments of an HF ``Data2VecAudioConfig`` with the same architecture."""
    enc, fe = cfg.encoder, cfg.frontend
    if enc.pre_ln or enc.final_ln or enc.layer_scale_init is not None or enc.drop_path:
        raise ValueError("encoder: HF Data2VecAudio is post-LN without final_ln, layer scale or drop path")
    if fe.alibi:
        raise ValueError("frontend.alibi: HF Data2VecAudio has no ALiBi attention bias (data2vec 2.0 audio)")
    return dict(
        hidden_size=enc.dim, num_hidden_layers=enc.layers, num_attention_heads=enc.heads,
        intermediate_size=enc.ffn_dim, hidden_dropout=enc.dropout, attention_dropout=enc.attention_dropout,
        activation_dropout=enc.activation_dropout, layerdrop=enc.layer_drop, layer_norm_eps=enc.layer_norm_eps,
        feat_proj_dropout=fe.feature_dropout, conv_dim=[c for c, _, _ in fe.conv_layers],
        conv_kernel=[k for _, k, _ in fe.conv_layers], conv_stride=[s for _, _, s in fe.conv_layers],
        conv_bias=fe.conv_bias, num_conv_pos_embeddings=fe.pos_conv_layers,
        conv_pos_kernel_size=fe.pos_conv_kernel, num_conv_pos_embedding_groups=fe.pos_conv_groups,
    )


def config_from_hf_audio(hf: dict, **model_fields) -> ModelConfig:
    """A speech ``ModelConfig`` from an HF ``Data2VecAudioConfig`` (``.to_dict()``); objective and
    EMA come from ``model_fields`` or the defaults (top_k capped at the depth)."""
    for key in ("hidden_act", "feat_extract_activation"):
        if hf.get(key, "gelu") != "gelu":
            raise ValueError(f"{key}: only gelu is supported, got {hf[key]!r}")
    encoder = TransformerConfig(
        dim=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], dropout=hf["hidden_dropout"], attention_dropout=hf["attention_dropout"],
        activation_dropout=hf["activation_dropout"], layer_drop=hf["layerdrop"], layer_norm_eps=hf["layer_norm_eps"])
    frontend = SpeechEncoderConfig(
        conv_layers=list(zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"])), conv_bias=hf["conv_bias"],
        feature_dropout=hf["feat_proj_dropout"], pos_conv_layers=hf["num_conv_pos_embeddings"],
        pos_conv_kernel=hf["conv_pos_kernel_size"], pos_conv_groups=hf["num_conv_pos_embedding_groups"])
    model_fields.setdefault("objective", ObjectiveConfig(top_k=min(ObjectiveConfig().top_k, encoder.layers)))
    return ModelConfig(modality="speech", encoder=encoder, frontend=frontend, **model_fields)
