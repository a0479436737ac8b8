"""Small synthetic corpora in the exact on-disk layouts of the real sources.

The shard builders are tested, and `d2v demo` runs, against these instead of
downloads. Each generator writes a local folder in the layout the real corpus
extracts to, optionally with one of each known kind of bad item, and returns a
`CorpusSpec` whose `expected` counts are what a correct builder must report.
Output is byte-identical for a given seed (fixed encoder parameters, seeds
derived from names with a stable hash), and no network is used. Write into an
empty or new `root`: files from an earlier run with other parameters stay.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

__all__ = ["CorpusSpec", "make_librispeech", "make_imagenet", "make_text_corpus"]

SAMPLE_RATE = 16_000
JPEG_QUALITY = 90


@dataclass
class CorpusSpec:
    """What a generator wrote and what a correct builder must report for it.

    `source` is the path to hand to the builder; `files` every file written
    (absolute, sorted); `faults` maps each deliberately odd item (path relative
    to `source`, or `file#doc` for text) to its reason code or accepted tag
    (`untranscribed`, `converted`); `expected` holds `items` (source items),
    `accepted`, `rejected`, `rejects_by_reason` (non-zero reasons only),
    `splits` ({split: accepted}) and modality-specific counts.
    """

    source: str
    kind: str
    files: list[str]
    expected: dict
    faults: dict[str, str] = field(default_factory=dict)


def _rng(seed: int, *keys: object) -> np.random.Generator:
    # crc32 rather than hash(): str hashing is salted per process.
    return np.random.default_rng([seed] + [zlib.crc32(str(k).encode()) for k in keys])


class _Writer:
    """Writes files under a root and remembers them for `CorpusSpec.files`."""

    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []

    def bytes(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files.append(str(path))
        return path

    def text(self, rel: str, text: str) -> Path:
        return self.bytes(rel, text.encode("utf-8"))

    def sorted_files(self) -> list[str]:
        return sorted(self.files)


# --------------------------------------------------------------------------- speech

_SPEECH_WORDS = (
    "THE AND OF TO A IN HE THAT WAS IT HIS HER YOU AS HAD WITH FOR SHE NOT AT BUT BE MY ON HAVE HIM "
    "SAID WHICH THIS ALL FROM THEY NO SO WERE WOULD DON'T I'M MISTER MISSUS CHAPTER LITTLE MOTHER "
    "HOUSE WATER NIGHT NEVER THOUGHT AGAIN COULD LONG GREAT THROUGH OLD RIVER GARDEN"
).split()


def _speech_signal(rng: np.random.Generator, seconds: float, sr: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """Voiced-speech-like int16 audio: gliding pitch, harmonics, syllable envelope, pauses, noise.

    Real-looking structure keeps FLAC compression ratios near those of speech,
    so sizes and timings measured on synthetic corpora are meaningful.
    """
    n = max(int(seconds * sr), 1)
    t = np.arange(n) / sr
    drift = np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t + rng.uniform(0, 2 * np.pi))
    f0 = rng.uniform(90.0, 220.0) * (1.0 + 0.15 * drift)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    weights = rng.uniform(0.2, 1.0, 6) / np.arange(1, 7)
    voiced = sum(w * np.sin((k + 1) * phase) for k, w in enumerate(weights))
    syllables = np.maximum(np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + rng.uniform(0, 2 * np.pi)), 0.0) ** 2
    gate_points = rng.random(int(seconds * 2) + 2) > 0.2  # word-level pauses, ~2 per second
    gate_points[gate_points.size // 2] = True  # never all silence
    gate = np.interp(t, np.linspace(0, seconds, gate_points.size), gate_points.astype(float))
    mono = voiced * syllables * gate
    mono = 0.5 * mono / max(np.abs(mono).max(), 1e-9)
    out = np.stack([mono + 0.004 * rng.standard_normal(n) for _ in range(channels)], axis=1)
    pcm = np.clip(out * 32767, -32768, 32767).astype(np.int16)
    return pcm[:, 0] if channels == 1 else pcm


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"


def _spoken_signal(rng: np.random.Generator, text: str, sr: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """int16 audio that says `text` in a toy language a CTC model can learn: each letter is a
    60-100 ms tone of its own pitch (250 Hz + 125 Hz per letter), letters 20 ms apart, words 120 ms.

    Gives downstream tests and the demo transcribed speech whose WER/CER can really improve.
    """
    pieces = [np.zeros(int(0.1 * sr))]
    for w, word in enumerate(text.split()):
        if w:
            pieces.append(np.zeros(int(0.12 * sr)))
        for letter in word:
            n = int(rng.uniform(0.06, 0.10) * sr)
            t = np.arange(n) / sr
            # pitches 125 Hz apart: wider than a 25 ms frame's resolution, so each letter is one feature
            f = 250.0 + 125.0 * LETTERS.index(letter) * rng.uniform(0.99, 1.01)
            envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades
            pieces.append(envelope * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)))
            pieces.append(np.zeros(int(0.02 * sr)))
    pieces.append(np.zeros(int(0.1 * sr)))
    mono = 0.4 * np.concatenate(pieces)
    out = np.stack([mono + 0.004 * rng.standard_normal(mono.size) for _ in range(channels)], axis=1)
    pcm = np.clip(out * 32767, -32768, 32767).astype(np.int16)
    return pcm[:, 0] if channels == 1 else pcm


# Voiced letters: 20 letters are vowel-like (two formants, F1 x F2 from these grids), the other 7
# fricative-like (a band of noise). A voice changes pitch, rate, formant scale (vocal-tract length),
# spectral tilt and breathiness, none of which changes a letter: only the spectral envelope's peaks
# say which it is, as formants do in speech.
_FORMANTS = [(f1, f2) for f1 in (300, 430, 610, 850) for f2 in (950, 1250, 1650, 2150, 2800)]
_FRICATIVES = (2600, 3200, 3900, 4700, 5500, 6300, 7200)


def _voice(rng: np.random.Generator) -> dict[str, float]:
    """A speaker's voice: f0 (Hz), rate (duration factor), tract (formant factor), tilt, breath."""
    return {"f0": float(rng.uniform(90, 240)), "rate": float(rng.uniform(0.75, 1.3)),
            "tract": float(rng.uniform(0.93, 1.07)), "tilt": float(rng.uniform(0.0, 0.4)),
            "breath": float(rng.uniform(0.002, 0.02))}


