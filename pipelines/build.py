"""The shard builder: scan -> plan -> build shards (one Dask task each) -> commit dataset.json.

Re-running an interrupted build with the same arguments skips every shard that was published
completely (its index names the same fingerprint and the tar has the recorded size) and ends
with exactly the shards of a clean build. dataset.json is written last and is the only entry
point, so a reader never sees a partial dataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import masking
from pipelines.cluster import Runner, progress, runner
from pipelines.plan import ShardPlan, ShardSize, plan_shards, shard_seed
from pipelines.shards import (
    META_FINGERPRINT,
    META_REJECTS,
    META_SHA256,
    META_SUMMARY,
    META_TAR_BYTES,
    TarShardWriter,
    index_bytes,
    index_row,
    json_bytes,
    npy_bytes,
    plan_column_bytes,
    read_index_column,
    read_index_footer,
    sha256_hex,
)
from pipelines.sources.base import Encoded, Reject, Source
from pipelines.storage import (
    Location,
    abort_orphaned_uploads,
    check_writable,
    exists,
    is_local,
    join,
    size_or_none,
    write_atomic,
)
from schemas import SCHEMA_VERSION, Dataset, MaskConfig, ShardInfo, SplitSummary, index_schema, rejects_schema
from schemas.arrow import JSON_SUFFIX, MASK_SUFFIX
from schemas.dataset import AMOUNT_FIELD, DATASET_JSON, PLAN_COLUMN

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "256MB"


class EmptyCorpusError(ValueError):
    """The corpus has no usable item: nothing is committed."""


@dataclass(frozen=True)
class BuildOptions:
    shard_size: ShardSize = field(default_factory=lambda: ShardSize.parse(DEFAULT_SHARD_SIZE))
    mask_variants: int = 4
    seed: int = 0
    overwrite: bool = False  # replace a dataset of other inputs or parameters at the output (its shards too)

    def __post_init__(self) -> None:
        if self.mask_variants < 1:
            raise ValueError("--mask-variants must be at least 1")


@dataclass
class ShardResult:
    split: str
    number: int
    tar_path: str
    index_path: str
    samples: int
    bytes: int
    sha256: str
    seconds: float
    tokens: int
    rejects: list[dict]
    counts: dict[str, int]
    skipped: bool = False

    def summary(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds, "tokens": self.tokens, "counts": self.counts}


@dataclass(frozen=True)
class _Job:
    """What every shard task of a build shares (picklable; sent to each worker once)."""

    source: Source
    out: Location
    variants: int
    seed: int
    mask_kind: str
    mask_params: dict


def build_shard(plan: ShardPlan, job: _Job) -> ShardResult:
    """Build and publish one shard, or return the finished one left by an earlier run."""
    fs, root = job.out.filesystem()
    tar_path, idx_path = join(root, plan.tar_path), join(root, plan.index_path)
    finished = _finished_shard(fs, tar_path, idx_path, plan)
    if finished is not None:
        return finished

    src_fs, src_root = job.source.location.filesystem()
    accepted: list[Encoded] = []
    rejects: list[dict] = []
    for row in plan.rows:
        outcome = job.source.encode(src_fs, src_root, row)
        if isinstance(outcome, Reject):
            rejects.append(outcome.to_row())
        else:
            accepted.append(outcome)

    masks = masking.mask_variants(
        job.mask_kind, [s.mask_length for s in accepted], job.variants,
        shard_seed(job.seed, plan.split, plan.number), **job.mask_params,
    ) if accepted else []

    writer = TarShardWriter()
    rows = []
    counts: dict[str, int] = {}
    for sample, mask in zip(accepted, masks):
        members = [
            (job.source.data_suffix, sample.data),
            (JSON_SUFFIX, json_bytes(sample.meta)),
            (MASK_SUFFIX, npy_bytes(mask.astype(bool, copy=False))),
        ]
        offset, size, spans = writer.add(sample.key, members)
        rows.append(index_row(sample.key, offset, size, spans, job.source.data_suffix, sample.mask_length, sample.index,
                              dict(members)))
        for name, value in sample.counts.items():
            counts[name] = counts.get(name, 0) + value
    tar = writer.finish()
    result = ShardResult(
        split=plan.split, number=plan.number, tar_path=plan.tar_path, index_path=plan.index_path,
        samples=len(accepted), bytes=len(tar), sha256=sha256_hex(tar),
        seconds=round(sum(s.seconds for s in accepted), 6), tokens=sum(s.tokens for s in accepted),
        rejects=rejects, counts=counts,
    )
    footer = {
        META_SHA256: result.sha256.encode(),
        META_TAR_BYTES: str(result.bytes).encode(),
        META_FINGERPRINT: plan.fingerprint.encode(),
        META_REJECTS: json.dumps(rejects, sort_keys=True).encode(),
        META_SUMMARY: json.dumps(result.summary(), sort_keys=True).encode(),
    }
    index = index_bytes(rows, index_schema(job.source.modality), footer)
    # The tar first, its index second: an index is the shard's completion mark.
    write_atomic(fs, tar_path, tar)
    write_atomic(fs, idx_path, index)
    return result


def _finished_shard(fs, tar_path: str, idx_path: str, plan: ShardPlan) -> ShardResult | None:
    if not exists(fs, idx_path):
        return None
    try:
        footer = read_index_footer(fs, idx_path)
    except Exception:  # noqa: BLE001 - an unreadable index is rebuilt like a missing one
        return None
    if footer.get(META_FINGERPRINT, b"").decode() != plan.fingerprint:
        return None
    tar_bytes = int(footer[META_TAR_BYTES])
    if size_or_none(fs, tar_path) != tar_bytes:
        return None
    summary = json.loads(footer[META_SUMMARY])
    return ShardResult(
        split=plan.split, number=plan.number, tar_path=plan.tar_path, index_path=plan.index_path,
        samples=summary["samples"], bytes=tar_bytes, sha256=footer[META_SHA256].decode(),
        seconds=summary["seconds"], tokens=summary["tokens"], rejects=json.loads(footer[META_REJECTS]),
        counts=summary["counts"], skipped=True,
    )


def build_dataset(source: Source, out: Location, options: BuildOptions = BuildOptions(), *,
                  workers: int | None = None, scheduler: str | None = None, echo=print) -> Dataset:
    """Build every shard of `source` under `out` and commit dataset.json; returns it.

    `workers`: a local Dask cluster of that size (0: in this process); `scheduler`: an existing one.
    """
    if "memory" in (out.protocol, source.location.protocol) and (workers != 0 or scheduler):
        raise ValueError("memory:// URLs live inside one process: build them with --workers 0")
    check_writable(out)  # before a cluster starts or a file is read
    with runner(workers, scheduler) as run:
        return build_with_runner(source, out, options, run, echo=echo)


def build_with_runner(source: Source, out: Location, options: BuildOptions, run: Runner, *, echo=print,
                      timings: dict | None = None) -> Dataset:
    """The build on tasks of an open runner; the caller has checked that `out` is writable.
    `timings`, when given, receives the seconds of each phase (scan, shards, commit)."""
    timings = {} if timings is None else timings
    started = time.monotonic()
    fs, root = out.filesystem()
    echo(f"scanning {source.location.public_url()} ({source.modality}) on {run.workers} worker(s)")
    scan = source.scan(run)
    source = scan.source or source
    scanned = scan.manifest.num_rows
    echo(f"scanned {scanned + len(scan.rejects)} source items: {scanned} usable, {len(scan.rejects)} rejected")
    if scanned == 0:
        raise EmptyCorpusError(
            f"no usable {source.modality} items in {source.location.public_url()}"
            + (f" ({len(scan.rejects)} rejected: {_reason_counts([r.to_row() for r in scan.rejects])})"
               if scan.rejects else "")
            + "; nothing was written"
        )
    timings["scan"] = time.monotonic() - started
    mask_kind, mask_params = source.mask_spec()
    build = {
        "format": SCHEMA_VERSION,
        "modality": source.modality,
        **source.build_params(),
        "shard_size": options.shard_size.describe(),
        "mask_variants": options.mask_variants,
        "seed": options.seed,
        "mask_kind": mask_kind,
        "mask_params": mask_params,
    }
    params_digest = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()
    plans = plan_shards(scan.manifest, seed=options.seed, size=options.shard_size, build_fingerprint=params_digest)
    fingerprint = hashlib.sha256("\n".join([params_digest] + [p.fingerprint for p in plans]).encode()).hexdigest()
    _retire_other_build(fs, root, fingerprint, echo, overwrite=options.overwrite, where=out.public_url())
    aborted = abort_orphaned_uploads(fs, root)  # a killed build's half-uploaded shards
    if aborted:
        echo(f"aborted {len(aborted)} unfinished upload(s) a killed build left: {', '.join(aborted[:3])}"
             + (" ..." if len(aborted) > 3 else ""))

    job = _Job(source, out, options.mask_variants, options.seed, mask_kind, mask_params)
    results: list[ShardResult] = [None] * len(plans)  # type: ignore[list-item]
    build_started = time.monotonic()
    done_samples = 0
    bar = progress(run.as_completed(build_shard, plans, job=job), total=len(plans), description="shards")
    for position, result in bar:
        results[position] = result
        done_samples += result.samples
        elapsed = max(time.monotonic() - build_started, 1e-9)
        bar.set_postfix(samples_per_s=f"{done_samples / elapsed:.1f}", refresh=False)
    bar.close()
    timings["shards"] = time.monotonic() - build_started

    skipped = sum(r.skipped for r in results)
    build_rejects = [row for r in results for row in r.rejects]
    all_rejects = [r.to_row() for r in scan.rejects] + build_rejects
    # Every planned shard is named, also one whose items were all rejected (0 samples): its index
    # carries those rejects, and a resumed build finds it like any other.
    samples = sum(r.samples for r in results)

    _write_table(fs, join(root, "rejects.parquet"), pa.Table.from_pylist(all_rejects, schema=rejects_schema()))
    if samples == 0:
        raise EmptyCorpusError(
            f"every item of {source.location.public_url()} was rejected while building "
            f"({_reason_counts(all_rejects)}); see rejects.parquet; dataset.json was not written"
        )
    _write_table(fs, join(root, "manifest.parquet"), scan.manifest)
    for path, data in source.extra_files().items():
        write_atomic(fs, join(root, path), data)

    counts = dict(source.counts(scan.manifest))
    for r in results:
        for name, value in r.counts.items():
            counts[name] = counts.get(name, 0) + value
    dataset = Dataset(
        modality=source.modality,
        source=source.location.public_url(),
        build=build,
        fingerprint=fingerprint,
        mask=MaskConfig(kind=mask_kind, variants=options.mask_variants, seed=options.seed, params=mask_params),
        source_items=scanned + len(scan.rejects),
        samples=samples,
        rejected=len(all_rejects),
        rejects_by_reason=_reason_counts(all_rejects),
        counts=counts,
        splits=_with_plan_files(fs, root, results, _split_summaries(results, source.modality), source.modality),
        shards=[_shard_info(r, source.modality) for r in results],
        **source.dataset_fields(),
    )
    write_atomic(fs, join(root, DATASET_JSON), dataset.to_json().encode())
    elapsed = time.monotonic() - started
    timings["commit"] = elapsed - timings["scan"] - timings["shards"]
    echo(_summary_line(dataset, len(results), skipped, elapsed))
    return dataset


def _retire_other_build(fs, root: str, fingerprint: str, echo, *, overwrite: bool, where: str) -> None:
    """A dataset of a different build at the output is refused, or with `overwrite` removed whole
    (dataset.json first, so no reader trusts shards being replaced; then its shards and indexes)."""
    path = join(root, DATASET_JSON)
    if is_local(fs):
        _remove_stale_temp_files(fs, root)
    if not exists(fs, path):
        return
    try:
        current = json.loads(fs.cat_file(path)).get("fingerprint")
    except Exception:  # noqa: BLE001
        current = None
    if current != fingerprint:
        if not overwrite:
            raise ValueError(f"{where} holds a dataset built with other inputs or parameters; build into another "
                             "output, or pass --overwrite (the flow: overwrite_dataset) to replace it")
        echo("output holds a dataset built with other inputs or parameters: replacing it and its shards")
        fs.rm_file(path)
        for folder in ("shards", "index", "plan"):
            if fs.isdir(join(root, folder)):
                fs.rm(join(root, folder), recursive=True)


def _remove_stale_temp_files(fs, root: str) -> None:
    for folder in ("shards", "index", "plan", ""):
        base = join(root, folder) if folder else root
        if not fs.isdir(base):
            continue
        for path in fs.ls(base, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp"):
                fs.rm_file(path)


def _write_table(fs, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_atomic(fs, path, buffer.getvalue())


def _reason_counts(rejects: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rejects:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    return dict(sorted(counts.items()))


def _shard_info(r: ShardResult, modality: str) -> ShardInfo:
    amount = AMOUNT_FIELD.get(modality)
    return ShardInfo(split=r.split, name=r.tar_path, index=r.index_path, samples=r.samples, bytes=r.bytes,
                     sha256=r.sha256, **({amount: getattr(r, amount)} if amount else {}))


def _with_plan_files(fs, root: str, results: list[ShardResult], splits: dict[str, SplitSummary],
                     modality: str) -> dict[str, SplitSummary]:
    """Each split's plan file (plan/{split}.parquet: the column its epochs are planned from, read
    back from the split's index files), written before dataset.json names it."""
    out = {}
    for split, summary in splits.items():
        indexes = [(r.index_path, r.samples) for r in results if r.split == split]
        data = plan_column_bytes(read_index_column(fs, root, indexes, PLAN_COLUMN[modality]), PLAN_COLUMN[modality])
        path = f"plan/{split}.parquet"
        write_atomic(fs, join(root, path), data)
        out[split] = summary.model_copy(update={"plan": path, "plan_sha256": sha256_hex(data)})
    return out


