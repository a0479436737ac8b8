"""LibriSpeech-layout corpora: noise, spoken letters, or varied voices (pitch, rate, timbre)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from pipelines.synthetic.common import SAMPLE_RATE, CorpusSpec, _rng, _Writer

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


# fault kinds that are built all the same (counted, not rejected)
ACCEPTED_FAULTS = ("untranscribed", "resampled", "downmixed")


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
    one empty, one 8 kHz and one stereo FLAC (the last two are kept, converted), a transcript line
    with no audio and a (valid) FLAC with no transcript line.
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
                    ("resampled", 8000, 1, True, True),  # converted at build time, not rejected
                    ("downmixed", SAMPLE_RATE, 2, True, True),
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

    rejects = {r: 1 for r in fault_map.values() if r not in ACCEPTED_FAULTS}
    untranscribed = sum(r == "untranscribed" for r in fault_map.values())
    converted = {r: 1 for r in fault_map.values() if r in ("resampled", "downmixed")}
    kept = sum(r in ACCEPTED_FAULTS for r in fault_map.values())
    if kept:
        splits[next(iter(subsets))] += kept
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
            "converted": converted,
            "splits": splits,
        },
    )
