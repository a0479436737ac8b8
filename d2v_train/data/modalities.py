"""What the streaming loader does differently per modality, one object each: how a sample is
decoded (crop, augment, mask row), how a batch is collated, what a batch's throughput unit is.
The loader itself fetches, decodes and collates through these alone; a new modality is a new
class here (and its decode and collate functions), not a branch in the loader.
"""
from __future__ import annotations

import numpy as np

from d2v_train.data import collate, decode
from d2v_train.data.plan import BatchPolicy, GlobalBatch
from d2v_train.data.reader import SampleBytes


class DataModality:
    """One modality's decoding and collation; stateless: `loader` is the StreamingLoader asking,
    whose settings (frame grid, image transform, index) the methods read."""

    name: str
    rate_name: str | None = None  # the metrics key of trained_units per second, if the modality has one

    def check_policy(self, policy: BatchPolicy) -> None:
        """Refuse a batch policy the modality cannot plan with."""

    def draws(self, keep: list[int], rng: np.random.Generator):
        """Random draws a batch's decoding needs, made before any sample is decoded (None: none)."""
        return None

    def decode(self, loader, sample: SampleBytes, plan: GlobalBatch, j: int, variant: int, draws):
        raise NotImplementedError

    def collate(self, loader, items: list, keys: list[str], rows: list[int], plan: GlobalBatch,
                rng: np.random.Generator) -> dict:
        """`rows`: each kept sample's position in the loader's index."""
        raise NotImplementedError

    def delivered(self, real: int, loader) -> dict:
        """Throughput.add's units beyond samples for a batch of `real` unpadded positions."""
        return {}

    def trained_units(self, batch: dict, loader) -> float:
        """What a training batch is measured in for rates (audio seconds, tokens); 0: samples only."""
        return 0.0


class SpeechData(DataModality):
    name = "speech"
    rate_name = "audio_s_per_s"

    def check_policy(self, policy: BatchPolicy) -> None:
        if policy.max_tokens is None and policy.crop:
            raise ValueError("speech training batches are planned by --max-tokens")

    def decode(self, loader, sample, plan, j, variant, draws):
        return decode.decode_speech(sample.data, sample.mask, variant=variant, crop_length=plan.crop_length,
                                    crop_offset=int(plan.crop_offsets[j]) if plan.crop_offsets is not None else 0,
                                    frame_grid=loader.frame_grid)

    def collate(self, loader, items, keys, rows, plan, rng):
        batch = collate.collate_speech(items, keys, pad=plan.crop_length is None)
        columns = loader.index.columns
        if "transcript" in columns:
            batch["transcripts"] = [columns["transcript"][row] for row in rows]
        return batch

    def delivered(self, real, loader):
        return {"audio_seconds": real / loader.frame_grid.sample_rate}

    def trained_units(self, batch, loader):
        return batch["source"].numel() / loader.frame_grid.sample_rate  # training crops: no padding


class VisionData(DataModality):
    name = "vision"

    def draws(self, keep, rng):
        return dict(zip(keep, rng.spawn(len(keep))))  # one generator per picture: crops and flips

    def decode(self, loader, sample, plan, j, variant, draws):
        tf = loader.image_transform
        return decode.decode_image(sample.data, sample.mask, variant=variant, train=loader.train, rng=draws[j],
                                   size=loader.image_size, scale=tf.crop_scale, hflip=tf.hflip,
                                   eval_resize=tf.eval_resize(loader.image_size))

    def collate(self, loader, items, keys, rows, plan, rng):
        labels = [int(loader.index.columns["label"][row]) for row in rows]
        return collate.collate_images(items, keys, labels)


class TextData(DataModality):
    name = "text"
    rate_name = "tokens_per_s"

    def decode(self, loader, sample, plan, j, variant, draws):
        return decode.decode_tokens(sample.data, sample.mask, variant=variant)

    def collate(self, loader, items, keys, rows, plan, rng):
        tokenizer = loader.index.dataset.tokenizer
        return collate.collate_text(items, keys, pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id,
                                    vocab_size=tokenizer.vocab_size,
                                    special_ids=(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                                 tokenizer.unk_id, tokenizer.mask_id),
                                    rng=rng)

    def delivered(self, real, loader):
        return {"tokens": real}

    def trained_units(self, batch, loader):
        return float((~batch["padding_mask"]).sum())  # tokens that are not padding


MODALITIES: dict[str, DataModality] = {m.name: m for m in (SpeechData(), VisionData(), TextData())}
