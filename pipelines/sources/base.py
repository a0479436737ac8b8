"""What every corpus source supplies to the shard builder.

A source scans a corpus root into a manifest (plus rejects) and encodes one manifest row into
the members of a sample. The builder does the rest (plan, masks, tar, index, publish, commit).
Sources are plain picklable objects: Dask ships them to the workers.
"""
from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipelines.storage import Location
from schemas.arrow import DATA_SUFFIX, manifest_schema


@dataclass(frozen=True)
class Reject:
    id: str
    split: str | None
    path: str | None
    stage: str  # "scan" or "build"
    reason: str  # short code, e.g. "truncated_audio"
    detail: str  # a sentence a person can act on

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class Encoded:
    """One accepted sample, before masks: its data member, its JSON metadata and index fields."""

    key: str
    data: bytes
    meta: dict
    mask_length: int
    index: dict  # the modality's extra index columns
    seconds: float = 0.0
    tokens: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"converted": 1}


@dataclass
class ScanResult:
    manifest: pa.Table
    rejects: list[Reject]
    # The source with what scanning learned (ImageNet's classes, a trained tokenizer): the build
    # uses it from here on. None when scanning learned nothing.
    source: Source | None = None


class Source(ABC):
    modality: str
    location: Location

    @property
    def data_suffix(self) -> str:
        return DATA_SUFFIX[self.modality]

    def manifest_table(self, rows: list[dict]) -> pa.Table:
        schema = manifest_schema(self.modality)
        return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()

    @abstractmethod
    def scan(self, runner) -> ScanResult:
        """List the corpus into manifest rows and scan-time rejects."""

    @abstractmethod
    def encode(self, fs, root: str, row: dict) -> Encoded | Reject:
        """Read and validate one item; return its sample or why it cannot be used."""

    @abstractmethod
    def build_params(self) -> dict:
        """Every source option that shapes the shards' bytes (recorded in dataset.json)."""

    @abstractmethod
    def mask_spec(self) -> tuple[str, dict]:
        """(mask kind, parameters) for pipelines.masking.mask_variants."""

    def dataset_fields(self) -> dict:
        """Modality fields of dataset.json (frame grid, classes, tokenizer, ...)."""
        return {}

    def extra_files(self) -> dict[str, bytes]:
        """Files committed beside the shards (e.g. the tokenizer), path -> bytes."""
        return {}

    def counts(self, manifest: pa.Table) -> dict[str, int]:
        """Notable accepted items known at scan time (builds may add to them)."""
        return {}


def listed_file(location: Location, fs, root: str, path: str):
    """(filesystem, path) of a file a list names (a manifest, a table): a URL on its own
    filesystem (with the source's storage options), an absolute path on the local disk, anything
    else under the source's folder."""
    if "://" in path:
        return Location(path, location.storage_options).filesystem()
    if path.startswith("/"):
        return Location(path).filesystem()
    return fs, posixpath.join(root, path)
