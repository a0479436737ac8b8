"""Vision front-end (data2vec v1 vision = BEiT; HF ``Data2VecVisionModel``).

Patches from a Conv2d with kernel = stride = patch size, the mask embedding on masked patches, a
CLS token in front (never masked), and one relative position bias table shared by all blocks
(BEiT's ``use_shared_relative_position_bias``). The teacher is an EMA of the whole encoder.
Attention has no key bias (BEiT, HF): a key bias only shifts each query's scores by a constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.models.config import TransformerConfig, VisionEncoderConfig
from d2v_train.models.encoder import Encoder, Frontend
from d2v_train.models.positions import sincos_2d

__all__ = ["VisionFrontend", "RelativePositionBias", "QKVNoKeyBias", "build_vision_encoder",
           "relative_position_index"]


def relative_position_index(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(1+P, 1+P) bias-table rows for (query, key) pairs, CLS first: a patch pair reads the row of
    its (dy, dx) offset; the table's last three rows serve CLS->patch, patch->CLS and CLS->CLS."""
    H, W = grid
    y_P, x_P = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    y_P, x_P = y_P.flatten(), x_P.flatten()
    dy_PP = y_P[:, None] - y_P[None, :] + H - 1
    dx_PP = x_P[:, None] - x_P[None, :] + W - 1
    n = (2 * H - 1) * (2 * W - 1)
    index = torch.full((H * W + 1, H * W + 1), n + 1, dtype=torch.long, device=device)  # patch -> CLS
    index[0, :] = n  # CLS -> patch
    index[0, 0] = n + 2
    index[1:, 1:] = dy_PP * (2 * W - 1) + dx_PP
    return index


class RelativePositionBias(nn.Module):
    """A learned (offsets + 3, heads) table -> additive (1, heads, 1+P, 1+P) attention bias. The
    index is rebuilt per call (a few small ops): no buffer to go stale under meta-device init."""

    def __init__(self, grid: tuple[int, int], heads: int):
        super().__init__()
        self.grid = tuple(grid)
        self.table = nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, heads))

    def forward(self) -> torch.Tensor:
        T = self.grid[0] * self.grid[1] + 1
        bias_TTH = self.table[relative_position_index(self.grid, self.table.device).view(-1)].view(T, T, -1)
        return bias_TTH.permute(2, 0, 1).unsqueeze(0)


class QKVNoKeyBias(nn.Module):
    """The fused q, k, v projection of ``transformer.Attention`` with biases on q and v only."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3 * dim, dim).normal_(std=0.02))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return F.linear(x_BTD, self.weight, bias)


class VisionFrontend(Frontend):
    teacher_skip = ("mask_emb",)  # the teacher never masks
    extra_tokens = 1  # CLS

    def __init__(self, cfg: VisionEncoderConfig, enc: TransformerConfig):
        super().__init__()
        self.grid, self.dim = cfg.grid, enc.dim
        self.patch_embed = nn.Conv2d(cfg.channels, enc.dim, cfg.patch_size, stride=cfg.patch_size)
        # (D,) vectors, (1, 1, D) in HF: 1-D parameters get no weight decay (BEiT exempts cls_token)
        self.cls_token = nn.Parameter(torch.zeros(enc.dim))
        self.mask_emb = nn.Parameter(torch.zeros(enc.dim))
        self.rel_pos_bias = RelativePositionBias(cfg.grid, enc.heads) if cfg.positions == "relative" else None

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """{"image" (B, C, H, W)} -> CLS + patch features (B, 1+P, D), no padding."""
        image = batch["image"]
        x_BDhw = self.patch_embed(image.to(self.patch_embed.weight.dtype))
        if tuple(x_BDhw.shape[2:]) != self.grid:
            raise ValueError(f"image: {tuple(image.shape[2:])} px makes a {tuple(x_BDhw.shape[2:])} patch grid, "
                             f"the model's is {self.grid}")
        x_BPD = x_BDhw.flatten(2).transpose(1, 2)
        if self.rel_pos_bias is None:  # fixed sin-cos positions; CLS has none (MAE, data2vec 2.0)
            x_BPD = x_BPD + sincos_2d(self.grid, self.dim).to(x_BPD.device, x_BPD.dtype)
        x_BTD = torch.cat([self.cls_token.to(x_BPD.dtype).expand(x_BPD.shape[0], 1, -1), x_BPD], dim=1)
        return x_BTD, torch.zeros(x_BTD.shape[:2], dtype=torch.bool, device=x_BTD.device)

    def prepare(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
        if mask_BT is None:
            return x_BTD
        return torch.where(mask_BT[..., None], self.mask_emb.to(x_BTD.dtype), x_BTD)

    def attention_bias(self, x_BTD: torch.Tensor, positions_NT: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.rel_pos_bias is None:
            return None
        assert positions_NT is None, "the relative position bias covers the full grid only"
        return self.rel_pos_bias().to(x_BTD.dtype)

    def target_mask(self, batch: dict) -> torch.Tensor:
        """The loader's (B, P) patch mask with the CLS position (never masked) in front."""
        return F.pad(batch["mask"], (1, 0), value=False)


def _init_beit(encoder: Encoder) -> None:
    """BEiT / data2vec vision init: weights N(0, 0.02) truncated at one std, biases 0, and each
    block's two output projections scaled by 1/sqrt(2 * depth) (``fix_init_weight``)."""
    def trunc_(t):
        nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)

    for m in encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, QKVNoKeyBias)):
            trunc_(m.weight)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.zeros_(m.bias)
    trunc_(encoder.frontend.cls_token)
    trunc_(encoder.frontend.mask_emb)
    with torch.no_grad():
        for depth, block in enumerate(encoder.transformer.blocks, start=1):
            block.attn.out.weight.div_(math.sqrt(2.0 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2.0 * depth))


def build_vision_encoder(frontend: VisionEncoderConfig, encoder: TransformerConfig) -> Encoder:
    if not encoder.pre_ln:
        raise ValueError("encoder.pre_ln: the vision encoder (BEiT) is pre-LN")
    enc = Encoder(VisionFrontend(frontend, encoder), encoder)
    for block in enc.transformer.blocks:
        block.attn.qkv = QKVNoKeyBias(encoder.dim)
    _init_beit(enc)
    return enc
