"""Speech front-end (data2vec audio / wav2vec 2.0 with layer-norm feature encoder).

Module names follow HF ``Data2VecAudioModel`` (``feature_extractor.conv_layers.{i}.{conv,layer_norm}``,
``feature_projection.{layer_norm,projection}``, ``pos_conv.layers.{i}.conv``) so ``hf.py`` is a
rename. The CNN and projection are shared with the teacher; the positional conv is copied to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.models.config import SpeechEncoderConfig, TransformerConfig
from d2v_train.models.conv import conv1d_via_2d
from d2v_train.models.encoder import Encoder, Frontend
from d2v_train.models.positions import alibi_bias

__all__ = ["SpeechFrontend", "build_speech_encoder", "conv_output_lengths", "frame_padding_mask"]


def conv_output_lengths(lengths, conv_layers) -> torch.Tensor:
    """Frames the CNN makes of ``lengths`` samples (floor((n - k) / s) + 1 per layer)."""
    n = torch.as_tensor(lengths)
    for _, kernel, stride in conv_layers:
        n = torch.div(n - kernel, stride, rounding_mode="floor") + 1
    return n


def frame_padding_mask(padding_BL: torch.Tensor, num_frames: int, conv_layers) -> torch.Tensor:
    """Sample-level padding (True = padded) -> frame-level: frames at or past the CNN output
    length of each row's count of real samples are padded (as HF and fairseq)."""
    frames_B = conv_output_lengths((~padding_BL).sum(-1), conv_layers)
    return torch.arange(num_frames, device=padding_BL.device) >= frames_B[:, None]