def _voiced_letter(rng: np.random.Generator, letter: int, voice: dict, n: int, sr: int) -> np.ndarray:
    """`n` samples of one letter in `voice`, unit RMS: formant-shaped harmonics of the voice's
    pitch (with vibrato), or for a fricative a band of noise around its centre."""
    t = np.arange(n) / sr
    if letter >= len(_FORMANTS):
        centre = _FRICATIVES[letter - len(_FORMANTS)] * voice["tract"]
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum[np.abs(np.fft.rfftfreq(n, 1 / sr) - centre) > 0.08 * centre] = 0
        wave = np.fft.irfft(spectrum, n)
    else:
        formants = np.array(_FORMANTS[letter], dtype=float) * voice["tract"]
        f0 = voice["f0"] * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * np.pi)))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        k = np.arange(1, int(4000 // voice["f0"]) + 1)
        fk = k[:, None] * voice["f0"]
        # each formant a resonance of bandwidth ~8% (wide enough that a 240 Hz voice's harmonics sample it)
        gain = 0.01 + np.exp(-0.5 * ((fk - formants) / (0.08 * formants + 50)) ** 2).sum(axis=1)
        wave = ((gain * k ** -voice["tilt"])[:, None] * np.sin(k[:, None] * phase)).sum(axis=0)
    return wave / max(np.sqrt(np.mean(wave ** 2)), 1e-9)


def _voices_signal(rng: np.random.Generator, text: str, voice: dict, sr: int = SAMPLE_RATE,
                   channels: int = 1) -> np.ndarray:
    """int16 audio of `voice` saying `text`, one vowel- or fricative-like letter at a time (60-100 ms
    times the voice's rate, 20 ms apart, words 120 ms apart): learnable by CTC, but the same letter
    sounds different from every voice, as speech does."""
    rate = voice["rate"]
    pieces = [np.zeros(int(0.1 * sr))]
    for w, word in enumerate(text.split()):
        if w:
            pieces.append(np.zeros(int(0.12 * rate * sr)))
        for letter in word:
            n = int(rng.uniform(0.06, 0.10) * rate * sr)
            t = np.arange(n) / sr
            envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
            pieces.append(envelope * _voiced_letter(rng, LETTERS.index(letter), voice, n, sr))
            pieces.append(np.zeros(int(0.02 * rate * sr)))
    pieces.append(np.zeros(int(0.1 * sr)))
    mono = 0.15 * np.concatenate(pieces)
    out = np.stack([mono + voice["breath"] * rng.standard_normal(mono.size) for _ in range(channels)], axis=1)
    pcm = np.clip(out * 32767, -32768, 32767).astype(np.int16)
    return pcm[:, 0] if channels == 1 else pcm


def _flac_bytes(pcm: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_librispeech(
    root: str | os.PathLike,
    subsets: dict[str, int],
    *,
    seed: int = 0,
    seconds: tuple[float, float] = (2.0, 6.0),
    speakers: int | dict[str, int] = 2,
    chapters_per_speaker: int = 2,
    faults: bool = False,
    spoken: bool = False,
    words: tuple[int, int] = (4, 20),
    voices: bool = False,
) -> CorpusSpec:
    """Write `root/LibriSpeech/SUBSET/SPEAKER/CHAPTER/...` as the real tarballs extract.

    Transcripts have `words` (min, max) words. `spoken`: the audio says its transcript in a toy
    letter-tone language (learnable by CTC; lengths follow the text, `seconds` is ignored);
    otherwise it is speech-like audio unrelated to the text. `voices` (with `spoken`): every
    speaker has a voice of its own (pitch, rate, formant scale, tilt) and letters are formant
    patterns, so a model must hear past the voice (`_voices_signal`).

    `subsets` maps a subset name (e.g. `train-clean-100`) to its number of good
    utterances, spread over `speakers` (a count, or one per subset) x `chapters_per_speaker` chapters; speaker
    and chapter ids are unique across subsets, as in the real corpus. With
    `faults`, the first chapter of the first subset also gets one truncated,
    one empty, one 8 kHz and one stereo FLAC, a transcript line with no audio
    and a (valid) FLAC with no transcript line.
    """
    per_subset = [speakers.get(s, 0) for s in subsets] if isinstance(speakers, dict) else [speakers] * len(subsets)
    if isinstance(speakers, dict) and set(speakers) - set(subsets):
        raise ValueError(f"speakers: no such subset: {', '.join(sorted(set(speakers) - set(subsets)))}")
    if min(per_subset, default=1) < 1 or chapters_per_speaker < 1:
        raise ValueError("need at least one speaker per subset and one chapter per speaker")
    if voices and not spoken:
        raise ValueError("voices=True needs spoken=True: a voice says a transcript")
    source = Path(root).absolute() / "LibriSpeech"
    out = _Writer(source)
    rng = _rng(seed, "librispeech")
    speaker_ids = rng.choice(np.arange(10, 9000), size=sum(per_subset), replace=False)
    chapter_ids = rng.choice(np.arange(1000, 300000), size=sum(per_subset) * chapters_per_speaker, replace=False)

    fault_map: dict[str, str] = {}
    splits: dict[str, int] = {}
    speaker_rows, chapter_rows = [], []
    for s_idx, (subset, count) in enumerate(subsets.items()):
        chapters = []  # (speaker, chapter, good utterance count)
        first = sum(per_subset[:s_idx])  # this subset's speakers: speaker_ids[first:first + per_subset[s_idx]]
        n_chapters = per_subset[s_idx] * chapters_per_speaker
        for c_idx in range(n_chapters):
            spk = int(speaker_ids[first + c_idx // chapters_per_speaker])
            chap = int(chapter_ids[first * chapters_per_speaker + c_idx])
            share = count // n_chapters + (1 if c_idx < count % n_chapters else 0)
            if share or (faults and s_idx == 0 and c_idx == 0):
                chapters.append((spk, chap, share))
        splits[subset] = count
        for spk in dict.fromkeys(c[0] for c in chapters):
            speaker_rows.append(f"{spk:<5}| {'FM'[spk % 2]} | {subset:<16} | 25.00 | Reader {spk}")
        for c_num, (spk, chap, share) in enumerate(chapters):
            chapter_rows.append(
                f"{chap:<7}| {spk:<5}| 12.50 | {subset:<16} | {chap % 997:<5}| {chap % 9973:<6}| Chapter {c_num + 1}"
            )
            rel_dir = f"{subset}/{spk}/{chap}"
            lines = []
            # (utterance kind, sample rate, channels, has audio, has transcript)
            plan = [("good", SAMPLE_RATE, 1, True, True)] * share
            if faults and s_idx == 0 and c_num == 0:
                extra = [
                    ("truncated_audio", SAMPLE_RATE, 1, True, True),
                    ("empty_audio", SAMPLE_RATE, 1, True, True),
                    ("wrong_sample_rate", 8000, 1, True, True),
                    ("wrong_channels", SAMPLE_RATE, 2, True, True),
                    ("missing_audio", SAMPLE_RATE, 1, False, True),
                    ("untranscribed", SAMPLE_RATE, 1, True, False),
                ]
                # faults sit between good utterances, so stopping at the first bad file loses good ones
                plan = [(plan + extra)[i] for i in _rng(seed, rel_dir, "faults").permutation(len(plan) + len(extra))]
            for u, (what, sr, channels, has_audio, has_text) in enumerate(plan):
                utt = f"{spk}-{chap}-{u:04d}"
                rel = f"{rel_dir}/{utt}.flac"
                urng = _rng(seed, utt)
                if has_text:
                    text = " ".join(urng.choice(_SPEECH_WORDS, size=int(urng.integers(words[0], words[1] + 1))))
                    lines.append(f"{utt} {text}")
                elif spoken:  # untranscribed audio still says something
                    text = " ".join(urng.choice(_SPEECH_WORDS, size=int(words[0])))
                if what != "good":
                    fault_map[rel] = what
                if not has_audio:
                    continue
                if what == "empty_audio":
                    out.bytes(rel, b"")
                    continue
                dur = float(urng.uniform(*seconds))
                if what == "truncated_audio":
                    dur = max(dur, 1.0)  # long enough that the cut lands inside audio frames
                if spoken and voices:
                    pcm = _voices_signal(urng, text, _voice(_rng(seed, "voice", spk)), sr, channels)
                elif spoken:
                    pcm = _spoken_signal(urng, text, sr, channels)
                else:
                    pcm = _speech_signal(urng, dur, sr, channels)
                data = _flac_bytes(pcm, sr)
                out.bytes(rel, data[: len(data) // 2] if what == "truncated_audio" else data)
            out.text(f"{rel_dir}/{spk}-{chap}.trans.txt", "".join(line + "\n" for line in lines))

    out.text("SPEAKERS.TXT", "; ID   |SEX| SUBSET           |MINUTES| NAME\n" + "".join(r + "\n" for r in speaker_rows))
    out.text(
        "CHAPTERS.TXT",
        "; ID     |READER|MINUTES| SUBSET           | PROJ.|BOOK ID| CH. TITLE\n"
        + "".join(r + "\n" for r in chapter_rows),
    )

    rejects = {r: 1 for r in fault_map.values() if r != "untranscribed"}
    untranscribed = sum(r == "untranscribed" for r in fault_map.values())
    if untranscribed:
        splits[next(iter(subsets))] += untranscribed
    accepted = sum(splits.values())
    rejected = sum(rejects.values())
    return CorpusSpec(
        source=str(source),
        kind="librispeech",
        files=out.sorted_files(),
        faults=fault_map,
        expected={
            "items": accepted + rejected,
            "accepted": accepted,
            "rejected": rejected,
            "rejects_by_reason": rejects,
            "untranscribed": untranscribed,
            "splits": splits,
        },
    )


# --------------------------------------------------------------------------- vision

_CLASS_WORDS = "tench goldfinch heron lynx otter kite magpie badger ferret lemur puffin ibis".split()
_LATIN_WORDS = "Tinca Carduelis Ardea Lynx Lutra Milvus Pica Meles Mustela Lemur Fratercula Threskiornis".split()


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB picture with a gradient, a few filled shapes and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = c0 + (c1 - c0) * ramp[..., None]
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _class_image(rng: np.random.Generator, width: int, height: int, label: int, classes: int) -> Image.Image:
    """A picture whose class shows everywhere, so crops of any part keep it: a jittered hue of its
    own over the whole picture, and its own shape (ellipse, box, triangle, cross) across the middle;
    a small random shape and noise are distractors. Downstream probes then have something to learn."""
    import colorsys

    hue = (label + rng.uniform(-0.25, 0.25)) / classes % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.55, 0.9))) * 255
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height) / 2.0  # in [-1, 1]
    base = rgb * (1.0 + 0.15 * ramp[..., None])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    r = min(width, height) * rng.uniform(0.25, 0.4)
    ink = tuple(int(v) for v in rgb * rng.uniform(0.3, 0.5))  # the same hue, darker: the middle keeps the class
    kind = label % 4
    if kind == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif kind == 1:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=ink)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=ink)
    sx, sy = int(rng.integers(0, width)), int(rng.integers(0, height))
    side = max(2, int(min(width, height) * rng.uniform(0.05, 0.15)))
    draw.rectangle((sx, sy, sx + side, sy + side), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


# Visual words: pictures are 8x8 mosaics of tiles, each tile one "word" (a 4x4 pattern of colours).
# Every class (family) has WORDS_PER_FAMILY words of its own, and all classes share FILLER_TILES
# filler words, as text's topics share function words. The labelled `train` split uses only the first
# half of each family's words, `val` only the second half, and the `unlabeled` pool all of them:
# nothing in a val picture looks like the train pictures of its class, so only what an encoder
# learned from the pool (which words share pictures) carries the labels over, as topic words
# do for text. Patterns are drawn at random, so nothing visual tells the families apart.
WORD_TILES, WORDS_PER_FAMILY, FILLER_TILES = 8, 12, 8


@lru_cache(maxsize=8)
def _word_patterns(families: int) -> np.ndarray:
    """(families * WORDS_PER_FAMILY + FILLER_TILES, 4, 4, 3) random 4x4 colour patterns, one per word,
    the same for every corpus (drawn once, read-only)."""
    patterns = np.random.default_rng(20261203).uniform(20, 235, (families * WORDS_PER_FAMILY + FILLER_TILES, 4, 4, 3))
    patterns.flags.writeable = False
    return patterns


def _words_image(rng: np.random.Generator, label: int, families: int, half: str | None,
                 family_share: float = 0.4, size: int = 64) -> Image.Image:
    """A WORD_TILES x WORD_TILES mosaic: each tile a word of the picture's family (of `half`:
    "seen", "unseen" or None for all) with probability `family_share`, else a filler word."""
    patterns = _word_patterns(families)
    first = label * WORDS_PER_FAMILY
    words = np.arange(first, first + WORDS_PER_FAMILY)
    if half is not None:
        words = words[: WORDS_PER_FAMILY // 2] if half == "seen" else words[WORDS_PER_FAMILY // 2:]
    fillers = np.arange(families * WORDS_PER_FAMILY, len(patterns))
    n = WORD_TILES * WORD_TILES
    chosen = np.where(rng.random(n) < family_share, rng.choice(words, n), rng.choice(fillers, n))
    if not np.isin(chosen, words).any():
        chosen[int(rng.integers(0, n))] = rng.choice(words)
    tiles = patterns[chosen] * rng.uniform(0.9, 1.1, (n, 1, 1, 1))  # each tile a little lighter or darker
    cell = size // WORD_TILES // 4
    grid = tiles.reshape(WORD_TILES, WORD_TILES, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(WORD_TILES * 4,
                                                                                            WORD_TILES * 4, 3)
    pixels = np.repeat(np.repeat(grid, cell, 0), cell, 1)
    pixels = pixels + rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _boxes(rng: np.random.Generator, wnid: str, width: int, height: int) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        x1, x2 = sorted(rng.choice(width, 2, replace=False).tolist())
        y1, y2 = sorted(rng.choice(height, 2, replace=False).tolist())
        parts.append(f"{wnid} {x1} {y1} {x2} {y2}")
    return " ".join(parts) + " "  # the Kaggle file ends each PredictionString with a space


def make_imagenet(
    root: str | os.PathLike,
    *,
    layout: str = "ilsvrc",
    classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    seed: int = 0,
    size_range: tuple[int, int] = (40, 96),
    faults: bool = False,
    learnable: bool | str = False,
    unlabelled: int = 0,
) -> CorpusSpec:
    """Write an ImageNet-style tree: Kaggle `ilsvrc` layout or torchvision `imagefolder`.

    `learnable`: each picture shows its class (a hue and a shape of its own, jittered), so a
    linear probe on a small encoder can beat chance; `learnable="words"`: 64 px mosaics of visual
    words (see `WORD_TILES`), where only pre-training on the `unlabelled` pictures of an
    `unlabeled/` split folder (imagefolder layout) links train's words to val's; otherwise
    pictures are unrelated to labels.

    `ilsvrc`: `ILSVRC/Data/CLS-LOC/train/WNID/WNID_N.JPEG`, flat
    `ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_NNNNNNNN.JPEG` labelled by
    `LOC_val_solution.csv`, and `LOC_synset_mapping.txt` in an unsorted order
    (label indices follow the sorted wnids, so a reader that keeps file order is
    caught). `imagefolder`: `train/WNID/*.JPEG` and `val/WNID/*.JPEG`.
    With `faults`, train also gets a PNG, a CMYK JPEG and a grayscale JPEG (all
    accepted after conversion to RGB), a truncated JPEG and random bytes, all
    named `.JPEG`; `ilsvrc` val also gets an image without a CSV row and a CSV
    row without an image.
    """
    if layout not in ("ilsvrc", "imagefolder"):
        raise ValueError(f"layout must be 'ilsvrc' or 'imagefolder', not {layout!r}")
    if unlabelled and layout != "imagefolder":
        raise ValueError("unlabelled pictures need layout='imagefolder' (an unlabeled/ split folder)")
    if classes < 1:
        raise ValueError("need at least one class")
    source = Path(root).absolute()
    out = _Writer(source)
    rng = _rng(seed, "imagenet", layout)
    wnids = [f"n0{v:07d}" for v in rng.choice(10_000_000, size=classes, replace=False)]
    ordered = sorted(wnids)
    file_order = list(rng.permutation(wnids))
    if classes > 1 and file_order == ordered:
        file_order[0], file_order[1] = file_order[1], file_order[0]

    base = "ILSVRC/Data/CLS-LOC/" if layout == "ilsvrc" else ""
    lo, hi = size_range
    fault_map: dict[str, str] = {}

    def picture(key: str, minimum: int = 0, wnid: str | None = None) -> Image.Image:
        irng = _rng(seed, key)
        w, h = (max(int(v), minimum) for v in irng.integers(lo, hi + 1, 2))
        if learnable == "words":
            label = ordered.index(wnid) if wnid in ordered else int(irng.integers(0, classes))
            half = None if key.startswith("unlabeled/") else "unseen" if "val/" in key else "seen"
            return _words_image(irng, label, classes, half)
        if learnable and wnid in ordered:
            return _class_image(irng, w, h, ordered.index(wnid), classes)
        return _image(irng, w, h)

    for wnid in ordered:
        numbers = _rng(seed, "train", wnid).choice(100_000, size=train_per_class, replace=False)
        for n in sorted(numbers.tolist()):
            rel = f"{base}train/{wnid}/{wnid}_{n}.JPEG"
            out.bytes(rel, _encode(picture(rel, wnid=wnid)))

    if faults:
        frng = _rng(seed, "train-faults")
        kinds = ["png", "cmyk", "gray", "truncated", "random"]
        numbers = frng.choice(np.arange(100_000, 200_000), size=len(kinds), replace=False)
        for i, (kind, n) in enumerate(zip(kinds, numbers.tolist())):
            wnid = ordered[i % classes]
            rel = f"{base}train/{wnid}/{wnid}_{n}.JPEG"
            if kind == "random":
                # a fixed non-magic prefix so no decoder (e.g. headerless TGA) claims the noise
                data = b"\x13\x37\xc0\xde" + frng.bytes(2048)
                fault_map[rel] = "undecodable_image"
            else:
                img = picture(rel, minimum=64, wnid=wnid)  # big enough that half the file ends inside scan data
                if kind == "png":
                    data = _encode(img, "PNG")
                elif kind == "cmyk":
                    data = _encode(img.convert("CMYK"))
                elif kind == "gray":
                    data = _encode(img.convert("L"))
                else:
                    full = _encode(img)
                    data = full[: len(full) // 2]
                fault_map[rel] = "undecodable_image" if kind == "truncated" else "converted"
            out.bytes(rel, data)

    n_val = classes * val_per_class
    val_labels = [w for w in ordered for _ in range(val_per_class)]
    val_labels = [val_labels[i] for i in rng.permutation(n_val)]
    rows = []
    if layout == "ilsvrc":
        # real ids are dense 1..N; the two faults take random places in that range
        extra = ["missing_label", "missing_image"] if faults else []
        ids = rng.permutation(n_val + len(extra)) + 1
        for label, vid in zip(val_labels + extra, ids.tolist()):
            name = f"ILSVRC2012_val_{vid:08d}"
            rel = f"{base}val/{name}.JPEG"
            img = picture(rel, wnid=label)  # the two fault rows are no wnid: unrelated pictures
            if label == "missing_image":
                fault_map[rel] = label
                rows.append((name, _boxes(_rng(seed, name), ordered[0], *img.size)))
                continue
            out.bytes(rel, _encode(img))
            if label == "missing_label":
                fault_map[rel] = label
            else:
                rows.append((name, _boxes(_rng(seed, name), label, *img.size)))
        order = rng.permutation(len(rows))  # the Kaggle CSV is not sorted by id
        csv_lines = "".join(f"{rows[i][0]},{rows[i][1]}\n" for i in order)
        out.text("LOC_val_solution.csv", "ImageId,PredictionString\n" + csv_lines)
        mapping = []
        for wnid in file_order:
            k = int(wnid[1:]) % len(_CLASS_WORDS)
            mapping.append(f"{wnid} {_CLASS_WORDS[k]}, {_LATIN_WORDS[k]} {_CLASS_WORDS[(k + 5) % len(_CLASS_WORDS)]}\n")
        out.text("LOC_synset_mapping.txt", "".join(mapping))
    else:
        for i, label in enumerate(val_labels):
            rel = f"val/{label}/ILSVRC2012_val_{i + 1:08d}.JPEG"
            out.bytes(rel, _encode(picture(rel, wnid=label)))

    for n in range(unlabelled):  # flat in the split folder: no class
        rel = f"unlabeled/u{n:06d}.JPEG"
        out.bytes(rel, _encode(picture(rel)))

    rejects: dict[str, int] = {}
    for reason in fault_map.values():
        if reason != "converted":
            rejects[reason] = rejects.get(reason, 0) + 1
    converted = sum(r == "converted" for r in fault_map.values())
    splits = {"train": classes * train_per_class + converted, "val": n_val}
    if unlabelled:
        splits["unlabeled"] = unlabelled
    accepted = sum(splits.values())
    rejected = sum(rejects.values())
    return CorpusSpec(
        source=str(source),
        kind=f"imagenet-{layout}",
        files=out.sorted_files(),
        faults=fault_map,
        expected={
            "items": accepted + rejected,
            "accepted": accepted,
            "rejected": rejected,
            "rejects_by_reason": rejects,
            "converted": converted,
            "classes": ordered,
            "splits": splits,
        },
    )


# --------------------------------------------------------------------------- text

_TEXT_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "river city music history system language station island century village network theory garden"
).split()
_ACCENTED = "café naïve Zürich São façade jalapeño Ελλάδα Straße résumé Kraków".split()
_CJK = "東京 データ 学習 한국어 北京 音声".split()
_EMOJI = "😀 🚀 🎵 🌍 📚".split()


# Two topics of 24 words each. A topic corpus draws every document from one topic, so words of a
# topic share their contexts; a topic task labels sentences by topic and uses the first half of
# each topic's words in its train split and only the second half in its dev split: an encoder
# can only carry the labels over to the unseen words through what it learned from the corpus.
_TOPIC_WORDS = {
    "nature": ("river forest mountain garden flower meadow valley island ocean rain cloud tree "
               "lake stone desert field spring leaf moss wind shore hill snow grass").split(),
    "machines": ("engine motor wire circuit signal battery sensor metal robot laser cable pump "
                 "piston valve turbine gear switch screen server network radio rocket steel drill").split(),
}


def _topic_words(topic: str, half: str | None = None) -> list[str]:
    words = _TOPIC_WORDS[topic]
    return words if half is None else words[: len(words) // 2] if half == "seen" else words[len(words) // 2:]


def _topic_sentence(rng: np.random.Generator, topic: str, half: str | None = None, topic_share: float = 0.4) -> str:
    n = int(rng.integers(8, 16))
    pool = _topic_words(topic, half)
    words = [str(rng.choice(pool)) if rng.random() < topic_share else str(rng.choice(_FILLER_WORDS)) for _ in range(n)]
    if not any(w in pool for w in words):
        words[int(rng.integers(0, n))] = str(rng.choice(pool))
    return " ".join(words)


def _paragraph(rng: np.random.Generator, n_words: int, exotic: float = 0.08) -> str:
    words = []
    for _ in range(n_words):
        r = rng.random()
        if r < exotic / 2:
            pool = _ACCENTED
        elif r < exotic * 0.8:
            pool = _CJK
        elif r < exotic:
            pool = _EMOJI
        else:
            pool = _TEXT_WORDS
        word = str(rng.choice(pool))
        if len(words) > 2 and rng.random() < 0.08:
            words[-1] += "."
        if not words or words[-1].endswith("."):
            word = word[:1].upper() + word[1:]
        words.append(word)
    return " ".join(words) + "."


def make_text_corpus(
    root: str | os.PathLike,
    *,
    files: int = 2,
    docs_per_file: int = 6,
    seed: int = 0,
    paragraphs: tuple[int, int] = (1, 4),
    words_per_paragraph: tuple[int, int] = (5, 60),
    faults: bool = False,
    topics: bool = False,
) -> CorpusSpec:
    """Write `root/part-NNN.txt` in the RoBERTa raw format.

    One paragraph per line, documents separated by one blank line, UTF-8.
    The first document of each file mixes in accented, CJK and emoji words;
    the second is long (~10k characters, several 512-token BPE blocks) and
    ignores the paragraph/word ranges. With `faults`, the first file gets one
    extra document, in its middle, whose line holds the bytes `\\xff\\xfe`. With `topics`, every
    document after the first two is about one topic (sentences of filler and topic words, see
    `_TOPIC_WORDS`), alternating between the topics.
    """
    source = Path(root).absolute()
    out = _Writer(source)
    fault_map: dict[str, str] = {}
    for f in range(files):
        name = f"part-{f:03d}.txt"
        frng = _rng(seed, "text", name)
        docs: list[bytes] = []
        for d in range(docs_per_file):
            if d == 1:
                paras = [_paragraph(frng, 160) for _ in range(10)]
            elif topics and d > 1:
                topic = sorted(_TOPIC_WORDS)[(d + f) % len(_TOPIC_WORDS)]
                n_par = int(frng.integers(paragraphs[0], paragraphs[1] + 1))
                paras = [". ".join(_topic_sentence(frng, topic) for _ in range(int(frng.integers(2, 5)))) + "."
                         for _ in range(n_par)]
            else:
                n_par = int(frng.integers(paragraphs[0], paragraphs[1] + 1))
                lo, hi = words_per_paragraph
                paras = [_paragraph(frng, int(frng.integers(lo, hi + 1))) for _ in range(n_par)]
            if d == 0:
                paras[0] += f" {frng.choice(_ACCENTED)} {frng.choice(_CJK)} {frng.choice(_EMOJI)}"
            docs.append("\n".join(paras).encode("utf-8"))
        if faults and f == 0:
            at = len(docs) // 2
            head, tail = _paragraph(frng, 12).encode(), _paragraph(frng, 12).encode()
            docs.insert(at, head + b" \xff\xfe " + tail + b"\n" + _paragraph(frng, 20).encode())
            fault_map[f"{name}#{at}"] = "invalid_utf8"
        out.bytes(name, b"\n\n".join(docs) + b"\n")

    rejected = len(fault_map)
    accepted = files * docs_per_file
    return CorpusSpec(
        source=str(source),
        kind="text",
        files=out.sorted_files(),
        faults=fault_map,
        expected={
            "items": accepted + rejected,
            "documents": accepted + rejected,
            "accepted": accepted,
            "rejected": rejected,
            "invalid_utf8": rejected,
            "rejects_by_reason": {"invalid_utf8": rejected} if rejected else {},
            "splits": {"train": accepted},
        },
    )


# --------------------------------------------------------------------------- GLUE-format tasks

# Two word lists from the text corpus's vocabulary (a tokenizer trained on make_text_corpus holds
# them as whole tokens); a sentence's class is the list it draws more words from.
_GOOD_WORDS = "river music garden island village city".split()
_BAD_WORDS = "history system language station network theory".split()
_FILLER_WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
GLUE_TASKS = ("SST-2", "MRPC", "CoLA")


def _opinion(rng: np.random.Generator, good: bool) -> str:
    """Filler words with 2-3 words of one list and fewer of the other, in random places."""
    major = int(rng.integers(2, 4))
    minor = int(rng.integers(0, major))
    words = [str(w) for w in rng.choice(_FILLER_WORDS, size=int(rng.integers(4, 10)))]
    words += [str(w) for w in rng.choice(_GOOD_WORDS if good else _BAD_WORDS, size=major)]
    words += [str(w) for w in rng.choice(_BAD_WORDS if good else _GOOD_WORDS, size=minor)]
    return " ".join(words[i] for i in rng.permutation(len(words)))


def make_glue_task(root: str | os.PathLike, task: str = "SST-2", *, train: int = 200, dev: int = 40,
                   seed: int = 0, rule: str = "lists") -> CorpusSpec:
    """Write `root/TASK/train.tsv` and `dev.tsv` in the GLUE layout of `task`, with a learnable rule.

    SST-2 (`sentence<TAB>label`) and CoLA (headerless `source, label, *-or-empty, sentence`): label 1
    when the sentence draws more words from one word list than from another. MRPC (byte-order mark,
    `Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String`): Quality 1 when both sentences lean
    to the same list. Labels are drawn 50/50; `expected` holds rows and label counts per split.
    `rule="topic"` (SST-2 only): label 1 for a sentence about machines, 0 for nature (see
    `_TOPIC_WORDS`), with the train split's topic words disjoint from the dev split's.
    """
    if rule not in ("lists", "topic"):
        raise ValueError(f"rule {rule!r}: expected 'lists' or 'topic'")
    if rule == "topic" and task != "SST-2":
        raise ValueError("rule 'topic' writes SST-2 files only")
    if task not in GLUE_TASKS:
        raise ValueError(f"task {task!r}: expected one of {GLUE_TASKS}")
    source = Path(root).absolute() / task
    out = _Writer(source)
    expected: dict = {"splits": {}, "labels": {}}
    for split, rows in (("train", train), ("dev", dev)):
        rng = _rng(seed, "glue", task, split)
        lines, counts = [], {"0": 0, "1": 0}
        for n in range(rows):
            label = int(rng.random() < 0.5)
            counts[str(label)] += 1
            if task == "MRPC":
                first = bool(rng.random() < 0.5)
                second = first if label else not first
                ids = f"{1000 + 2 * n}\t{1001 + 2 * n}"
                lines.append(f"{label}\t{ids}\t{_opinion(rng, first)}\t{_opinion(rng, second)}")
            elif rule == "topic":
                topic = "machines" if label else "nature"
                lines.append(f"{_topic_sentence(rng, topic, 'seen' if split == 'train' else 'unseen')}\t{label}")
            elif task == "CoLA":
                lines.append(f"syn{n % 7:02d}\t{label}\t{'' if label else '*'}\t{_opinion(rng, bool(label))}")
            else:
                lines.append(f"{_opinion(rng, bool(label))}\t{label}")
        header = {"SST-2": "sentence\tlabel\n", "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n",
                  "CoLA": ""}[task]
        out.text(f"{split}.tsv", header + "".join(line + "\n" for line in lines))
        expected["splits"][split] = rows
        expected["labels"][split] = counts
    return CorpusSpec(source=str(source), kind="glue", files=out.sorted_files(), expected=expected)
