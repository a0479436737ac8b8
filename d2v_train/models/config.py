"""Model configs: validated pydantic models (a wrong key or value names the field), YAML presets.

One ``ModelConfig`` per preset: the shared Transformer, a modality front-end (the ``frontend``
union, discriminated by ``kind``), the objective and the EMA schedule. Defaults are data2vec v1
speech Base (DATA2VEC.md section 2). ``variant: data2vec2`` switches to data2vec 2.0's efficient
objective (section 4) with the settings in ``data2vec2``; ``Data2Vec2Config.defaults`` gives the
released ones per modality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "TransformerConfig",
    "SpeechEncoderConfig",
    "VisionEncoderConfig",
    "TextEncoderConfig",
    "ObjectiveConfig",
    "EMAConfig",
    "DecoderConfig",
    "MultiMaskConfig",
    "Data2Vec2Config",
    "ModelConfig",
    "load_config",
    "save_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Frontend(_Strict):
    def dataset_mismatch(self, dataset) -> str | None:
        """Why a built dataset (schemas.Dataset) of this modality cannot feed this front-end, or None."""
        return None


class TransformerConfig(_Strict):
    dim: int = Field(768, gt=0)
    layers: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
    ffn_dim: int = Field(3072, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    layer_drop: float = Field(0.05, ge=0.0, lt=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    pre_ln: bool = False  # False: post-LN (data2vec audio/text); True: pre-LN (ViT/BEiT)
    final_ln: bool = False  # a LayerNorm after the last block (pre-LN encoders)
    layer_norm_eps: float = Field(1e-5, gt=0.0)
    layer_scale_init: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"heads: dim {self.dim} is not divisible by heads {self.heads}")
        return self


_WAV2VEC2_CNN = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


class SpeechEncoderConfig(_Frontend):
    """wav2vec 2.0 / data2vec audio front-end: CNN feature encoder + 5-layer positional conv."""

    kind: Literal["speech"] = "speech"
    conv_layers: list[tuple[int, int, int]] = Field(
        default_factory=lambda: list(_WAV2VEC2_CNN),
        description="(channels, kernel, stride) per Conv1d layer of the feature encoder")
    conv_bias: bool = False
    feature_norm: Literal["layer"] = "layer"  # LayerNorm over channels after each conv
    feature_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on projected features (dropout_input)
    pos_conv_layers: int = Field(5, gt=0)
    pos_conv_kernel: int = Field(19, gt=1)
    pos_conv_groups: int = Field(16, gt=0)
    # ALiBi (data2vec 2.0 audio): each block's attention gets -scale_h * slope_h * |i - j|, with a
    # learned scale per head; the positional conv stays
    alibi: bool = False

    @field_validator("conv_layers")
    @classmethod
    def _positive(cls, v):
        if not v or any(min(layer) < 1 for layer in v):
            raise ValueError("conv_layers: need at least one layer, all (channels, kernel, stride) >= 1")
        return v

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees (400 for the standard CNN): no shorter input gives a frame."""
        field, jump = 1, 1
        for _, kernel, stride in self.conv_layers:
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @property
    def hop(self) -> int:
        """Samples per frame (320 for the standard CNN: 50 Hz at 16 kHz)."""
        hop = 1
        for _, _, stride in self.conv_layers:
            hop *= stride
        return hop


