"""`d2v data inspect` and `d2v data verify`: what a built dataset holds, and whether it is intact."""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np

from pipelines.shards import META_SHA256, PlanFileError, read_parquet, read_plan_column, sha256_hex
from pipelines.storage import Location, StorageError, exists, join
from schemas import Dataset
from schemas.arrow import DATA_SUFFIX, JSON_SUFFIX, MASK_SUFFIX, payload_crc32
from schemas.dataset import AMOUNT_FIELD, DATASET_JSON, PLAN_COLUMN


def read_dataset(location: Location) -> tuple[Dataset, object, str]:
    """(dataset, filesystem, root); a clear error where there is no complete dataset."""
    try:
        fs, root = location.filesystem()
        path = join(root, DATASET_JSON)
        if not exists(fs, path):
            raise StorageError(
                f"no dataset.json at {location.public_url()}: not a d2v dataset, or its build has not finished"
            )
        text = fs.cat_file(path)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read {location.public_url()}: {exc}") from exc
    return Dataset.from_json(text, join(location.public_url(), DATASET_JSON)), fs, root


def summary(dataset: Dataset, url: str) -> dict:
    """The facts `inspect --json` prints: counts that add up, per-split sizes, the build's knobs."""
    splits = {}
    for name, split in dataset.splits.items():
        entry = {"samples": split.samples, "shards": split.shards, "bytes": split.bytes}
        amount = AMOUNT_FIELD.get(dataset.modality)
        if amount:
            entry[amount] = getattr(split, amount)
        splits[name] = entry
    return {
        "url": url,
        "schema_version": dataset.schema_version,
        "modality": dataset.modality,
        "source": dataset.source,
        "fingerprint": dataset.fingerprint,
        "source_items": dataset.source_items,
        "samples": dataset.samples,
        "rejected": dataset.rejected,
        "rejects_by_reason": dataset.rejects_by_reason,
        "counts": dataset.counts,
        "splits": splits,
        "mask": dataset.mask.model_dump(mode="json"),
        "build": dataset.build,
    }


def format_summary(info: dict) -> str:
    lines = [
        f"{info['url']}: {info['modality']} dataset (schema v{info['schema_version']}) from {info['source']}",
        f"  source items {info['source_items']} = samples {info['samples']} + rejected {info['rejected']}",
    ]
    for reason, count in info["rejects_by_reason"].items():
        lines.append(f"    rejected {reason}: {count}")
    for name, count in info["counts"].items():
        lines.append(f"  {name}: {count}")
    lines.append(f"  {'split':<20} {'samples':>9} {'shards':>7} {'MB':>10}  extra")
    for name, split in info["splits"].items():
        extra = ""
        if "seconds" in split:
            extra = f"{split['seconds'] / 3600:.3f} h audio"
        if "tokens" in split:
            extra = f"{split['tokens']} tokens"
        lines.append(f"  {name:<20} {split['samples']:>9} {split['shards']:>7} {split['bytes'] / 1e6:>10.2f}  {extra}")
    mask = info["mask"]
    lines.append(f"  masks: {mask['kind']} x{mask['variants']} {mask['params']}")
    return "\n".join(lines)


@dataclass
class VerifyReport:
    shards: int
    samples: int
    broken: list[tuple[str, str]]  # (shard, problem)

    @property
    def ok(self) -> bool:
        return not self.broken


def verify(location: Location, *, stop_at_first: bool = False) -> VerifyReport:
    """Re-read every shard: checksum, size, and every index row against the tar's members; every
    broken shard is reported (`stop_at_first`: the first only)."""
    dataset, fs, root = read_dataset(location)
    broken: list[tuple[str, str]] = []
    samples = 0
    planned_by: dict[str, np.ndarray] = {}  # each intact index's plan column, for the plan files' check
    for shard in dataset.shards:
        try:
            problem = _check_shard(fs, root, dataset, shard, planned_by)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged shard makes a reader raise
            problem = f"cannot be checked: {type(exc).__name__}: {exc}"
        if problem:
            broken.append((shard.name, " ".join(problem.split())))  # one line per shard
            if stop_at_first:
                break
        else:
            samples += shard.samples
    broken_shards = {name for name, _ in broken}
    for split, summary in dataset.splits.items():
        if summary.plan is not None and not (stop_at_first and broken):
            # against the split's index files only where they are all intact (a broken one is reported)
            intact = not any(s.name in broken_shards for s in dataset.shards_of(split))
            try:
                problem = _check_plan(fs, root, dataset, split, planned_by if intact else None)
            except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes a reader raise
                problem = f"cannot be checked: {type(exc).__name__}: {exc}"
            if problem:
                broken.append((summary.plan, " ".join(problem.split())))
    return VerifyReport(len(dataset.shards), samples, broken)


