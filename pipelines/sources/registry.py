"""One registry of corpus sources: the name `d2v data build NAME` takes, the modality its datasets
hold, and how a source is made from its inputs and options. The CLI and the flow make sources
through it alone; a new corpus layout is a new module in this folder and one entry here."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.sources.base import Source
from pipelines.storage import Location


@dataclass(frozen=True)
class SourceKind:
    name: str  # `d2v data build NAME`
    modality: str  # what its datasets hold
    make: Callable[..., Source]  # (inputs: list of Locations, **options) -> Source


def _librispeech(inputs: list[Location], *, subsets: tuple[str, ...], mask_prob: float = 0.65,
                 mask_length: int = 10) -> Source:
    from pipelines.sources.librispeech import LibriSpeechSource

    if not subsets:
        raise ValueError("--subsets: name at least one subset, e.g. train-clean-100")
    (root,) = inputs
    return LibriSpeechSource(root, tuple(subsets), mask_prob, mask_length)


def _imagenet(inputs: list[Location], *, splits: tuple[str, ...] = ("train", "val"), resize_shorter: int | None = None,
              mask_kind: str = "block", image_size: int = 224, patch_size: int = 16) -> Source:
    from pipelines.sources.imagenet import ImageNetSource

    (root,) = inputs
    return ImageNetSource(root, tuple(splits), resize_shorter=resize_shorter, mask_kind=mask_kind,
                          image_size=image_size, patch_size=patch_size)


def _text(inputs: list[Location], **options) -> Source:
    from pipelines.sources.text import TextSource

    return TextSource.create(tuple(inputs), **options)


SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (
    SourceKind("librispeech", "speech", _librispeech),
    SourceKind("imagenet", "vision", _imagenet),
    SourceKind("text", "text", _text),
)}
# the source the flow builds for each modality
BY_MODALITY: dict[str, SourceKind] = {kind.modality: kind for kind in SOURCES.values()}


def make_source(name: str, inputs: list[Location], **options) -> Source:
    """The source `name` over `inputs` (one corpus root, or text files) with its options."""
    return SOURCES[name].make(inputs, **options)
