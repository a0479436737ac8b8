"""Decode one sample's members into numpy arrays, with every random choice passed in.

The loader's planner draws crops, flips and mask variants from (seed, epoch, batch), so these
functions are pure: the same bytes and parameters give the same arrays. Numpy only (no torch):
they run in loader threads, and soundfile, Pillow and numpy release the GIL for the heavy work.
Problems raise ``ValueError`` naming what is wrong; the caller adds the key and shard.
"""
from __future__ import annotations

import io
import math
import os
import re

import numpy as np
import soundfile
from PIL import Image

from schemas.dataset import FrameGrid

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "decode_speech", "decode_image", "decode_tokens",
           "random_resized_crop", "load_npy"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# the header numpy's np.save writes for a plain C-order array (format 1.0)
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def load_npy(data: bytes, what: str) -> np.ndarray:
    """A stored ``.npy`` member, never unpickled; may be a read-only view of ``data``.

    The usual np.save header is matched directly (about 10x faster than np.load's literal_eval,
    which costs a few percent of a whole FLAC decode); any other layout goes through np.load.
    """
    try:
        if data[:8] == b"\x93NUMPY\x01\x00":
            end = 10 + int.from_bytes(data[8:10], "little")
            header = _NPY_HEADER.fullmatch(data, 10, end)
            if header:
                shape = tuple(int(d) for d in header[2].split(b",") if d.strip())
                return np.frombuffer(data, header[1].decode(), math.prod(shape), end).reshape(shape)
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy reports bad headers with several types
        raise ValueError(f"{what} is not a valid .npy array: {exc}") from exc


def _mask_row(mask_npy: bytes, variant: int, length: int | None, unit: str) -> np.ndarray:
    """Row ``variant`` of the stored bool (K, T) masks, checked against the sample's T."""
    mask = load_npy(mask_npy, "mask")
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool (variants, {unit}), got {mask.dtype} {mask.shape}")
    if not 0 <= variant < mask.shape[0]:
        raise ValueError(f"mask variant {variant} out of range: the sample stores {mask.shape[0]}")
    if length is not None and mask.shape[1] != length:
        raise ValueError(f"mask has {mask.shape[1]} {unit} but the data has {length}")
    return mask[variant]


def _read_flac(flac: bytes) -> tuple[np.ndarray, int]:
    """float32 samples and rate, read through an in-memory file where Linux has memfd.

    libsndfile then reads a file descriptor; from BytesIO it calls back into Python ~100 times
    per utterance, and each call waits for the GIL, which stalls loader threads under load.
    """
    if not hasattr(os, "memfd_create"):
        return soundfile.read(io.BytesIO(flac), dtype="float32")
    fd = os.memfd_create("d2v-flac", os.MFD_CLOEXEC)
    try:
        view = memoryview(flac)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        with soundfile.SoundFile(fd, closefd=False) as f:
            return f.read(dtype="float32"), f.samplerate
    finally:
        os.close(fd)