def _check_plan(fs, root: str, dataset: Dataset, split: str, planned_by: dict | None) -> str | None:
    """A split's plan file against dataset.json and, given `planned_by` (the plan column of each
    intact index, as the shard checks read it), against the split's index files."""
    summary, name = dataset.splits[split], PLAN_COLUMN[dataset.modality]
    try:
        planned = read_plan_column(fs, root, summary, name).to_numpy()
    except FileNotFoundError:
        return "plan file is missing"
    except PlanFileError as exc:
        return str(exc)
    if planned_by is None:
        return None
    shards = dataset.shards_of(split)
    if any(s.name not in planned_by for s in shards):  # an index without the column
        return f"the split's index files have no {name} column"
    recorded = np.concatenate([planned_by[s.name] for s in shards] or [np.zeros(0)])
    if len(planned) != len(recorded) or (planned != recorded).any():
        return f"its {name} column differs from the split's index files"
    return None


def _check_shard(fs, root: str, dataset: Dataset, shard, planned_by: dict[str, np.ndarray]) -> str | None:
    """`shard`'s problem, or None; an intact shard's plan column goes into `planned_by`."""
    try:
        data = fs.cat_file(join(root, shard.name))
    except FileNotFoundError:
        return "tar is missing"
    except Exception as exc:  # noqa: BLE001
        return f"tar cannot be read: {exc}"
    if len(data) != shard.bytes:
        return f"size {len(data)} != {shard.bytes} recorded in dataset.json"
    if sha256_hex(data) != shard.sha256:
        return "sha256 differs from dataset.json"
    try:
        table = read_parquet(fs, join(root, shard.index))
    except FileNotFoundError:
        return "index is missing"
    except Exception as exc:  # noqa: BLE001
        return f"index cannot be read: {exc}"
    footer = table.schema.metadata or {}
    if footer.get(META_SHA256, b"").decode() != shard.sha256:
        return "index footer names another tar (sha256 differs)"
    if table.num_rows != shard.samples:
        return f"index has {table.num_rows} rows, dataset.json says {shard.samples} samples"
    try:
        members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()}
    except tarfile.TarError as exc:
        return f"not a readable tar: {exc}"
    suffixes = {"data": DATA_SUFFIX[dataset.modality], "json": JSON_SUFFIX, "mask": MASK_SUFFIX}
    expected_members = 0
    for row in table.to_pylist():
        key = row["key"]
        for column, suffix in suffixes.items():
            name = f"{key}.{suffix}"
            member = members.get(name)
            if member is None:
                return f"index names {name}, which the tar does not hold"
            if member.offset_data != row[f"{column}_offset"] or member.size != row[f"{column}_bytes"]:
                return f"index offsets of {name} do not match the tar"
            expected_members += 1
        first = members[f"{key}.{suffixes['data']}"]
        if first.offset != row["sample_offset"]:
            return f"sample offset of {key} does not match the tar"
        payload = {column: data[row[f"{column}_offset"]: row[f"{column}_offset"] + row[f"{column}_bytes"]]
                   for column in suffixes}
        if row.get("payload_crc32") is not None and payload_crc32(*payload.values()) != row["payload_crc32"]:
            return f"payload checksum of {key} differs from the index"
        mask_bytes = payload["mask"]
        try:
            mask = np.load(io.BytesIO(mask_bytes), allow_pickle=False)
        except ValueError as exc:
            return f"mask of {key} is not a valid .npy: {exc}"
        if mask.dtype != np.bool_ or mask.shape != (dataset.mask.variants, row["mask_length"]):
            return f"mask of {key} has shape {mask.shape} {mask.dtype}, expected ({dataset.mask.variants}, {row['mask_length']}) bool"
    if expected_members != len(members):
        return f"tar holds {len(members) - expected_members} member(s) the index does not name"
    if PLAN_COLUMN[dataset.modality] in table.column_names:
        planned_by[shard.name] = table.column(PLAN_COLUMN[dataset.modality]).to_numpy()
    return None
