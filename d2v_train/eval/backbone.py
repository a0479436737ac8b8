"""The encoder under evaluation: a pre-trained checkpoint's student, or a random initialisation
of the same config (the baseline every comparison needs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from d2v_train.checkpoint import step_of
from d2v_train.config import CONFIGS, TrainConfig
from d2v_train.models.config import ModelConfig
from d2v_train.models.data2vec import build_encoder
from d2v_train.models.encoder import Encoder
from schemas.evaluation import CheckpointRef

RANDOM = "random"


@dataclass
class Backbone:
    encoder: Encoder
    model: ModelConfig
    train: TrainConfig | None  # the pre-training config (None for a preset's random init)
    ref: CheckpointRef

    @property
    def modality(self) -> str:
        return self.model.modality

    @property
    def label(self) -> str:
        """How reports name a run by default: "random", "step N", or the checkpoint's URL."""
        if self.ref.url == RANDOM:
            return RANDOM
        return f"step {self.ref.step}" if self.ref.step else self.ref.url

    @property
    def dataset_url(self) -> str | None:
        """The dataset the encoder was pre-trained on (its tokenizer serves text evaluation)."""
        return self.train.data.urls[0] if self.train else None


def load_backbone(checkpoint: str, model: str | None = None, *, seed: int = 0) -> Backbone:
    """`checkpoint`: a checkpoint folder or run's checkpoint folder (any fsspec URL), or "random";
    `model` (needed with "random"): a preset name, a YAML file, or a checkpoint whose config to use."""
    if checkpoint != RANDOM:
        from d2v_train.export import load_model

        train_cfg, data2vec, folder = load_model(checkpoint)
        return _backbone(data2vec.student, train_cfg.model, train_cfg, folder, step_of(folder))
    if not model:
        raise ValueError("--checkpoint random needs --model: a preset (e.g. speech_tiny), a YAML file or a checkpoint")
    model_cfg, train_cfg = _model_config(model)
    torch.manual_seed(seed)  # every rank builds the same random weights
    return _backbone(build_encoder(model_cfg), model_cfg, train_cfg, RANDOM, None)


def _model_config(model: str) -> tuple[ModelConfig, TrainConfig | None]:
    path = Path(model)
    if path.suffix in (".yaml", ".yml") or (not path.suffix and (CONFIGS / f"{model}.yaml").exists()):
        return ModelConfig.model_validate(TrainConfig._preset(model)), None
    from d2v_train.export import load_model

    train_cfg, _, _ = load_model(model)
    return train_cfg.model, train_cfg


def _backbone(encoder: Encoder, model: ModelConfig, train: TrainConfig | None, url: str, step: int | None) -> Backbone:
    enc = model.encoder
    ref = CheckpointRef(url=url, step=step, model=f"{model.modality} dim={enc.dim} layers={enc.layers}",
                        parameters=sum(p.numel() for p in encoder.parameters()))
    return Backbone(encoder.train(), model, train, ref)
