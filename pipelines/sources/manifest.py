"""Manifest tables: one row per item in a CSV, TSV, Parquet or JSON-lines file (Common Voice's
TSVs, an image folder with a labels CSV, a Parquet file of paths and transcripts, a list of text
files), read with polars.

Columns are named by the user: the file's path (relative to the table's folder, absolute, or any
fsspec URL), and optionally an id (default: the file name without its suffix), a split (default:
every row in `--default-split`), a transcript and a speaker (speech), a label (images: class names,
sorted into label indexes; a row without one is unlabelled). Text cells are read as UTF-8; a cell
that is not (shown with U+FFFD by the lossy decode) rejects its row as `bad_transcript`.
A row without a path is rejected as `bad_row`; a missing file as `missing_audio`/`unreadable_file`
(text: `missing_file`). Text tables name RoBERTa-format text files, built as `d2v data build text`
builds them (their documents are the items; the table's rejects are added to the text source's).
"""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field, replace

from pipelines.sources.audio_list import AudioListSource, Listed
from pipelines.sources.base import Reject, ScanResult, listed_file
from pipelines.sources.imagenet import UNLABELLED, ImageNetSource, _drop_duplicate_ids, _is_image, _key
from pipelines.sources.text import TextSource
from pipelines.storage import Location, check_readable, join

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".json": "jsonl"}
_LOST = "\ufffd"  # what the lossy UTF-8 decode puts where bytes were not UTF-8


@dataclass(frozen=True)
class TableColumns:
    """Which column holds what; None: the table has no such column."""

    path: str = "path"
    id: str | None = None
    split: str | None = None
    transcript: str | None = None
    speaker: str | None = None
    label: str | None = None
    default_split: str = "train"

    def named(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def read_table(fs, path: str):
    """The table as a polars DataFrame of strings (CSV/TSV) or its own types (Parquet, JSON lines)."""
    import polars as pl

    kind = TABLE_SUFFIXES.get(posixpath.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"{posixpath.basename(path)}: expected a table ending in "
                         f"{', '.join(sorted(TABLE_SUFFIXES))}")
    data = io.BytesIO(fs.cat_file(path))
    try:
        if kind in ("csv", "tsv"):
            # TSVs (Common Voice) hold quotes inside sentences: no quoting there
            return pl.read_csv(data, separator="\t" if kind == "tsv" else ",", quote_char=None if kind == "tsv" else '"',
                               infer_schema=False, encoding="utf8-lossy", truncate_ragged_lines=True)
        if kind == "parquet":
            return pl.read_parquet(data)
        return pl.read_ndjson(data)
    except Exception as exc:  # noqa: BLE001 - polars' parse errors are many
        raise ValueError(f"{posixpath.basename(path)} cannot be read as {kind}: {exc}") from None


def table_rows(fs, root: str, table: str, columns: TableColumns) -> list[tuple[int, dict]]:
    """(row number, {role: value as text or None}) for every row, the named columns checked."""
    frame = read_table(fs, join(root, table))
    roles = {role: name for role, name in columns.named().items() if role != "default_split"}
    missing = [f"--{role}-column {name}" for role, name in roles.items() if name not in frame.columns]
    if missing:
        raise ValueError(f"{table} has no column {', '.join(missing)} (its columns: {', '.join(frame.columns)})")
    out = []
    for number, row in enumerate(frame.select(list(roles.values())).iter_rows(), start=1):
        values = {role: (None if value is None else str(value)) for role, value in zip(roles, row)}
        out.append((number, values))
    return out


def _first_problem(table: str, number: int, values: dict, split: str) -> Reject | None:
    key = values.get("id") or (_stem(values["path"]) if values.get("path") else f"row-{number}")
    if not (values.get("path") or "").strip():
        return Reject(key, split, None, "scan", "bad_row", f"{table} row {number} names no file")
    for role in ("transcript", "speaker", "label", "id", "split", "path"):
        if _LOST in (values.get(role) or ""):
            return Reject(key, split, values["path"], "scan", "bad_transcript" if role == "transcript" else "bad_row",
                          f"{table} row {number}: its {role} is not UTF-8 text")
    return None


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path.rstrip("/")))[0]


