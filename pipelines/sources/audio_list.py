"""Speech named by a list: audio files given one per row (a fairseq manifest, a table), each with
an id, a split and optionally a transcript and a speaker.

A row's path is relative to the list's folder, absolute on the local disk, or any fsspec URL
(s3://...; the source's storage options apply: base.listed_file). Scanning reads every file's header in Dask tasks
(chunks of rows); building decodes and converts it (audio.py). Sources that find their rows in
other ways subclass AudioListSource and implement `list_rows`.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

from pipelines.sources.audio import AudioError, SpeechSource, converted_frames, encoded, header, prepare_audio
from pipelines.sources.base import Encoded, Reject, ScanResult, Source, listed_file
from pipelines.storage import Location, check_readable
from schemas import FrameGrid

_SCAN_CHUNK = 256  # rows whose headers one scan task reads


@dataclass(frozen=True)
class Listed:
    """A row as the list gives it, before its file is looked at."""

    id: str
    split: str
    path: str  # relative to the list's folder, absolute, or a URL
    transcript: str | None = None
    speaker: str | None = None
    frames: int | None = None  # the length the list records (fairseq's n_samples), checked against the file


@dataclass(frozen=True)
class AudioListSource(SpeechSource, Source):
    location: Location  # the folder the list's relative paths start from
    mask_prob: float = 0.65
    mask_length: int = 10
    frame_grid: FrameGrid = field(default_factory=FrameGrid)
    modality: str = "speech"

    @abstractmethod
    def list_rows(self, fs, root: str) -> tuple[list[Listed], list[Reject]]:
        """Every row of the list (and the rows that cannot even be listed, as rejects)."""

    @abstractmethod
    def list_params(self) -> dict:
        """What names the list (file, columns) in dataset.json's build parameters."""

    def build_params(self) -> dict:
        return {**self.list_params(), **self.audio_params()}

    def scan(self, runner) -> ScanResult:
        fs, root = check_readable(self.location)
        listed, rejects = self.list_rows(fs, root)
        listed, duplicates = _unique_ids(listed)
        chunks = [listed[i: i + _SCAN_CHUNK] for i in range(0, len(listed), _SCAN_CHUNK)]
        results = runner.map(_scan_rows, chunks, location=self.location, frame_grid=self.frame_grid)
        rows = [row for chunk_rows, _ in results for row in chunk_rows]
        rejects = rejects + duplicates + [r for _, chunk_rejects in results for r in chunk_rejects]
        return ScanResult(self.manifest_table(rows), rejects)

    def encode(self, fs, root: str, row: dict) -> Encoded | Reject:
        try:
            file_fs, path = listed_file(self.location, fs, root, row["path"])
            data = file_fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001
            return _reject(row, "build", "unreadable_file", f"cannot read {row['path']}: {exc}")
        try:
            audio = prepare_audio(data, row["path"], expected_frames=row["num_samples"])
        except AudioError as exc:
            return _reject(row, "build", exc.reason, str(exc))
        return encoded(row, audio, self.frame_grid)


def _reject(row: dict, stage: str, reason: str, detail: str) -> Reject:
    return Reject(row["id"], row["split"], row["path"], stage, reason, detail)


def _unique_ids(listed: list[Listed]) -> tuple[list[Listed], list[Reject]]:
    """The first row of each id; later ones are rejected (a key names one sample)."""
    seen: dict[str, Listed] = {}
    rejects = []
    for item in listed:
        if item.id in seen:
            rejects.append(Reject(item.id, item.split, item.path, "scan", "duplicate_id",
                                  f"{item.path}: id {item.id} is also {seen[item.id].path}"))
        else:
            seen[item.id] = item
    return list(seen.values()), rejects


def _scan_rows(items: list[Listed], location: Location, frame_grid: FrameGrid) -> tuple[list[dict], list[Reject]]:
    """Headers of a chunk of rows: manifest rows and rejects."""
    fs, root = location.filesystem()
    rows, rejects = [], []
    for item in items:
        base = {"id": item.id, "split": item.split, "path": item.path}
        try:
            file_fs, path = listed_file(location, fs, root, item.path)
            size = int(file_fs.size(path) or 0)
        except FileNotFoundError:
            rejects.append(_reject(base, "scan", "missing_audio", f"{item.path} does not exist"))
            continue
        except Exception as exc:  # noqa: BLE001
            rejects.append(_reject(base, "scan", "unreadable_file", f"cannot read {item.path}: {exc}"))
            continue
        if size == 0:
            rejects.append(_reject(base, "scan", "empty_audio", f"{item.path} is empty (0 bytes)"))
            continue
        try:
            info = header(file_fs, path)
        except Exception as exc:  # noqa: BLE001
            rejects.append(_reject(base, "scan", "undecodable_audio", f"{item.path} has no readable audio header: {exc}"))
            continue
        if item.frames is not None and item.frames != info.frames and info.format != "MP3":
            rejects.append(_reject(base, "scan", "length_mismatch",
                                   f"{item.path} has {info.frames} samples, the list says {item.frames}"))
            continue
        if frame_grid.frames(converted_frames(info.frames, info.samplerate)) < 1:
            rejects.append(_reject(base, "scan", "too_short", f"{item.path} has {info.frames} samples: too short for one frame"))
            continue
        rows.append({**base, "bytes": size, "num_samples": int(info.frames), "sample_rate": int(info.samplerate),
                     "channels": int(info.channels), "speaker": item.speaker, "chapter": None,
                     "transcript": item.transcript})
    return rows, rejects