class VisionEncoderConfig(_Frontend):
    """BEiT / data2vec vision front-end: a patch embedding (Conv2d, kernel = stride = patch_size),
    a CLS token and one relative position bias shared by all blocks."""

    kind: Literal["vision"] = "vision"
    image_size: int = Field(224, gt=0)
    patch_size: int = Field(16, gt=0)
    channels: int = Field(3, gt=0)
    # relative: BEiT's learned relative position bias shared by all blocks (v1); sincos: a fixed
    # 2-D sin-cos embedding added to the patches (MAE, data2vec 2.0)
    positions: Literal["relative", "sincos"] = "relative"

    @model_validator(mode="after")
    def _patches_tile(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def dataset_mismatch(self, dataset) -> str | None:
        """The stored masks are per patch of the crop the dataset was built for."""
        if (dataset.image_size, dataset.patch_size) == (self.image_size, self.patch_size):
            return None
        return (f"model.frontend: image_size {self.image_size} / patch_size {self.patch_size}, but the dataset's "
                f"masks were drawn for {dataset.image_size} / {dataset.patch_size} (rebuild with --image-size / "
                "--patch-size, or choose a matching preset)")


class TextEncoderConfig(_Frontend):
    """RoBERTa / data2vec text front-end: token, learned position and token type embeddings, LayerNorm.

    Positions count from ``pad_id + 1`` (RoBERTa, HF), so ``max_positions`` = longest block +
    pad_id + 1 (514 for 512 tokens with <pad> = 1, as our trained tokenizers and RoBERTa have it).
    """

    kind: Literal["text"] = "text"
    vocab_size: int = Field(50265, gt=0)
    max_positions: int = Field(514, gt=0)
    type_vocab_size: int = Field(1, gt=0)
    pad_id: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _ids_fit(self):
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id: {self.pad_id} is not below vocab_size {self.vocab_size}")
        if self.max_positions <= self.pad_id + 1:
            raise ValueError(f"max_positions: {self.max_positions} leaves no position after pad_id + 1")
        return self

    @property
    def max_tokens(self) -> int:
        return self.max_positions - self.pad_id - 1


class ObjectiveConfig(_Strict):
    top_k: int = Field(8, gt=0)
    target: Literal["ffn", "block"] = "ffn"  # ffn: FFN output before the residual (speech/text)
    instance_norm_targets: bool = True  # per layer, over time, per channel
    layer_norm_targets: bool = False  # per layer, over channels
    final_norm: Literal["none", "layer", "instance"] = "none"  # after the top-K average
    loss: Literal["l2", "smooth_l1"] = "l2"
    loss_beta: float = Field(0.0, ge=0.0)  # smooth_l1 only
    # per position, on the loss summed over channels; None: the reference's scale for that loss,
    # 1/sqrt(D) for l2 (fairseq audio), 1 for smooth_l1 (fairseq text release config)
    loss_scale: float | None = Field(None, gt=0.0)
    head: Literal["linear", "mlp"] = "linear"  # mlp: Linear(D, 2D)-GELU-Linear(2D, D) (fairseq text)

    @model_validator(mode="after")
    def _beta(self):
        if self.loss == "smooth_l1" and self.loss_beta <= 0:
            raise ValueError("loss_beta: smooth_l1 needs loss_beta > 0")
        return self


class EMAConfig(_Strict):
    tau0: float = Field(0.999, ge=0.0, le=1.0)
    tau_e: float = Field(0.9999, ge=0.0, le=1.0)
    tau_n: int = Field(30_000, ge=0)  # updates over which tau goes linearly from tau0 to tau_e


class DecoderConfig(_Strict):
    """data2vec 2.0's convolutional decoder: ``layers`` x (Conv(k, groups) -> LayerNorm without
    affine -> GELU, residual from the second layer on), then Linear back to the encoder width.
    1-D over time for speech and text, 2-D over the patch grid for images."""

    dim: int = Field(384, gt=0)
    layers: int = Field(4, gt=0)
    kernel: int = Field(7, gt=0)
    groups: int = Field(16, gt=0)
    input_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # on the student's outputs
    noise_std: float = Field(0.01, ge=0.0)  # what fills the masked slots

    @model_validator(mode="after")
    def _groups_divide(self):
        if self.dim % self.groups:
            raise ValueError(f"groups: {self.groups} does not divide dim {self.dim}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: {self.kernel} must be odd (the output keeps the input's length)")
        return self


class MultiMaskConfig(_Strict):
    """The masks data2vec 2.0 draws per clone, on the fly (``pipelines.masking``).

    block_1d: ``compute_inverse_block_masks_1d`` (speech: p 0.5, blocks of 5, adjust 0.05; text:
    p 0.48, blocks of 1, never <s> or </s>); inverse_block_2d: ``compute_inverse_block_masks``
    (images: p 0.8, 3x3 kept blocks, adjust 0.07).
    """

    kind: Literal["block_1d", "inverse_block_2d"] = "block_1d"
    mask_prob: float = Field(0.5, gt=0.0, lt=1.0)
    block_size: int = Field(5, gt=0)
    mask_prob_adjust: float = Field(0.05, ge=0.0, lt=1.0)
    inverse: bool = False  # block_1d: blocks are kept, not masked


class Data2Vec2Config(_Strict):
    clones: int = Field(8, gt=0)  # M masked copies of each sample; the teacher runs once
    decoder: DecoderConfig = DecoderConfig()
    mask: MultiMaskConfig = MultiMaskConfig()
    # images: the student's CLS output regresses the mean target over patches, with this weight
    cls_loss: float = Field(0.0, ge=0.0)

    @staticmethod
    def defaults(modality: str) -> dict:
        """The released base settings of fairseq data2vec 2.0 for ``modality`` (DATA2VEC.md section 4)."""
        if modality == "vision":
            return {"clones": 16, "cls_loss": 0.01,
                    "decoder": {"dim": 768, "layers": 6, "kernel": 3, "groups": 16, "input_dropout": 0.0},
                    "mask": {"kind": "inverse_block_2d", "mask_prob": 0.8, "block_size": 3,
                             "mask_prob_adjust": 0.07}}
        if modality == "text":
            return {"clones": 8, "decoder": {"dim": 768, "layers": 5, "kernel": 9, "groups": 1},
                    "mask": {"kind": "block_1d", "mask_prob": 0.48, "block_size": 1, "mask_prob_adjust": 0.0}}
        return {}


class ModelConfig(_Strict):
    modality: Literal["speech", "vision", "text"] = "speech"
    # data2vec: v1, the student encodes every position with mask embeddings; data2vec2: the
    # student encodes only the kept positions and a conv decoder predicts the masked ones
    variant: Literal["data2vec", "data2vec2"] = "data2vec"
    encoder: TransformerConfig = TransformerConfig()
    frontend: SpeechEncoderConfig | VisionEncoderConfig | TextEncoderConfig = Field(
        default_factory=SpeechEncoderConfig, discriminator="kind")
    objective: ObjectiveConfig = ObjectiveConfig()
    ema: EMAConfig = EMAConfig()
    data2vec2: Data2Vec2Config | None = None  # variant data2vec2 only; None: the modality's defaults

    @model_validator(mode="before")
    @classmethod
    def _frontend_kind_defaults_to_modality(cls, data):
        if not isinstance(data, dict):
            return data
        frontend = data.get("frontend")
        if isinstance(frontend, dict) and "kind" not in frontend:
            data = {**data, "frontend": {**frontend, "kind": data.get("modality", "speech")}}
        if data.get("variant") == "data2vec2":
            given = data.get("data2vec2")
            if given is None or isinstance(given, dict):
                defaults = Data2Vec2Config.defaults(data.get("modality", "speech"))
                data = {**data, "data2vec2": _merge(defaults, given or {})}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.frontend.kind != self.modality:
            raise ValueError(f"frontend.kind: {self.frontend.kind!r} does not match modality {self.modality!r}")
        if self.objective.top_k > self.encoder.layers:
            raise ValueError(f"objective.top_k: {self.objective.top_k} > encoder.layers {self.encoder.layers}")
        if self.frontend.kind == "speech" and self.encoder.dim % self.frontend.pos_conv_groups:
            raise ValueError(f"frontend.pos_conv_groups: {self.frontend.pos_conv_groups} does not divide "
                             f"encoder.dim {self.encoder.dim}")
        if self.frontend.kind == "vision" and self.frontend.positions == "sincos" and self.encoder.dim % 4:
            raise ValueError(f"encoder.dim: the 2-D sin-cos positions need a multiple of 4, got {self.encoder.dim}")
        if self.variant == "data2vec" and self.data2vec2 is not None:
            raise ValueError("data2vec2: settings for variant data2vec2, but variant is data2vec")
        if self.variant == "data2vec2":
            self._check_data2vec2()
        return self

    def _check_data2vec2(self) -> None:
        v2, fe = self.data2vec2, self.frontend
        if fe.kind == "vision":
            if fe.positions != "sincos":
                raise ValueError("frontend.positions: data2vec2 drops masked patches, which a relative position "
                                 "bias over the full grid does not allow; use sincos")
            if v2.mask.kind != "inverse_block_2d":
                raise ValueError(f"data2vec2.mask.kind: images need inverse_block_2d, not {v2.mask.kind!r}")
        elif v2.mask.kind != "block_1d":
            raise ValueError(f"data2vec2.mask.kind: {fe.kind} needs block_1d, not {v2.mask.kind!r}")
        if v2.cls_loss and fe.kind != "vision":
            raise ValueError("data2vec2.cls_loss: only images have a CLS token")
        if self.objective.head != "linear":
            raise ValueError("objective.head: data2vec2 predicts with its decoder; leave head at linear")


def load_config(path: str | Path, overrides: dict | None = None) -> ModelConfig:
    """A preset from YAML; ``overrides`` (nested dict) replace its values before validation."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if overrides:
        data = _merge(data, overrides)
    return ModelConfig.model_validate(data)


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