@dataclass(frozen=True)
class SpeechTableSource(AudioListSource):
    table: str = ""  # file name of the table inside `location`
    columns: TableColumns = field(default_factory=TableColumns)

    def list_params(self) -> dict:
        return {"manifest": "table", "table": self.table, "columns": self.columns.named()}

    def list_rows(self, fs, root: str) -> tuple[list[Listed], list[Reject]]:
        rows, rejects = [], []
        for number, values in table_rows(fs, root, self.table, self.columns):
            split = values.get("split") or self.columns.default_split
            problem = _first_problem(self.table, number, values, split)
            if problem:
                rejects.append(problem)
                continue
            rows.append(Listed(values.get("id") or _stem(values["path"]), split, values["path"],
                               transcript=values.get("transcript") or None, speaker=values.get("speaker")))
        return rows, rejects


@dataclass(frozen=True)
class ImageTableSource(ImageNetSource):
    """Images a table names; classes are the sorted label values. The table's folder is
    `location`, its file name `table`."""

    table: str = ""
    columns: TableColumns = field(default_factory=TableColumns)
    splits: tuple[str, ...] = ()  # every split the table names

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}")

    def build_params(self) -> dict:
        return {**super().build_params(), "manifest": "table", "table": self.table, "columns": self.columns.named()}

    def scan(self, runner) -> ScanResult:
        fs, root = check_readable(self.location)
        listed, rejects = [], []
        for number, values in table_rows(fs, root, self.table, self.columns):
            split = values.get("split") or self.columns.default_split
            problem = _first_problem(self.table, number, values, split)
            if problem is None and not _is_image(values["path"]):
                problem = Reject(values.get("id") or _stem(values["path"]), split, values["path"], "scan",
                                 "not_an_image", f"{self.table} row {number}: {values['path']} is not a .jpg/.png file")
            if problem:
                rejects.append(problem)
            else:
                listed.append(values | {"split": split})
        classes = sorted({v["label"] for v in listed if v.get("label")})
        rows = [{"id": v.get("id") or _key(posixpath.basename(v["path"])), "split": v["split"], "path": v["path"],
                 "bytes": 0, "wnid": v.get("label") or "",
                 "label": classes.index(v["label"]) if v.get("label") else UNLABELLED} for v in listed]
        rows, duplicates = _drop_duplicate_ids(rows)
        found = replace(self, classes=tuple(classes), splits=tuple(sorted({r["split"] for r in rows})))
        return ScanResult(self.manifest_table(rows), rejects + duplicates, found)

    def read_file(self, fs, root: str, path: str) -> bytes:
        file_fs, file_path = listed_file(self.location, fs, root, path)
        return file_fs.cat_file(file_path)


@dataclass(frozen=True)
class TextTableSource(TextSource):
    """The text files a table names, as one text corpus; the table's bad rows and missing files
    are rejects of the build beside the documents' own."""

    table: str = ""
    table_rejects: tuple[Reject, ...] = ()

    @classmethod
    def from_table(cls, table: Location, columns: TableColumns, **options) -> TextTableSource:
        url = table.url.rstrip("/")
        folder = Location(url.rsplit("/", 1)[0], table.storage_options)
        name = url.rsplit("/", 1)[-1]
        fs, root = check_readable(folder)
        files, rejects = [], []
        for number, values in table_rows(fs, root, name, columns):
            split = values.get("split") or columns.default_split
            problem = _first_problem(name, number, values, split)
            if problem is None:
                file_fs, path = listed_file(folder, fs, root, values["path"])
                if not file_fs.isfile(path):
                    problem = Reject(_stem(values["path"]), split, values["path"], "scan", "missing_file",
                                     f"{name} row {number}: {values['path']} does not exist")
            if problem:
                rejects.append(problem)
            else:
                files.append(Location(values["path"] if "://" in values["path"] else
                                      (values["path"] if values["path"].startswith("/") else
                                       f"{folder.url.rstrip('/')}/{values['path']}"), table.storage_options))
        if not files:
            raise ValueError(f"{name} names no text file that exists ({len(rejects)} rows rejected)")
        text = TextSource.create(tuple(files), **options)
        return cls(**{f: getattr(text, f) for f in text.__dataclass_fields__}, table=name,
                   table_rejects=tuple(rejects))

    def build_params(self) -> dict:
        return {**super().build_params(), "manifest": "table", "table": self.table}

    def scan(self, runner) -> ScanResult:
        result = super().scan(runner)
        return replace(result, rejects=list(self.table_rejects) + result.rejects)
