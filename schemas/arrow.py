"""Arrow schemas of the tables the shard builder commits.

- source manifest (`manifest.parquet`): one row per usable source item, as scanned.
- shard index (`index/{split}-{NNNNNN}.parquet`): one row per sample in the tar, with the byte
  offsets and sizes of its members so a reader can plan and fetch with ranged reads.
- rejects (`rejects.parquet`): one row per source item that could not be used, with the reason.

For text, a source item is a token block of a document (a document yields one or more blocks);
a rejected document counts as one item.
"""
from __future__ import annotations

import zlib

import pyarrow as pa

MODALITIES = ("speech", "vision", "text")

# The data member of each sample, by modality (the tar member is `{key}.{suffix}`).
DATA_SUFFIX = {"speech": "flac", "vision": "jpg", "text": "tokens.npy"}
JSON_SUFFIX = "json"
MASK_SUFFIX = "mask.npy"

_MANIFEST_COMMON = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
]

_MANIFEST_EXTRA = {
    "speech": [
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("chapter", pa.string()),
        pa.field("transcript", pa.string()),
        # a piece of a longer recording (Libri-light): its samples [start, stop) at the file's own
        # rate; null for a whole file
        pa.field("start", pa.int64()),
        pa.field("stop", pa.int64()),
    ],
    "vision": [
        pa.field("wnid", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
    ],
    "text": [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("block", pa.int32(), nullable=False),
        pa.field("doc_offset", pa.int64(), nullable=False),
        pa.field("doc_bytes", pa.int64(), nullable=False),
        pa.field("token_start", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
    ],
}

# The index column that gives a sample's length in the units batches are planned in (speech:
# audio samples, text: tokens); images have none (batches of pictures have a fixed size).
LENGTH_COLUMN = {"speech": "num_samples", "text": "num_tokens"}

# Where each sample's members lie in its tar, as index columns: `{member}_offset`, `{member}_bytes`
# ("sample" is the whole sample, headers included: one ranged read).
SPAN_MEMBERS = ("sample", "data", "json", "mask")
SPAN_COLUMNS = tuple(f"{member}_{part}" for member in SPAN_MEMBERS for part in ("offset", "bytes"))

_INDEX_COMMON = [
    pa.field("key", pa.string(), nullable=False),
    *(pa.field(column, pa.int64(), nullable=False) for column in SPAN_COLUMNS),
    # Mask length T: frames (speech), patches (vision) or tokens (text).
    pa.field("mask_length", pa.int32(), nullable=False),
    # payload_crc32 of the sample's members, checked on every read (absent in indexes of older builds).
    pa.field("payload_crc32", pa.int64(), nullable=False),
]

_INDEX_EXTRA = {
    "speech": [
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("chapter", pa.string()),
        pa.field("transcript", pa.string()),
    ],
    "vision": [
        pa.field("label", pa.int32(), nullable=False),
        pa.field("wnid", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ],
    "text": [
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("block", pa.int32(), nullable=False),
    ],
}

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("path", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # "scan" or "build"
        pa.field("reason", pa.string(), nullable=False),  # a short code, counted in dataset.json
        pa.field("detail", pa.string(), nullable=False),  # a readable sentence for people
    ]
)


def payload_crc32(data: bytes, json: bytes, mask: bytes) -> int:
    """The checksum of a sample's three member payloads, in this order: cheap enough to check on
    every read (about 1 GB/s), and it catches flipped or zeroed bytes that still decode."""
    return zlib.crc32(mask, zlib.crc32(json, zlib.crc32(data)))


def _check(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def manifest_schema(modality: str) -> pa.Schema:
    _check(modality)
    return pa.schema(_MANIFEST_COMMON + _MANIFEST_EXTRA[modality])


def index_schema(modality: str) -> pa.Schema:
    _check(modality)
    return pa.schema(_INDEX_COMMON + _INDEX_EXTRA[modality])


def rejects_schema() -> pa.Schema:
    return REJECTS_SCHEMA
