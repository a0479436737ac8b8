"""LibriSpeech: `SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac` + `SPEAKER-CHAPTER.trans.txt`.

16 kHz mono FLAC; transcripts upper-case, one `UTT-ID TEXT` line per utterance. Durations come
from the FLAC headers at scan time; every file is fully decoded at build time, so a truncated
file is caught before it reaches a shard. 16 kHz mono FLAC bytes are stored unchanged; a file at
another rate or with more channels is converted (audio.py) and counted as resampled/downmixed.
Audio without a transcript is kept (pre-training needs no labels) with a null transcript and is
counted as `untranscribed`; a transcript line without audio is rejected as `missing_audio`.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from pipelines.sources.audio import AudioError, SpeechSource, converted_frames, encoded, header, prepare_audio
from pipelines.sources.base import Encoded, Reject, ScanResult, Source
from pipelines.storage import Location, StorageError, check_readable, find_files, list_folders
from schemas import FrameGrid

_UTT = re.compile(r"^(\d+)-(\d+)-(\d+)$")


@dataclass(frozen=True)
class _Chapter:
    subset: str
    speaker: str
    chapter: str
    flacs: tuple[tuple[str, int], ...]  # (path relative to the given root, bytes)
    transcript: str | None  # path of SPEAKER-CHAPTER.trans.txt relative to the given root


@dataclass(frozen=True)
class LibriSpeechSource(SpeechSource, Source):
    location: Location
    subsets: tuple[str, ...]
    mask_prob: float = 0.65
    mask_length: int = 10
    frame_grid: FrameGrid = field(default_factory=FrameGrid)
    modality: str = "speech"

    def build_params(self) -> dict:
        return {"subsets": list(self.subsets), **self.audio_params()}

    # -- scan ---------------------------------------------------------------------------------
    def scan(self, runner) -> ScanResult:
        fs, given_root = check_readable(self.location)
        root = _corpus_root(fs, given_root)
        available = list_folders(fs, root)
        missing = [s for s in self.subsets if s not in available]
        if missing:
            raise StorageError(
                f"subset(s) {', '.join(missing)} not found under {self.location.public_url()} "
                f"(found: {', '.join(available) or 'nothing'})"
            )
        chapters: list[_Chapter] = []
        for subset in self.subsets:
            chapters.extend(_list_chapters(fs, given_root, root, subset))
        results = runner.map(_scan_chapter, chapters, location=self.location)
        rows = [row for chapter_rows, _ in results for row in chapter_rows]
        rejects = [reject for _, chapter_rejects in results for reject in chapter_rejects]
        return ScanResult(self.manifest_table(rows), rejects)

    # -- build --------------------------------------------------------------------------------
    def encode(self, fs, root: str, row: dict) -> Encoded | Reject:
        path = posixpath.join(root, row["path"])
        try:
            data = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001
            return _reject(row, "build", "unreadable_file", f"cannot read {row['path']}: {exc}")
        try:
            audio = prepare_audio(data, row["path"], expected_frames=row["num_samples"])
        except AudioError as exc:
            return _reject(row, "build", exc.reason, str(exc))
        return encoded(row, audio, self.frame_grid)


def _corpus_root(fs, root: str) -> str:
    """Accept the folder holding the subsets, or its parent holding `LibriSpeech/`."""
    nested = posixpath.join(root, "LibriSpeech")
    if posixpath.basename(root.rstrip("/")) != "LibriSpeech" and fs.isdir(nested):
        return nested
    return root


def _list_chapters(fs, given_root: str, root: str, subset: str) -> list[_Chapter]:
    """Chapters of a subset from one recursive listing (cheap on object stores)."""
    found = find_files(fs, posixpath.join(root, subset))
    folders: dict[tuple[str, str], dict] = {}
    for path, info in sorted(found.items()):
        relative = posixpath.relpath(path, given_root)
        parts = posixpath.relpath(path, root).split("/")
        if len(parts) != 4:
            continue  # README/LICENSE files of the distribution, not utterances
        _, speaker, chapter, name = parts
        entry = folders.setdefault((speaker, chapter), {"flacs": [], "transcript": None})
        if name.endswith(".flac"):
            entry["flacs"].append((relative, int(info.get("size") or 0)))
        elif name == f"{speaker}-{chapter}.trans.txt":
            entry["transcript"] = relative
    return [
        _Chapter(subset, speaker, chapter, tuple(entry["flacs"]), entry["transcript"])
        for (speaker, chapter), entry in sorted(folders.items())
    ]


def _reject(row: dict, stage: str, reason: str, detail: str) -> Reject:
    return Reject(row["id"], row["split"], row["path"], stage, reason, detail)


def _read_transcripts(fs, root: str, chapter: _Chapter) -> tuple[dict[str, str], list[Reject]]:
    if chapter.transcript is None:
        return {}, []
    text = fs.cat_file(posixpath.join(root, chapter.transcript))
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        return {}, [Reject(f"{chapter.speaker}-{chapter.chapter}", chapter.subset, chapter.transcript, "scan",
                           "bad_transcript", f"{chapter.transcript} is not UTF-8: {exc}")]
    transcripts: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        utt, _, words = line.strip().partition(" ")
        transcripts[utt] = words.strip()
    return transcripts, []


def _scan_chapter(chapter: _Chapter, location: Location) -> tuple[list[dict], list[Reject]]:
    """Headers and transcripts of one chapter folder: manifest rows and rejects."""
    fs, root = location.filesystem()
    transcripts, rejects = _read_transcripts(fs, root, chapter)
    rows: list[dict] = []
    seen: set[str] = set()
    for relative, size in chapter.flacs:
        utt = posixpath.basename(relative)[: -len(".flac")]
        seen.add(utt)
        base = {"id": utt, "split": chapter.subset, "path": relative}
        match = _UTT.match(utt)
        if not match or match.group(1) != chapter.speaker or match.group(2) != chapter.chapter:
            rejects.append(_reject(base, "scan", "bad_name",
                                   f"{relative}: expected {chapter.speaker}-{chapter.chapter}-NNNN.flac"))
            continue
        if size == 0:
            rejects.append(_reject(base, "scan", "empty_audio", f"{relative} is empty (0 bytes)"))
            continue
        try:
            info = header(fs, posixpath.join(root, relative))
        except Exception as exc:  # noqa: BLE001
            rejects.append(_reject(base, "scan", "undecodable_audio", f"{relative} has no readable audio header: {exc}"))
            continue
        if FrameGrid().frames(converted_frames(info.frames, info.samplerate)) < 1:
            rejects.append(_reject(base, "scan", "too_short", f"{relative} has {info.frames} samples: too short for one frame"))
            continue
        rows.append({
            **base, "bytes": size, "num_samples": int(info.frames), "sample_rate": info.samplerate,
            "channels": info.channels, "speaker": chapter.speaker, "chapter": chapter.chapter,
            "transcript": transcripts.get(utt),
        })
    for utt in sorted(set(transcripts) - seen):
        rejects.append(Reject(utt, chapter.subset, chapter.transcript, "scan", "missing_audio",
                              f"{chapter.transcript} has a line for {utt} but {utt}.flac does not exist"))
    return rows, rejects
