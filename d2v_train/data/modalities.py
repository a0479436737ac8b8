"""What the data side does differently per modality, one object each: how a sample is decoded
(crop, augment, mask row), how a batch is collated, what a batch's throughput unit is, which batch
plan `d2v data stream` uses, and how one input file becomes a batch of one (`d2v encode`).
The loader itself fetches, decodes and collates through these alone; a new modality is a new
class here (and its decode and collate functions), not a branch in the loader.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from d2v_train.data import collate, decode
from d2v_train.data.batches import Batch
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
                rng: np.random.Generator) -> Batch:
        """`rows`: each kept sample's position in the loader's index."""
        raise NotImplementedError

    def delivered(self, real: int, loader) -> dict:
        """Throughput.add's units beyond samples for a batch of `real` unpadded positions."""
        return {}

    def trained_units(self, batch: Batch, loader) -> float:
        """What a training batch is measured in for rates (audio seconds, tokens); 0: samples only."""
        return 0.0

    def stream_policy(self, *, max_tokens: int | None, batch_size: int | None, train: bool, tail: str) -> BatchPolicy:
        """`d2v data stream`'s batch plan from its options: fixed-size batches, shuffled in training."""
        if max_tokens is not None:
            raise ValueError("--max-tokens applies to speech; use --batch-size")
        return BatchPolicy(batch_size=batch_size or 32, shuffle=train, tail=tail)

    def single_input(self, data: bytes, where: str, model, data_url: str) -> Batch:
        """One input file (`where` names it in errors) as a batch of one, preprocessed as the loader
        scores samples; `model`: the ModelConfig, `data_url`: its pre-training dataset."""
        raise NotImplementedError


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
        if "transcript" in loader.index.columns:
            (batch["transcripts"],) = loader.index.gather(rows, ("transcript",))
        return batch

    def delivered(self, real, loader):
        return {"audio_seconds": real / loader.frame_grid.sample_rate}

    def trained_units(self, batch, loader):
        return batch["source"].numel() / loader.frame_grid.sample_rate  # training crops: no padding

    def stream_policy(self, *, max_tokens, batch_size, train, tail):
        if batch_size is None:
            return BatchPolicy(max_tokens=max_tokens or 1_400_000, shuffle=train, crop=train, tail=tail)
        if train:
            raise ValueError("--batch-size: speech training batches are planned by --max-tokens")
        return BatchPolicy(batch_size=batch_size, shuffle=False, crop=False, tail=tail)

    def single_input(self, data, where, model, data_url):
        import soundfile

        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        if rate != 16000 or audio.shape[1] != 1:
            raise ValueError(f"{where}: expected 16 kHz mono audio, got {rate} Hz with {audio.shape[1]} channel(s)")
        wav = audio[:, 0].copy()
        shortest = model.frontend.receptive_field
        if wav.size < shortest:
            raise ValueError(f"{where}: {wav.size} samples, shorter than one frame of the encoder ({shortest})")
        mean, scale = decode.waveform_scale(wav)  # as the loader normalises
        wav *= scale
        wav -= mean * scale
        source = torch.from_numpy(wav[None])
        return {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)}


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
        (labels,) = loader.index.gather(rows, ("label",))
        return collate.collate_images(items, keys, labels)

    def single_input(self, data, where, model, data_url):
        from d2v_train.data.transforms import ImageTransform

        size = model.frontend.image_size
        patches = (size // model.frontend.patch_size) ** 2
        mask = io.BytesIO()
        np.save(mask, np.zeros((1, patches), dtype=bool))
        image, _ = decode.decode_image(data, mask.getvalue(), variant=0, train=False, rng=np.random.default_rng(0),
                                       size=size, eval_resize=ImageTransform().eval_resize(size))
        return {"image": torch.from_numpy(np.ascontiguousarray(image))[None],
                "mask": torch.zeros(1, patches, dtype=torch.bool)}


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

    def single_input(self, data, where, model, data_url):
        from pipelines.tokenizer import load_tokenizer, special_ids

        tokenizer = load_tokenizer(f"{data_url.rstrip('/')}/tokenizer")
        ids = special_ids(tokenizer)
        room = model.frontend.max_positions - model.frontend.pad_id - 3  # positions start after pad_id
        content = tokenizer.encode(data.decode("utf-8"), add_special_tokens=False).ids[:room]
        tokens_BT = torch.tensor([[ids["bos_id"], *content, ids["eos_id"]]], dtype=torch.int64)
        def nothing_BT():
            return torch.zeros_like(tokens_BT, dtype=torch.bool)

        return {"tokens": tokens_BT, "target_tokens": tokens_BT, "padding_mask": nothing_BT(), "mask": nothing_BT(),
                "target_mask": nothing_BT()}


MODALITIES: dict[str, DataModality] = {m.name: m for m in (SpeechData(), VisionData(), TextData())}
