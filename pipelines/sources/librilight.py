"""Libri-light: `SPEAKER/BOOK/FILE.flac` recordings of minutes to an hour, no transcripts, a
`FILE.json` beside each whose `voice_activity` lists the voiced [start, end] seconds.

The recordings are cut at build time into pieces of at most `max_seconds`: consecutive voiced
stretches are joined while the piece stays within the limit, and a piece ends in the silence
between two stretches (a stretch longer than the limit is cut into equal parts). Where the JSON is
missing or unreadable, the voiced stretches come from an energy detector (30 ms frames 35 dB
below the recording's loud frames, silences of at least 0.3 s; counted as `vad_from_energy`).
Pieces are keyed `SPEAKER-BOOK-FILE-SEG`. Scanning and building read a recording in blocks, so an
hour of audio never sits in memory whole; every piece is read on its own at build time.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field, replace

import numpy as np
import soundfile

from pipelines.sources.audio import (
    AUDIO_SUFFIXES,
    AudioError,
    SpeechSource,
    converted_frames,
    encoded,
    open_file,
    prepare_samples,
)
from pipelines.sources.base import Encoded, Reject, ScanResult, Source
from pipelines.storage import Location, StorageError, check_readable, find_files, join
from schemas import FrameGrid

FRAME_SECONDS = 0.03  # the energy detector's frame
SILENCE_DB = 35.0  # a frame this far below the loud frames (95th percentile) is silent
MIN_SILENCE_SECONDS = 0.3  # shorter pauses do not separate stretches
BLOCK_SECONDS = 10.0  # what is decoded at a time


@dataclass(frozen=True)
class _Recording:
    speaker: str
    book: str
    path: str  # relative to the source root
    size: int
    vad: str | None  # the JSON beside it, relative to the root


def voiced_from_json(text: bytes) -> list[tuple[float, float]]:
    """The voiced stretches (seconds) a Libri-light JSON lists; ValueError if it lists none."""
    found = json.loads(text).get("voice_activity")
    if not isinstance(found, list) or not found:
        raise ValueError("no voice_activity list")
    stretches = [(float(start), float(end)) for start, end in found]
    if any(end <= start or start < 0 for start, end in stretches):
        raise ValueError("a voice_activity entry ends before it starts")
    return sorted(stretches)


def voiced_from_energy(rms: np.ndarray, frame_seconds: float = FRAME_SECONDS) -> list[tuple[float, float]]:
    """Voiced stretches (seconds) from per-frame RMS: frames SILENCE_DB below the loud ones are
    silent; silences shorter than MIN_SILENCE_SECONDS are bridged."""
    if not rms.size:
        return []
    db = 20 * np.log10(np.maximum(rms, 1e-10))
    voiced = db > np.percentile(db, 95) - SILENCE_DB
    edges = np.flatnonzero(np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))  # [start, end) frames of voiced runs
    bridge = int(round(MIN_SILENCE_SECONDS / frame_seconds))
    merged: list[list[int]] = []
    for start, end in runs:
        if merged and start - merged[-1][1] < bridge:
            merged[-1][1] = end
        else:
            merged.append([int(start), int(end)])
    return [(start * frame_seconds, end * frame_seconds) for start, end in merged]


def pieces(stretches: list[tuple[float, float]], max_seconds: float, duration: float) -> list[tuple[float, float]]:
    """Stretches joined into pieces of at most `max_seconds`, each cut in a silence; a stretch
    longer than that is cut into equal parts. Clipped to the recording."""
    parts: list[tuple[float, float]] = []
    for start, end in stretches:
        start, end = max(0.0, start), min(duration, end)
        if end <= start:
            continue
        count = int(np.ceil((end - start) / max_seconds - 1e-9))
        step = (end - start) / count
        parts += [(start + i * step, start + (i + 1) * step) for i in range(count)]
    out: list[list[float]] = []
    for start, end in parts:
        if out and end - out[-1][0] <= max_seconds:
            out[-1][1] = end
        else:
            out.append([start, end])
    return [(start, end) for start, end in out]


@dataclass(frozen=True)
class LibriLightSource(SpeechSource, Source):
    location: Location
    split: str = "train"
    max_seconds: float = 30.0
    mask_prob: float = 0.65
    mask_length: int = 10
    frame_grid: FrameGrid = field(default_factory=FrameGrid)
    modality: str = "speech"
    scanned: tuple[tuple[str, int], ...] = ()  # what scanning counted: recordings, pieces, vad_from_energy

    def __post_init__(self) -> None:
        if not self.max_seconds > 0:
            raise ValueError(f"--max-seconds {self.max_seconds}: expected a positive length")

    def build_params(self) -> dict:
        return {"layout": "librilight", "split": self.split, "max_seconds": self.max_seconds,
                "vad": {"frame_seconds": FRAME_SECONDS, "silence_db": SILENCE_DB,
                        "min_silence_seconds": MIN_SILENCE_SECONDS},
                **self.audio_params()}

    def scan(self, runner) -> ScanResult:
        fs, root = check_readable(self.location)
        recordings = _list_recordings(fs, root)
        if not recordings:
            raise StorageError(f"{self.location.public_url()} holds no SPEAKER/BOOK/*.flac recordings")
        results = runner.map(_scan_recording, recordings, location=self.location, split=self.split,
                             max_seconds=self.max_seconds, frame_grid=self.frame_grid)
        rows = [row for found, _, _ in results for row in found]
        rejects = [reject for _, found, _ in results for reject in found]
        totals: dict[str, int] = {}
        for _, _, counts in results:
            for name, value in counts.items():
                totals[name] = totals.get(name, 0) + value
        return ScanResult(self.manifest_table(rows), rejects, replace(self, scanned=tuple(sorted(totals.items()))))

    def counts(self, manifest) -> dict[str, int]:
        return dict(self.scanned)

    def encode(self, fs, root: str, row: dict) -> Encoded | Reject:
        path = join(root, row["path"])
        frames = row["stop"] - row["start"]
        try:
            with open_file(fs, path, block_size=1 << 20) as f:
                sound = soundfile.SoundFile(f)
                sound.seek(row["start"])
                audio = sound.read(frames, dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - libsndfile reports corrupt data in many ways
            return Reject(row["id"], row["split"], row["path"], "build", "truncated_audio",
                          f"{row['path']} cannot be decoded at samples {row['start']}-{row['stop']}: {exc}")
        if len(audio) != frames:
            return Reject(row["id"], row["split"], row["path"], "build", "truncated_audio",
                          f"{row['path']} ends after {row['start'] + len(audio)} samples, its header says more")
        try:
            prepared = prepare_samples(audio, row["sample_rate"], transcoded=False)
        except AudioError as exc:
            return Reject(row["id"], row["split"], row["path"], "build", exc.reason, str(exc))
        return encoded(row, prepared, self.frame_grid)


def _list_recordings(fs, root: str) -> list[_Recording]:
    found = find_files(fs, root)
    audio: dict[str, int] = {}
    jsons: set[str] = set()
    for path, info in sorted(found.items()):
        parts = posixpath.relpath(path, root).split("/")
        if len(parts) != 3:
            continue
        if parts[2].lower().endswith(AUDIO_SUFFIXES):
            audio["/".join(parts)] = int(info.get("size") or 0)
        elif parts[2].endswith(".json"):
            jsons.add("/".join(parts))
    out = []
    for relative, size in audio.items():
        speaker, book, _ = relative.split("/")
        vad = posixpath.splitext(relative)[0] + ".json"
        out.append(_Recording(speaker, book, relative, size, vad if vad in jsons else None))
    return out


def _key(recording: _Recording, number: int) -> str:
    stem = posixpath.splitext(posixpath.basename(recording.path))[0]
    return "-".join(part.replace(".", "_").replace("-", "_") for part in (recording.speaker, recording.book, stem)) \
        + f"-{number:04d}"


def _scan_recording(recording: _Recording, location: Location, split: str, max_seconds: float,
                    frame_grid: FrameGrid) -> tuple[list[dict], list[Reject], dict]:
    """A recording's pieces as manifest rows, its rejects and counts."""
    fs, root = location.filesystem()
    reject_id = _key(recording, 0)[:-5]
    counts: dict[str, int] = {"recordings": 1}
    if recording.size == 0:
        return [], [Reject(reject_id, split, recording.path, "scan", "empty_audio", f"{recording.path} is empty")], {}
    path = join(root, recording.path)
    stretches = None
    if recording.vad is not None:
        try:
            stretches = voiced_from_json(fs.cat_file(join(root, recording.vad)))
        except Exception:  # noqa: BLE001 - a broken JSON falls back to the energy detector
            counts["broken_vad_json"] = 1
    try:
        with open_file(fs, path, block_size=1 << 20) as f:
            sound = soundfile.SoundFile(f)
            rate, channels, total = sound.samplerate, sound.channels, sound.frames
            if stretches is None:
                counts["vad_from_energy"] = 1
                stretches = voiced_from_energy(_frame_rms(sound))
    except Exception as exc:  # noqa: BLE001
        return [], [Reject(reject_id, split, recording.path, "scan", "undecodable_audio",
                           f"{recording.path} cannot be decoded: {exc}")], {}
    rows, rejects = [], []
    duration = total / rate
    for number, (start, end) in enumerate(pieces(stretches, max_seconds, duration)):
        first, last = int(round(start * rate)), min(total, int(round(end * rate)))
        base = {"id": _key(recording, number), "split": split, "path": recording.path}
        if frame_grid.frames(converted_frames(last - first, rate)) < 1:
            rejects.append(Reject(base["id"], split, recording.path, "scan", "too_short",
                                  f"{recording.path} piece {number} ({start:.2f}-{end:.2f} s) is too short for one frame"))
            continue
        rows.append({**base, "bytes": int(recording.size * (last - first) / max(total, 1)),
                     "num_samples": last - first, "sample_rate": rate, "channels": channels,
                     "speaker": recording.speaker, "chapter": recording.book, "transcript": None,
                     "start": first, "stop": last})
    counts["pieces"] = len(rows)
    return rows, rejects, counts


def _frame_rms(sound: soundfile.SoundFile) -> np.ndarray:
    """RMS of each FRAME_SECONDS frame (channels averaged), decoded BLOCK_SECONDS at a time."""
    frame = max(1, int(round(sound.samplerate * FRAME_SECONDS)))
    block = frame * max(1, int(BLOCK_SECONDS / FRAME_SECONDS))
    out = []
    sound.seek(0)
    for chunk in sound.blocks(blocksize=block, dtype="float32", always_2d=True):
        mono = chunk.mean(axis=1)
        usable = len(mono) - len(mono) % frame
        if usable:
            out.append(np.sqrt(np.mean(mono[:usable].reshape(-1, frame) ** 2, axis=1)))
        if len(mono) > usable:
            out.append(np.sqrt(np.mean(mono[usable:] ** 2, keepdims=True)))
    return np.concatenate(out) if out else np.zeros(0)
