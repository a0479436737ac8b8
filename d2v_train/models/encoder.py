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
from d2v_train.models.multimask import Kept, gather_kept, keep_index
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
    # leading tokens that are not content (vision's CLS): never masked, no target of their own
    extra_tokens: int = 0
    # True: the first and last content positions (text's <s> and </s>) are never masked
    keep_ends: bool = False

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

    def attention_bias(self, x_BTD: torch.Tensor, positions_NT: torch.Tensor | None = None) -> torch.Tensor | None:
        """Additive attention bias shared by all blocks (BEiT relative positions, ALiBi); none by
        default. ``positions_NT``: the original index of each position, when some were dropped."""
        return None

    def target_mask(self, batch: dict) -> torch.Tensor:
        """The positions to regress on the encoder's grid (True = masked): the batch's "mask" by
        default; vision adds the never-masked CLS, text keeps only the <mask> inputs."""
        return batch["mask"]

    def teacher_features(self, batch: dict, x_BTD: torch.Tensor) -> torch.Tensor:
        """The teacher's input when ``share_features``: the student's local features, detached
        (text re-embeds the unmasked tokens instead)."""
        return x_BTD.detach()

    def unmasked(self, batch: dict) -> dict:
        """The batch as the teacher sees it (text: the original tokens); data2vec 2.0's student
        embeds it too, then drops the masked positions."""
        return batch


class Encoder(nn.Module):
    def __init__(self, frontend: Frontend, cfg: TransformerConfig):
        super().__init__()
        self.frontend = frontend
        self.transformer = Transformer(cfg)

    def parallel_units(self) -> list[nn.Module]:
        """The modules sharded (FSDP2), compiled and checkpointed one by one: the Transformer blocks."""
        return list(self.transformer.blocks)

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

    def forward_kept(self, x_NTD: torch.Tensor, padding_NT: torch.Tensor,
                     mask_NT: torch.Tensor) -> tuple[TransformerOutput, Kept]:
        """data2vec 2.0's student: positions first (on the full sequence, masked features zeroed so
        the positional conv cannot see them), then only the positions neither masked nor padded go
        through the blocks. Returns the output over the kept slots and where they came from."""
        x_NTD = self.frontend.prepare(x_NTD, None)
        x_NTD = x_NTD.masked_fill(mask_NT[..., None], 0.0)
        x_NTD = self.frontend.positional(x_NTD, padding_NT if padding_NT.any() else None)
        kept = keep_index(mask_NT | padding_NT)
        x_NKD = gather_kept(x_NTD, kept)
        padding_NK = kept.padding_NK if kept.padding_NK.any() else None
        bias = self.frontend.attention_bias(x_NKD, kept.index_NK)
        return self.transformer(x_NKD, padding_NK, attn_bias=bias), kept