def _split_summaries(results: list[ShardResult], modality: str) -> dict[str, SplitSummary]:
    splits: dict[str, SplitSummary] = {}
    for split in sorted({r.split for r in results}):
        mine = [r for r in results if r.split == split]
        amount = AMOUNT_FIELD.get(modality)
        total = {} if amount is None else {amount: sum(getattr(r, amount) for r in mine)}
        if amount == "seconds":
            total[amount] = round(total[amount], 3)
        splits[split] = SplitSummary(samples=sum(r.samples for r in mine), shards=len(mine),
                                     bytes=sum(r.bytes for r in mine), **total)
    return splits


# the build's summary of a split's amount field: (total, seconds elapsed) -> text
_AMOUNT_LINE = {
    "seconds": lambda total, elapsed: f", {total / 3600:.3f} audio-hours ({total / elapsed:.0f} audio-s/s)",
    "tokens": lambda total, elapsed: f", {total} tokens ({total / elapsed:.0f} tokens/s)",
}


def _summary_line(dataset: Dataset, shards: int, skipped: int, elapsed: float) -> str:
    rate = dataset.samples / max(elapsed, 1e-9)
    extra = ""
    amount = AMOUNT_FIELD.get(dataset.modality)
    if amount:
        total = sum(getattr(s, amount) or 0 for s in dataset.splits.values())
        extra = _AMOUNT_LINE[amount](total, max(elapsed, 1e-9))
    return (
        f"built {shards} shards ({skipped} already done) with {dataset.samples} samples in {elapsed:.1f}s "
        f"({rate:.1f} samples/s{extra}); {dataset.rejected} rejected of {dataset.source_items} source items"
    )
