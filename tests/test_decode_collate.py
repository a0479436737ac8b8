"""Per-sample decoding (crops, normalisation, mask slices) and batch collation."""
import io

import numpy as np
import pytest
import soundfile
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from d2v_train.data.collate import collate_images, collate_speech, collate_text
from d2v_train.data.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_image,
    decode_speech,
    decode_tokens,
    load_npy,
    random_resized_crop,
)
from schemas.dataset import FrameGrid

GRID = FrameGrid()
HOP = GRID.hop


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def flac(pcm: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def utterance(n: int, seed: int = 0, dc: float = 0.0) -> tuple[bytes, np.ndarray]:
    """FLAC bytes of a loud noisy tone and what soundfile decodes them to."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n) + dc
    data = flac(np.clip(x * 32767, -32768, 32767).astype(np.int16))
    return data, soundfile.read(io.BytesIO(data), dtype="float32")[0]


def masks(k: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((k, length)) < 0.5


def jpeg(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a little noise: JPEG keeps it close, resizes keep it recognisable."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 37.0 + y / 23.0)], axis=-1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def test_load_npy_matches_np_load():
    rng = np.random.default_rng(0)
    arrays = [rng.random((8, 499)) < 0.5, np.arange(7, dtype=np.int32), np.zeros((0, 3), bool), np.array(5),
              np.arange(6, dtype=">i8").reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3))]
    for array in arrays:
        for data in (npy(array), memoryview(npy(array))):
            out = load_npy(data, "x")
            assert out.dtype == array.dtype and out.shape == array.shape
            np.testing.assert_array_equal(out, array)
    for bad in (npy(np.arange(7, dtype=np.int32))[:-4], b"\x93NUMPY\x01\x00garbage", b""):
        with pytest.raises(ValueError, match="not a valid .npy"):
            load_npy(bad, "x")
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a valid .npy"):
        load_npy(buffer.getvalue(), "x")


# -- speech -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dc", [0.0, 0.1, 0.4])
def test_speech_normalised_over_whole_utterance_like_layer_norm(dc):
    data, raw = utterance(40_000, dc=dc)
    wave, mask = decode_speech(data, npy(masks(3, GRID.frames(raw.size))), variant=0, crop_length=None,
                               frame_grid=GRID)
    reference = torch.nn.functional.layer_norm(torch.from_numpy(raw), raw.shape).numpy()
    assert wave.dtype == np.float32 and wave.shape == raw.shape
    np.testing.assert_allclose(wave, reference, atol=2e-5)
    assert abs(float(wave.mean(dtype=np.float64))) < 1e-5
    var = float(raw.astype(np.float64).var())
    assert float(wave.var(dtype=np.float64)) == pytest.approx(var / (var + 1e-5), rel=1e-4)
    raw_wave, _ = decode_speech(data, npy(masks(3, GRID.frames(raw.size))), variant=0, crop_length=None,
                                frame_grid=GRID, normalize=False)
    np.testing.assert_array_equal(raw_wave, raw)


def test_speech_crop_is_exact_slice_of_whole_decode():
    data, raw = utterance(50_000)
    stored = npy(masks(2, GRID.frames(raw.size)))
    whole, _ = decode_speech(data, stored, variant=1, crop_length=None, frame_grid=GRID)
    for offset, length in [(0, 32_000), (HOP * 7, 20_001), (HOP * 56, 50_000 - HOP * 56), (HOP * 100, 400)]:
        crop, _ = decode_speech(data, stored, variant=1, crop_length=length, crop_offset=offset, frame_grid=GRID)
        np.testing.assert_array_equal(crop, whole[offset:offset + length])


def frame_windows(first_sample: int, num_samples: int, grid: FrameGrid) -> tuple[np.ndarray, np.ndarray]:
    """First and last utterance sample each output frame sees, by running the conv stack's
    index arithmetic (min / max over each kernel window) rather than any formula."""
    lo = hi = np.arange(first_sample, first_sample + num_samples)
    for kernel, stride in zip(grid.kernels, grid.strides):
        if lo.size < kernel:
            return lo[:0], hi[:0]
        lo = sliding_window_view(lo, kernel)[::stride].min(axis=1)
        hi = sliding_window_view(hi, kernel)[::stride].max(axis=1)
    return lo, hi


def test_frame_grid_matches_conv_stack():
    for n in [0, 399, 400, 401, 719, 720, 721, 16_000, 33_333]:
        assert GRID.frames(n) == frame_windows(0, n, GRID)[0].size
    lo, hi = frame_windows(0, 4000, GRID)
    np.testing.assert_array_equal(lo, HOP * np.arange(lo.size))
    np.testing.assert_array_equal(hi - lo + 1, 400)  # receptive field


@pytest.mark.parametrize("offset_frames,length", [(0, 32_000), (1, 32_000), (13, 16_319), (25, 16_320),
                                                  (50, 400), (3, 719), (0, 48_000), (90, 48_000 - 90 * HOP)])
def test_speech_mask_slice_is_the_crop_frames(offset_frames, length):
    n = 48_000
    data, _ = utterance(n, seed=offset_frames)
    stored = masks(4, GRID.frames(n), seed=offset_frames)
    offset = offset_frames * HOP
    _, mask = decode_speech(data, npy(stored), variant=2, crop_length=length, crop_offset=offset, frame_grid=GRID)
    crop_lo, crop_hi = frame_windows(offset, length, GRID)  # crop frames, in utterance sample indices
    utt_lo, utt_hi = frame_windows(0, n, GRID)
    # the utterance frame whose window is exactly crop frame j's window
    match = np.array([np.flatnonzero((utt_lo == a) & (utt_hi == b)).item() for a, b in zip(crop_lo, crop_hi)])
    assert mask.shape == (crop_lo.size,) == (GRID.frames(length),)
    np.testing.assert_array_equal(match, offset_frames + np.arange(crop_lo.size))
    np.testing.assert_array_equal(mask, stored[2, match])


def test_speech_errors_are_value_errors():
    data, raw = utterance(20_000)
    good = npy(masks(2, GRID.frames(raw.size)))
    kw = {"variant": 0, "crop_length": 16_000, "frame_grid": GRID}
    with pytest.raises(ValueError, match="FLAC cannot be decoded"):
        decode_speech(b"fLaC" + b"\x00" * 100, good, **kw)
    with pytest.raises(ValueError, match="FLAC cannot be decoded"):
        decode_speech(b"not audio at all" * 50, good, **kw)
    with pytest.raises(ValueError):  # truncated: either undecodable or fewer samples than the mask
        decode_speech(data[: len(data) // 2], good, variant=0, crop_length=None, frame_grid=GRID)
    with pytest.raises(ValueError, match="multiple of the hop"):
        decode_speech(data, good, crop_offset=HOP + 1, **kw)
    with pytest.raises(ValueError, match="does not fit"):
        decode_speech(data, good, crop_offset=HOP * 13, **kw)
    with pytest.raises(ValueError, match="mask has"):
        decode_speech(data, npy(masks(2, GRID.frames(raw.size) + 1)), **kw)
    with pytest.raises(ValueError, match="variant 2 out of range"):
        decode_speech(data, good, **{**kw, "variant": 2})
    with pytest.raises(ValueError, match="not a valid .npy"):
        decode_speech(data, b"garbage", **kw)
    with pytest.raises(ValueError, match="too short"):
        decode_speech(data, good, **{**kw, "crop_length": 399})
    with pytest.raises(ValueError, match="expected 16000 Hz"):
        decode_speech(flac(np.zeros(20_000, np.int16), rate=8000), good, **kw)
    with pytest.raises(ValueError, match="expected mono"):
        decode_speech(flac(np.zeros((20_000, 2), np.int16)), good, **kw)


# -- vision -----------------------------------------------------------------------------------
def test_eval_image_is_centre_crop_with_imagenet_normalisation():
    pixels = picture(320, 256)  # shorter side already 256: the crop is a plain slice
    stored = masks(3, 196)
    image, mask = decode_image(jpeg(pixels, "PNG"), npy(stored), variant=1, train=False)
    assert image.dtype == np.float32 and image.shape == (3, 224, 224)
    expected = (pixels[16:240, 48:272] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(image, expected.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(mask, stored[1])
    image, _ = decode_image(jpeg(picture(500, 375)), npy(stored), variant=0, train=False)
    assert image.shape == (3, 224, 224)


def grey_levels(image: np.ndarray) -> np.ndarray:
    return (image * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]) * 255


@pytest.mark.parametrize("width,height", [(500, 375), (333, 500)])
def test_box_resampling_matches_torchvision_order(width, height):
    """Resize-then-crop (eval) and crop-then-resize (train), as torchvision does them, agree with
    resampling only the output region up to rounding, and a few levels at the border."""
    pixels = picture(width, height, seed=width)
    img, data, stored = Image.fromarray(pixels), jpeg(pixels, "PNG"), npy(masks(1, 196))
    ow, oh = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
    top, left = int(round((oh - 224) / 2.0)), int(round((ow - 224) / 2.0))
    resized = np.asarray(img.resize((ow, oh), Image.Resampling.BICUBIC))
    references = [(resized[top:top + 224, left:left + 224], decode_image(data, stored, variant=0, train=False)[0])]
    for seed in range(3):
        t, l, h, w = random_resized_crop(width, height, np.random.default_rng(seed))
        crop = img.crop((l, t, l + w, t + h)).resize((224, 224), Image.Resampling.BICUBIC)
        out = decode_image(data, stored, variant=0, train=True, rng=np.random.default_rng(seed), hflip=0.0)[0]
        references.append((np.asarray(crop), out))
    for reference, out in references:
        diff = np.abs(grey_levels(out) - reference.transpose(2, 0, 1))
        assert diff.mean() < 0.5 and diff.max() < 8 and diff[:, 3:-3, 3:-3].max() < 2.5


def test_normalisation_constants():
    solid = np.zeros((240, 240, 3), np.uint8)
    solid[...] = (0, 128, 255)
    image, _ = decode_image(jpeg(solid, "PNG"), npy(masks(1, 196)), variant=0, train=False, eval_resize=240)
    for c, v in enumerate((0, 128, 255)):
        np.testing.assert_allclose(image[c], (v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_train_crop_deterministic_per_seed_and_varied_across_seeds():
    data, stored = jpeg(picture(500, 375)), npy(masks(2, 196))
    def run(seed):
        return decode_image(data, stored, variant=0, train=True, rng=np.random.default_rng(seed))[0]
    np.testing.assert_array_equal(run(7), run(7))
    outputs = [run(seed) for seed in range(8)]
    distinct = {o.tobytes() for o in outputs}
    assert len(distinct) == 8 and all(o.shape == (3, 224, 224) for o in outputs)


def test_flip_mirrors_image_but_not_mask():
    data, stored = jpeg(picture(500, 375)), masks(2, 196)
    kept, mask_kept = decode_image(data, npy(stored), variant=1, train=True, rng=np.random.default_rng(3), hflip=0.0)
    flipped, mask_flipped = decode_image(data, npy(stored), variant=1, train=True, rng=np.random.default_rng(3),
                                         hflip=1.0)
    np.testing.assert_array_equal(flipped, kept[:, :, ::-1])
    assert not np.array_equal(flipped, kept)
    np.testing.assert_array_equal(mask_flipped, stored[1])
    np.testing.assert_array_equal(mask_kept, stored[1])


def test_random_resized_crop_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop(500, 375, rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.08 * 0.9 <= h * w / (500 * 375) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # a 10:1 strip with most of its area asked for: every try fails, the centred 4:3 crop remains
    assert random_resized_crop(1000, 100, rng, scale=(0.9, 1.0)) == (0, 433, 100, 133)
    assert random_resized_crop(100, 1000, rng, scale=(0.9, 1.0)) == (433, 0, 133, 100)


@pytest.mark.parametrize("train", [False, True])
def test_draft_decoding_stays_close_to_full_decoding(train):
    data, stored = jpeg(picture(1800, 1350)), npy(masks(1, 196))
    kw = {"variant": 0, "train": train, "scale": (0.5, 1.0)}
    fast, _ = decode_image(data, stored, rng=np.random.default_rng(5), draft=True, **kw)
    full, _ = decode_image(data, stored, rng=np.random.default_rng(5), draft=False, **kw)
    assert not np.array_equal(fast, full)  # the reduced decode did happen
    assert float(np.abs(fast - full).mean()) < 0.03  # about 1.7 grey levels out of 255


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_non_rgb_jpeg_becomes_rgb(mode):
    buffer = io.BytesIO()
    Image.fromarray(picture(600, 600)).convert(mode).save(buffer, "JPEG")  # 600 px: drafted at 1/2 for eval
    for train in (False, True):
        image, _ = decode_image(buffer.getvalue(), npy(masks(1, 196)), variant=0, train=train,
                                rng=np.random.default_rng(0))
        assert image.shape == (3, 224, 224) and np.isfinite(image).all()
    if mode == "L":  # grey stays grey: the three channels carry the same levels
        np.testing.assert_allclose(grey_levels(image)[0], grey_levels(image)[2], atol=1e-3)


def test_image_errors_are_value_errors():
    stored = npy(masks(1, 196))
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_image(b"\xff\xd8\xff" + b"\x00" * 64, stored, variant=0, train=False)
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_image(jpeg(picture(300, 300))[:2000], stored, variant=0, train=False)
    with pytest.raises(ValueError, match="needs rng"):
        decode_image(jpeg(picture(300, 300)), stored, variant=0, train=True)


# -- text -------------------------------------------------------------------------------------
def test_decode_tokens_checks_lengths():
    tokens = np.array([0, 5, 6, 7, 2], np.int32)
    stored = masks(3, 5)
    out, mask = decode_tokens(npy(tokens), npy(stored), variant=2)
    np.testing.assert_array_equal(out, tokens)
    np.testing.assert_array_equal(mask, stored[2])
    with pytest.raises(ValueError, match="mask has 6 tokens"):
        decode_tokens(npy(tokens), npy(masks(3, 6)), variant=0)


def test_text_replacement_proportions_and_padding():
    rng = np.random.default_rng(0)
    pad_id, mask_id, bos, eos, vocab = 1, 4, 0, 2, 1000
    specials = (bos, pad_id, eos, 3)
    items, keys = [], []
    for i in range(64):
        length = 512 if i % 4 else int(rng.integers(20, 512))
        tokens = rng.integers(5, vocab, length).astype(np.int32)
        tokens[0], tokens[-1] = bos, eos
        mask = np.zeros(length, bool)
        mask[1:-1] = rng.random(length - 2) < 0.15
        items.append((tokens, mask))
        keys.append(f"doc-{i}")
    batch = collate_text(items, keys, pad_id=pad_id, mask_id=mask_id, vocab_size=vocab, special_ids=specials,
                         rng=np.random.default_rng(1))
    student, original, mask = batch["tokens"], batch["target_tokens"], batch["mask"]
    target, padding = batch["target_mask"], batch["padding_mask"]
    assert student.dtype == original.dtype == torch.int64 and student.shape == (64, 512)
    assert mask.dtype == target.dtype == padding.dtype == torch.bool
    assert batch["keys"] == keys
    lengths = torch.tensor([t.size for t, _ in items])
    assert torch.equal(padding, torch.arange(512) >= lengths[:, None])
    assert (original[padding] == pad_id).all() and (student[padding] == pad_id).all()
    assert not mask[padding].any() and not target[padding].any()
    assert torch.equal(student[~mask], original[~mask])
    assert torch.equal(target, student == mask_id) and not (target & ~mask).any()
    n = int(mask.sum())
    as_mask = int(target.sum()) / n
    kept = int((mask & (student == original)).sum()) / n
    randomised = int((mask & ~target & (student != original)).sum()) / n
    assert as_mask == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.02)
    assert randomised == pytest.approx(0.1, abs=0.02)
    assert not np.isin(student[mask & ~target].numpy(), [*specials, mask_id]).any()


# -- collation --------------------------------------------------------------------------------
def test_collate_speech_equal_crops():
    items = [(np.full(32_000, i, np.float32), masks(1, GRID.frames(32_000), seed=i)[0]) for i in range(3)]
    batch = collate_speech(items, ["a", "b", "c"])
    assert batch["source"].dtype == torch.float32 and batch["source"].shape == (3, 32_000)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (3, 99)
    assert not batch["padding_mask"].any() and batch["padding_mask"].shape == (3, 32_000)
    assert not batch["frame_padding_mask"].any() and batch["frame_padding_mask"].shape == (3, 99)
    assert batch["keys"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unequal crops"):
        collate_speech(items + [(np.zeros(16_000, np.float32), masks(1, 49)[0])], list("abcd"))
    with pytest.raises(ValueError, match="keys"):
        collate_speech(items, ["a"])


def test_collate_speech_pads_whole_utterances():
    lengths = [16_000, 24_321, 20_000]
    items = [(np.ones(n, np.float32), np.ones(GRID.frames(n), bool)) for n in lengths]
    batch = collate_speech(items, ["x", "y", "z"], pad=True)
    source, padding = batch["source"], batch["padding_mask"]
    mask, frame_padding = batch["mask"], batch["frame_padding_mask"]
    assert source.shape == (3, 24_321) and mask.shape == (3, GRID.frames(24_321))
    for i, n in enumerate(lengths):
        assert (source[i, :n] == 1).all() and (source[i, n:] == 0).all()
        assert not padding[i, :n].any() and padding[i, n:].all()
        t = GRID.frames(n)
        assert mask[i, :t].all() and not mask[i, t:].any()
        assert not frame_padding[i, :t].any() and frame_padding[i, t:].all()


def test_collate_images():
    items = [(np.zeros((3, 224, 224), np.float32), masks(1, 196, seed=i)[0]) for i in range(4)]
    batch = collate_images(items, list("abcd"), [3, 1, 4, 1])
    assert batch["image"].shape == (4, 3, 224, 224) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 196) and batch["mask"].dtype == torch.bool
    assert batch["label"].tolist() == [3, 1, 4, 1] and batch["label"].dtype == torch.int64
    assert batch["keys"] == list("abcd")