def decode_speech(flac: bytes, mask_npy: bytes, *, variant: int, crop_length: int | None, crop_offset: int = 0,
                  frame_grid: FrameGrid, normalize: bool = True, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(waveform float32 (crop_length,), mask bool (frames(crop_length),)) of one utterance.

    Normalised over the whole utterance before cropping, as fairseq's ``layer_norm`` of the
    waveform (biased variance, ``eps`` 1e-5), so a crop sees the same scale as the utterance.
    ``crop_offset`` must be a multiple of the hop: crop frame j then covers crop samples
    [hop*j, hop*j + receptive field), i.e. utterance frame crop_offset // hop + j, so the mask
    is an exact slice of the stored one. ``crop_length`` None keeps the whole utterance.
    """
    try:
        wave, rate = _read_flac(flac)
    except Exception as exc:  # noqa: BLE001 - libsndfile reports corrupt data in many ways
        raise ValueError(f"FLAC cannot be decoded: {exc}") from exc
    if rate != frame_grid.sample_rate:
        raise ValueError(f"audio is {rate} Hz, expected {frame_grid.sample_rate} Hz")
    if wave.ndim != 1:
        raise ValueError(f"audio has {wave.shape[1]} channels, expected mono")
    n, hop = wave.size, frame_grid.hop
    mask = _mask_row(mask_npy, variant, frame_grid.frames(n), "frames")
    if crop_length is None:
        if crop_offset != 0:
            raise ValueError(f"crop_offset {crop_offset} without crop_length: a whole utterance starts at 0")
        crop_length = n
    if crop_offset % hop or crop_offset < 0 or crop_length < 0 or crop_offset + crop_length > n:
        raise ValueError(f"crop [{crop_offset}, {crop_offset + crop_length}) does not fit the utterance's {n} "
                         f"samples at a multiple of the hop ({hop})")
    frames = frame_grid.frames(crop_length)
    if frames < 1:
        raise ValueError(f"crop of {crop_length} samples is too short for one frame")
    crop = wave[crop_offset:crop_offset + crop_length]
    if normalize:
        mean, scale = waveform_scale(wave, eps)
        crop *= scale  # (x - mean) * scale as two passes over the crop only
        crop -= mean * scale
    start = crop_offset // hop
    return crop, mask[start:start + frames]


def waveform_scale(wave: np.ndarray, eps: float = 1e-5) -> tuple[float, float]:
    """(mean, 1 / std) of a float32 waveform: x -> (x - mean) * scale is fairseq's normalisation."""
    mean, var = _moments(wave)
    return mean, 1.0 / math.sqrt(var + eps)


_ones = np.ones(0, dtype=np.float32)


def _moments(x: np.ndarray) -> tuple[float, float]:
    """Mean and biased variance of float32 ``x`` from two BLAS dot products.

    A dot with ones is ~3x faster than numpy's pairwise sum, and neither pass writes memory;
    only when the DC offset exceeds the spread (cancellation) is the centred signal used.
    """
    global _ones
    ones = _ones  # grown, never mutated: safe to share between loader threads
    if ones.size < x.size:
        ones = _ones = np.ones(max(x.size, 2 * ones.size), dtype=np.float32)
    n = x.size
    mean = float(np.dot(x, ones[:n])) / n
    var = float(np.dot(x, x)) / n - mean * mean
    if mean * mean > var:
        centred = x - np.float32(mean)
        var = float(np.dot(centred, centred)) / n
    return mean, max(var, 0.0)


def random_resized_crop(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision's RandomResizedCrop rule: up to 10 draws of area
    fraction ~ U(scale) and log aspect ~ U(log ratio); failing that, the largest centred crop
    whose aspect lies within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _reduction(shorter: int, needed: int) -> int:
    """Largest JPEG DCT scale-down (1, 2, 4, 8) that keeps ``shorter`` at least ``needed`` pixels:
    the result then loses no detail the final resize keeps, and decoding is 2-4x cheaper."""
    for r in (8, 4, 2):
        if shorter // r >= needed:
            return r
    return 1


def decode_image(jpeg: bytes, mask_npy: bytes, *, variant: int, train: bool, rng: np.random.Generator | None = None,
                 size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_resize: int = 256,
                 draft: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (3, size, size) normalised, mask bool (patches,)) of one picture.

    train: random resized crop (``rng`` draws the crop, then the flip), bicubic resize, flip
    with probability ``hflip``. eval: bicubic resize of the shorter side to ``eval_resize``, centre
    crop. The patch mask is not flipped with the image: masks are drawn i.i.d. per patch, so a
    mirrored mask is as likely as the stored one and each position keeps its precomputed mask.

    Only the output region is resampled (Pillow's ``box``), 1.7x cheaper than resizing the whole
    picture for eval; filter taps at its edge read the neighbouring pixels, where torchvision
    (crop first) clamps, so border pixels can differ by a few grey levels. ``draft`` lets a JPEG
    decode at 1/2..1/8 scale when the region keeps at least the output's pixels.
    """
    if train and rng is None:
        raise ValueError("train=True needs rng (the crop and flip are drawn from it)")
    if not train and eval_resize < size:
        raise ValueError(f"eval_resize {eval_resize} is smaller than the crop size {size}")
    mask = _mask_row(mask_npy, variant, None, "patches")
    try:
        img = Image.open(io.BytesIO(jpeg))
        width, height = img.size
        if train:
            top, left, h, w = random_resized_crop(width, height, rng, scale, ratio)
            box = (left, top, left + w, top + h)
            flip = rng.random() < hflip
            r = _reduction(min(h, w), size)
        else:
            if width <= height:  # torchvision Resize(int): the longer side truncated
                ow, oh = eval_resize, int(eval_resize * height / width)
            else:
                ow, oh = int(eval_resize * width / height), eval_resize
            top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
            fx, fy = width / ow, height / oh  # the centre crop of the resized picture, in source pixels
            box = (left * fx, top * fy, (left + size) * fx, (top + size) * fy)
            flip = False
            r = _reduction(min(width, height), eval_resize)
        if draft and r > 1 and img.format == "JPEG":
            img.draft("RGB", (width // r, height // r))
        img.load()
    except Exception as exc:  # noqa: BLE001 - Pillow signals corrupt data with many exception types
        raise ValueError(f"image cannot be decoded: {exc}") from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height  # < 1 after a draft decode
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    pixels = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return _normalize(pixels, mean, std, flip), mask


def _normalize(pixels_HWC: np.ndarray, mean, std, flip: bool) -> np.ndarray:
    """uint8 HWC -> float32 CHW of (v / 255 - mean) / std, mirrored when ``flip``."""
    std = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    mul = (1.0 / (255.0 * std)).astype(np.float32)
    add = (-np.asarray(mean, dtype=np.float64).reshape(3, 1, 1) / std).astype(np.float32)
    src_CHW = pixels_HWC.transpose(2, 0, 1)
    if flip:
        src_CHW = src_CHW[:, :, ::-1]
    out_CHW = np.empty(src_CHW.shape, dtype=np.float32)
    np.multiply(src_CHW, mul, out=out_CHW)
    out_CHW += add
    return out_CHW


def decode_tokens(tokens_npy: bytes, mask_npy: bytes, *, variant: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 (T,), mask bool (T,)) of one text block."""
    tokens = load_npy(tokens_npy, "tokens")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise ValueError(f"tokens must be a non-empty 1-D integer array, got {tokens.dtype} {tokens.shape}")
    return tokens, _mask_row(mask_npy, variant, tokens.size, "tokens")
