"""Text front-end (data2vec text = RoBERTa; HF ``Data2VecTextModel``).

Token + learned position + token type embeddings, then LayerNorm; the Transformer's input dropout
follows. The loader has already put <mask> into the student's tokens, so there is no mask
embedding: the teacher re-embeds the original tokens with the student's (shared) embeddings and
holds only the Transformer (fairseq ``ema_transformer_layers_only``).
"""

from __future__ import annotations

import torch
from torch import nn

from d2v_train.models.config import TextEncoderConfig, TransformerConfig
from d2v_train.models.encoder import Encoder, Frontend

__all__ = ["TextFrontend", "build_text_encoder", "position_ids"]


def position_ids(padding_BT: torch.Tensor, pad_id: int) -> torch.Tensor:
    """RoBERTa positions: real tokens count from pad_id + 1, padding sits at pad_id."""
    keep_BT = (~padding_BT).long()
    return keep_BT.cumsum(1) * keep_BT + pad_id


class TextFrontend(Frontend):
    teacher_skip = ("word_embeddings", "position_embeddings", "token_type_embeddings", "layer_norm")
    share_features = True
    keep_ends = True  # <s> and </s>

    def __init__(self, cfg: TextEncoderConfig, enc: TransformerConfig):
        super().__init__()
        self.pad_id, self.max_tokens = cfg.pad_id, cfg.max_tokens
        self.word_embeddings = nn.Embedding(cfg.vocab_size, enc.dim, padding_idx=cfg.pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, enc.dim, padding_idx=cfg.pad_id)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, enc.dim)
        self.layer_norm = nn.LayerNorm(enc.dim, eps=enc.layer_norm_eps)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)  # BERT init, padding rows zero
            if emb.padding_idx is not None:
                nn.init.zeros_(emb.weight[emb.padding_idx])

    def embed_tokens(self, tokens_BT: torch.Tensor, padding_BT: torch.Tensor | None = None) -> torch.Tensor:
        if padding_BT is None:
            padding_BT = tokens_BT.eq(self.pad_id)
        if tokens_BT.shape[1] > self.max_tokens:
            raise ValueError(f"tokens: {tokens_BT.shape[1]} per row, the model has positions for {self.max_tokens}")
        x_BTD = (self.word_embeddings(tokens_BT) + self.token_type_embeddings.weight[0]  # one type, as RoBERTa
                 + self.position_embeddings(position_ids(padding_BT, self.pad_id)))
        return self.layer_norm(x_BTD)

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """{"tokens" (B, T), optional "padding_mask" (True = padded; else tokens == pad_id)}."""
        tokens_BT = batch["tokens"]
        padding_BT = batch.get("padding_mask")
        if padding_BT is None:
            padding_BT = tokens_BT.eq(self.pad_id)
        return self.embed_tokens(tokens_BT, padding_BT), padding_BT

    def prepare(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
        return x_BTD  # <mask> is already in the tokens; dropout is the Transformer's input dropout

    def target_mask(self, batch: dict) -> torch.Tensor:
        """Only positions whose input became <mask> are regressed (not the random/kept 20%)."""
        return batch["target_mask"]

    def unmasked(self, batch: dict) -> dict:
        return {**batch, "tokens": batch["target_tokens"]}

    def teacher_features(self, batch: dict, x_BTD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embed_tokens(batch["target_tokens"], batch.get("padding_mask"))


def build_text_encoder(frontend: TextEncoderConfig, encoder: TransformerConfig) -> Encoder:
    if encoder.pre_ln or encoder.final_ln:
        raise ValueError("encoder.pre_ln: the text encoder (RoBERTa) is post-LN without a final LayerNorm")
    return Encoder(TextFrontend(frontend, encoder), encoder)
