"""Audio as the speech models take it: 16 kHz mono, stored as 16-bit FLAC.

Every speech source decodes what libsndfile decodes (WAV, FLAC, OGG/Vorbis, OGG/Opus, MP3, ...),
averages the channels to mono and resamples with soxr (its "HQ" quality) at build time, so the
loader never converts. A file that is already 16 kHz mono 16-bit FLAC is stored unchanged.
Only a file that cannot be decoded is rejected.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import soundfile
import soxr

from pipelines.sources.base import Encoded
from pipelines.storage import is_local

TARGET_RATE = 16000
RESAMPLER = "soxr-HQ"  # recorded in dataset.json: another resampler gives other bytes
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64")


class AudioError(ValueError):
    """A file that cannot be used; `reason` is the reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Prepared:
    data: bytes  # 16 kHz mono 16-bit FLAC
    frames: int  # samples at 16 kHz
    rate: int  # the file's own rate
    channels: int  # the file's own channel count
    conversions: tuple[str, ...] = field(default=())  # "resampled", "downmixed", "transcoded"

    def counts(self) -> dict[str, int]:
        return {name: 1 for name in self.conversions}


def converted_frames(frames: int, rate: int) -> int:
    """Samples at 16 kHz of `frames` samples at `rate` (what soxr gives back)."""
    return frames if rate == TARGET_RATE else int(round(frames * TARGET_RATE / rate))


def to_model_rate(audio: np.ndarray, rate: int) -> np.ndarray:
    """float (frames, channels) at `rate` -> float32 (frames',) mono at 16 kHz."""
    mono = audio.mean(axis=1, dtype=np.float32) if audio.ndim == 2 else audio.astype(np.float32, copy=False)
    if rate == TARGET_RATE:
        return mono
    return soxr.resample(mono, rate, TARGET_RATE, quality="HQ").astype(np.float32, copy=False)


def flac_bytes(mono: np.ndarray) -> bytes:
    """float32 mono at 16 kHz -> 16-bit FLAC bytes (clipped to the 16-bit range)."""
    pcm = np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, TARGET_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def prepare_audio(data: bytes, name: str, *, expected_frames: int | None = None) -> Prepared:
    """The file's bytes as the shards store them. `expected_frames`: what its header said at scan
    time (a decode that ends early is a truncated file). Raises AudioError."""
    if not data:
        raise AudioError("empty_audio", f"{name} is empty (0 bytes)")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, channels, kind, subtype = f.samplerate, f.channels, f.format, f.subtype
            audio = f.read(dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile reports corrupt data in many ways
        raise AudioError("truncated_audio", f"{name} cannot be decoded: {exc}") from None
    frames = len(audio)
    if expected_frames is not None and kind != "MP3" and frames != expected_frames:  # MP3 headers estimate
        raise AudioError("truncated_audio", f"{name} decodes to {frames} samples but its header says {expected_frames}")
    if frames == 0:
        raise AudioError("empty_audio", f"{name} holds no audio samples")
    if rate == TARGET_RATE and channels == 1 and kind == "FLAC" and subtype == "PCM_16":
        return Prepared(data, frames, rate, channels)
    return prepare_samples(audio, rate, transcoded=kind != "FLAC" or subtype != "PCM_16")


def prepare_samples(audio: np.ndarray, rate: int, *, transcoded: bool = True) -> Prepared:
    """Decoded float samples (frames, channels) at `rate` as the shards store them."""
    channels = audio.shape[1]
    conversions = tuple(name for name, done in (("resampled", rate != TARGET_RATE), ("downmixed", channels > 1),
                                                ("transcoded", transcoded)) if done)
    mono = to_model_rate(audio, rate)
    return Prepared(flac_bytes(mono), len(mono), rate, channels, conversions)


def open_file(fs, path: str, block_size: int = 64 * 1024):
    """A binary file object of `path` (a local path opened directly, else through fsspec)."""
    return open(path, "rb") if is_local(fs) else fs.open(path, "rb", block_size=block_size)


def header(fs, path: str):
    """soundfile's info of a file on any filesystem."""
    with open_file(fs, path) as f:
        return soundfile.info(f)


class SpeechSource:
    """What every speech source shares (a mixin for their dataclasses, which hold mask_prob,
    mask_length and frame_grid): span masks on the frame grid, 16 kHz FLAC by soxr."""

    def audio_params(self) -> dict:
        """The build parameters of the stored audio (dataset.json's `build`)."""
        return {"sample_rate": TARGET_RATE, "resampler": RESAMPLER, "frame_grid": self.frame_grid.model_dump(mode="json")}

    def mask_spec(self) -> tuple[str, dict]:
        return "span", {"mask_prob": self.mask_prob, "mask_length": self.mask_length}

    def dataset_fields(self) -> dict:
        return {"frame_grid": self.frame_grid}


def encoded(row: dict, audio: Prepared, frame_grid) -> Encoded:
    """A prepared file as a sample: metadata, index fields and counts (the original rate and
    channels recorded where it was converted)."""
    meta = {"key": row["id"], "split": row["split"], "speaker": row.get("speaker"), "chapter": row.get("chapter"),
            "transcript": row.get("transcript"), "num_samples": audio.frames, "sample_rate": TARGET_RATE}
    if audio.conversions:
        meta.update(source_rate=audio.rate, source_channels=audio.channels)
    index = {"num_samples": audio.frames, "speaker": row.get("speaker"), "chapter": row.get("chapter"),
             "transcript": row.get("transcript")}
    counts = {**({"untranscribed": 1} if row.get("transcript") is None else {}), **audio.counts()}
    return Encoded(row["id"], audio.data, meta, frame_grid.frames(audio.frames), index,
                   seconds=audio.frames / TARGET_RATE, counts=counts)
