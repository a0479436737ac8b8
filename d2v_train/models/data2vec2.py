"""data2vec 2.0 (DATA2VEC.md section 4): the same teacher targets, several times less compute.

One call = one loss: the teacher encodes each unmasked sample once; the student encodes M masked
clones of it, but only their kept positions; a convolutional decoder fills the masked slots with
small noise, restores the order and predicts the (repeated) targets, which the loss compares at
the masked positions. Images add a loss on the CLS token. Masks are drawn here, per clone.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.models.config import ModelConfig
from d2v_train.models.data2vec import Data2VecOutput, build_encoder, make_teacher
from d2v_train.models.decoder import ConvDecoder
from d2v_train.models.ema import EMATeacher
from d2v_train.models.loss import effective_rank, position_losses, regression_loss, std_stats
from d2v_train.models.multimask import clone, draw_clone_masks, pad_front, restore
from d2v_train.models.targets import build_targets

__all__ = ["Data2Vec2", "mask_rng"]


def mask_rng(keys: list[str] | None) -> np.random.Generator:
    """The masks' generator: one draw of torch's (which the trainer seeds per step alike on every
    rank) mixed with the batch's sample keys, so that ranks mask differently and a resumed run the same."""
    seed = int(torch.randint(0, 2**62, ()))
    return np.random.default_rng([seed, zlib.crc32("\n".join(keys or []).encode())])


class Data2Vec2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.variant == "data2vec2" and cfg.data2vec2 is not None
        self.cfg = cfg
        self.student = build_encoder(cfg)
        # masked positions are dropped, not embedded: nothing trains the mask embedding (it stays
        # in the encoder, at its initial value, for fine-tuning's time masking)
        mask_emb = getattr(self.student.frontend, "mask_emb", None)
        if mask_emb is not None:
            mask_emb.requires_grad_(False)
        grid = getattr(self.student.frontend, "grid", None)
        self.decoder = ConvDecoder(cfg.data2vec2.decoder, cfg.encoder.dim, grid)

    def parallel_units(self) -> list[nn.Module]:
        """The student's units of sharding and activation checkpointing (the root holds the rest)."""
        return self.student.parallel_units()

    def make_teacher(self) -> EMATeacher:
        return make_teacher(self.student)

    def draw_masks(self, padding_BS: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(B * M, S) masks over the content positions (no CLS) of the batch's samples."""
        v2, fe = self.cfg.data2vec2, self.student.frontend
        lengths_B = (~padding_BS).sum(1).cpu().numpy()
        mask_NS = draw_clone_masks(v2.mask, lengths_B, padding_BS.shape[1], v2.clones, rng,
                                   grid=getattr(fe, "grid", None), skip_ends=fe.keep_ends)
        return mask_NS.to(padding_BS.device)

    def forward(self, batch: dict, teacher: EMATeacher) -> Data2VecOutput:
        obj, v2, fe = self.cfg.objective, self.cfg.data2vec2, self.student.frontend
        M, E = v2.clones, fe.extra_tokens
        clean = fe.unmasked(batch)
        x_BTD, padding_BT = self.student.embed(clean)
        padding_BS = padding_BT[:, E:]

        with torch.no_grad():
            t_in = x_BTD.detach() if fe.share_features else clean  # a teacher that embeds does it inside
            layers = teacher(t_in, padding_BT, return_from=self.cfg.encoder.layers - obj.top_k,
                             target=obj.target).layers
            y_BSD = build_targets([y[:, E:] for y in layers], padding_BS, obj)

        mask_NS = self.draw_masks(padding_BS, mask_rng(batch.get("keys")))
        x_NTD, padding_NT = clone(x_BTD, M), clone(padding_BT, M)
        out, kept = self.student.forward_kept(x_NTD, padding_NT, pad_front(mask_NS, E))

        dec = v2.decoder
        x_NKD = F.dropout(out.x_BTD, dec.input_dropout, self.training)
        noise_NTD = torch.randn(x_NTD.shape, device=x_NKD.device, dtype=x_NKD.dtype) * dec.noise_std
        full_NTD = restore(x_NKD, kept, noise_NTD)[:, E:]
        full_NTD = full_NTD.masked_fill(clone(padding_BS, M)[..., None], 0.0)
        pred_NSD = self.decoder(full_NTD)

        y_NSD = clone(y_BSD, M)
        pred_ND, y_ND = pred_NSD[mask_NS], y_NSD[mask_NS]
        loss_sum, count = regression_loss(pred_ND, y_ND, obj)
        if v2.cls_loss:
            # CLS (kept slot 0) regresses the sample's mean target; weighted by the clone's masked
            # count, so that after the trainer's division it adds cls_loss x the mean over clones
            cls_N = position_losses(out.x_BTD[:, 0], clone(y_BSD.mean(1), M), obj)
            loss_sum = loss_sum + v2.cls_loss * (cls_N * mask_NS.sum(1)).sum()
        return Data2VecOutput(loss_sum, count, std_stats(y_ND), std_stats(pred_ND), effective_rank(y_BSD[~padding_BS]))
