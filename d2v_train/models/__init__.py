"""data2vec models: the shared Transformer, modality front-ends, targets, loss, EMA teacher."""

from d2v_train.models.config import (
    EMAConfig,
    ModelConfig,
    ObjectiveConfig,
    SpeechEncoderConfig,
    TransformerConfig,
    load_config,
    save_config,
)
from d2v_train.models.data2vec import Data2Vec, Data2VecOutput, build_encoder
from d2v_train.models.ema import EMATeacher, ema_tau
from d2v_train.models.encoder import Encoder, Frontend

__all__ = [
    "EMAConfig", "ModelConfig", "ObjectiveConfig", "SpeechEncoderConfig", "TransformerConfig",
    "load_config", "save_config", "Data2Vec", "Data2VecOutput", "build_encoder", "EMATeacher",
    "ema_tau", "Encoder", "Frontend",
]
