"""ImageNet: the ILSVRC CLS-LOC layout or an ImageFolder tree.

ILSVRC: `ILSVRC/Data/CLS-LOC/train/WNID/WNID_N.JPEG`, a flat `val/` labelled by
`LOC_val_solution.csv` (first wnid of PredictionString), class index = position of the wnid in
the sorted wnids of `LOC_synset_mapping.txt`. ImageFolder: `train/WNID/*`, `val/WNID/*`, classes
from the sorted wnid folders of train; other split folders may sit beside them, and pictures
directly in a split folder are unlabelled (label -1), as STL-10's `unlabeled/` pool to pre-train
on. Every image is decoded at build time; files that are not RGB JPEGs (real ImageNet has PNGs
and CMYK JPEGs named .JPEG) are re-encoded as RGB JPEG.
"""
from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import dataclass, replace

from PIL import Image

from pipelines.sources.base import Encoded, Reject, ScanResult, Source
from pipelines.storage import Location, StorageError, check_readable, find_files, list_folders

ILSVRC_ROOT = "ILSVRC/Data/CLS-LOC"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
JPEG_QUALITY = 95
UNLABELLED = -1  # the label of a picture outside any class folder


@dataclass(frozen=True)
class ImageNetSource(Source):
    location: Location
    splits: tuple[str, ...] = ("train", "val")
    resize_shorter: int | None = None
    mask_kind: str = "block"
    image_size: int = 224
    patch_size: int = 16
    modality: str = "vision"
    classes: tuple[str, ...] = ()  # filled by scan

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}")
        if self.resize_shorter is not None and self.resize_shorter < 1:
            raise ValueError("--resize-shorter must be a positive number of pixels")
        odd = [s for s in self.splits if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s)]
        if odd or not self.splits:
            raise ValueError(f"--splits: expected split folder names such as train,val, got "
                             f"{', '.join(self.splits) or 'nothing'}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def build_params(self) -> dict:
        return {"splits": list(self.splits), "resize_shorter": self.resize_shorter, "jpeg_quality": JPEG_QUALITY,
                "image_size": self.image_size, "patch_size": self.patch_size, "classes": list(self.classes)}

    def mask_spec(self) -> tuple[str, dict]:
        if self.mask_kind == "block":
            patches = self.grid[0] * self.grid[1]
            return "block", {"grid": self.grid, "num_masking_patches": round(patches * 120 / 196), "min_num_patches": 16}
        if self.mask_kind == "inverse_block":
            return "inverse_block", {"grid": self.grid, "mask_prob": 0.8, "block_size": 3}
        raise ValueError(f"--mask-kind {self.mask_kind!r}: expected block or inverse_block")

    def dataset_fields(self) -> dict:
        return {"image_size": self.image_size, "patch_size": self.patch_size, "classes": list(self.classes)}

    # -- scan ---------------------------------------------------------------------------------
    def scan(self, runner) -> ScanResult:
        fs, root = check_readable(self.location)
        ilsvrc = posixpath.join(root, ILSVRC_ROOT)
        if fs.isdir(ilsvrc):
            unknown = [s for s in self.splits if s not in ("train", "val")]
            if unknown:
                raise ValueError(f"--splits {','.join(unknown)}: the ILSVRC layout has train and val only")
            classes = _ilsvrc_classes(fs, root)
            rows, rejects = [], []
            for split in self.splits:
                found = _ilsvrc_split(fs, root, split, classes)
                rows += found[0]
                rejects += found[1]
        elif any(fs.isdir(posixpath.join(root, split)) for split in self.splits):
            classes = _folder_classes(fs, root, self.splits)
            rows, rejects = [], []
            for split in self.splits:
                found = _class_folders(fs, root, split, split, classes)
                rows += found[0]
                rejects += found[1]
        else:
            raise StorageError(
                f"{self.location.public_url()} holds neither {ILSVRC_ROOT}/ nor ImageFolder split folders "
                f"({', '.join(self.splits)})"
            )
        rows, duplicates = _drop_duplicate_ids(rows)
        return ScanResult(self.manifest_table(rows), rejects + duplicates, replace(self, classes=tuple(classes)))

    # -- build --------------------------------------------------------------------------------
    def read_file(self, fs, root: str, path: str) -> bytes:
        """A manifest row's file (tables name files anywhere: manifest.ImageTableSource)."""
        return fs.cat_file(posixpath.join(root, path))

    def encode(self, fs, root: str, row: dict) -> Encoded | Reject:
        try:
            data = self.read_file(fs, root, row["path"])
        except Exception as exc:  # noqa: BLE001
            return _reject(row, "build", "unreadable_file", f"cannot read {row['path']}: {exc}")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # a truncated file fails here, not at open
            original_format, original_mode = image.format, image.mode
            width, height = image.size
        except Exception as exc:  # noqa: BLE001 - Pillow signals corrupt data with many exception types
            return _reject(row, "build", "undecodable_image", f"{row['path']} cannot be decoded: {exc}")
        counts: dict[str, int] = {}
        needs_resize = self.resize_shorter is not None and min(width, height) > self.resize_shorter
        if original_format != "JPEG" or original_mode != "RGB" or needs_resize:
            if original_format != "JPEG" or original_mode != "RGB":
                counts["converted"] = 1
            image = image.convert("RGB")
            if needs_resize:
                scale = self.resize_shorter / min(width, height)
                width, height = max(1, round(width * scale)), max(1, round(height * scale))
                image = image.resize((width, height), Image.Resampling.BICUBIC)
                counts["resized"] = 1
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            data = buffer.getvalue()
        meta = {"key": row["id"], "split": row["split"], "label": row["label"], "wnid": row["wnid"],
                "width": width, "height": height}
        index = {"label": row["label"], "wnid": row["wnid"], "width": width, "height": height}
        return Encoded(row["id"], data, meta, self.grid[0] * self.grid[1], index, counts=counts)


def _reject(row: dict, stage: str, reason: str, detail: str) -> Reject:
    return Reject(row["id"], row["split"], row["path"], stage, reason, detail)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _key(name: str) -> str:
    stem = posixpath.basename(name).rsplit(".", 1)[0]
    return stem.replace(".", "_")


def _ilsvrc_classes(fs, root: str) -> list[str]:
    mapping = posixpath.join(root, "LOC_synset_mapping.txt")
    if not fs.exists(mapping):
        raise StorageError(f"{mapping} is missing: it defines the class index of the ILSVRC layout")
    wnids = [line.split()[0] for line in fs.cat_file(mapping).decode("utf-8").splitlines() if line.strip()]
    return sorted(set(wnids))


def _folder_classes(fs, root: str, splits: tuple[str, ...]) -> list[str]:
    base = posixpath.join(root, "train" if "train" in splits else splits[0])
    if not fs.isdir(base):
        return []
    return list_folders(fs, base)


def _class_folders(fs, root: str, folder: str, split: str, classes: list[str]) -> tuple[list[dict], list[Reject]]:
    """Items of `root/folder/WNID/*`: rows for known classes, rejects for the rest; pictures directly
    in `root/folder` are unlabelled rows."""
    base = posixpath.join(root, folder)
    if not fs.isdir(base):
        raise StorageError(f"split folder {base} does not exist")
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    rows, rejects = [], []
    for path, info in sorted(find_files(fs, base).items()):
        relative = posixpath.relpath(path, root)
        parts = posixpath.relpath(path, base).split("/")
        if len(parts) > 2 or not _is_image(parts[-1]):
            continue
        wnid = parts[0] if len(parts) == 2 else ""
        row = {"id": _key(parts[-1]), "split": split, "path": relative, "bytes": int(info.get("size") or 0), "wnid": wnid}
        if not wnid:
            rows.append({**row, "label": UNLABELLED})
            continue
        if wnid not in label_of:
            rejects.append(_reject(row, "scan", "unknown_class", f"{relative}: class {wnid} is not among the {len(classes)} known classes"))
            continue
        rows.append({**row, "label": label_of[wnid]})
    return rows, rejects


def _ilsvrc_split(fs, root: str, split: str, classes: list[str]) -> tuple[list[dict], list[Reject]]:
    if split == "train":
        return _class_folders(fs, root, f"{ILSVRC_ROOT}/train", "train", classes)
    base = posixpath.join(root, ILSVRC_ROOT, "val")
    solution = posixpath.join(root, "LOC_val_solution.csv")
    if not fs.exists(solution):
        raise StorageError(f"{solution} is missing: it holds the labels of the flat val/ folder")
    labels: dict[str, str] = {}
    for record in csv.DictReader(io.StringIO(fs.cat_file(solution).decode("utf-8"))):
        prediction = (record.get("PredictionString") or "").split()
        if record.get("ImageId") and prediction:
            labels[record["ImageId"]] = prediction[0]
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    rows, rejects, seen = [], [], set()
    for path, info in sorted(find_files(fs, base).items()):
        name = posixpath.relpath(path, base)
        if "/" in name or not _is_image(name):
            continue
        relative = posixpath.relpath(path, root)
        image_id = name.rsplit(".", 1)[0]
        seen.add(image_id)
        row = {"id": _key(name), "split": "val", "path": relative, "bytes": int(info.get("size") or 0)}
        wnid = labels.get(image_id)
        if wnid is None:
            rejects.append(_reject({**row}, "scan", "missing_label", f"{relative} has no row in LOC_val_solution.csv"))
        elif wnid not in label_of:
            rejects.append(_reject(row, "scan", "unknown_class", f"{relative}: class {wnid} is not in LOC_synset_mapping.txt"))
        else:
            rows.append({**row, "wnid": wnid, "label": label_of[wnid]})
    for image_id in sorted(set(labels) - seen):
        rejects.append(Reject(_key(image_id), "val", f"{ILSVRC_ROOT}/val/{image_id}.JPEG", "scan", "missing_image",
                              f"LOC_val_solution.csv labels {image_id}, but val/ has no such image"))
    return rows, rejects


def _drop_duplicate_ids(rows: list[dict]) -> tuple[list[dict], list[Reject]]:
    """Keys must be unique within a dataset: keep the first path in sorted order."""
    kept, rejects, seen = [], [], {}
    for row in sorted(rows, key=lambda r: (r["id"], r["path"])):
        if row["id"] in seen:
            rejects.append(_reject(row, "scan", "duplicate_id", f"{row['path']} has the same key as {seen[row['id']]}"))
        else:
            seen[row["id"]] = row["path"]
            kept.append(row)
    return kept, rejects
