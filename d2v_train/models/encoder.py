"""A modality front-end plus the shared Transformer: what HF calls ``Data2Vec{Audio,Vision,Text}Model``.

Front-ends subclass ``Frontend`` and only supply parts (fairseq data2vec 2.0's layout): a local
encoder (raw input -> features), the mask embedding, a positional encoder; they also say which of
their parts the EMA teacher does not hold (shared with the student) and which it copies.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from d2v_train.models.config import TransformerConfig
from d2v_train.models.transformer import Transformer, TransformerOutput

__all__ = ["Frontend", "Encoder"]


class Frontend(nn.Module):
    # names of parameters/submodules the teacher does not hold (it never masks, or it reuses the
    # student's local features when ``share_features``)
    teacher_skip: tuple[str, ...] = ()
    # names the teacher copies from the student at every update instead of averaging
    teacher_copy: tuple[str, ...] = ()
    # True: the teacher runs on the student's (detached) local features, computed once
    share_features: bool = False

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw batch -> (features x_BTD, padding_BT with True = padded)."""
        raise NotImplementedError

    def prepare(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
        """Input dropout, then the mask embedding at ``mask_BT`` (True = masked). The teacher runs
        it too, unmasked and in eval mode: so its input is the student's before dropout."""
        raise NotImplementedError

    def positional(self, x_BTD: torch.Tensor, padding_BT: torch.Tensor | None) -> torch.Tensor:
        """Position information and any input norm, before the blocks."""
        return x_BTD

    def attention_bias(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """Additive attention bias shared by all blocks (BEiT relative positions); none by default."""
        return None

    def target_mask(self, batch: dict) -> torch.Tensor:
        """The positions to regress on the encoder's grid (True = masked): the batch's "mask" by
        default; vision adds the never-masked CLS, text keeps only the <mask> inputs."""
        return batch["mask"]

    def teacher_features(self, batch: dict, x_BTD: torch.Tensor) -> torch.Tensor:
        """The teacher's input when ``share_features``: the student's local features, detached
        (text re-embeds the unmasked tokens instead)."""
        return x_BTD.detach()


class Encoder(nn.Module):
    def __init__(self, frontend: Frontend, cfg: TransformerConfig):
        super().__init__()
        self.frontend = frontend
        self.transformer = Transformer(cfg)

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frontend.embed(batch)

    def forward(
        self,
        x_BTD: torch.Tensor | dict,
        padding_BT: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
        *,
        return_from: int | None = None,
        target: Literal["ffn", "block"] = "block",
    ) -> TransformerOutput:
        """Features from ``embed`` -> contextualised output; ``mask_BT`` True = replace by the mask
        embedding. A batch without padding skips the attention mask (faster kernels). ``x_BTD`` may
        also be a raw batch, embedded here: FSDP2 gathers a root's parameters only around
        ``forward``, so a teacher that embeds for itself (vision) must do it inside."""
        if isinstance(x_BTD, dict):
            x_BTD, padding_BT = self.embed(x_BTD)
        if padding_BT is not None and not padding_BT.any():
            padding_BT = None
        x_BTD = self.frontend.prepare(x_BTD, mask_BT)
        x_BTD = self.frontend.positional(x_BTD, padding_BT)
        return self.transformer(x_BTD, padding_BT, attn_bias=self.frontend.attention_bias(x_BTD),
                                return_from=return_from, target=target)
