"""What a batch holds, per modality: the keys and tensor shapes the collate functions produce, the
models read and the loader adds (typed dictionaries: the same dicts, now with a name and a shape
each). B: batch, L: audio samples, T: frames or tokens, P: patches; masks are True = masked,
padding masks True = padding."""
from __future__ import annotations

from typing import NotRequired, TypedDict

import torch


class Served(TypedDict, total=False):
    """What the loader adds to every batch it hands out."""

    keys: list[str]  # the samples, in order (empty: all of them lost to skipped bad shards)
    epoch: int
    batch: int  # the global batch's number in the epoch's plan
    padding: bool  # a repeat that only evens out the ranks' batch counts (tail="pad")
    skipped: int  # samples of skipped bad shards left out of this batch
    sources: list[int]  # a mix (data.splits, data.sources): the part each sample came from


class SpeechBatch(Served):
    source: torch.Tensor  # float32 (B, L), normalised waveforms
    padding_mask: torch.Tensor  # bool (B, L)
    mask: torch.Tensor  # bool (B, T) frames to mask
    frame_padding_mask: torch.Tensor  # bool (B, T)
    transcripts: NotRequired[list[str | None]]  # where the index has them


class ImageBatch(Served):
    image: torch.Tensor  # float32 (B, 3, H, W), normalised
    mask: torch.Tensor  # bool (B, P) patches to mask
    label: torch.Tensor  # int64 (B,)


class TextBatch(Served):
    tokens: torch.Tensor  # int64 (B, T), the student's input after BERT's 80/10/10 replacement
    target_tokens: torch.Tensor  # int64 (B, T), the original ids (the teacher's input)
    mask: torch.Tensor  # bool (B, T) positions selected
    target_mask: torch.Tensor  # bool (B, T) positions that became <mask> (the ones regressed)
    padding_mask: torch.Tensor  # bool (B, T)


Batch = SpeechBatch | ImageBatch | TextBatch
