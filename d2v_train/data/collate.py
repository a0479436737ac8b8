"""Stack decoded samples into a batch dict of torch tensors.

Every batch carries its sample ``keys`` (coverage and resume checks) and padding masks
(True = padding), even where training batches never pad, so models handle one shape of input.
Arrays are stacked once in numpy and wrapped with ``torch.from_numpy`` (no second copy).
"""
from __future__ import annotations

import numpy as np
import torch

from d2v_train.data.batches import ImageBatch, SpeechBatch, TextBatch
from pipelines.masking import bert_replacements

__all__ = ["collate_speech", "collate_images", "collate_text"]


def _check_keys(items: list, keys: list[str]) -> None:
    if len(items) != len(keys):
        raise ValueError(f"{len(items)} samples but {len(keys)} keys")
    if not items:
        raise ValueError("cannot collate an empty batch")


def _pad_rows(rows: list[np.ndarray], fill, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(B, max length) array of ``rows`` padded with ``fill``, and its padding mask."""
    lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), int(lengths.max())), fill, dtype=dtype)
    for row, r in zip(out, rows):  # one vectorised copy per sample
        row[:r.size] = r
    return out, np.arange(out.shape[1]) >= lengths[:, None]


def collate_speech(items: list[tuple[np.ndarray, np.ndarray]], keys: list[str], *, pad: bool = False) -> SpeechBatch:
    """{"source" float32 (B, L), "padding_mask" bool (B, L), "mask" bool (B, T) True = masked,
    "frame_padding_mask" bool (B, T), "keys"}.

    Training crops have equal lengths and must not pad (a length mismatch is a planner bug);
    ``pad=True`` (evaluation on whole utterances) zero-pads to the longest, with the mask False
    at padded frames.
    """
    _check_keys(items, keys)
    waves, masks = [w for w, _ in items], [m for _, m in items]
    if pad:
        source, padding = _pad_rows(waves, 0.0, np.float32)
        mask, frame_padding = _pad_rows(masks, False, np.bool_)
    else:
        if len({w.size for w in waves}) > 1 or len({m.size for m in masks}) > 1:
            raise ValueError(f"unequal crops in an unpadded batch: {sorted({w.size for w in waves})} samples")
        source, mask = np.stack(waves), np.stack(masks)
        padding, frame_padding = np.zeros(source.shape, dtype=bool), np.zeros(mask.shape, dtype=bool)
    return {"source": torch.from_numpy(source), "padding_mask": torch.from_numpy(padding),
            "mask": torch.from_numpy(mask), "frame_padding_mask": torch.from_numpy(frame_padding),
            "keys": list(keys)}


def collate_images(items: list[tuple[np.ndarray, np.ndarray]], keys: list[str], labels) -> ImageBatch:
    """{"image" float32 (B, 3, H, W), "mask" bool (B, P), "label" int64 (B,), "keys"}."""
    _check_keys(items, keys)
    if len(labels) != len(items):
        raise ValueError(f"{len(items)} samples but {len(labels)} labels")
    try:
        image, mask = np.stack([i for i, _ in items]), np.stack([m for _, m in items])
    except ValueError as exc:
        raise ValueError(f"images or masks differ in shape within a batch: {exc}") from exc
    return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
            "label": torch.from_numpy(np.asarray(labels, dtype=np.int64)), "keys": list(keys)}


def collate_text(items: list[tuple[np.ndarray, np.ndarray]], keys: list[str], *, pad_id: int, mask_id: int,
                 vocab_size: int, special_ids=(), rng: np.random.Generator, random_prob: float = 0.1,
                 leave_prob: float = 0.1) -> TextBatch:
    """{"tokens" int64 (B, T) the student's input after BERT 80/10/10 replacement,
    "target_tokens" the original ids, "mask" positions selected, "target_mask" positions that
    became <mask> (the ones data2vec regresses), "padding_mask", "keys"}; padded with ``pad_id``.

    Replacement happens here rather than at decode because it is drawn per batch from ``rng``;
    padding is never masked, so it is never replaced.
    """
    _check_keys(items, keys)
    tokens, padding = _pad_rows([t for t, _ in items], pad_id, np.int64)
    mask, _ = _pad_rows([m for _, m in items], False, np.bool_)
    student, target = bert_replacements(tokens, mask, rng, vocab_size=vocab_size, mask_token_id=mask_id,
                                        random_prob=random_prob, leave_prob=leave_prob,
                                        special_ids=special_ids, return_targets=True)
    return {"tokens": torch.from_numpy(student), "target_tokens": torch.from_numpy(tokens),
            "mask": torch.from_numpy(mask), "target_mask": torch.from_numpy(target),
            "padding_mask": torch.from_numpy(padding), "keys": list(keys)}
