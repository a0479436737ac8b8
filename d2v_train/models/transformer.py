"""The context encoder shared by every modality: a stack of post-LN or pre-LN Transformer blocks.

Blocks return both their output and their FFN output before the last residual add, so the
teacher's data2vec targets come out of the forward itself (no hooks, works under FSDP/compile).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.models.config import TransformerConfig

__all__ = ["Attention", "FeedForward", "Block", "Transformer", "TransformerOutput", "drop_path"]


def drop_path(x_BTD: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""
    if p == 0.0 or not training:
        return x_BTD
    keep_B11 = x_BTD.new_empty(x_BTD.shape[0], 1, 1).bernoulli_(1.0 - p)
    return x_BTD * keep_B11 / (1.0 - p)


class Attention(nn.Module):
    """Multi-head self-attention on SDPA; q, k, v fused into one projection (one GEMM)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BTD: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTK = self.qkv(x_BTD).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, attn_mask=attn_mask,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.out(y_BHTK.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.activation_dropout = activation_dropout

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(x_BTD)), self.activation_dropout, self.training)
        return self.fc2(h)


class Block(nn.Module):
    """One Transformer block. Returns (block output, FFN output before dropout/scale/residual)."""

    def __init__(self, cfg: TransformerConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.pre_ln, self.dropout, self.drop_path = cfg.pre_ln, cfg.dropout, drop_path_rate
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attention_dropout)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.activation_dropout)
        if cfg.layer_scale_init is not None:
            self.attn_scale = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
            self.ffn_scale = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
        else:
            self.attn_scale = self.ffn_scale = None

    def _branch(self, y_BTD: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        y_BTD = F.dropout(y_BTD, self.dropout, self.training)
        if scale is not None:
            y_BTD = y_BTD * scale
        return drop_path(y_BTD, self.drop_path, self.training)

    def forward(self, x_BTD: torch.Tensor, attn_mask: torch.Tensor | None = None):
        if self.pre_ln:
            x_BTD = x_BTD + self._branch(self.attn(self.attn_norm(x_BTD), attn_mask), self.attn_scale)
            f_BTD = self.ffn(self.ffn_norm(x_BTD))
            return x_BTD + self._branch(f_BTD, self.ffn_scale), f_BTD
        x_BTD = self.attn_norm(x_BTD + self._branch(self.attn(x_BTD, attn_mask), self.attn_scale))
        f_BTD = self.ffn(x_BTD)
        return self.ffn_norm(x_BTD + self._branch(f_BTD, self.ffn_scale)), f_BTD


class TransformerOutput(NamedTuple):
    x_BTD: torch.Tensor
    layers: list[torch.Tensor]  # per requested block: its output or its FFN output


class Transformer(nn.Module):
    """Input dropout, the blocks (with layer drop in training), an optional final LayerNorm."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.dropout, self.layer_drop = cfg.dropout, cfg.layer_drop
        # stochastic depth grows linearly with depth (BEiT/timm); plain floats: meta-device init works
        rates = [cfg.drop_path * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) if cfg.final_ln else None
        self.apply(_init_bert)

    def forward(
        self,
        x_BTD: torch.Tensor,
        padding_BT: torch.Tensor | None = None,
        *,
        attn_bias: torch.Tensor | None = None,
        return_from: int | None = None,
        target: Literal["ffn", "block"] = "block",
    ) -> TransformerOutput:
        """``padding_BT`` True = padded key; ``attn_bias`` an additive float bias broadcastable to
        (B, H, T, T); blocks ``return_from`` and up report their ``target`` output in ``layers``."""
        attn_mask = _attention_mask(padding_BT, attn_bias)
        x_BTD = F.dropout(x_BTD, self.dropout, self.training)
        n = len(self.blocks)
        # layer drop draws from the default CPU generator: under FSDP every rank must draw alike
        # (seed it per step), or a block skipped on one rank only stalls the others' all-gather
        drop_L = (torch.rand(n) < self.layer_drop).tolist() if self.training and self.layer_drop > 0 else [False] * n
        layers = []
        for i, block in enumerate(self.blocks):
            if drop_L[i]:
                continue
            x_BTD, f_BTD = block(x_BTD, attn_mask)
            if return_from is not None and i >= return_from:
                layers.append(f_BTD if target == "ffn" else x_BTD)
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return TransformerOutput(x_BTD, layers)


def _attention_mask(padding_BT: torch.Tensor | None, attn_bias: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B,1,1,S) key mask (True = attend): SDPA keeps its fast kernels with it."""
    keep_B11S = None if padding_BT is None else ~padding_BT[:, None, None, :]
    if attn_bias is None:
        return keep_B11S
    if keep_B11S is None:
        return attn_bias
    return attn_bias.masked_fill(~keep_B11S, float("-inf"))


def _init_bert(module: nn.Module) -> None:
    """BERT init (fairseq ``init_bert_params``, HF ``initializer_range`` 0.02)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
