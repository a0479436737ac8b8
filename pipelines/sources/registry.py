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


def _librilight(inputs: list[Location], *, split: str = "train", max_seconds: float = 30.0, mask_prob: float = 0.65,
                mask_length: int = 10) -> Source:
    from pipelines.sources.librilight import LibriLightSource

    (root,) = inputs
    return LibriLightSource(root, split, max_seconds, mask_prob, mask_length)


def _imagenet(inputs: list[Location], *, splits: tuple[str, ...] = ("train", "val"), resize_shorter: int | None = None,
              mask_kind: str = "block", image_size: int = 224, patch_size: int = 16) -> Source:
    from pipelines.sources.imagenet import ImageNetSource

    (root,) = inputs
    return ImageNetSource(root, tuple(splits), resize_shorter=resize_shorter, mask_kind=mask_kind,
                          image_size=image_size, patch_size=patch_size)


def _text(inputs: list[Location], **options) -> Source:
    from pipelines.sources.text import TextSource

    return TextSource.create(tuple(inputs), **options)


def _fairseq_manifest(inputs: list[Location], *, splits: tuple[str, ...] = (), mask_prob: float = 0.65,
                      mask_length: int = 10) -> Source:
    from pipelines.sources.fairseq import FairseqManifestSource

    (root,) = inputs
    return FairseqManifestSource(root, mask_prob, mask_length, splits=tuple(splits))


def _manifest(inputs: list[Location], *, modality: str, columns, mask_prob: float = 0.65, mask_length: int = 10,
              **options) -> Source:
    """A table file: its folder is the source's location (relative paths start there)."""
    from pipelines.sources.manifest import ImageTableSource, SpeechTableSource, TextTableSource

    (table,) = inputs
    if modality == "text":
        return TextTableSource.from_table(table, columns, mask_prob=mask_prob, **options)
    url = table.url.rstrip("/")
    folder, name = Location(url.rsplit("/", 1)[0] if "/" in url else ".", table.storage_options), url.rsplit("/", 1)[-1]
    if modality == "speech":
        return SpeechTableSource(folder, mask_prob, mask_length, table=name, columns=columns)
    if modality == "vision":
        return ImageTableSource(folder, table=name, columns=columns, **options)
    raise ValueError(f"--modality {modality}: manifest tables hold speech, vision or text items")


SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (
    SourceKind("librispeech", "speech", _librispeech),
    SourceKind("librilight", "speech", _librilight),
    SourceKind("fairseq-manifest", "speech", _fairseq_manifest),
    SourceKind("manifest", "speech, vision or text", _manifest),
    SourceKind("imagenet", "vision", _imagenet),
    SourceKind("text", "text", _text),
)}
# the source the flow builds for each modality
BY_MODALITY: dict[str, SourceKind] = {SOURCES[name].modality: SOURCES[name] for name in ("librispeech", "imagenet", "text")}


def make_source(name: str, inputs: list[Location], **options) -> Source:
    """The source `name` over `inputs` (one corpus root, or text files) with its options."""
    return SOURCES[name].make(inputs, **options)
