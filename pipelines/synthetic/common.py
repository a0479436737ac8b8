"""What every generator shares: the spec it returns, seeded draws, a file writer."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
