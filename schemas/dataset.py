"""`dataset.json`: the one entry point of a built dataset. Readers trust only what it names."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

# Bump when a reader of the previous version could misread the new files.
SCHEMA_VERSION = 1
DATASET_JSON = "dataset.json"  # the file at a dataset's root that names its shards


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def inside_root(path: str) -> str:
    """A path from dataset.json names a file under the dataset root and nothing else: relative,
    '/'-separated, without '..', '.', empty parts, a scheme or a drive."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or ":" in path
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"{path!r} is not a path inside the dataset root")
    return path


def sha256_hex(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{value!r} is not a sha256 (64 lowercase hex characters)")
    return value


RelativePath = Annotated[str, AfterValidator(inside_root)]
Sha256 = Annotated[str, AfterValidator(sha256_hex)]


class FrameGrid(_Strict):
    """The speech feature encoder's frame grid: masks are stored on it, one bool per frame."""

    sample_rate: int = 16000
    kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)

    @model_validator(mode="after")
    def _same_depth(self) -> FrameGrid:
        if len(self.kernels) != len(self.strides) or not self.kernels:
            raise ValueError("frame_grid.kernels and frame_grid.strides must be non-empty and of equal length")
        return self

    @property
    def hop(self) -> int:
        """Samples per frame step (320 for wav2vec 2.0's CNN): crops at multiples of it slice masks exactly."""
        hop = 1
        for stride in self.strides:
            hop *= stride
        return hop

    def frames(self, num_samples: int) -> int:
        """Output length of the convolution stack for `num_samples` input samples (0 if too short)."""
        length = int(num_samples)
        for kernel, stride in zip(self.kernels, self.strides):
            if length < kernel:
                return 0
            length = (length - kernel) // stride + 1
        return length


class MaskConfig(_Strict):
    """How the stored `{key}.mask.npy` variants were drawn: bool (variants, T), True = masked."""

    kind: Literal["span", "block", "inverse_block", "inverse_block_1d", "token"]
    variants: int = Field(ge=1)
    seed: int
    params: dict[str, float | int | bool | tuple[int, ...]] = Field(default_factory=dict)


class TokenizerRef(_Strict):
    """The byte-level BPE tokenizer stored under `tokenizer/` of a text dataset."""

    path: RelativePath = "tokenizer"
    vocab_size: int
    sha256: Sha256  # of tokenizer.json: the ids in the shards mean something only with this file
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    mask_id: int
    block_size: int


class ShardInfo(_Strict):
    split: str
    name: RelativePath  # path of the tar relative to the dataset root
    index: RelativePath  # path of the Parquet index relative to the dataset root
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: Sha256
    seconds: float | None = None  # speech: audio seconds in the shard
    tokens: int | None = None  # text: tokens in the shard


# What a shard's and a split's amount of data is measured in beside samples, by modality: the
# ShardInfo / SplitSummary field (speech: audio seconds, text: tokens; images: samples alone).
AMOUNT_FIELD = {"speech": "seconds", "text": "tokens"}


# The index column a split's epochs are planned from, by modality: what its plan file holds
# (speech and text: lengths; images: labels, for class-balanced subsets and the batches).
PLAN_COLUMN = {"speech": "num_samples", "vision": "label", "text": "num_tokens"}


class SplitSummary(_Strict):
    samples: int
    shards: int
    bytes: int
    seconds: float | None = None
    tokens: int | None = None
    # plan/{split}.parquet: PLAN_COLUMN of every sample in shard order, so that a reader opens a
    # split of 10,000 shards with one read instead of one per index file (absent: older builds)
    plan: RelativePath | None = None
    plan_sha256: Sha256 | None = None


class Dataset(_Strict):
    schema_version: int = SCHEMA_VERSION
    modality: Literal["speech", "vision", "text"]
    source: str  # the corpus URL, credentials removed
    build: dict  # every build parameter that shapes the bytes; a rebuild with the same ones is identical
    fingerprint: str  # sha256 of `build` and the source manifest
    mask: MaskConfig
    frame_grid: FrameGrid | None = None  # speech
    image_size: int | None = None  # vision: the training crop the patch grid refers to
    patch_size: int | None = None
    classes: list[str] | None = None  # vision: wnid of each label index
    tokenizer: TokenizerRef | None = None  # text
    source_items: int
    samples: int
    rejected: int
    rejects_by_reason: dict[str, int]
    counts: dict[str, int] = Field(default_factory=dict)  # notable accepted items, e.g. untranscribed, converted
    splits: dict[str, SplitSummary]
    shards: list[ShardInfo]

    @model_validator(mode="after")
    def _counts_add_up(self) -> Dataset:
        if self.source_items != self.samples + self.rejected:
            raise ValueError(
                f"source_items ({self.source_items}) != samples ({self.samples}) + rejected ({self.rejected})"
            )
        if sum(self.rejects_by_reason.values()) != self.rejected:
            raise ValueError("rejects_by_reason does not add up to rejected")
        if sum(s.samples for s in self.shards) != self.samples:
            raise ValueError("shard sample counts do not add up to samples")
        for split, summary in self.splits.items():
            shards = [s for s in self.shards if s.split == split]
            totals = {"samples": sum(s.samples for s in shards), "shards": len(shards), "bytes": sum(s.bytes for s in shards)}
            for key, total in totals.items():
                if getattr(summary, key) != total:
                    raise ValueError(f"splits.{split}.{key} is {getattr(summary, key)}, its shards add up to {total}")
        if {s.split for s in self.shards} - set(self.splits):
            raise ValueError(f"shards of splits missing from splits: {sorted({s.split for s in self.shards} - set(self.splits))}")
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"dataset.json has schema version {self.schema_version}; this d2v reads up to {SCHEMA_VERSION}"
            )
        return self

    def shards_of(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in dataset (has: {', '.join(sorted(self.splits))})")
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "dataset.json") -> Dataset:
        """The parsed file; a bad one is a ValueError of one line naming the field (`where`: the file)."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(the document)"
            message = first["msg"].removeprefix("Value error, ")
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise ValueError(f"{where}: {field}: {message}{more}") from None
