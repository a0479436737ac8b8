"""The objective a config names: data2vec (v1) or data2vec 2.0, both built on the same encoder."""
from __future__ import annotations

from torch import nn

from d2v_train.models.config import ModelConfig
from d2v_train.models.data2vec import Data2Vec
from d2v_train.models.data2vec2 import Data2Vec2


def build_model(cfg: ModelConfig) -> nn.Module:
    """The objective of ``cfg.variant``: ``Data2Vec`` (v1) or ``Data2Vec2``; both take
    (batch, teacher) and return a ``Data2VecOutput``."""
    return Data2Vec2(cfg) if cfg.variant == "data2vec2" else Data2Vec(cfg)
