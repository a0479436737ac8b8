"""The data2vec objective: a student encoder with a regression head, regressing targets built by
an EMA teacher (``ema.EMATeacher``, passed in: it lives outside the model's state).

One call = one loss: teacher forward on the unmasked input (no grad, eval), targets from its
top-K blocks, student forward on the masked input, head and loss at the masked positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from d2v_train.models.config import ModelConfig
from d2v_train.models.ema import EMATeacher
from d2v_train.models.encoder import Encoder
from d2v_train.models.loss import effective_rank, regression_loss, std_from_stats, std_stats
from d2v_train.models.speech import build_speech_encoder
from d2v_train.models.targets import build_targets, select_masked
from d2v_train.models.text import build_text_encoder
from d2v_train.models.vision import build_vision_encoder

__all__ = ["Data2Vec", "Data2VecOutput", "build_encoder", "build_head", "make_teacher", "ENCODERS"]

# modality -> encoder builder
ENCODERS = {
    "speech": lambda cfg: build_speech_encoder(cfg.frontend, cfg.encoder),
    "vision": lambda cfg: build_vision_encoder(cfg.frontend, cfg.encoder),
    "text": lambda cfg: build_text_encoder(cfg.frontend, cfg.encoder),
}


def build_encoder(cfg: ModelConfig) -> Encoder:
    if cfg.modality not in ENCODERS:
        raise ValueError(f"modality: no encoder for {cfg.modality!r} yet (have {sorted(ENCODERS)})")
    return ENCODERS[cfg.modality](cfg)


def make_teacher(student: Encoder) -> EMATeacher:
    """The student's EMA teacher, initialised as a copy of the student (as the reference), without
    the front-end parts it does not hold and copying those it must not average."""
    fe = student.frontend
    return EMATeacher(student, skip=[f"frontend.{n}" for n in fe.teacher_skip],
                      copy_prefixes=[f"frontend.{n}" for n in fe.teacher_copy])


def build_head(kind: str, dim: int) -> nn.Module:
    """The regression head: Linear (speech, vision) or fairseq text's 2-layer head, whose hidden
    width is 2 * dim (``head_layers=2``), BERT-initialised as the rest of that model."""
    if kind == "linear":
        return nn.Linear(dim, dim)
    head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    for layer in (head[0], head[2]):
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return head


class Data2VecOutput(NamedTuple):
    loss_sum: torch.Tensor  # divide by the all-reduced ``count``
    count: torch.Tensor  # masked positions regressed on this rank
    target_stats: torch.Tensor  # loss.std_stats: all-reduce (SUM), then std_from_stats
    pred_stats: torch.Tensor
    target_rank: torch.Tensor  # loss.effective_rank of this rank's targets (a diagnostic: average it)

    @property
    def target_std(self) -> torch.Tensor:
        return std_from_stats(self.target_stats)

    @property
    def pred_std(self) -> torch.Tensor:
        return std_from_stats(self.pred_stats)


class Data2Vec(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.student = build_encoder(cfg)
        self.head = build_head(cfg.objective.head, cfg.encoder.dim)

    def parallel_units(self) -> list[nn.Module]:
        """The student's units of sharding and activation checkpointing (the root holds the rest)."""
        return self.student.parallel_units()

    def make_teacher(self) -> EMATeacher:
        return make_teacher(self.student)

    def forward(self, batch: dict, teacher: EMATeacher) -> Data2VecOutput:
        """``batch``: the loader's for the modality, e.g. speech {"source", "padding_mask" (True =
        padded), "mask" (True = masked, on the encoder's frame grid)}."""
        obj, fe = self.cfg.objective, self.student.frontend
        x_BTD, padding_BT = self.student.embed(batch)
        mask_BT = fe.target_mask(batch)
        if mask_BT.shape != padding_BT.shape:
            raise ValueError(f"mask: shape {tuple(mask_BT.shape)} does not match the encoder's frames "
                             f"{tuple(padding_BT.shape)}")
        mask_BT = mask_BT & ~padding_BT

        with torch.no_grad():
            t_in = fe.teacher_features(batch, x_BTD) if fe.share_features else batch  # the teacher embeds it
            layers = teacher(t_in, padding_BT, return_from=self.cfg.encoder.layers - obj.top_k,
                             target=obj.target).layers
            y_ND = select_masked(build_targets(layers, padding_BT, obj), mask_BT)

        x_BTD = self.student(x_BTD, padding_BT, mask_BT).x_BTD
        pred_ND = self.head(select_masked(x_BTD, mask_BT))
        loss_sum, count = regression_loss(pred_ND, y_ND, obj)
        return Data2VecOutput(loss_sum, count, std_stats(y_ND), std_stats(pred_ND), effective_rank(y_ND))
