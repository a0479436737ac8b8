"""fairseq manifests, in and out: `{split}.tsv` (the first line the audio root, then one
`relative/path<TAB>n_samples` line per file) and, when present, `{split}.wrd` (the words) or
`{split}.ltr` (letters separated by spaces, `|` after each word), one line per tsv row (an
empty line: the file has no transcript).

Building reads them (a sample's key is its file name without the suffix; n_samples is checked
against the file). Export writes them from a d2v dataset, its stored 16 kHz FLAC extracted beside
them, so a dataset goes to fairseq and comes back with the same rows.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace

from pipelines.shards import read_parquet
from pipelines.sources.audio_list import AudioListSource, Listed
from pipelines.sources.base import Reject, ScanResult
from pipelines.storage import Location, StorageError, check_readable, join, write_atomic

LABEL_SUFFIXES = ("wrd", "ltr")  # words first: the letters are derived from them


def letters(words: str) -> str:
    """fairseq's letter targets of a transcript: `HI THERE` -> `H I | T H E R E |`."""
    return " ".join(" ".join(word) + " |" for word in words.split())


def words(letter_line: str) -> str:
    """The transcript of a letter target line (the inverse of `letters`)."""
    return " ".join("".join(word.split()) for word in letter_line.split("|") if word.strip())


@dataclass(frozen=True)
class FairseqManifestSource(AudioListSource):
    splits: tuple[str, ...] = ()  # () = every {split}.tsv in the folder

    def list_params(self) -> dict:
        return {"manifest": "fairseq", "splits": list(self.splits)}

    def scan(self, runner) -> ScanResult:
        """The splits found (every {split}.tsv) are recorded in the build parameters."""
        source = self
        if not self.splits:
            fs, root = check_readable(self.location)
            found = sorted(posixpath.basename(p)[: -len(".tsv")] for p in fs.glob(join(root, "*.tsv")))
            if not found:
                raise StorageError(f"{self.location.public_url()} holds no {{split}}.tsv manifest")
            source = replace(self, splits=tuple(found))
        return replace(AudioListSource.scan(source, runner), source=source)

    def list_rows(self, fs, root: str) -> tuple[list[Listed], list[Reject]]:
        rows, rejects = [], []
        for split in self.splits:
            found = _read_split(fs, root, split)
            rows += found[0]
            rejects += found[1]
        return rows, rejects


def _read_split(fs, root: str, split: str) -> tuple[list[Listed], list[Reject]]:
    tsv = join(root, f"{split}.tsv")
    if not fs.exists(tsv):
        raise StorageError(f"{split}.tsv is missing under {root}")
    lines = fs.cat_file(tsv).decode("utf-8").splitlines()
    if not lines:
        raise ValueError(f"{split}.tsv is empty: its first line must name the audio root")
    audio_root, entries = lines[0].strip(), lines[1:]
    labels = _labels(fs, root, split, len(entries))
    rows, rejects = [], []
    for number, line in enumerate(entries, start=2):
        relative, _, count = line.rstrip("\n").partition("\t")
        key = posixpath.splitext(posixpath.basename(relative))[0] or f"{split}-line{number}"
        where = f"{split}.tsv line {number}"
        if not relative or not count.strip().isdigit():
            rejects.append(Reject(key, split, relative or None, "scan", "bad_row",
                                  f"{where}: expected path<TAB>n_samples, got {line!r}"))
            continue
        path = posixpath.join(audio_root, relative) if audio_root else relative
        rows.append(Listed(key, split, path, transcript=labels[number - 2] if labels else None,
                           frames=int(count)))
    return rows, rejects


def _labels(fs, root: str, split: str, rows: int) -> list[str] | None:
    """The transcripts of a split's rows from its .wrd (else .ltr) file; None without either."""
    for suffix in LABEL_SUFFIXES:
        path = join(root, f"{split}.{suffix}")
        if fs.exists(path):
            lines = fs.cat_file(path).decode("utf-8").splitlines()
            if len(lines) != rows:
                raise ValueError(f"{split}.{suffix} has {len(lines)} lines, {split}.tsv has {rows} rows: "
                                 "a label file needs one line per row")
            found = [line.strip() if suffix == "wrd" else words(line) for line in lines]
            return [text or None for text in found]  # an empty line: an untranscribed file
    return None


def export_manifest(location: Location, out: Location, *, echo=print) -> dict[str, int]:
    """`{split}.tsv` (+ .wrd and .ltr where every row has a transcript) for each split of the
    dataset at `location`, and its audio as `audio/{split}/{key}.flac` under `out`; rows per split.
    The audio root (the tsv's first line) is absolute, so the manifests work from any folder."""
    from pipelines.inspection import read_dataset

    dataset, fs, root = read_dataset(location)
    if dataset.modality != "speech":
        raise ValueError(f"{location.public_url()} holds {dataset.modality} shards: fairseq manifests list audio")
    out_fs, out_root = out.filesystem()
    audio_root = out.url.rstrip("/") + "/audio" if "://" in out.url else posixpath.abspath(join(out_root, "audio"))
    written = {}
    for split in dataset.splits:
        lines, transcripts = [audio_root], []
        for shard in dataset.shards_of(split):
            index = read_parquet(fs, join(root, shard.index),
                                 ["key", "data_offset", "data_bytes", "num_samples", "transcript"]).to_pylist()
            tar = fs.cat_file(join(root, shard.name))
            for row in index:
                relative = f"{split}/{row['key']}.flac"
                write_atomic(out_fs, join(out_root, "audio", relative),
                             tar[row["data_offset"]: row["data_offset"] + row["data_bytes"]])
                lines.append(f"{relative}\t{row['num_samples']}")
                transcripts.append(row["transcript"])
        write_atomic(out_fs, join(out_root, f"{split}.tsv"), "".join(f"{line}\n" for line in lines).encode())
        if any(t is not None for t in transcripts):  # an untranscribed row: an empty line
            write_atomic(out_fs, join(out_root, f"{split}.wrd"), "".join(f"{t or ''}\n" for t in transcripts).encode())
            write_atomic(out_fs, join(out_root, f"{split}.ltr"),
                         "".join(f"{letters(t or '')}\n" for t in transcripts).encode())
        written[split] = len(lines) - 1
        echo(f"{split}: {written[split]} rows -> {out.public_url().rstrip('/')}/{split}.tsv")
    return written