class _ConvLayer(nn.Module):
    """Conv1d -> LayerNorm over channels -> GELU, on time-major (B, T, C) features.

    Training computes the conv as one matmul over the kernel windows, with no layout round trips:
    about 2.8x faster forward+backward on CPU than Conv1d with transposes around the LayerNorm.
    Eval runs Conv1d in HF's and fairseq's op order, so extracted features equal theirs bit for
    bit (fp32 summation order otherwise moves them by ~1e-6, which later LayerNorms amplify).
    """

    def __init__(self, in_channels: int, channels: int, kernel: int, stride: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.LayerNorm(channels)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        if self.training:
            (kernel,), (stride,) = self.conv.kernel_size, self.conv.stride
            span = stride * ((x_BTC.shape[1] - kernel) // stride)  # start of the last window
            # windows as kernel-major rows: k strided slices side by side (their backward is
            # ~2x cheaper than Tensor.unfold's); the weight is permuted to (out, kernel, in)
            windows_BTKC = torch.cat([x_BTC[:, j:j + span + 1:stride] for j in range(kernel)], dim=-1)
            w = self.conv.weight.transpose(1, 2).flatten(1)
            return F.gelu(self.layer_norm(F.linear(windows_BTKC, w, self.conv.bias)))
        y_BTC = self.conv(x_BTC.transpose(1, 2)).transpose(1, 2)
        return F.gelu(self.layer_norm(y_BTC).transpose(1, 2)).transpose(1, 2)


class _FeatureExtractor(nn.Module):
    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        channels_in = [1] + [c for c, _, _ in cfg.conv_layers[:-1]]
        self.conv_layers = nn.ModuleList(
            _ConvLayer(c_in, c, k, s, cfg.conv_bias) for c_in, (c, k, s) in zip(channels_in, cfg.conv_layers))

    def forward(self, source_BL: torch.Tensor) -> torch.Tensor:
        """(B, L) samples -> (B, T, C) features."""
        x_BTC = source_BL[..., None]
        for layer in self.conv_layers:
            x_BTC = layer(x_BTC)
        return x_BTC


class _FeatureProjection(nn.Module):
    def __init__(self, channels: int, dim: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(channels, eps=eps)
        self.projection = nn.Linear(channels, dim)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x_BTC))


class _PosConvLayer(nn.Module):
    """Grouped Conv1d -> LayerNorm over channels -> GELU, on channel-major (B, D, T) features.

    Training computes the conv with ``conv.conv1d_via_2d`` (faster backward on CPU, which matters
    for data2vec 2.0's per-clone pass); eval keeps Conv1d, so outputs equal HF's bit for bit.
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 - kernel % 2  # an even kernel makes one frame too many
        nn.init.zeros_(self.conv.bias)

    def forward(self, x_BDT: torch.Tensor) -> torch.Tensor:
        x_BDT = conv1d_via_2d(self.conv, x_BDT) if self.training else self.conv(x_BDT)
        if self.trim:
            x_BDT = x_BDT[:, :, :-self.trim]
        return F.gelu(F.layer_norm(x_BDT.transpose(1, 2), x_BDT.shape[1:2]).transpose(1, 2))


class _PositionalConv(nn.Module):
    def __init__(self, dim: int, cfg: SpeechEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            _PosConvLayer(dim, cfg.pos_conv_kernel, cfg.pos_conv_groups) for _ in range(cfg.pos_conv_layers))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BDT = x_BTD.transpose(1, 2)
        for layer in self.layers:
            x_BDT = layer(x_BDT)
        return x_BDT.transpose(1, 2)


class SpeechFrontend(Frontend):
    teacher_skip = ("feature_extractor", "feature_projection", "mask_emb")
    teacher_copy = ("pos_conv",)
    share_features = True

    def __init__(self, cfg: SpeechEncoderConfig, enc: TransformerConfig):
        super().__init__()
        self.conv_geometry = [tuple(layer) for layer in cfg.conv_layers]
        self.feature_extractor = _FeatureExtractor(cfg)
        self.feature_projection = _FeatureProjection(cfg.conv_layers[-1][0], enc.dim, enc.layer_norm_eps)
        self.feature_dropout = cfg.feature_dropout
        self.mask_emb = nn.Parameter(torch.empty(enc.dim).uniform_())
        self.pos_conv = _PositionalConv(enc.dim, cfg)
        self.layer_norm = nn.LayerNorm(enc.dim, eps=enc.layer_norm_eps)
        self.alibi_scale = nn.Parameter(torch.ones(enc.heads)) if cfg.alibi else None

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        source_BL = batch["source"]
        x_BTD = self.feature_projection(self.feature_extractor(source_BL))
        padding_BL = batch.get("padding_mask")
        if padding_BL is None:
            padding_BT = torch.zeros(x_BTD.shape[:2], dtype=torch.bool, device=x_BTD.device)
        else:
            padding_BT = frame_padding_mask(padding_BL, x_BTD.shape[1], self.conv_geometry)
        return x_BTD, padding_BT

    def prepare(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
        x_BTD = F.dropout(x_BTD, self.feature_dropout, self.training)
        if mask_BT is None:
            return x_BTD
        return torch.where(mask_BT[..., None], self.mask_emb.to(x_BTD.dtype), x_BTD)

    def positional(self, x_BTD: torch.Tensor, padding_BT: torch.Tensor | None) -> torch.Tensor:
        if padding_BT is not None:  # padded frames must not leak into the conv positions
            x_BTD = x_BTD.masked_fill(padding_BT[..., None], 0.0)
        return self.layer_norm(x_BTD + self.pos_conv(x_BTD))

    def attention_bias(self, x_BTD: torch.Tensor, positions_NT: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.alibi_scale is None:
            return None
        if positions_NT is None:
            positions_NT = torch.arange(x_BTD.shape[1], device=x_BTD.device)[None]
        return alibi_bias(positions_NT, self.alibi_scale.float()).to(x_BTD.dtype)


def build_speech_encoder(frontend: SpeechEncoderConfig, encoder: TransformerConfig) -> Encoder:
    return Encoder(SpeechFrontend(frontend, encoder), encoder)
