"""Distributed checkpoints (torch.distributed.checkpoint) at any fsspec URL.

Each checkpoint is a folder `step-NNNNNNNN/`; DCP writes its `.metadata` last, so a folder
counts only when that file exists. Resume picks the newest complete one; after a save, rank 0
keeps the newest `keep` and removes the rest.
"""
from __future__ import annotations

import pickle
import re

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from pipelines.storage import Location, abort_orphaned_uploads

_STEP = re.compile(r"step-(\d{8})$")  # the folders step_folder names
_ANY_STEP = re.compile(r"step-(\d+)/?$")  # also a folder a user names by hand (step-5)


def step_folder(url: str, step: int) -> str:
    return f"{url.rstrip('/')}/step-{step:08d}"


def step_of(folder: str) -> int | None:
    """The step a checkpoint folder's name records, or None."""
    match = _ANY_STEP.search(folder)
    return int(match.group(1)) if match else None


def _step_folders(url: str) -> dict[int, bool]:
    """step -> complete, for the step folders under `url`."""
    fs, root = Location(url).filesystem()
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return {}
    folders = {}
    for path in fs.ls(root, detail=False):
        match = _STEP.search(path.rstrip("/"))
        if match:
            folders[int(match.group(1))] = fs.exists(f"{path.rstrip('/')}/.metadata")
    return folders


def complete_steps(url: str) -> list[int]:
    """Steps of the complete checkpoints under `url`, oldest first."""
    return sorted(step for step, complete in _step_folders(url).items() if complete)


def remove_incomplete(url: str) -> list[int]:
    """Delete the folders of saves that never finished (a run killed while saving), and abort the
    multipart uploads such a save left on S3; call it only while nothing is saving. Returns their steps."""
    fs, root = Location(url).filesystem()
    steps = sorted(step for step, complete in _step_folders(url).items() if not complete)
    for step in steps:
        fs.rm(step_folder(root, step), recursive=True)
    abort_orphaned_uploads(fs, root)
    return steps


def resolve(url: str) -> str | None:
    """A checkpoint folder itself, or the newest complete checkpoint under a run's folder."""
    fs, root = Location(url).filesystem()
    if fs.exists(f"{root.rstrip('/')}/.metadata"):
        return url
    steps = complete_steps(url)
    return step_folder(url, steps[-1]) if steps else None


CONFIG_FILE = "train_config.json"


def save(state: dict, url: str, step: int, keep: int, *, config_json: str | None = None) -> str:
    """`config_json`: the run's configuration, stored beside the tensors (rank 0) so a checkpoint
    alone is enough to rebuild its model (d2v export-hf, d2v encode)."""
    folder = _start(url, step, config_json)
    dcp.save(state, storage_writer=FsspecWriter(folder))
    if _main():
        _prune(url, keep)
    if dist.is_initialized():
        dist.barrier()
    return folder


class PendingSave:
    """An async save in flight. `wait()` returns once its `.metadata` is written (so the checkpoint
    is complete on every rank: DCP writes it after gathering all ranks' results), then prunes."""

    def __init__(self, future, url: str, keep: int, folder: str) -> None:
        self.future, self.url, self.keep, self.folder = future, url, keep, folder

    def wait(self) -> str:
        self.future.result()
        if _main():
            _prune(self.url, self.keep)
        return self.folder


def save_async(state: dict, url: str, step: int, keep: int, *, config_json: str | None = None,
               process_group: dist.ProcessGroup | None = None) -> PendingSave:
    """Like `save`, but returns after copying `state` (FsspecWriter stages a CPU copy), writing it in
    a background thread: training may change the tensors at once. The thread runs DCP's planning
    collectives, so give it a `process_group` of its own (gloo): sharing the training group would
    interleave them with FSDP's. Call `wait()` on the result before the next save and before exit."""
    folder = _start(url, step, config_json)
    future = dcp.async_save(state, storage_writer=FsspecWriter(folder), process_group=process_group)
    return PendingSave(future, url, keep, folder)


def _main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _start(url: str, step: int, config_json: str | None) -> str:
    folder = step_folder(url, step)
    if config_json is not None and _main():
        fs, root = Location(folder).filesystem()
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{CONFIG_FILE}", config_json.encode())
    return folder


class UnsafeCheckpointError(ValueError):
    """A checkpoint's `.metadata` names something other than DCP's own metadata types."""


# What DCP's `.metadata` pickle may name: its metadata dataclasses, the storage index, tensor
# sizes, dtypes and layouts. Anything else (os.system, builtins.eval, ...) is refused unread.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"{self.where}: refusing to load {module}.{name} (not checkpoint metadata); "
                                    "the file was not written by torch.distributed.checkpoint")


def read_metadata(file, where: str) -> Metadata:
    """A `.metadata` file's content, unpickled through the allow-list."""
    try:
        metadata = _MetadataUnpickler(file, where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise UnsafeCheckpointError(f"{where}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{where}: not DCP checkpoint metadata ({type(metadata).__name__})")
    return metadata


class SafeReader(FsspecReader):
    """DCP's fsspec reader, with `.metadata` unpickled through an allow-list: loading a shared or
    downloaded checkpoint runs no code. (Tensor payloads are read with `weights_only=True` by DCP.)"""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_metadata(f, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load(state: dict, folder: str) -> None:
    """Fills `state` in place (tensors and DTensors reshard to this world size). The metadata is
    checked first, so that a refused file is one error here rather than DCP's per-rank fallbacks."""
    fs, root = Location(folder).filesystem()
    path = f"{root.rstrip('/')}/.metadata"
    with fs.open(path, "rb") as f:
        read_metadata(f, path)
    dcp.load(state, storage_reader=SafeReader(folder))


def _prune(url: str, keep: int) -> None:
    fs, root = Location(url).filesystem()
    for step in complete_steps(url)[:-keep]:
        fs.rm(step_folder(root, step), recursive=True)
